//! Loading the certificate and key: the start errors an operator sees, and reload
//! keeping the old pair when the new one is bad.

use std::path::PathBuf;

use super::{Acceptor, TlsError};

/// A self-signed certificate for `localhost` and its key, as PEM.
fn pair() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
    let cert = params.self_signed(&key).expect("cert");
    (cert.pem(), key.serialize_pem())
}

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("agentwire-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Dir(dir)
    }
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn neither_file_means_plain_tcp() {
    assert!(Acceptor::from_settings(None, None).expect("ok").is_none());
}

#[test]
fn one_file_without_the_other_is_refused() {
    let p = PathBuf::from("/nonexistent");
    let e = Acceptor::from_settings(Some(&p), None).expect_err("half");
    assert!(
        matches!(
            e,
            TlsError::Half {
                missing: "tls_key_file"
            }
        ),
        "{e}"
    );
    let e = Acceptor::from_settings(None, Some(&p)).expect_err("half");
    assert!(
        matches!(
            e,
            TlsError::Half {
                missing: "tls_cert_file"
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_files_are_refused_with_the_setting_named() {
    let dir = Dir::new("bad");
    let (cert, key) = pair();
    let (other_cert, _) = pair();
    let cert_file = dir.file("cert.pem", &cert);
    let key_file = dir.file("key.pem", &key);
    let garbage = dir.file("garbage.pem", "not a pem file\n");
    let missing = dir.0.join("missing.pem");
    let other = dir.file("other.pem", &other_cert);

    let e = Acceptor::from_settings(Some(&missing), Some(&key_file)).expect_err("missing");
    assert!(
        e.to_string().starts_with("cannot read tls_cert_file"),
        "{e}"
    );
    let e = Acceptor::from_settings(Some(&garbage), Some(&key_file)).expect_err("garbage");
    assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    // A certificate where the key should be.
    let e = Acceptor::from_settings(Some(&cert_file), Some(&cert_file)).expect_err("no key");
    assert!(
        e.to_string().contains("tls_key_file") && e.to_string().contains("PRIVATE KEY"),
        "{e}"
    );
    // A key that is not the certificate's.
    let e = Acceptor::from_settings(Some(&other), Some(&key_file)).expect_err("mismatch");
    assert!(matches!(e, TlsError::Rejected { .. }), "{e}");
    // A broken PEM section.
    let broken = dir.file(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n",
    );
    let e = Acceptor::from_settings(Some(&broken), Some(&key_file)).expect_err("broken");
    assert!(e.to_string().contains("bad PEM"), "{e}");

    assert!(Acceptor::from_settings(Some(&cert_file), Some(&key_file))
        .expect("good pair")
        .is_some());
}

#[test]
fn a_bad_reload_keeps_the_pair_in_force() {
    let dir = Dir::new("reload");
    let (cert, key) = pair();
    let cert_file = dir.file("cert.pem", &cert);
    let key_file = dir.file("key.pem", &key);
    let mut acceptor = Acceptor::from_settings(Some(&cert_file), Some(&key_file))
        .expect("ok")
        .expect("tls");
    let before = std::sync::Arc::as_ptr(&acceptor.config);
    dir.file("cert.pem", "garbage");
    assert!(acceptor.reload().is_err());
    assert_eq!(
        std::sync::Arc::as_ptr(&acceptor.config),
        before,
        "old config kept"
    );
    assert!(acceptor.session().is_ok());
    let (cert2, key2) = pair();
    dir.file("cert.pem", &cert2);
    dir.file("key.pem", &key2);
    acceptor.reload().expect("good reload");
    assert_ne!(
        std::sync::Arc::as_ptr(&acceptor.config),
        before,
        "new config in force"
    );
}
