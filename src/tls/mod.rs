//! TLS on the gateway's one port (PROTOCOL.md section 12): with `tls_cert_file` and
//! `tls_key_file` set, every connection accepted on `listen` speaks TLS (`wss://`,
//! `https://`: the upgrade, the publish API, health, stats, metrics alike). The admin
//! listener (`admin_listen`) stays plain HTTP.
//!
//! Two parts:
//! - this file: the server side's configuration, [`Acceptor`]: reads the PEM chain and
//!   key, builds the rustls `ServerConfig` (TLS 1.2 and 1.3, ALPN `http/1.1`, the
//!   aws-lc-rs provider, which jsonwebtoken already builds) and reloads it on `SIGHUP`
//!   ([`Acceptor::reload`]): connections that finished their handshake keep the
//!   configuration they started with (each holds its own `Arc`), new handshakes use the
//!   new one; a bad new file keeps the old one.
//! - [`transport`]: the connection's socket as the reactor sees it, plain or TLS behind
//!   one small interface ([`Transport`]): `Read` for the HTTP-head and WebSocket readers,
//!   [`Transport::write_out`] for the flush of the connection's output queue.
//!
//! rustls runs inside the mio loop, with no thread or runtime of its own: the reactor
//! reads and writes, rustls only encrypts, decrypts and keeps the handshake state. The
//! handshake is bounded by the connection's existing handshake timer
//! (`handshake_timeout_ms`, from accept to the WebSocket upgrade).

pub mod transport;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::UnbufferedServerConnection;
use rustls::ServerConfig;

pub use transport::Transport;

/// Why the certificate or key could not be loaded (at start: the start fails; on
/// `SIGHUP`: the old ones stay in force and this is logged).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Only one of `tls_cert_file` and `tls_key_file` is set.
    #[error("tls_cert_file and tls_key_file go together: {missing} is not set")]
    Half { missing: &'static str },
    /// The file cannot be read.
    #[error("cannot read {setting} {path}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file holds no PEM section of the expected kind, or a broken one.
    #[error("{setting} {path}: {message}")]
    Pem {
        setting: &'static str,
        path: PathBuf,
        message: String,
    },
    /// rustls refused the pair (for example a key that does not match the certificate).
    #[error("tls_cert_file {cert} with tls_key_file {key}: {source}")]
    Rejected {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// The server side of TLS: the current `ServerConfig` and where it came from.
pub struct Acceptor {
    cert_file: PathBuf,
    key_file: PathBuf,
    config: Arc<ServerConfig>,
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// ALPN protocols offered: HTTP/1.1 only (a client offering only `h2` is refused with
/// the `no_application_protocol` alert, RFC 7301; a client offering none is served).
const ALPN: &[&[u8]] = &[b"http/1.1"];

impl Acceptor {
    /// The acceptor `tls_cert_file` / `tls_key_file` describe: `None` when neither is
    /// set.
    ///
    /// # Errors
    /// [`TlsError`]: one set without the other, an unreadable file, no certificate or
    /// no key in it, bad PEM, or a pair rustls refuses.
    pub fn from_settings(
        cert_file: Option<&Path>,
        key_file: Option<&Path>,
    ) -> Result<Option<Acceptor>, TlsError> {
        match (cert_file, key_file) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Half {
                missing: "tls_key_file",
            }),
            (None, Some(_)) => Err(TlsError::Half {
                missing: "tls_cert_file",
            }),
            (Some(cert), Some(key)) => Ok(Some(Acceptor {
                config: load(cert, key)?,
                cert_file: cert.to_owned(),
                key_file: key.to_owned(),
            })),
        }
    }

    /// Read both files again and use them for the handshakes from now on. Connections
    /// already accepted keep the configuration they started with.
    ///
    /// # Errors
    /// As [`Acceptor::from_settings`]; the configuration in force is then unchanged.
    pub fn reload(&mut self) -> Result<(), TlsError> {
        self.config = load(&self.cert_file, &self.key_file)?;
        Ok(())
    }

    /// The certificate file (for log lines).
    pub fn cert_file(&self) -> &Path {
        &self.cert_file
    }

    /// A server-side TLS state for a newly accepted connection.
    ///
    /// # Errors
    /// Only if rustls cannot create the state (no failure mode with this configuration
    /// is known; the caller drops the connection).
    pub fn session(&self) -> Result<UnbufferedServerConnection, rustls::Error> {
        UnbufferedServerConnection::new(Arc::clone(&self.config))
    }
}

/// Build the server configuration from the two PEM files.
fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |setting, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            setting,
            path: path.to_owned(),
            source,
        })
    };
    let pem_error = |setting, path: &Path, message: String| TlsError::Pem {
        setting,
        path: path.to_owned(),
        message,
    };
    let cert_pem = read("tls_cert_file", cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("tls_cert_file", cert_file, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(pem_error(
            "tls_cert_file",
            cert_file,
            "no CERTIFICATE section found".into(),
        ));
    }
    let key_pem = read("tls_key_file", key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        let message = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PRIVATE KEY section found (PKCS#8, PKCS#1 or SEC1)".to_owned()
            }
            e => format!("bad PEM: {e}"),
        };
        pem_error("tls_key_file", key_file, message)
    })?;
    let rejected = |source| TlsError::Rejected {
        cert: cert_file.to_owned(),
        key: key_file.to_owned(),
        source,
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rejected)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(rejected)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
