//! Issue 9, the process-level rows: a stalled log pipe (F8), never-reading sessions
//! against the kernel and user-space output budgets (F9), SIGHUP (F10), tokens that
//! never expire (F12), runs ended by a shutdown, and the close log line.
//!
//! F8 and F10 run the real binary (`CARGO_BIN_EXE_agentwire`): its stderr and its
//! signal handling are what is under test. Every wait has a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    bearer, config, connect, get_json, log_capture, now_s, token, token_with, upgrade,
    upgrade_head, Agent, TestGateway, PUBLISH_KEY, SECRET, WAIT,
};

// ------------------------------------------------------------ spawned binary

/// The `agentwire` binary, killed on drop.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (the binary is told to bind it, so its address
/// is known without reading its stderr).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn spawn_binary(rust_log: &str, stderr: Stdio) -> Proc {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_agentwire"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--jwt-secret",
            SECRET,
            "--publish-key",
            PUBLISH_KEY,
            "--demo-agent",
            "false",
            "--max-connections-per-user",
            "1000",
        ])
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn the agentwire binary");
    let proc = Proc {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while health(proc.addr, Duration::from_secs(1)) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the binary never answered /health"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

/// One raw HTTP exchange with a deadline on every step; `None` when the gateway did not
/// answer in time (or the connection failed).
fn exchange(addr: SocketAddr, request: &[u8], within: Duration) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, within).ok()?;
    s.set_read_timeout(Some(within)).ok()?;
    s.set_write_timeout(Some(within)).ok()?;
    s.write_all(request).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

fn health(addr: SocketAddr, within: Duration) -> Option<u16> {
    let req = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    exchange(addr, req.as_bytes(), within).map(|(status, _)| status)
}

fn stats_of(addr: SocketAddr, within: Duration) -> Option<Value> {
    let req = format!("GET /ws/stats HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let (_, text) = exchange(addr, req.as_bytes(), within)?;
    let body = text.split("\r\n\r\n").nth(1)?;
    serde_json::from_str(body).ok()
}

/// F8: stderr is a pipe nobody reads (a stalled log shipper). v1 wrote each log line
/// from the event loop and froze once the pipe was full: 495 refused upgrades and
/// `/health` timed out. Now lines go through a bounded queue to a log thread: the loop
/// keeps answering, the overflow is dropped and counted (`log.lines_dropped`), the
/// refusal lines are collapsed, and once the pipe is read again one line says how many
/// were lost.
#[test]
fn f8_a_stalled_log_pipe_never_stalls_the_gateway() {
    let mut gw = spawn_binary("debug", Stdio::piped());
    // Hold the read end and never read it (until the end).
    let stderr = gw.child.stderr.take().expect("stderr piped");
    let addr = gw.addr;
    let bad = format!("Authorization: Bearer {}x", token("f8-user"));

    // 1. A thousand refused upgrades (the v1 freeze came after ~495).
    let mut answered = 0;
    for _ in 0..1000 {
        let head = upgrade_head(addr, "/ws", std::slice::from_ref(&bad));
        match exchange(addr, head.as_bytes(), Duration::from_secs(3)) {
            Some((401, _)) => answered += 1,
            other => panic!(
                "refused upgrade {answered} got {:?} (the loop is stuck on the log pipe?)",
                other.map(|(s, _)| s)
            ),
        }
    }
    // 2. Far more log lines than the pipe and the queue hold: 3,000 sessions that
    // open and go (an `open` and a `closed` line each).
    let good = bearer(&token("f8-user"));
    for i in 0..3000 {
        let head = upgrade_head(addr, "/ws", std::slice::from_ref(&good));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        s.write_all(head.as_bytes()).expect("send upgrade");
        let mut got = [0u8; 12];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("session {i}: no answer ({e}): the loop is stuck?"));
        assert_eq!(&got, b"HTTP/1.1 101", "session {i}");
    }
    // The gateway still answers, and says it dropped log lines instead of blocking.
    assert_eq!(
        health(addr, Duration::from_secs(5)),
        Some(200),
        "/health answers"
    );
    let stats = stats_of(addr, Duration::from_secs(5)).expect("/ws/stats answers");
    let dropped = stats["log"]["lines_dropped"].as_u64().unwrap_or(0);
    assert!(
        dropped > 0,
        "log lines dropped and counted: {}",
        stats["log"]
    );
    assert_eq!(stats["connections"]["refused"]["invalid_token"], 1000);

    // 3. The log shipper comes back: the writer catches up and reports the loss once;
    // the 1000 identical refusals cost a handful of lines plus a summary.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.contains("log lines dropped"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no 'log lines dropped' line in {} lines",
            lines.len()
        );
        if let Ok(l) = rx.recv_timeout(left) {
            lines.push(l);
        }
    }
    let full = lines
        .iter()
        .filter(|l| l.contains("refused status=401"))
        .count();
    assert!(
        full < 100,
        "{full} refusal lines for 1000 identical refusals"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("[20") && l.contains("Z ")),
        "env_logger's line format kept"
    );
}

