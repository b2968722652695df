//! A real HTTP/1.1 server for the inbound webhook tests ([`WebhookServer`]): a std
//! `TcpListener` on `127.0.0.1:0`, one thread per accepted connection, keep-alive
//! (several requests per connection, `Content-Length` bodies). Every request is handed
//! to the test ([`WebhookServer::next_request`]) and answered as the current
//! [`Behaviour`] says: at once with a status, or held until the test releases it (or
//! never, for timeouts). Accepted connections are counted (keep-alive checks).
//! [`WebhookServer::start_tls`] serves HTTPS (rustls) with the certificate in
//! `tests/fixtures/webhook-tls/` (for 127.0.0.1 and localhost, signed by the test CA
//! `ca.pem` there, valid until 2126).

#![allow(dead_code)] // each test module uses its own subset

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;

use super::*;

/// How the server answers the next requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer at once with this status (body `{}`).
    Answer(u16),
    /// Answer only when the test calls [`WebhookServer::release`] (with its status);
    /// a request never released is never answered.
    Hold,
}

/// One request the server read.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Value,
    /// Which accepted connection it came on (1 for the first).
    pub connection: usize,
}

pub struct WebhookServer {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    behaviour: Arc<Mutex<Behaviour>>,
    requests: Receiver<Received>,
    release: Sender<u16>,
    stop: Arc<AtomicBool>,
}

impl WebhookServer {
    pub fn start(behaviour: Behaviour) -> WebhookServer {
        Self::start_with(behaviour, None)
    }

    /// The same over TLS (see the module docs).
    pub fn start_tls(behaviour: Behaviour) -> WebhookServer {
        Self::start_with(behaviour, Some(tls_config()))
    }

    fn start_with(behaviour: Behaviour, tls: Option<Arc<rustls::ServerConfig>>) -> WebhookServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the webhook server");
        let addr = listener.local_addr().expect("local addr");
        let accepts = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Mutex::new(behaviour));
        let (req_tx, requests) = crossbeam_channel::unbounded();
        let (release, release_rx) = crossbeam_channel::unbounded::<u16>();
        let stop = Arc::new(AtomicBool::new(false));
        let (a, b, s) = (accepts.clone(), behaviour.clone(), stop.clone());
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let n = a.fetch_add(1, Ordering::AcqRel) + 1;
                        let (b, tx, rel, s) =
                            (b.clone(), req_tx.clone(), release_rx.clone(), s.clone());
                        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
                        match &tls {
                            None => {
                                std::thread::spawn(move || serve(stream, n, b, tx, rel, s));
                            }
                            Some(cfg) => {
                                let conn = rustls::ServerConnection::new(cfg.clone())
                                    .expect("a TLS server connection");
                                let stream = rustls::StreamOwned::new(conn, stream);
                                std::thread::spawn(move || serve(stream, n, b, tx, rel, s));
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        WebhookServer {
            addr,
            accepts,
            behaviour,
            requests,
            release,
            stop,
        }
    }

    /// The URL for `inbound_url`.
    pub fn url(&self) -> String {
        format!("http://{}/agentwire/inbound", self.addr)
    }

    /// The `https://` URL (for a server from [`WebhookServer::start_tls`]).
    pub fn https_url(&self) -> String {
        format!("https://{}/agentwire/inbound", self.addr)
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().expect("behaviour lock") = behaviour;
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::Acquire)
    }

    /// The next request read (held or answered), within [`WAIT`].
    pub fn next_request(&self) -> Received {
        self.requests
            .recv_timeout(WAIT)
            .expect("the webhook server got a request in time")
    }

    /// A request read since the last call, if any (no wait).
    pub fn try_request(&self) -> Option<Received> {
        self.requests.try_recv().ok()
    }

    /// Answer one held request with `status`.
    pub fn release(&self, status: u16) {
        let _ = self.release.send(status);
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// A closed port: connecting to it is refused.
pub fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}/inbound")
}

/// The test CA's PEM file (trusted through `SSL_CERT_FILE` by a spawned gateway).
pub fn test_ca_file() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhook-tls/ca.pem")
}

fn tls_config() -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhook-tls");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .expect("server.pem")
        .collect::<Result<_, _>>()
        .expect("server.pem parses");
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("server.key parses");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("the test certificate and key match");
    Arc::new(cfg)
}

fn serve<S: Read + Write>(
    mut stream: S,
    connection: usize,
    behaviour: Arc<Mutex<Behaviour>>,
    requests: Sender<Received>,
    release: Receiver<u16>,
    stop: Arc<AtomicBool>,
) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // One request: the head, then Content-Length bytes.
        let (head_len, req) = loop {
            if let Some(parsed) = parse_request(&buf, connection) {
                break parsed;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                }
                Err(_) => return,
            }
        };
        buf.drain(..head_len);
        let mode = *behaviour.lock().expect("behaviour lock");
        let _ = requests.send(req);
        let status = match mode {
            Behaviour::Answer(status) => status,
            Behaviour::Hold => loop {
                match release.recv_timeout(Duration::from_millis(100)) {
                    Ok(status) => break status,
                    Err(_) if stop.load(Ordering::Acquire) => return,
                    Err(_) => {}
                }
            },
        };
        let answer = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        if stream.write_all(answer.as_bytes()).is_err() || stream.flush().is_err() {
            return;
        }
    }
}

/// A whole request at the start of `buf`: its length and what it holds.
fn parse_request(buf: &[u8], connection: usize) -> Option<(usize, Received)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).expect("request head is UTF-8");
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .map_or(0, |v| v.parse().expect("numeric content-length"));
    if buf.len() < end + len {
        return None;
    }
    let body = serde_json::from_slice(&buf[end..end + len]).expect("the request body is JSON");
    Some((
        end + len,
        Received {
            method,
            path,
            headers,
            body,
            connection,
        },
    ))
}
