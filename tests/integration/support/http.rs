//! A raw HTTP client for refusals and the plain endpoints ([`http_request`],
//! [`upgrade`], [`get_json`]), including requests too large to send before the answer.

#![allow(dead_code)] // each test module uses its own subset

use super::*;

/// A plain HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Send raw request bytes on a new connection and read one response (the head of a
/// 101, or a head and its `Content-Length` body), within [`WAIT`].
pub fn http_request(addr: SocketAddr, raw: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("tcp connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    stream.write_all(raw).expect("write request");
    read_response(&mut stream)
}

/// Read one HTTP response from `stream` within [`WAIT`]. For a 101 the bytes read
/// past the head are returned as the body.
pub fn read_response(stream: &mut TcpStream) -> HttpResponse {
    read_response_from(stream, &mut Vec::new())
}

/// As [`read_response`], starting with the bytes already in `buf` and leaving the
/// bytes past this response there (keep-alive, pipelining).
pub fn read_response_from(stream: &mut TcpStream, buf: &mut Vec<u8>) -> HttpResponse {
    let deadline = Instant::now() + WAIT;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let parsed = parse_response_head(buf);
        if let Some((status, headers, head_len, len)) = &parsed {
            let end = match len {
                Some(n) if buf.len() >= head_len + n => Some(head_len + n),
                None if *status == 101 => Some(buf.len()),
                _ => None,
            };
            if let Some(end) = end {
                let body = buf.get(*head_len..end).unwrap_or(&[]).to_vec();
                buf.drain(..end);
                return HttpResponse {
                    status: *status,
                    headers: headers.clone(),
                    body,
                };
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        assert!(
            !remaining.is_zero(),
            "no complete HTTP response within {WAIT:?}; got {:?}",
            String::from_utf8_lossy(buf)
        );
        stream
            .set_read_timeout(Some(remaining))
            .expect("read timeout");
        match stream.read(&mut chunk) {
            Ok(0) => {
                // EOF: a response without Content-Length ends here.
                let (status, headers, head_len, _) = parsed.unwrap_or_else(|| {
                    panic!(
                        "connection closed before a response head: {:?}",
                        String::from_utf8_lossy(buf)
                    )
                });
                let body = buf.get(head_len..).unwrap_or(&[]).to_vec();
                buf.clear();
                return HttpResponse {
                    status,
                    headers,
                    body,
                };
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!(
                "reading the HTTP response failed ({e}); got so far: {:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

type Head = (u16, Vec<(String, String)>, usize, Option<usize>);

fn parse_response_head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).expect("response head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    assert!(
        version.starts_with("HTTP/1."),
        "status line {status_line:?}"
    );
    let status: u16 = parts.next()?.parse().expect("numeric status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().expect("numeric Content-Length"));
    Some((status, headers, end + 4, len))
}

/// `GET path` with `Connection: close`.
pub fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// `GET path`: (status, JSON body).
pub fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let r = get(addr, path);
    (r.status, r.json())
}

/// The head of a valid WebSocket upgrade of `path_and_query` with extra header lines
/// (each `Name: value`), version 13.
pub fn upgrade_head(addr: SocketAddr, path_and_query: &str, extra: &[String]) -> String {
    let mut head = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

/// Send a raw upgrade request (see [`upgrade_head`]) and read the answer.
pub fn upgrade(addr: SocketAddr, path_and_query: &str, extra: &[String]) -> HttpResponse {
    http_request(addr, upgrade_head(addr, path_and_query, extra).as_bytes())
}

/// `Authorization: Bearer <token>` as a header line.
pub fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// Check a refusal: `status`, a JSON body of exactly `{"error": code, "message": text}`.
pub fn assert_refusal(r: &HttpResponse, status: u16, code: &str) {
    assert_eq!(
        r.status,
        status,
        "expected {status} {code}, got {} with body {}",
        r.status,
        r.text()
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "refusal content type; headers {:?}",
        r.headers
    );
    let body = r.json();
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("refusal body is an object: {body}"));
    assert_eq!(body["error"], code, "refusal error code: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "refusal has a message: {body}"
    );
    assert_eq!(
        obj.len(),
        2,
        "refusal body has exactly error and message: {body}"
    );
}

// ------------------------------------------------------------ huge requests

/// Send `raw` (any size) from a writer thread while this thread reads one response,
/// so a gateway that answers before the request is complete (431) is read rather than
/// deadlocked against a full socket buffer. Write errors after the answer (the
/// gateway closed) are expected and ignored. Returns the response and how long it took
/// from the first byte written.
pub fn http_request_streamed(addr: SocketAddr, raw: Vec<u8>) -> (HttpResponse, Duration) {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("tcp connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    let mut writer = stream.try_clone().expect("clone socket");
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        for chunk in raw.chunks(64 * 1024) {
            if writer.write_all(chunk).is_err() {
                return;
            }
        }
    });
    let r = read_response(&mut stream);
    let took = started.elapsed();
    // Unblocks the writer if it is still sending.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    (r, took)
}
