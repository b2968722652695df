//! Cluster runs: `--server redis1` / `--server redis2` run agentwire on the Redis engine
//! (PROTOCOL.md section 9, docs/CLUSTER.md) with one or two `agentwire serve` nodes on
//! one `redis-server`, so any scenario (and `loadgen compare --servers
//! agentwire,redis1,redis2 ...`) puts the memory engine and the Redis engine side by
//! side.
//!
//! How it fits: `Run::setup` (main.rs) starts the Redis server here (or uses
//! `--redis-url`), then node 0 as the usual gateway (sampled by the [`Monitor`]) and the
//! other nodes here. The client threads spread their connections over the nodes
//! round-robin (client.rs, `Target::addrs`) and each publisher connection posts to node
//! `i % nodes` (driver.rs), so a user's connections sit on several nodes and most events
//! cross nodes through Redis. Around every phase `Run::phase` takes a [`ClusterMark`]:
//! CPU time of every node and of redis-server, and the nodes' store pipelines
//! (`/ws/stats` `engine.round_trips`), which become the record's `cluster.phases`
//! (CPU per delivered frame, Redis round trips per event).
//!
//! [`Monitor`]: crate::gateway::Monitor

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::driver;
use crate::gateway::{self, Gateway};
use crate::sys;

/// The Redis server of a cluster run: started here, or given with `--redis-url`.
pub struct Redis {
    pub url: String,
    /// Our child (None with `--redis-url`; then its CPU is not sampled).
    child: Option<Child>,
    pub log: Option<PathBuf>,
}

impl Redis {
    /// Start `redis-server` on a free loopback port, in memory only (`--save ''
    /// --appendonly no`), pinned like the gateway, and wait until it answers PING.
    pub fn start(
        bin: &Path,
        cpus: Vec<usize>,
        nice: Option<i32>,
        scenario: &str,
        deadline: Instant,
    ) -> io::Result<Redis> {
        let port = gateway::free_port()?;
        let (log, log_path) = gateway::log_file(scenario, "redis-server")?;
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        gateway::pin_child(&mut cmd, cpus, nice);
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::other(format!(
                "cannot start {}: {e} (install it: apt-get install redis-server, or pass --redis-url)",
                bin.display()
            ))
        })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(io::Error::other(format!(
                    "redis-server exited at start ({status}); see {}",
                    log_path.display()
                )));
            }
            if ping(addr).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other(format!(
                    "redis-server did not answer PING in time; see {}",
                    log_path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Redis {
            url: format!("redis://{addr}"),
            child: Some(child),
            log: Some(log_path),
        })
    }

    /// A Redis server someone else runs.
    pub fn external(url: String) -> Redis {
        Redis {
            url,
            child: None,
            log: None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// One `PING` on a fresh connection; Ok when it answered `+PONG`.
fn ping(addr: SocketAddr) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"PING\r\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.starts_with("+PONG") {
        Ok(())
    } else {
        Err(io::Error::other(format!("PING answered {line:?}")))
    }
}

/// The nodes after node 0 and the Redis server they share.
pub struct Cluster {
    pub redis: Redis,
    /// Nodes 1.. (node 0 is the run's gateway).
    pub more: Vec<Gateway>,
    /// Every node's address, node 0 first.
    pub addrs: Vec<SocketAddr>,
    /// Every node's pid, node 0 first.
    pub pids: Vec<Option<u32>>,
}

/// The gateway settings that make a node of this cluster (`agentwire serve` flags).
pub fn node_args(redis_url: &str, prefix: &str, node: usize) -> Vec<String> {
    [
        ("--engine", "redis".to_owned()),
        ("--redis-url", redis_url.to_owned()),
        ("--redis-prefix", prefix.to_owned()),
        ("--node-id", format!("lg-node-{node}")),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_owned(), v])
    .collect()
}

/// CPU ticks of every node and of Redis, and the nodes' store round trips, at one
/// moment.
#[derive(Clone, Debug)]
pub struct ClusterMark {
    at: Instant,
    node_ticks: Vec<Option<u64>>,
    redis_ticks: Option<u64>,
    round_trips: Vec<Option<u64>>,
}

impl Cluster {
    pub fn nodes(&self) -> usize {
        self.addrs.len()
    }

    pub fn mark(&self) -> ClusterMark {
        ClusterMark {
            at: Instant::now(),
            node_ticks: self
                .pids
                .iter()
                .map(|p| p.and_then(|p| sys::cpu_ticks(p, None)))
                .collect(),
            redis_ticks: self.redis.pid().and_then(|p| sys::cpu_ticks(p, None)),
            round_trips: self.addrs.iter().map(|a| round_trips(*a)).collect(),
        }
    }

