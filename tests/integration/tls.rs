//! TLS on the gateway's port (PROTOCOL.md section 12, issue 13 item 1), with
//! certificates made at test time (rcgen) and real clients: rustls (Rust), curl, and
//! Python's `websockets` (the pinned test venv). Sessions and the HTTP endpoints over
//! TLS 1.3 and 1.2, ALPN, the JWT matrix over TLS, bad TLS input counted and closed
//! without harming another client, a stalled handshake dropped by
//! `handshake_timeout_ms`, the output bounds over TLS, and `SIGHUP` reloading the
//! certificate in the real binary while a client stays connected.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use tungstenite::Message;

use crate::support::tls::*;
use crate::support::{
    assert_refusal, bearer, now_s, token, token_alg, token_with, wait_until, Agent, TestGateway,
    PUBLISH_KEY, SECRET, WAIT,
};

const H1: &[&[u8]] = &[b"http/1.1"];

fn start(tag: &str) -> (TestGateway, CertFiles, TestCert) {
    let cert = TestCert::new();
    let files = CertFiles::new(tag, &cert);
    let gw = TestGateway::start(tls_config(&files), Agent::None);
    (gw, files, cert)
}

fn stats(gw: &TestGateway, cfg: &Arc<rustls::ClientConfig>) -> Value {
    https_get(gw.addr, cfg, "/ws/stats").json()
}

#[test]
fn wss_session_and_every_endpoint_over_tls_1_3_and_1_2() {
    let (gw, _files, cert) = start("basic");
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let cfg = client_config(&[&cert.der], H1, versions);
        let stream = tls_stream(gw.addr, &cfg).expect("handshake");
        assert_eq!(stream.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(
            stream.conn.protocol_version(),
            Some(versions[0].version),
            "the version asked for"
        );
        drop(stream);

        let health = https_get(gw.addr, &cfg, "/health");
        assert_eq!(health.status, 200, "{}", health.text());
        assert_eq!(health.json()["status"], "healthy");
        assert_eq!(https_get(gw.addr, &cfg, "/ws/config").status, 200);
        let metrics = https_get(gw.addr, &cfg, "/metrics").text();
        assert!(
            metrics.contains("agentwire_tls_handshakes_total"),
            "{metrics}"
        );

        // A session, fed by the publish API over TLS.
        let user = "tls-user";
        let auth = format!("Bearer {}", token(user));
        let (mut ws, connected) =
            wss_connect(gw.addr, &cfg, "/ws", &[("Authorization", &auth)]).expect("wss");
        assert_eq!(connected["user_id"], user);
        let body = json!({"type": "agent_thinking", "user_id": user, "run_id": "r1",
                          "agent_name": "a", "data": {"big": "x".repeat(40_000)}});
        let body = serde_json::to_vec(&body).expect("json");
        let mut raw = format!(
            "POST /api/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(&body);
        let answer = https_request(gw.addr, &cfg, &raw).expect("publish over TLS");
        assert_eq!(answer.status, 202, "{}", answer.text());
        let event = next_json(&mut ws).expect("event");
        assert_eq!(event["type"], "agent_thinking");
        assert_eq!(event["data"]["big"].as_str().map(str::len), Some(40_000));
        // Client messages both ways.
        ws.send(Message::text(r#"{"type":"ping"}"#))
            .expect("send ping");
        assert_eq!(next_json(&mut ws).expect("pong")["type"], "pong");
        // A client message spanning several records (and several reads).
        let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "p".repeat(60_000));
        ws.send(Message::text(big)).expect("send a 60 KB message");
        assert_eq!(next_json(&mut ws).expect("pong")["type"], "pong");
        ws.close(None).expect("close");
        loop {
            match ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed) => break,
                Err(e) => panic!("clean close over TLS expected, got {e}"),
            }
        }
    }
    let cfg = client_config(&[&cert.der], H1, &[]);
    let tls = &stats(&gw, &cfg)["tls"];
    assert!(tls["handshakes"].as_u64() >= Some(12), "{tls}");
    assert_eq!(tls["failures"], 0, "{tls}");
}

