//! Redis behind Sentinel and Redis over TLS, as real processes (Debian's `redis-server`,
//! which is also the sentinel: `redis-server <conf> --sentinel`): a master, a replica
//! (`--replicaof`) and three sentinels watching them ([`SentinelSet`], a small
//! `down-after-milliseconds` so a failover takes seconds), and a TLS-only server
//! ([`TlsRedis`], `--tls-port`). Everything is killed and its files removed on drop.

#![allow(dead_code)] // each test module uses its own subset

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::*;

/// The name the sentinels know the master by.
pub const MASTER_NAME: &str = "awmaster";
/// How long a failover may take here at most (detection, election, promotion, the
/// nodes' reconnect backoff), on a loaded machine.
pub const FAILOVER_WAIT: Duration = Duration::from_secs(60);

/// A scratch directory of one test; removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("agentwire-it-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `redis-server` process (a server or a sentinel); killed on drop.
pub struct Proc {
    pub port: u16,
    child: Option<Child>,
}

impl Proc {
    fn spawn(port: u16, args: &[String]) -> Proc {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (bash tools/test.sh installs it with apt)");
        Proc {
            port,
            child: Some(child),
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain connection to `127.0.0.1:port` (the redis crate, as the gateway uses).
pub fn plain_con(port: u16) -> ::redis::RedisResult<::redis::Connection> {
    let c = ::redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let con = c.get_connection_with_timeout(Duration::from_secs(2))?;
    con.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(con)
}

/// A connection to `127.0.0.1:port`: plain, or TLS checked against the PEM `ca`.
pub fn con_to(port: u16, ca: Option<&str>) -> ::redis::RedisResult<::redis::Connection> {
    let Some(ca) = ca else {
        return plain_con(port);
    };
    let c = ::redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}"),
        ::redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.as_bytes().to_vec()),
        },
    )?;
    let con = c.get_connection_with_timeout(Duration::from_secs(2))?;
    con.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(con)
}

