//! TLS for the tests: certificates made at test time ([`TestCert`], rcgen), files for
//! the gateway's `tls_cert_file` / `tls_key_file` ([`CertFiles`]), a gateway with TLS
//! on ([`tls_config`]), and blocking rustls clients with a deadline on every read:
//! [`tls_stream`], [`https_request`], [`wss_connect`].

#![allow(dead_code)] // each test module uses its own subset

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::*;

/// A self-signed certificate for `localhost` and 127.0.0.1, with its key.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCert {
    pub fn new() -> TestCert {
        let key = rcgen::KeyPair::generate().expect("generate a key");
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("certificate parameters");
        let cert = params.self_signed(&key).expect("self-sign");
        TestCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// A scratch directory holding `cert.pem` and `key.pem`; removed on drop.
pub struct CertFiles {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn new(tag: &str, cert: &TestCert) -> CertFiles {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("agentwire-it-tls-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let files = CertFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
        };
        files.write(cert);
        files
    }

    /// Replace both files (for a reload).
    pub fn write(&self, cert: &TestCert) {
        std::fs::write(&self.cert, &cert.cert_pem).expect("write cert");
        std::fs::write(&self.key, &cert.key_pem).expect("write key");
    }
}

impl Drop for CertFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// [`config`] with TLS on, from `files`.
pub fn tls_config(files: &CertFiles) -> Config {
    Config {
        tls_cert_file: Some(files.cert.clone()),
        tls_key_file: Some(files.key.clone()),
        ..config()
    }
}

/// A rustls client configuration trusting `certs`, offering ALPN `alpn`, limited to
/// `versions` (empty: TLS 1.2 and 1.3).
pub fn client_config(
    certs: &[&CertificateDer<'static>],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add((*c).clone()).expect("trust the test certificate");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions = if versions.is_empty() {
        rustls::DEFAULT_VERSIONS
    } else {
        versions
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection to `addr` as `localhost`, handshake done (`Err` describes a
/// failed handshake).
pub fn tls_stream(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> Result<TlsStream, String> {
    let tcp = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| format!("tcp connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(WAIT))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(WAIT))
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("server name");
    let conn = ClientConnection::new(Arc::clone(cfg), name).map_err(|e| e.to_string())?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| format!("TLS handshake: {e}"))?;
    }
    Ok(stream)
}

/// The end-entity certificate the server presented.
pub fn peer_cert(stream: &TlsStream) -> CertificateDer<'static> {
    stream
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned()
}

/// Send `raw` (a whole request, `Connection: close`) over a new TLS connection and
/// read the response to the end of the stream, within [`WAIT`].
pub fn https_request(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    raw: &[u8],
) -> Result<HttpResponse, String> {
    let mut stream = tls_stream(addr, cfg)?;
    stream.write_all(raw).map_err(|e| format!("write: {e}"))?;
    stream.flush().map_err(|e| format!("flush: {e}"))?;
    let mut buf = Vec::new();
    // A gateway answering with Content-Length and then closing sends close_notify:
    // the read ends cleanly.
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && !buf.is_empty() => break,
            Err(e) => return Err(format!("read: {e} after {} bytes", buf.len())),
        }
        if buf.len() > 1 << 20 {
            return Err("response over 1 MiB".into());
        }
    }
    parse_response(&buf)
}

/// A GET of `path` over TLS (`Connection: close`).
pub fn https_get(addr: SocketAddr, cfg: &Arc<ClientConfig>, path: &str) -> HttpResponse {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    https_request(addr, cfg, raw.as_bytes()).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Status, headers and body of one complete response.
fn parse_response(buf: &[u8]) -> Result<HttpResponse, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(format!(
                "incomplete response: {:?}",
                String::from_utf8_lossy(buf)
            ))
        }
        Err(e) => return Err(format!("bad response: {e}")),
    };
    Ok(HttpResponse {
        status: resp.code.unwrap_or(0),
        headers: resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: buf[head_len..].to_vec(),
    })
}

/// A WebSocket session over TLS: upgrade `path_and_query` with `headers`, read the
/// `connected` frame. `Err` describes a refused or failed handshake.
pub fn wss_connect(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<(WebSocket<TlsStream>, Value), String> {
    let stream = tls_stream(addr, cfg)?;
    let request = upgrade_request(
        &format!("wss://localhost:{}{path_and_query}", addr.port()),
        headers,
    )?;
    let (mut ws, _) = tungstenite::client::client_with_config(request, stream, None)
        .map_err(|e| format!("handshake: {e}"))?;
    let connected = next_json(&mut ws)?;
    if connected["type"] != "connected" {
        return Err(format!("expected connected, got {connected}"));
    }
    Ok((ws, connected))
}

/// The next text frame as JSON (pings are answered by tungstenite on the way).
pub fn next_json(ws: &mut WebSocket<TlsStream>) -> Result<Value, String> {
    loop {
        match ws.read().map_err(|e| format!("read: {e}"))? {
            Message::Text(t) => {
                return serde_json::from_str(t.as_str()).map_err(|e| format!("json: {e}"))
            }
            Message::Close(f) => return Err(format!("closed: {f:?}")),
            _ => {}
        }
    }
}

/// Where the pinned Python test clients live: `AGENTWIRE_TEST_PYTHON`, else the venv
/// `tools/test.sh` makes (`target/test-venv`).
pub fn test_python() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTWIRE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
}