#[test]
fn alpn_other_than_http_1_1_is_refused_and_none_is_served() {
    let (gw, _files, cert) = start("alpn");
    let h2_only = client_config(&[&cert.der], &[b"h2"], &[]);
    let e = tls_stream(gw.addr, &h2_only).expect_err("h2 only refused");
    assert!(e.contains("NoApplicationProtocol"), "{e}");
    let none = client_config(&[&cert.der], &[], &[]);
    assert_eq!(https_get(gw.addr, &none, "/health").status, 200);
    let both = client_config(&[&cert.der], &[b"h2", b"http/1.1"], &[]);
    let s = tls_stream(gw.addr, &both).expect("handshake");
    assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[test]
fn jwt_matrix_over_tls() {
    let (gw, _files, cert) = start("jwt");
    let cfg = client_config(&[&cert.der], H1, &[]);
    let user = "tls-jwt";
    // Good: bearer header, query token, subprotocol.
    let good = token(user);
    wss_connect(
        gw.addr,
        &cfg,
        "/ws",
        &[("Authorization", &format!("Bearer {good}"))],
    )
    .expect("good token, header");
    wss_connect(gw.addr, &cfg, &format!("/ws?token={good}"), &[]).expect("good token, query");
    let refused = |tok: &str, what: &str| {
        let head = format!(
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n{}\r\n\r\n",
            crate::support::WS_KEY,
            bearer(tok)
        );
        let r =
            https_request(gw.addr, &cfg, head.as_bytes()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_refusal(&r, 401, "invalid_token");
    };
    refused(
        &token_alg(
            Algorithm::HS256,
            "another-secret-that-is-long-enough",
            &json!({"sub": user, "exp": now_s() + 600}),
        ),
        "bad signature",
    );
    refused(
        &token_with(&json!({"sub": user, "exp": now_s() - 3600})),
        "expired",
    );
    refused("not.a.jwt", "garbage");
    assert!(SECRET.len() >= 16);
}

#[test]
fn bad_tls_input_is_counted_and_closed_without_harming_a_session() {
    let (gw, _files, cert) = start("bad");
    let cfg = client_config(&[&cert.der], H1, &[]);
    let auth = format!("Bearer {}", token("tls-bystander"));
    let (mut ws, _) = wss_connect(gw.addr, &cfg, "/ws", &[("Authorization", &auth)]).expect("wss");
    let before = stats(&gw, &cfg)["tls"]["failures"].as_u64().unwrap_or(0);

    let inputs: [&[u8]; 3] = [
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        // A handshake record whose message is not a ClientHello.
        &[0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0x00, 0x00, 0x01, 0x00],
        // An application-data record before any handshake.
        &[0x17, 0x03, 0x03, 0x00, 0x04, 1, 2, 3, 4],
    ];
    for input in inputs {
        let mut tcp = TcpStream::connect(gw.addr).expect("connect");
        tcp.set_read_timeout(Some(WAIT)).expect("timeout");
        tcp.write_all(input).expect("write");
        let mut got = Vec::new();
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the gateway should close the connection: {e}"),
            }
            assert!(Instant::now() < deadline, "not closed");
        }
        // At most a TLS alert record (content type 21), never an HTTP answer.
        assert!(
            got.is_empty() || got[0] == 21,
            "answer to bad TLS input: {got:?}"
        );
    }
    wait_until("tls failures counted", || {
        stats(&gw, &cfg)["tls"]["failures"].as_u64().unwrap_or(0) >= before + 3
    });
    ws.send(Message::text(r#"{"type":"ping"}"#)).expect("send");
    assert_eq!(next_json(&mut ws).expect("pong")["type"], "pong");
}

#[test]
fn a_stalled_handshake_is_dropped_at_handshake_timeout_ms() {
    let cert = TestCert::new();
    let files = CertFiles::new("stall", &cert);
    let gw = TestGateway::start(
        agentwire::Config {
            handshake_timeout_ms: 300,
            ..tls_config(&files)
        },
        Agent::None,
    );
    let cfg = client_config(&[&cert.der], H1, &[]);
    // Silent after connecting, and stalled halfway through a ClientHello record.
    let silent = TcpStream::connect(gw.addr).expect("connect");
    let mut half = TcpStream::connect(gw.addr).expect("connect");
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .expect("write");
    // A finished handshake that then stalls before its HTTP request is dropped too.
    let mut done = tls_stream(gw.addr, &cfg).expect("handshake");
    for mut s in [silent, half, done.sock.try_clone().expect("clone")] {
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + WAIT;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                // The close_notify of the finished handshake, or an alert.
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("not dropped within {WAIT:?}: {e}"),
            }
            assert!(Instant::now() < deadline, "not dropped");
        }
    }
    let mut buf = [0u8; 16];
    assert!(matches!(done.read(&mut buf), Ok(0) | Err(_)));
}

