//! The in-process gateway every test starts ([`TestGateway`], [`config`]) and the
//! process figures tests assert on (RSS, a thread's CPU time).

#![allow(dead_code)] // each test module uses its own subset

use super::*;

/// The configuration every test starts from: ephemeral port, HS256 with [`SECRET`],
/// publishing enabled with [`PUBLISH_KEY`], no demo agent, a short shutdown grace.
pub fn config() -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        jwt_secret: Some(SECRET.into()),
        publish_key: Some(PUBLISH_KEY.into()),
        demo_agent: Some(false),
        shutdown_grace_ms: 1000,
        ..Config::default()
    }
}

/// Who consumes the gateway's inbound channel (`user_message`, `cancel`).
pub enum Agent {
    /// Nobody: the receiver is dropped, so `user_message` gets `no_agent`.
    None,
    /// The built-in demo agent (`agentwire::demo::spawn`).
    Demo,
    /// The test takes the receiver ([`TestGateway::inbound`]) and runs its own worker.
    Test,
}

/// A gateway running on its own reactor thread. Dropping it asks the gateway to shut
/// down (without waiting for it).
pub struct TestGateway {
    pub addr: SocketAddr,
    pub emitter: Emitter,
    pub epoch: String,
    inbound: Option<Receiver<Inbound>>,
    handle: Option<GatewayHandle>,
}

impl TestGateway {
    pub fn start(cfg: Config, agent: Agent) -> TestGateway {
        log_capture::install();
        let mut gateway = Gateway::new(cfg).expect("gateway config is valid and binds");
        let addr = gateway.local_addr();
        let emitter = gateway.emitter();
        let epoch = gateway.epoch().to_owned();
        let inbound = match agent {
            Agent::None => None,
            Agent::Demo => {
                let rx = gateway.inbound().expect("inbound taken once");
                agentwire::demo::spawn(emitter.clone(), rx).expect("demo agent thread");
                None
            }
            Agent::Test => gateway.inbound(),
        };
        let handle = gateway.spawn().expect("reactor thread");
        TestGateway {
            addr,
            emitter,
            epoch,
            inbound,
            handle: Some(handle),
        }
    }

    /// A gateway with [`config`] and no agent.
    pub fn plain() -> TestGateway {
        TestGateway::start(config(), Agent::None)
    }

    /// The inbound channel (only with [`Agent::Test`]; once).
    pub fn inbound(&mut self) -> Receiver<Inbound> {
        self.inbound
            .take()
            .expect("started with Agent::Test, taken once")
    }

    /// Start a test worker on the inbound channel: it answers every `user_message`
    /// with `agent_started` then `agent_completed` (agent `test_agent`, the message's
    /// run id and thread), and forwards every inbound message to the returned channel.
    pub fn echo_worker(&mut self) -> Receiver<Inbound> {
        let inbound = self.inbound();
        let emitter = self.emitter.clone();
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for msg in inbound.iter() {
                if let Inbound::UserMessage {
                    user_id,
                    thread_id,
                    run_id,
                    text,
                    ..
                } = &msg
                {
                    if let Ok(mut run) =
                        emitter.run(user_id, thread_id.as_deref(), run_id, "test_agent")
                    {
                        let _ = run.agent_started(&json!({ "text": text }));
                        let _ = run.agent_completed(&json!({ "answer": text }));
                    }
                }
                let _ = tx.send(msg);
            }
        });
        rx
    }

    /// Shut down through the library and wait for the reactor thread; returns the
    /// join result and how long it took. Bounded: panics after `within`.
    pub fn shutdown_and_join(&mut self, within: Duration) -> (Result<(), String>, Duration) {
        let handle = self.handle.take().expect("not shut down yet");
        let started = Instant::now();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(handle.shutdown().map_err(|e| e.to_string()));
        });
        match rx.recv_timeout(within) {
            Ok(result) => (result, started.elapsed()),
            Err(_) => panic!("GatewayHandle::shutdown did not return within {within:?}"),
        }
    }

    pub fn connect(&self, user: &str) -> Client {
        connect(self.addr, user)
    }

    pub fn stats(&self) -> Value {
        get_json(self.addr, "/ws/stats").1
    }

    /// Poll `/ws/stats` until `pred` holds.
    pub fn wait_stats(&self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last stats: {s}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Poll `/ws/stats` until exactly `n` sessions are open.
    pub fn wait_open(&self, n: u64) -> Value {
        self.wait_stats(&format!("{n} open connections"), |s| {
            s["connections"]["open"] == json!(n)
        })
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if self.handle.take().is_some() {
            let _ = self.emitter.shutdown();
        }
    }
}

// -------------------------------------------------------- process figures

/// This process's resident set size in bytes (`VmRSS` of `/proc/self/status`). The
/// gateways of the tests run in-process, so their memory is in it.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS in /proc/self/status")
}

/// CPU time (user + system) of one thread of this process, from
/// `/proc/self/task/TID/stat` (clock ticks of 10 ms).
pub fn thread_cpu(tid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .unwrap_or_else(|e| panic!("read stat of thread {tid}: {e}"));
    // Fields after the parenthesised name (which may hold spaces): state is field 3,
    // utime 14 and stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .expect("stat has a name");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11)
        .zip(fields.get(12))
        .map(|(u, s)| u.parse::<u64>().unwrap_or(0) + s.parse::<u64>().unwrap_or(0))
        .expect("utime and stime");
    Duration::from_millis(ticks * 10)
}

fn task_ids() -> std::collections::BTreeSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .expect("list /proc/self/task")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn task_name(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Serializes [`TestGateway::start_watched`], so the one new reactor thread between
/// two listings of `/proc/self/task` is this gateway's.
static WATCHED_START: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl TestGateway {
    /// As [`TestGateway::start`], also returning the OS thread id of this gateway's
    /// reactor thread, for [`thread_cpu`].
    pub fn start_watched(cfg: Config, agent: Agent) -> (TestGateway, u32) {
        let _one_at_a_time = WATCHED_START.lock().unwrap_or_else(|e| e.into_inner());
        let before = task_ids();
        let gw = TestGateway::start(cfg, agent);
        // The thread names itself once it runs ("agentwire-reactor", cut to 15 bytes).
        let deadline = Instant::now() + WAIT;
        loop {
            let new: Vec<u32> = task_ids()
                .difference(&before)
                .copied()
                .filter(|&t| task_name(t) == "agentwire-react")
                .collect();
            match new.as_slice() {
                [tid] => return (gw, *tid),
                [] => assert!(Instant::now() < deadline, "reactor thread not found"),
                many => panic!("more than one new reactor thread: {many:?}"),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The lines a spawned process writes to its piped stderr, as they come (a reader
/// thread sends each; the channel closes when the process closes stderr).
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}