/// Wait until `f` holds, for up to `within`.
pub fn wait_long(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A master, its replica and three sentinels (quorum 2); with TLS, every one of them
/// speaks only TLS (replication and the sentinels' links too).
pub struct SentinelSet {
    pub master: Proc,
    pub replica: Proc,
    pub sentinels: Vec<Proc>,
    /// The PEM of the certificate every process presents (its own CA), with TLS.
    pub ca: Option<String>,
    /// The sentinels' `requirepass`, if any.
    pub sentinel_password: Option<String>,
    _dir: Scratch,
}

/// The TLS lines of a server's or sentinel's config (`--name value` or file lines).
fn tls_lines(files: &tls::CertFiles) -> Vec<(String, String)> {
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_owned();
    vec![
        ("tls-cert-file".into(), path(&files.cert)),
        ("tls-key-file".into(), path(&files.key)),
        ("tls-ca-cert-file".into(), path(&files.cert)),
        ("tls-auth-clients".into(), "no".into()),
        ("tls-replication".into(), "yes".into()),
    ]
}

impl SentinelSet {
    pub fn start() -> SentinelSet {
        SentinelSet::start_with(None)
    }

    /// With `tls`: every process on TLS only, presenting that certificate.
    pub fn start_with(tls: Option<&tls::CertFiles>) -> SentinelSet {
        SentinelSet::start_opts(tls, None)
    }

    /// With `sentinel_password`: the sentinels ask it (`requirepass`) of clients and of
    /// each other (`sentinel sentinel-pass`).
    pub fn start_opts(
        tls: Option<&tls::CertFiles>,
        sentinel_password: Option<&str>,
    ) -> SentinelSet {
        let dir = Scratch::new("sentinel");
        let ca = tls.map(|f| std::fs::read_to_string(&f.cert).expect("read cert"));
        let ca_ref = ca.as_deref();
        let server = |port: u16, extra: &[&str]| {
            let port_args: Vec<String> = match tls {
                None => vec!["--port".into(), port.to_string()],
                Some(files) => {
                    let mut a = vec![
                        "--port".into(),
                        "0".into(),
                        "--tls-port".into(),
                        port.to_string(),
                    ];
                    for (k, v) in tls_lines(files) {
                        a.push(format!("--{k}"));
                        a.push(v);
                    }
                    a
                }
            };
            let mut args: Vec<String> = port_args;
            args.extend(
                [
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    dir.0.to_str().expect("utf-8 dir"),
                    "--dbfilename",
                    &format!("dump-{port}.rdb"),
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            args.extend(extra.iter().map(|s| s.to_string()));
            Proc::spawn(port, &args)
        };
        let master = server(free_port(), &[]);
        wait_until("the master answers", || con_to(master.port, ca_ref).is_ok());
        let mport = master.port.to_string();
        let replica = server(free_port(), &["--replicaof", "127.0.0.1", &mport]);
        wait_until("the replica is in sync", || {
            con_to(replica.port, ca_ref)
                .and_then(|mut c| {
                    ::redis::cmd("INFO")
                        .arg("replication")
                        .query::<String>(&mut c)
                })
                .is_ok_and(|info| info.contains("master_link_status:up"))
        });
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port();
                let conf = dir.0.join(format!("sentinel-{i}.conf"));
                // Sentinel rewrites its file (what it learnt): one per sentinel.
                let listen = match tls {
                    None => format!("port {port}\n"),
                    Some(files) => {
                        let mut l = format!("port 0\ntls-port {port}\n");
                        for (k, v) in tls_lines(files) {
                            l.push_str(&format!("{k} {v}\n"));
                        }
                        l
                    }
                };
                let listen = match sentinel_password {
                    None => listen,
                    Some(pw) => format!("{listen}requirepass {pw}\nsentinel sentinel-pass {pw}\n"),
                };
                std::fs::write(
                    &conf,
                    format!(
                        "{listen}bind 127.0.0.1\ndir {dir}\n\
                         sentinel monitor {MASTER_NAME} 127.0.0.1 {mport} 2\n\
                         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                         sentinel failover-timeout {MASTER_NAME} 10000\n\
                         sentinel parallel-syncs {MASTER_NAME} 1\n",
                        dir = dir.0.display()
                    ),
                )
                .expect("write sentinel.conf");
                Proc::spawn(
                    port,
                    &[
                        conf.to_str().expect("utf-8 path").to_owned(),
                        "--sentinel".to_owned(),
                    ],
                )
            })
            .collect::<Vec<_>>();
        let set = SentinelSet {
            master,
            replica,
            sentinels,
            ca,
            sentinel_password: sentinel_password.map(str::to_owned),
            _dir: dir,
        };
        // Every sentinel sees the replica and the two others (they find each other
        // through the master's hello channel, every 2 s): a failover can be agreed.
        for s in &set.sentinels {
            wait_long("the sentinels know each other", FAILOVER_WAIT, || {
                set.sentinel_con(s.port)
                    .and_then(|mut c| {
                        ::redis::cmd("SENTINEL")
                            .arg("CKQUORUM")
                            .arg(MASTER_NAME)
                            .query::<String>(&mut c)
                    })
                    .is_ok_and(|ok| ok.contains("3 usable"))
                    && set
                        .sentinel_con(s.port)
                        .and_then(|mut c| {
                            ::redis::cmd("SENTINEL")
                                .arg("REPLICAS")
                                .arg(MASTER_NAME)
                                .query::<Vec<::redis::Value>>(&mut c)
                        })
                        .is_ok_and(|r| r.len() == 1)
            });
        }
        set
    }

    /// A connection to one of its processes (TLS when the set is).
    pub fn con(&self, port: u16) -> ::redis::RedisResult<::redis::Connection> {
        con_to(port, self.ca.as_deref())
    }

    /// A connection to one of its sentinels (authenticated when they ask it).
    pub fn sentinel_con(&self, port: u16) -> ::redis::RedisResult<::redis::Connection> {
        let mut c = self.con(port)?;
        if let Some(pw) = &self.sentinel_password {
            let _: String = ::redis::cmd("AUTH").arg(pw).query(&mut c)?;
        }
        Ok(c)
    }

    /// `redis_url` naming the three sentinels.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let scheme = if self.ca.is_some() {
            "rediss+sentinel"
        } else {
            "redis+sentinel"
        };
        format!("{scheme}://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The port of the master the first answering sentinel names now.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let mut c = self.sentinel_con(s.port).ok()?;
            let (_, port): (String, u16) = ::redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME)
                .query(&mut c)
                .ok()?;
            Some(port)
        })
    }

    /// Block until the replica has every write the master took so far (`WAIT`).
    pub fn sync_replica(&self) {
        let mut c = self.con(self.master.port).expect("master connection");
        let acked: i64 = ::redis::cmd("WAIT")
            .arg(1)
            .arg(10_000)
            .query(&mut c)
            .expect("WAIT");
        assert_eq!(acked, 1, "the replica acknowledged the writes");
    }
}

/// [`config`] with the Redis engine on `url`, as node `name`.
pub fn engine_config(url: &str, name: &str) -> Config {
    let mut cfg = config();
    cfg.set("engine", "redis").expect("engine");
    cfg.set("redis_url", url).expect("redis_url");
    cfg.set("node_id", name).expect("node_id");
    cfg.set("redis_timeout_ms", "500")
        .expect("redis_timeout_ms");
    cfg
}

/// A `redis-server` that speaks only TLS (`--port 0 --tls-port`), with the certificate
/// and key in `files` (no client certificates asked).
pub struct TlsRedis {
    pub proc: Proc,
}

impl TlsRedis {
    pub fn start(files: &tls::CertFiles) -> TlsRedis {
        let port = free_port();
        let args: Vec<String> = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            files.cert.to_str().expect("utf-8"),
            "--tls-key-file",
            files.key.to_str().expect("utf-8"),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::spawn(port, &args);
        wait_until("the TLS redis-server listens", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        TlsRedis { proc }
    }

    /// `rediss://` for it (the certificate names localhost and 127.0.0.1).
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.proc.port)
    }
}