#[test]
fn a_tls_client_that_does_not_read_is_closed_1013_within_max_pending_bytes() {
    let cert = TestCert::new();
    let files = CertFiles::new("slow", &cert);
    let gw = TestGateway::start(
        agentwire::Config {
            max_pending_bytes: 256 * 1024,
            socket_send_buffer_bytes: 16 * 1024,
            ..tls_config(&files)
        },
        Agent::None,
    );
    let cfg = client_config(&[&cert.der], H1, &[]);
    let user = "tls-slow";
    let auth = format!("Bearer {}", token(user));
    // Stop reading after `connected` with a small receive buffer: the kernel fills,
    // then rustls (16 KiB), then the output queue up to max_pending_bytes.
    let (mut ws, _) = wss_connect(gw.addr, &cfg, "/ws", &[("Authorization", &auth)]).expect("wss");
    socket2::SockRef::from(&ws.get_ref().sock)
        .set_recv_buffer_size(4096)
        .expect("rcvbuf");
    let mut run = gw.emitter.run(user, None, "r-slow", "a").expect("run");
    let chunk = "y".repeat(8 * 1024);
    let mut closed = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        for _ in 0..32 {
            if run.agent_thinking(&json!({ "c": chunk })).is_err() {
                break;
            }
        }
        let s = stats(&gw, &cfg);
        if s["connections"]["closed_by_reason"]["slow_consumer"].as_u64() >= Some(1) {
            closed = true;
            break;
        }
        // Unsent bytes over all connections stay within the bound plus one batch.
        let pending = s["bytes"]["pending_out"].as_u64().unwrap_or(0);
        assert!(pending <= 256 * 1024 + 33 * 9 * 1024, "pending {pending}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        closed,
        "the non-reading TLS client was not closed as a slow consumer"
    );
    // The client still gets the 1013 once it reads.
    ws.get_mut()
        .sock
        .set_read_timeout(Some(WAIT))
        .expect("timeout");
    let code = loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => break u16::from(f.code),
            Ok(_) => {}
            Err(e) => panic!("expected close 1013, got {e}"),
        }
    };
    assert_eq!(code, 1013);
}