/// F10: SIGHUP killed v1 (bare EOF, no 1001, no drain). It now reloads the JWT keys,
/// secret and allowed origins (PROTOCOL.md section 12, `key_rotation.rs`): the process
/// and its connections stay.
/// SIGTERM then drains, and "shutdown complete" counts only the sessions the shutdown
/// closed (v1 counted every close of the run).
#[test]
fn f10_sighup_keeps_the_process_and_its_connections() {
    let mut gw = spawn_binary("info", Stdio::piped());
    let stderr = gw.child.stderr.take().expect("stderr piped");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let wait_line = |what: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = lines.lock().unwrap().iter().find(|l| l.contains(what)) {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no log line with {what:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Three sessions come and go before; one stays.
    for _ in 0..3 {
        connect(gw.addr, "f10-before").close();
    }
    let mut c = connect(gw.addr, "f10-user");
    let pid = gw.child.id().to_string();
    for _ in 0..3 {
        let status = Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
    wait_line("SIGHUP received");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        gw.child.try_wait().expect("try_wait").is_none(),
        "the process survived SIGHUP"
    );
    c.ping_pong();
    assert_eq!(health(gw.addr, Duration::from_secs(5)), Some(200));

    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success());
    c.expect_close(1001);
    let line = wait_line("shutdown complete");
    assert!(
        line.contains("shutdown complete; 1 connections closed"),
        "{line}"
    );
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(code) = gw.child.try_wait().expect("try_wait") {
            assert!(code.success(), "exit status {code:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------- in-process

/// A session that upgraded and then never reads: its client's receive buffer is
/// small, so what the gateway sends piles up on the gateway's side.
fn never_reading(addr: SocketAddr, user: &str) -> TcpStream {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&addr.into(), WAIT).expect("connect");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let head = upgrade_head(addr, "/ws", &[bearer(&token(user))]);
    s.write_all(head.as_bytes()).expect("send upgrade");
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("read the 101 head");
        assert!(n == 1, "connection closed during the upgrade");
        got.push(byte[0]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

/// F9: sessions that never read while events flow. v1 let the kernel absorb it (no
/// 1013, kernel TCP memory 1 -> 1,560 MiB for 600 sessions) and had no total bound on
/// user-space output. Now accepted sockets get a bounded SO_SNDBUF (reported as a
/// budget) and the total unsent output stays under `max_pending_total_bytes`: the
/// largest holders are closed with 1013. 10 s of attack, new never-readers joining as
/// old ones are closed; a reading user keeps getting its events.
#[test]
fn f9_never_reading_sessions_stay_within_the_total_output_budget() {
    const LIMIT: u64 = 2 * 1024 * 1024;
    let mut cfg = config();
    cfg.max_pending_total_bytes = LIMIT as usize;
    cfg.socket_send_buffer_bytes = 65_536;
    cfg.max_connections_per_user = 1000;
    let gw = TestGateway::start(cfg, Agent::None);
    let stats = gw.stats();
    assert_eq!(
        stats["budgets"]["pending_total"]["limit"], LIMIT,
        "the total output budget is reported: {}",
        stats["budgets"]
    );
    let emitter = gw.emitter.clone();
    let attackers: Vec<String> = (0..8).map(|i| format!("f9-slow-{i}")).collect();
    let mut slow: Vec<TcpStream> = attackers
        .iter()
        .map(|u| never_reading(gw.addr, u))
        .collect();
    let mut reader = connect(gw.addr, "f9-reader");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let users = attackers.clone();
    let pump = std::thread::spawn(move || {
        let blob = "x".repeat(16 * 1024);
        let mut runs: Vec<_> = users
            .iter()
            .map(|u| {
                emitter
                    .run(u, None, &format!("r-{u}"), "flood")
                    .expect("run")
            })
            .collect();
        let mut sent = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            for run in runs.iter_mut() {
                if run.agent_thinking(&json!({"blob": blob})).is_err() {
                    return sent;
                }
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        sent
    });
    let started = Instant::now();
    let mut peak = 0u64;
    let mut seq = 0u64;
    while started.elapsed() < Duration::from_secs(10) {
        let s = gw.stats();
        let used = s["budgets"]["pending_total"]["used"]
            .as_u64()
            .unwrap_or(u64::MAX);
        peak = peak.max(used);
        // Between two loop iterations the total is under the limit; a sample may land
        // after an iteration queued more (events of one drain, close frames).
        assert!(
            used <= LIMIT + 512 * 1024,
            "unsent output {used} over the budget {LIMIT}: {}",
            s["budgets"]
        );
        // New never-readers replace the closed ones (a sustained attack).
        if s["connections"]["open"].as_u64().unwrap_or(0) < 9 {
            let i = slow.len() % attackers.len();
            slow.push(never_reading(gw.addr, &attackers[i]));
        }
        // The reading user is served throughout.
        let run = format!("r-reader-{seq}");
        seq += 1;
        let mut h = gw.emitter.run("f9-reader", None, &run, "a").expect("run");
        h.agent_completed(&json!({})).expect("emit");
        let ev = reader.recv_json();
        assert_eq!(ev["run_id"], run.as_str());
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = pump.join().expect("pump thread");
    let s = gw.stats();
    let over_budget = s["connections"]["closed_by_reason"]["pending_total_budget"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        over_budget >= 1,
        "the largest holders were closed (1013) for the total budget: {} ({sent} events)",
        s["connections"]["closed_by_reason"]
    );
    let sndbuf = &s["budgets"]["socket_send_buffer"];
    assert_eq!(sndbuf["limit"], 65_536);
    let applied = sndbuf["used"].as_u64().unwrap_or(0);
    assert!(
        (65_536..=2 * 65_536).contains(&applied),
        "SO_SNDBUF applied to accepted sockets: {sndbuf}"
    );
    assert!(peak > 0, "output did pile up");
    drop(slow);
}

/// F12: a token with `exp` 2^63 never expired. With `jwt_max_lifetime_s`, tokens
/// that live longer are refused: 401 at the upgrade, `invalid_token` on refresh.
#[test]
fn f12_max_lifetime_refuses_tokens_that_never_expire() {
    let mut cfg = config();
    cfg.jwt_max_lifetime_s = Some(3600);
    let gw = TestGateway::start(cfg, Agent::None);
    let forever = token_with(&json!({"sub": "f12-user", "exp": 1u64 << 63}));
    let r = upgrade(gw.addr, "/ws", &[bearer(&forever)]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "invalid_token");
    let old = token_with(&json!({"sub": "f12-user", "exp": now_s() + 60, "iat": now_s() - 86_400}));
    assert_eq!(upgrade(gw.addr, "/ws", &[bearer(&old)]).status, 401);

    let mut c = connect(gw.addr, "f12-user");
    c.send_json(&json!({"type": "refresh", "token": forever}));
    let answer = c.recv_json();
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "invalid_token", "{answer}");
    // One token check per connection per second (issue 9 F3): a second connection.
    let mut c = connect(gw.addr, "f12-user");
    let fine = token_with(&json!({"sub": "f12-user", "exp": now_s() + 1800, "iat": now_s()}));
    c.send_json(&json!({"type": "refresh", "token": fine}));
    assert_eq!(c.recv_json()["type"], "refreshed");
    let (_, config) = get_json(gw.addr, "/ws/config");
    assert_eq!(config["jwt_max_lifetime_s"], 3600);
    assert_eq!(config["max_pending_total_bytes"], 536_870_912);
    assert_eq!(config["socket_send_buffer_bytes"], 262_144);
}

/// SIGTERM (here the library's shutdown) ended in-flight runs silently. Now each
/// run's users get `agent_error {"reason":"shutdown"}` before the 1001.
#[test]
fn shutdown_ends_runs_in_progress_with_agent_error_before_1001() {
    let mut gw = TestGateway::plain();
    let mut c = connect(gw.addr, "shut-user");
    let mut run = gw
        .emitter
        .run("shut-user", Some("t-shut"), "r-shut", "shut_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    assert_eq!(c.expect_type("agent_started")["run_id"], "r-shut");
    let (result, _) = gw.shutdown_and_join(WAIT);
    let before = c.expect_close(1001);
    assert_eq!(before.len(), 1, "one frame before the close: {before:?}");
    let ev = &before[0];
    assert_eq!(ev["type"], "agent_error", "{ev}");
    assert_eq!(ev["data"]["reason"], "shutdown", "{ev}");
    assert_eq!(ev["run_id"], "r-shut");
    assert_eq!(ev["thread_id"], "t-shut");
    assert_eq!(ev["agent_name"], "shut_agent");
    result.expect("clean shutdown");
}

/// v1 logged `code=0` for a close that sent no close frame (the peer went away); the
/// line now says `code=-`, and gives the real code when one was sent.
#[test]
fn the_close_line_names_no_code_when_none_was_sent() {
    let gw = TestGateway::plain();
    let c = connect(gw.addr, "close-line-user");
    let id = c.connected["connection_id"]
        .as_str()
        .expect("connection_id")
        .to_owned();
    drop(c); // TCP closed without a close frame
    gw.wait_open(0);
    let deadline = Instant::now() + WAIT;
    let line = loop {
        let found = log_capture::lines().into_iter().find(|l| {
            l.contains(&format!("conn={id} user=\"close-line-user\""))
                && l.contains("closed reason=")
        });
        if let Some(l) = found {
            break l;
        }
        assert!(Instant::now() < deadline, "no close line for {id}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(line.contains(" code=- "), "{line}");
}
