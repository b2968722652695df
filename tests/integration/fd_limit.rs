//! Accept at the file-descriptor limit: the release-mode binary runs under
//! `ulimit -n 48`; once every descriptor is used, pending connections wait in the
//! backlog, the reactor does not spin (CPU stays low), and as soon as descriptors are
//! freed the waiting clients are accepted and upgraded (no stall).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{bearer, read_response, upgrade_head, SECRET};

struct Gw {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_limited(nofile: u32) -> Gw {
    let bin = env!("CARGO_BIN_EXE_agentwire");
    let script = format!(
        "ulimit -n {nofile} && exec \"$0\" serve --listen 127.0.0.1:0 --jwt-secret {SECRET} \
         --demo-agent false --max-connections-per-user 1000"
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(bin)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gateway");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("gateway printed its address")
        .parse()
        .expect("address parses");
    Gw { child, addr }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after_comm = stat.rsplit(')').next().expect("stat format");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields after the command: state is index 0, utime is 11, stime is 12.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Send an upgrade and wait up to `within` for the 101 (false: no answer in time).
fn upgraded(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(1))
}

#[test]
fn accept_survives_the_fd_limit_without_spinning_or_stalling() {
    let gw = start_limited(48);
    let mut open = Vec::new();
    let mut waiting = Vec::new();
    // Far more clients than descriptors: the first ones are upgraded, the rest wait in
    // the listen backlog (the TCP connect itself succeeds there).
    for i in 0..60 {
        let mut s = TcpStream::connect(gw.addr).expect("connect");
        let head = upgrade_head(
            gw.addr,
            "/ws",
            &[bearer(&crate::support::token(&format!("fd-{i}")))],
        );
        s.write_all(head.as_bytes()).unwrap();
        if upgraded(&mut s, Duration::from_millis(150)) {
            open.push(s);
        } else {
            waiting.push(s);
        }
    }
    assert!(!open.is_empty(), "no client was upgraded at all");
    assert!(
        !waiting.is_empty(),
        "the limit was never reached ({} upgraded)",
        open.len()
    );

    // At the limit: the loop must not busy-loop on accept.
    let pid = gw.child.id();
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - t0;
    // 100 ticks per second is a whole core; a spinning accept loop uses ~100.
    assert!(
        used < 30,
        "gateway used {used} ticks of CPU in 1 s at the fd limit"
    );

    // Free descriptors: waiting clients must now be accepted and upgraded.
    let freed = open.len().min(10);
    for s in open.drain(..freed) {
        drop(s);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut served = 0;
    for s in waiting.iter_mut().take(freed / 2) {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        s.set_read_timeout(Some(left)).unwrap();
        let r = read_response(s);
        assert_eq!(r.status, 101, "a waiting client got {}", r.status);
        served += 1;
    }
    assert!(served > 0);
}