#[test]
fn curl_over_tls() {
    let (gw, files, _cert) = start("curl");
    let port = gw.addr.port();
    let curl = |extra: &[&str], path: &str| -> String {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&files.cert)
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(extra)
            .arg(format!("https://localhost:{port}{path}"))
            .output()
            .expect("run curl (tools/test.sh installs it when missing)");
        assert!(
            out.status.success(),
            "curl {extra:?} {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let health: Value = serde_json::from_str(&curl(&[], "/health")).expect("json");
    assert_eq!(health["status"], "healthy");
    let health: Value =
        serde_json::from_str(&curl(&["--tlsv1.2", "--tls-max", "1.2"], "/health")).expect("json");
    assert_eq!(health["status"], "healthy");
    let event = json!({"type": "agent_thinking", "user_id": "curl-user", "run_id": "r1",
                       "agent_name": "a", "data": {}});
    let accepted = curl(
        &[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {PUBLISH_KEY}"),
            "-H",
            "Content-Type: application/json",
            "-d",
            &event.to_string(),
            "-w",
            " %{http_code}",
        ],
        "/api/events",
    );
    assert!(accepted.ends_with(" 202"), "{accepted}");
    assert!(curl(&[], "/metrics").contains("agentwire_tls_handshakes_total"));
    // The certificate is checked: without --cacert curl refuses it.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--resolve"])
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/health"))
        .output()
        .expect("run curl");
    assert!(!out.status.success(), "an untrusted certificate must fail");
}

#[test]
fn python_websockets_over_tls() {
    let (mut gw, files, _cert) = start_with_worker("python");
    let _ = gw.echo_worker();
    let python = test_python();
    // The asyncio client: the sync one (websockets 15.0.1) sometimes never sends its
    // request after a TLS 1.3 handshake (its reader thread and the session tickets;
    // seen against Python's own TLS server too), which would make this test flaky.
    let script = r#"
import asyncio, json, ssl, sys
from websockets.asyncio.client import connect
async def main():
    ctx = ssl.create_default_context(cafile=sys.argv[1])
    async with connect(f"wss://localhost:{sys.argv[2]}/ws", ssl=ctx, open_timeout=10,
                       additional_headers={"Authorization": "Bearer " + sys.argv[3]}) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        print(first["type"], first["user_id"], flush=True)
        await ws.send(json.dumps({"type": "user_message", "thread_id": "t1", "text": "over tls"}))
        for _ in range(3):
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            print(m["type"], json.dumps(m.get("data", {})), flush=True)
asyncio.run(main())
"#;
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&files.cert)
        .arg(gw.addr.port().to_string())
        .arg(token("py-user"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "run {} ({e}): the pinned test venv is made by tools/test.sh; \
                 or set AGENTWIRE_TEST_PYTHON to a python with websockets",
                python.display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python websockets over TLS failed: {stdout}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        crate::support::log_capture::lines().join("\n")
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"connected py-user"), "{stdout}");
    assert!(lines.iter().any(|l| l.starts_with("ack")), "{stdout}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("agent_completed") && l.contains("over tls")),
        "{stdout}"
    );
}

fn start_with_worker(tag: &str) -> (TestGateway, CertFiles, TestCert) {
    let cert = TestCert::new();
    let files = CertFiles::new(tag, &cert);
    let gw = TestGateway::start(tls_config(&files), Agent::Test);
    (gw, files, cert)
}

// ------------------------------------------------------------ SIGHUP, real binary

