//! The Redis engine's harness: a real `redis-server` per test ([`RedisServer`]: a free
//! port, no persistence, killed when dropped; `SIGSTOP`/`SIGCONT` and a restart without
//! its data), gateway nodes on it with `engine = "redis"`, in-process ([`node`]) or as
//! the real binary ([`BinaryNode`], for `kill -9`).
//!
//! `redis-server` comes from Debian's package; `tools/test.sh` installs it when missing.

#![allow(dead_code)] // each test module uses its own subset

use std::process::{Child, Command, Stdio};

use super::*;

/// A `redis-server` of one test.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (bash tools/test.sh installs it with apt)");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether it answers `PING` (a raw RESP exchange).
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} redis-server");
        }
    }

    /// `SIGSTOP`: Redis keeps its connections and answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// `kill -9`, then a new server on the same port: without persistence it is empty.
    pub fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.resume();
        }
        self.kill();
    }
}

/// A plain Redis connection of the test (the `redis` crate, as the gateway uses).
pub fn redis_con(redis: &RedisServer) -> ::redis::Connection {
    ::redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis connection")
}

/// Workers read the inbound stream: a consumer group exists (nodes see it within a
/// housekeeping tick or two).
pub fn workers_read_the_stream(redis: &RedisServer) {
    let _: () = ::redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("agentwire:inbound")
        .arg("workers")
        .arg("$")
        .arg("MKSTREAM")
        .query(&mut redis_con(redis))
        .expect("XGROUP CREATE");
}

/// The test config with the Redis engine on `redis`, as node `name`.
pub fn redis_config(redis: &RedisServer, name: &str) -> Config {
    let mut cfg = config();
    cfg.set("engine", "redis").expect("engine");
    cfg.set("redis_url", &redis.url()).expect("redis_url");
    cfg.set("node_id", name).expect("node_id");
    cfg.set("redis_timeout_ms", "500")
        .expect("redis_timeout_ms");
    cfg
}

/// The config of node `name` on `redis` whose users' messages go to the webhook
/// `server` (`inbound_url`, `inbound_key`).
pub fn webhook_config(redis: &RedisServer, name: &str, server: &WebhookServer) -> Config {
    let mut cfg = redis_config(redis, name);
    cfg.inbound_url = Some(server.url());
    cfg.inbound_key = Some("cluster-inbound-key-0123".into());
    cfg
}

/// An in-process node on `redis`, with no agent.
pub fn node(redis: &RedisServer, name: &str) -> TestGateway {
    TestGateway::start(redis_config(redis, name), Agent::None)
}

/// An in-process node on `redis`, with no agent, its config changed by `tweak` first.
pub fn node_with(redis: &RedisServer, name: &str, tweak: impl Fn(&mut Config)) -> TestGateway {
    let mut cfg = redis_config(redis, name);
    tweak(&mut cfg);
    TestGateway::start(cfg, Agent::None)
}

/// Publish event `i` (`text_delta`, run `r-1`) of `user` through `addr` and require
/// 503 `engine_unavailable` (the node cannot reach Redis).
pub fn assert_publish_unavailable(addr: SocketAddr, user: &str, i: u64) {
    let ev = pub_event("text_delta", user, None, "r-1", json!({ "i": i }));
    let r = publish(addr, &json!([ev]));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "engine_unavailable");
}

/// The `data.i` of each event, checking they all belong to `user`.
pub fn ids(events: &[Value], user: &str) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e["user_id"], user, "cross-user delivery: {e}");
            e["data"]["i"].as_u64().expect("data.i")
        })
        .collect()
}

/// `connected`'s epoch.
pub fn epoch_of(c: &Client) -> String {
    c.connected["epoch"]
        .as_str()
        .expect("connected.epoch")
        .to_owned()
}

/// The real binary as a node on `redis` (its own process, for `kill -9`).
pub struct BinaryNode {
    pub addr: SocketAddr,
    child: Child,
}

impl BinaryNode {
    pub fn start(redis: &RedisServer, name: &str) -> BinaryNode {
        BinaryNode::start_at(redis, name, SocketAddr::from(([127, 0, 0, 1], free_port())))
    }

    /// A node on `addr` (a restart on the address of a killed one).
    pub fn start_at(redis: &RedisServer, name: &str, addr: SocketAddr) -> BinaryNode {
        BinaryNode::start_with(redis, name, addr, &[])
    }

    /// A node on `addr` with more settings (`AGENTWIRE_*` variables).
    pub fn start_with(
        redis: &RedisServer,
        name: &str,
        addr: SocketAddr,
        settings: &[(&str, &str)],
    ) -> BinaryNode {
        let child = Command::new(env!("CARGO_BIN_EXE_agentwire"))
            .env_clear()
            .envs(settings.iter().copied())
            .env("AGENTWIRE_LISTEN", addr.to_string())
            .env("AGENTWIRE_JWT_SECRET", SECRET)
            .env("AGENTWIRE_PUBLISH_KEY", PUBLISH_KEY)
            .env("AGENTWIRE_ENGINE", "redis")
            .env("AGENTWIRE_REDIS_URL", redis.url())
            .env("AGENTWIRE_NODE_ID", name)
            .env("AGENTWIRE_REDIS_TIMEOUT_MS", "500")
            .env("AGENTWIRE_DEMO_AGENT", "false")
            .env(
                "RUST_LOG",
                std::env::var("AGENTWIRE_TEST_NODE_LOG").map_or("off", |_| "info"),
            )
            .stdout(Stdio::null())
            .stderr(match std::env::var("AGENTWIRE_TEST_NODE_LOG") {
                Ok(dir) => std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(format!("{dir}/{name}.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
                Err(_) => Stdio::null(),
            })
            .spawn()
            .expect("start the agentwire binary");
        let node = BinaryNode { addr, child };
        wait_until("the binary node answers /health 200", || {
            TcpStream::connect(addr).is_ok() && get_json(addr, "/health").0 == 200
        });
        node
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BinaryNode {
    fn drop(&mut self) {
        self.kill9();
    }
}
