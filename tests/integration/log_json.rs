//! Issue 13, item 6: `log_format = json`. The real binary (`CARGO_BIN_EXE_agentwire`)
//! runs with `--log-format json`; a WebSocket session (token in the query string) opens
//! and closes, and an upgrade with a bad token is refused. Every stderr line must be one
//! JSON object with `ts`, `level`, `target` and `message`; the open and close lines carry
//! `conn` and `user` (and `reason`, `code`, `duration_ms` for the close), the refusal
//! `conn` and `reason`; and no line holds a token segment, `token=` or a query string
//! (the log capture's check, [`log_capture::violations_in`]). Every wait has a deadline.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use crate::support::{
    connect_with, get, log_capture, now_s, token, token_alg, upgrade, PUBLISH_KEY, SECRET, WAIT,
};

/// The binary, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of the binary's stderr so far.
fn lines_of(all: &Mutex<Vec<String>>) -> Vec<String> {
    all.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Wait (bounded) for a stderr line that parses as JSON and satisfies `pred`.
fn wait_line(all: &Mutex<Vec<String>>, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = lines_of(all)
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| pred(v));
        if let Some(v) = found {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} line in:\n{}",
            lines_of(all).join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn json_log_lines_are_objects_with_the_connection_fields_and_no_token() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentwire"))
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--jwt-secret",
            SECRET,
            "--publish-key",
            PUBLISH_KEY,
            "--demo-agent",
            "false",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the agentwire binary");
    let stderr = child.stderr.take().expect("piped stderr");
    let proc = Proc(child);
    let all = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&all);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the binary never answered /health"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(addr, "/health").status, 200);

    // A session with its token in the query string, closed by the client.
    let t = token("json-log-user");
    let client = connect_with(addr, &format!("/ws?token={t}"), &[]).expect("upgrade");
    let id = client.connected["connection_id"]
        .as_str()
        .expect("connection_id")
        .to_owned();
    client.close();
    // An upgrade refused: a token signed with another key, in the query string.
    let claims = json!({"sub": "json-log-intruder", "exp": now_s() + 3600});
    let bad = token_alg(Algorithm::HS256, "another-secret-0123456789abcdef", &claims);
    assert_eq!(upgrade(addr, &format!("/ws?token={bad}"), &[]).status, 401);

    let open = wait_line(&all, "open", |v| {
        v["conn"] == id.as_str() && v["message"].as_str().is_some_and(|m| m.contains(" open "))
    });
    assert_eq!(open["user"], "json-log-user", "{open}");
    assert_eq!(open["level"], "INFO", "{open}");
    let closed = wait_line(&all, "close", |v| {
        v["conn"] == id.as_str() && v.get("reason").is_some()
    });
    assert_eq!(closed["user"], "json-log-user", "{closed}");
    assert_eq!(closed["reason"], "client_closed", "{closed}");
    assert!(
        closed["code"].is_u64() || closed["code"].is_null(),
        "{closed}"
    );
    assert!(closed["duration_ms"].is_u64(), "{closed}");
    let refused = wait_line(&all, "refusal", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains(" refused "))
    });
    assert!(refused["conn"].is_string(), "{refused}");
    assert!(refused["reason"].is_string(), "{refused}");

    drop(proc);
    let _ = reader.join();
    let lines = lines_of(&all);
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        for key in ["ts", "level", "target", "message"] {
            assert!(v[key].is_string(), "{key} missing: {line}");
        }
        let ts = v["ts"].as_str().unwrap_or_default();
        assert!(ts.len() == 24 && ts.ends_with('Z'), "ts {ts}: {line}");
    }
    let leaks = log_capture::violations_in(&lines);
    assert!(
        leaks.is_empty(),
        "log lines leak a token:\n{}",
        leaks.join("\n")
    );
    for line in &lines {
        assert!(!line.contains(&t) && !line.contains(&bad), "{line}");
    }
}