struct Proc {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(files: &CertFiles) -> Proc {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
            l.local_addr().expect("addr").port()
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentwire"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--jwt-secret", SECRET, "--publish-key", PUBLISH_KEY])
            .args(["--demo-agent", "false", "--tls-cert-file"])
            .arg(&files.cert)
            .arg("--tls-key-file")
            .arg(&files.key)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agentwire");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let p = Proc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            lines,
        };
        p.wait_line("listening on", 0);
        p
    }

    /// The `nth` (0-based) line containing `what`, waiting for it.
    fn wait_line(&self, what: &str, nth: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(what))
                .nth(nth)
            {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no log line {nth} with {what:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn hup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_connections() {
    let old = TestCert::new();
    let new = TestCert::new();
    let files = CertFiles::new("hup", &old);
    let gw = Proc::spawn(&files);
    let trust_both = client_config(&[&old.der, &new.der], H1, &[]);
    let trust_old = client_config(&[&old.der], H1, &[]);
    let user = "tls-hup";
    let auth = format!("Bearer {}", token(user));
    let (mut ws, _) =
        wss_connect(gw.addr, &trust_old, "/ws", &[("Authorization", &auth)]).expect("wss");
    assert_eq!(peer_cert(ws.get_ref()), old.der);

    files.write(&new);
    gw.hup();
    gw.wait_line("TLS certificate reloaded", 0);
    // A new client sees the new certificate; one trusting only the old one fails.
    let fresh = tls_stream(gw.addr, &trust_both).expect("handshake after reload");
    assert_eq!(
        peer_cert(&fresh),
        new.der,
        "new handshakes use the new certificate"
    );
    assert!(tls_stream(gw.addr, &trust_old).is_err());
    // The client connected before keeps working: an event and a ping both ways.
    let body = json!({"type": "agent_thinking", "user_id": user, "run_id": "r1",
                      "agent_name": "a", "data": {"n": 1}})
    .to_string();
    let raw = format!(
        "POST /api/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = https_request(gw.addr, &trust_both, raw.as_bytes()).expect("publish");
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(next_json(&mut ws).expect("event")["data"]["n"], 1);
    ws.send(Message::text(r#"{"type":"ping"}"#)).expect("send");
    assert_eq!(next_json(&mut ws).expect("pong")["type"], "pong");

    // A bad new file: the new certificate stays in force, and the log says why.
    std::fs::write(&files.cert, "not a certificate").expect("write");
    gw.hup();
    let line = gw.wait_line("TLS reload failed", 0);
    assert!(line.contains("tls_cert_file"), "{line}");
    let again = tls_stream(gw.addr, &trust_both).expect("handshake after a bad reload");
    assert_eq!(peer_cert(&again), new.der);
    ws.send(Message::text(r#"{"type":"ping"}"#)).expect("send");
    assert_eq!(next_json(&mut ws).expect("pong")["type"], "pong");
    let health = https_get(gw.addr, &trust_both, "/ws/stats").json();
    assert_eq!(health["tls"]["reloads"], 1, "{}", health["tls"]);
    assert_eq!(health["tls"]["reload_failures"], 1, "{}", health["tls"]);
}

#[test]
fn half_a_tls_configuration_or_a_bad_pem_fails_the_start() {
    let cert = TestCert::new();
    let files = CertFiles::new("start", &cert);
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(env!("CARGO_BIN_EXE_agentwire"))
            .args(["serve", "--listen", "127.0.0.1:0", "--jwt-secret", SECRET])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run agentwire");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let flag = |s: &'static str| std::ffi::OsStr::new(s);
    let (code, err) = run(&[flag("--tls-cert-file"), files.cert.as_os_str()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tls_key_file"), "{err}");
    std::fs::write(
        &files.key,
        "-----BEGIN PRIVATE KEY-----\n@@\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let (code, err) = run(&[
        flag("--tls-cert-file"),
        files.cert.as_os_str(),
        flag("--tls-key-file"),
        files.key.as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("tls_key_file") && err.contains("bad PEM"),
        "{err}"
    );
}

#[test]
fn the_admin_listener_stays_plain_http_while_listen_speaks_tls() {
    let cert = TestCert::new();
    let files = CertFiles::new("admin", &cert);
    let gateway = agentwire::Gateway::new(agentwire::Config {
        admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..tls_config(&files)
    })
    .expect("binds both listeners");
    let addr = gateway.local_addr();
    let admin = gateway.admin_addr().expect("admin listener bound");
    let handle = gateway.spawn().expect("reactor thread");
    let cfg = client_config(&[&cert.der], H1, &[]);
    // Admin: plain HTTP.
    let (status, stats) = crate::support::get_json(admin, "/ws/stats");
    assert_eq!(status, 200);
    assert_eq!(stats["tls"]["handshakes"], 0, "{}", stats["tls"]);
    // listen: TLS only, and the admin endpoints are not there.
    assert_eq!(https_get(addr, &cfg, "/health").status, 200);
    assert_refusal(&https_get(addr, &cfg, "/ws/stats"), 404, "not_found");
    let stats = crate::support::get_json(admin, "/ws/stats").1;
    assert_eq!(stats["tls"]["handshakes"], 2, "{}", stats["tls"]);
    handle.shutdown().expect("shutdown");
}