    /// What one phase cost: CPU of the nodes and of Redis per delivered frame and per
    /// event sent, and Redis round trips (store pipelines) per event sent.
    pub fn phase(&self, a: &ClusterMark, b: &ClusterMark, sent: u64, delivered: u64) -> Value {
        let tick_us = 1e6 / sys::clk_tck().max(1) as f64;
        let diff = |x: Option<u64>, y: Option<u64>| match (x, y) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x)),
            _ => None,
        };
        let node_us: Vec<Option<f64>> = a
            .node_ticks
            .iter()
            .zip(&b.node_ticks)
            .map(|(x, y)| diff(*x, *y).map(|t| t as f64 * tick_us))
            .collect();
        let nodes_total: Option<f64> = node_us.iter().copied().sum();
        let redis_us = diff(a.redis_ticks, b.redis_ticks).map(|t| t as f64 * tick_us);
        let trips: Option<u64> = a
            .round_trips
            .iter()
            .zip(&b.round_trips)
            .map(|(x, y)| diff(*x, *y))
            .sum();
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
        let per = |v: Option<f64>, n: u64| v.filter(|_| n > 0).map(|v| round2(v / n as f64));
        json!({
            "seconds": round2(secs),
            "events_sent": sent,
            "frames_delivered": delivered,
            "node_cpu_pct": node_us.iter().map(|u| u.map(|u| round2(u / secs / 1e4))).collect::<Vec<_>>(),
            "redis_cpu_pct": redis_us.map(|u| round2(u / secs / 1e4)),
            "nodes_cpu_us_per_frame": per(nodes_total, delivered),
            "redis_cpu_us_per_frame": per(redis_us, delivered),
            "nodes_cpu_us_per_event": per(nodes_total, sent),
            "redis_cpu_us_per_event": per(redis_us, sent),
            "round_trips": trips,
            "round_trips_per_event": trips
                .filter(|_| sent > 0)
                .map(|t| (t as f64 / sent as f64 * 1e4).round() / 1e4),
        })
    }

    /// Each node's `/ws/stats` `engine` section, node 0 first.
    pub fn engine_stats(&self) -> Vec<Value> {
        self.addrs
            .iter()
            .map(|a| {
                stats(*a)
                    .and_then(|v| v.get("engine").cloned())
                    .unwrap_or(Value::Null)
            })
            .collect()
    }

    /// Stop nodes 1.. and our Redis server; how each ended.
    pub fn stop(self, wait: Duration) -> Vec<String> {
        let mut out = Vec::new();
        for g in self.more {
            out.push(g.stop(wait));
        }
        if let Some(mut c) = self.redis.child {
            sys::terminate(c.id());
            out.push(format!(
                "redis-server: {}",
                driver::wait_child(&mut c, wait)
            ));
        }
        out
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn stats(addr: SocketAddr) -> Option<Value> {
    match driver::http_get(addr, "/ws/stats") {
        Ok((200, body)) => serde_json::from_slice(&body).ok(),
        _ => None,
    }
}

/// The node's store pipelines so far (`/ws/stats` `engine.round_trips`).
fn round_trips(addr: SocketAddr) -> Option<u64> {
    stats(addr)?.pointer("/engine/round_trips")?.as_u64()
}

/// The human line of one phase's cluster figures.
pub fn phase_line(label: &str, v: &Value) -> String {
    // A figure with its unit, or "n/a" (Redis not ours: its CPU is not sampled).
    let f = |k: &str, unit: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .map_or("n/a".to_owned(), |x| format!("{x}{unit}"))
    };
    let nodes = v
        .get("node_cpu_pct")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| x.as_f64().map_or("n/a".into(), |x| format!("{x:.0}%")))
                .collect::<Vec<_>>()
                .join(" + ")
        })
        .unwrap_or_default();
    format!(
        "  cluster    {label}: nodes CPU {nodes}, redis-server {}; per delivered frame: nodes {}, redis {}; Redis round trips per event {}",
        f("redis_cpu_pct", "%"),
        f("nodes_cpu_us_per_frame", " us"),
        f("redis_cpu_us_per_frame", " us"),
        f("round_trips_per_event", ""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_args_name_the_engine_and_a_distinct_node() {
        let a = node_args("redis://127.0.0.1:1", "lgx", 0);
        let b = node_args("redis://127.0.0.1:1", "lgx", 1);
        assert_eq!(
            a,
            [
                "--engine",
                "redis",
                "--redis-url",
                "redis://127.0.0.1:1",
                "--redis-prefix",
                "lgx",
                "--node-id",
                "lg-node-0"
            ]
        );
        assert_ne!(a, b);
    }

    #[test]
    fn phase_figures_divide_by_what_was_delivered() {
        let c = Cluster {
            redis: Redis::external("redis://x".into()),
            more: Vec::new(),
            addrs: Vec::new(),
            pids: Vec::new(),
        };
        let t = Instant::now();
        let tck = sys::clk_tck();
        let a = ClusterMark {
            at: t,
            node_ticks: vec![Some(0), Some(10)],
            redis_ticks: Some(0),
            round_trips: vec![Some(5), Some(0)],
        };
        let b = ClusterMark {
            at: t + Duration::from_secs(1),
            node_ticks: vec![Some(tck), Some(10 + tck)],
            redis_ticks: Some(tck),
            round_trips: vec![Some(15), Some(10)],
        };
        let v = c.phase(&a, &b, 1000, 2000);
        assert_eq!(v["round_trips"], 20);
        assert_eq!(v["round_trips_per_event"], 0.02);
        // Two nodes a second each, over 2000 frames: 1000 us per frame.
        assert_eq!(v["nodes_cpu_us_per_frame"], 1000.0);
        assert_eq!(v["redis_cpu_us_per_frame"], 500.0);
        assert_eq!(v["redis_cpu_pct"], 100.0);
        let line = phase_line("step 1", &v);
        assert!(line.contains("round trips per event 0.02"), "{line}");
        // Pipelines carry many events: kept to 4 decimals, not rounded away.
        let v2 = c.phase(&a, &b, 200_000, 600_000);
        assert_eq!(v2["round_trips_per_event"], 0.0001);
    }
}
