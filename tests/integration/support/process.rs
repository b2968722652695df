//! A spawned program with its stderr collected line by line ([`Spawned`]): the
//! `agentwire` binary (SIGHUP reload tests) or an example (the `worker` example), with
//! waits on a log line, signals, and a bounded wait for the exit status.

#![allow(dead_code)] // each test module uses its own subset

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use super::*;

/// A running program, killed on drop. Its stderr lines are collected as they come.
pub struct Spawned {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Its stdout, for programs that print what a test needs (the example's token).
    pub stdout: Option<BufReader<std::process::ChildStdout>>,
}

impl Spawned {
    /// Start `program` with `args` and `env` (stdin closed, stdout and stderr piped).
    pub fn start(program: &str, args: &[&str], env: &[(&str, &str)]) -> Spawned {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout = child.stdout.take().map(BufReader::new);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Spawned {
            child,
            lines,
            stdout,
        }
    }

    /// The stderr lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wait (bounded by [`WAIT`]) until the `n`-th stderr line containing `needle`
    /// (counting from 1) has come; returns it.
    pub fn wait_line_n(&self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self
                .lines()
                .into_iter()
                .filter(|l| l.contains(needle))
                .nth(n - 1)
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no line {n} containing {needle:?} in:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many stderr lines so far contain `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Send signal `sig` (`libc::SIGHUP`, ...).
    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill(2) with a pid this test started and still holds (not yet waited).
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// Wait (bounded by `within`) for the exit status.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}; stderr:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 (bound and released: another process could take it in
/// between, which on this loopback is rare enough for tests).
pub fn free_addr() -> SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Wait (bounded) until `addr` answers `GET /health` with 200.
pub fn wait_healthy(addr: SocketAddr, proc_: &Spawned) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{addr} never accepted; stderr:\n{}",
            proc_.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(addr, "/health").status, 200);
}
