//! Issue 13, item 8: signal-aware embedding. The `worker` example (built here with
//! `cargo build --example worker`, the profile and target dir of this test binary) runs
//! the gateway with `Gateway::spawn_with_signals`; a client sends messages and sees
//! answers the example's workers computed (arithmetic, word counts); SIGTERM then drains
//! it as the binary drains (close 1001 to the client) and the program exits 0.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::support::*;

/// Build the `worker` example with the profile and target dir of this test binary and
/// return its path (cargo only relinks when it changed).
fn worker_example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/integration-<hash>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--example", "worker", "--target-dir"])
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build --example worker");
    assert!(status.success(), "cargo build --example worker failed");
    let path = profile_dir.join("examples").join("worker");
    assert!(path.exists(), "{} not built", path.display());
    path
}

/// Events of the run `ack` named, up to and including its last one.
fn run_events(c: &mut Client, text: &str) -> Vec<Value> {
    let ack = c.user_message(Some("t1"), text, "m1");
    let run_id = ack["run_id"].as_str().expect("run_id").to_owned();
    let mut events = Vec::new();
    loop {
        let v = c.recv_json();
        if v["run_id"] != run_id.as_str() {
            continue;
        }
        let last = matches!(v["type"].as_str(), Some("agent_completed" | "agent_error"));
        events.push(v);
        if last {
            return events;
        }
    }
}

#[test]
fn the_worker_example_computes_answers_and_drains_on_sigterm_with_exit_0() {
    let bin = worker_example();
    let addr = free_addr();
    let listen = addr.to_string();
    let mut p = Spawned::start(
        bin.to_str().expect("utf-8 path"),
        &["--listen", &listen],
        &[("RUST_LOG", "info")],
    );
    let mut stdout = p.stdout.take().expect("stdout");
    let mut token = None;
    for _ in 0..2 {
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the example's stdout");
        if let Some(t) = line.trim().strip_prefix("token for user alice: ") {
            token = Some(t.to_owned());
        }
    }
    let token = token.expect("the example prints a token");
    log_capture::register_secret(&token);
    wait_healthy(addr, &p);
    let mut c = connect_with(
        addr,
        "/ws",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .expect("connect with the example's token");

    let events = run_events(&mut c, "2 + 3 * (4 - 1)");
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "agent_started",
            "agent_thinking",
            "tool_executing",
            "tool_completed",
            "text_delta",
            "agent_completed"
        ]
    );
    assert_eq!(
        events[3]["data"],
        json!({"tool": "calculator", "result": "11"})
    );
    assert_eq!(events[5]["data"]["answer"], "11");

    let events = run_events(&mut c, "count these four words");
    let done = events.last().expect("events");
    assert_eq!(done["type"], "agent_completed");
    assert_eq!(done["data"]["answer"], "4 words, 22 characters");
    assert_eq!(done["data"]["counts"]["longest_word"], "count");

    // SIGTERM: the client gets 1001 and the program exits 0 once drained.
    p.signal(libc::SIGTERM);
    c.expect_close(1001);
    let status = p.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; stderr:\n{}",
        p.lines().join("\n")
    );
    p.wait_line_n("shutdown complete", 1);
    p.wait_line_n("workers done: exiting", 1);
    let leaks = log_capture::violations_in(&p.lines());
    assert!(leaks.is_empty(), "{leaks:?}");
}
