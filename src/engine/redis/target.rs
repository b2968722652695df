//! Where the engine's connections go (`redis_url`, `redis_tls_ca_file`; docs/CLUSTER.md,
//! "Sentinel and TLS"): one server, or the master that Redis Sentinel names.
//!
//! - `redis://[user:password@]host:port[/db]`: one server, plain TCP.
//! - `rediss://[user:password@]host:port[/db]`: one server over TLS (rustls, the
//!   aws-lc-rs provider the gateway already uses). The server's certificate is checked
//!   against `redis_tls_ca_file` when set (a private CA, PEM), else the system's trust
//!   store; the host name must match it.
//! - `redis+sentinel://[user:password@]host[:port][,host[:port]...]/<master_name>[/db]`:
//!   Sentinel (port 26379 unless given). `rediss+sentinel://` speaks TLS to the sentinels
//!   and to the master (same CA). The credentials are the master's; the sentinels are
//!   asked with `redis_sentinel_password` when set (their `requirepass`), else without
//!   AUTH.
//!
//! Every engine thread calls [`Target::connect`] on its own whenever it (re)connects:
//! with Sentinel that asks the sentinels in turn `SENTINEL GET-MASTER-ADDR-BY-NAME`,
//! connects to the address the first one names and checks with `ROLE` that it is a
//! master (a sentinel that has not yet seen a failover names the old one), so a node
//! follows a failover by itself: its connection to the old master breaks (killed, or
//! closed by Sentinel when it demotes it, or the store thread meets `READONLY`), and the
//! reconnect finds the new one. Every step is bounded by `redis_timeout_ms` (the redis
//! crate's own `sentinel` module connects without timeouts, hence this small client of
//! the [Sentinel client protocol](https://redis.io/docs/latest/develop/reference/sentinel-clients/)).

use std::sync::Mutex;
use std::time::Duration;

use redis::{
    Client, Connection, ErrorKind, IntoConnectionInfo, ProtocolVersion, RedisError, RedisResult,
    TlsCertificates,
};

/// The default port of a sentinel.
pub(crate) const SENTINEL_PORT: u16 = 26379;
/// Sentinels in one `redis_url` at most.
pub(crate) const SENTINELS_MAX: usize = 16;

/// A parsed `redis+sentinel://` (or `rediss+sentinel://`) URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SentinelUrl {
    /// TLS to the sentinels and the master.
    pub tls: bool,
    /// `user:password` (as written, percent-encoded), for the master.
    pub userinfo: Option<String>,
    /// `(host, port)`; an IPv6 host without its brackets.
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    pub db: i64,
}

/// The form of a `redis_url`, checked (config validation and the engine's start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UrlForm {
    /// `redis://` (tls false) or `rediss://` (tls true).
    Single {
        tls: bool,
    },
    Sentinel(SentinelUrl),
}

/// What `redis_url` should look like, for error messages.
pub(crate) const URL_FORMS: &str = "expected redis://[user:password@]host:port[/db], \
     rediss://... (TLS) or redis+sentinel://[user:password@]host[:port][,host[:port]...]/<master_name>[/db] \
     (rediss+sentinel:// for TLS)";

/// Check a `redis_url` and tell its form; the error says what is wrong.
pub(crate) fn parse_url(url: &str) -> Result<UrlForm, String> {
    if url.contains('#') {
        // The redis crate reads `#insecure` as "skip certificate checks": never here.
        return Err("a fragment (#...) is not allowed".into());
    }
    if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        return parse_sentinel(rest, false).map(UrlForm::Sentinel);
    }
    if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
        return parse_sentinel(rest, true).map(UrlForm::Sentinel);
    }
    let tls = if url.starts_with("redis://") {
        false
    } else if url.starts_with("rediss://") {
        true
    } else {
        return Err(URL_FORMS.into());
    };
    // The redis crate's own parser says what else is wrong (port, db, ...).
    Client::open(url).map_err(|e| format!("{e} ({URL_FORMS})"))?;
    Ok(UrlForm::Single { tls })
}

/// `[userinfo@]host[:port][,host[:port]...]/<master>[/db]`
fn parse_sentinel(rest: &str, tls: bool) -> Result<SentinelUrl, String> {
    let (authority, path) = rest
        .split_once('/')
        .ok_or("redis+sentinel:// needs /<master_name> after the sentinels")?;
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_owned()), h),
        None => (None, authority),
    };
    if userinfo.as_deref() == Some("") {
        return Err("empty credentials before @".into());
    }
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        sentinels.push(parse_host(host)?);
    }
    if sentinels.len() > SENTINELS_MAX {
        return Err(format!("at most {SENTINELS_MAX} sentinels"));
    }
    let (master, db) = match path.split_once('/') {
        Some((m, db)) => (
            m,
            db.parse::<i64>()
                .ok()
                .filter(|d| (0..=1_000_000).contains(d))
                .ok_or_else(|| format!("db {db:?} is not a number"))?,
        ),
        None => (path, 0),
    };
    if master.is_empty()
        || master.len() > 128
        || !master
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "master name {master:?}: expected 1 to 128 of A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(SentinelUrl {
        tls,
        userinfo,
        sentinels,
        master: master.to_owned(),
        db,
    })
}

/// `host[:port]` or `[v6][:port]`.
fn parse_host(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("sentinel {s:?}: expected host[:port] or [ipv6][:port]");
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() || host.contains(['@', '/', ' ']) {
        return Err(bad());
    }
    let port = match port {
        None => SENTINEL_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?,
    };
    Ok((host.to_owned(), port))
}

/// `host` in a URL: an IPv6 address in brackets.
fn url_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Where to connect: built once at the engine's start, shared by its threads.
pub(crate) struct Target {
    kind: Kind,
    timeout: Duration,
}

enum Kind {
    /// One server: its client speaking RESP2 (the store thread) and RESP3 (the feed).
    Single(Box<(Client, Client)>),
    Sentinel {
        url: SentinelUrl,
        sentinels: Vec<Client>,
        ca: Option<Vec<u8>>,
        /// The master last connected to (logged when it changes).
        last: Mutex<Option<(String, u16)>>,
    },
}

/// A client for `url`, with the private CA for `rediss://`, speaking `protocol`.
fn client(
    url: impl IntoConnectionInfo,
    ca: Option<&[u8]>,
    protocol: ProtocolVersion,
) -> RedisResult<Client> {
    let info = url.into_connection_info()?;
    let settings = info.redis_settings().clone().set_protocol(protocol);
    let info = info.set_redis_settings(settings);
    match ca {
        Some(ca) if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) => {
            Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.to_vec()),
                },
            )
        }
        _ => Client::open(info),
    }
}

impl Target {
    /// Check `url` and build its clients; `ca` is the PEM of `redis_tls_ca_file`.
    /// `sentinel_password` (`redis_sentinel_password`): the sentinels' `requirepass`.
    pub(crate) fn new(
        url: &str,
        ca: Option<Vec<u8>>,
        sentinel_password: Option<&str>,
        timeout: Duration,
    ) -> Result<Target, String> {
        let kind = match parse_url(url)? {
            UrlForm::Single { .. } => {
                let of = |protocol| client(url, ca.as_deref(), protocol).map_err(|e| e.to_string());
                Kind::Single(Box::new((
                    of(ProtocolVersion::RESP2)?,
                    of(ProtocolVersion::RESP3)?,
                )))
            }
            UrlForm::Sentinel(s) => {
                let scheme = if s.tls { "rediss" } else { "redis" };
                let sentinels = s
                    .sentinels
                    .iter()
                    .map(|(h, p)| {
                        let mut info =
                            format!("{scheme}://{}:{p}", url_host(h)).into_connection_info()?;
                        if let Some(pw) = sentinel_password {
                            info = info.set_redis_settings(
                                redis::RedisConnectionInfo::default().set_password(pw),
                            );
                        }
                        client(info, ca.as_deref(), ProtocolVersion::RESP2)
                    })
                    .collect::<RedisResult<Vec<_>>>()
                    .map_err(|e| e.to_string())?;
                Kind::Sentinel {
                    url: s,
                    sentinels,
                    ca,
                    last: Mutex::new(None),
                }
            }
        };
        Ok(Target { kind, timeout })
    }

    /// A new connection to the server (with Sentinel: to the master the sentinels name
    /// now), connected within the timeout; the caller sets its read/write timeouts.
    pub(crate) fn connect(&self) -> RedisResult<Connection> {
        self.connect_speaking(ProtocolVersion::RESP2)
    }

    /// [`Target::connect`], the connection speaking RESP3 (Redis 6 or later): the feed
    /// thread's pub/sub connection, on which every value read is then a push.
    pub(crate) fn connect_resp3(&self) -> RedisResult<Connection> {
        self.connect_speaking(ProtocolVersion::RESP3)
    }

    fn connect_speaking(&self, protocol: ProtocolVersion) -> RedisResult<Connection> {
        match &self.kind {
            Kind::Single(clients) => match protocol {
                ProtocolVersion::RESP2 => &clients.0,
                _ => &clients.1,
            }
            .get_connection_with_timeout(self.timeout),
            Kind::Sentinel {
                url,
                sentinels,
                ca,
                last,
            } => {
                let mut why: Option<RedisError> = None;
                for (sentinel, (host, port)) in sentinels.iter().zip(&url.sentinels) {
                    match self.via(sentinel, url, ca.as_deref(), protocol) {
                        Ok((con, addr)) => {
                            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                            if last.as_ref() != Some(&addr) {
                                log::info!(
                                    "redis: sentinel {host}:{port} names {}:{} master of {:?}",
                                    addr.0,
                                    addr.1,
                                    url.master
                                );
                                *last = Some(addr);
                            }
                            return Ok(con);
                        }
                        Err(e) => {
                            log::debug!("redis: sentinel {host}:{port}: {e}");
                            why = Some(e);
                        }
                    }
                }
                let detail = why.map(|e| e.to_string()).unwrap_or_default();
                Err(RedisError::from((
                    ErrorKind::Io,
                    "no sentinel named a reachable master",
                    format!("master {:?}: {detail}", url.master),
                )))
            }
        }
    }

    /// Ask one sentinel for the master's address, connect to it and check its role.
    fn via(
        &self,
        sentinel: &Client,
        url: &SentinelUrl,
        ca: Option<&[u8]>,
        protocol: ProtocolVersion,
    ) -> RedisResult<(Connection, (String, u16))> {
        let mut con = sentinel.get_connection_with_timeout(self.timeout)?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&url.master)
            .query(&mut con)?;
        drop(con);
        let Some((host, port)) = addr else {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "the sentinel does not know this master name",
                url.master.clone(),
            )));
        };
        let scheme = if url.tls { "rediss" } else { "redis" };
        let auth = url
            .userinfo
            .as_deref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let master = client(
            format!("{scheme}://{auth}{}:{port}/{}", url_host(&host), url.db),
            ca,
            protocol,
        )?;
        let mut con = master.get_connection_with_timeout(self.timeout)?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut con)?;
        match role.first() {
            Some(redis::Value::BulkString(r)) if r == b"master" => Ok((con, (host, port))),
            _ => Err(RedisError::from((
                ErrorKind::Io,
                "the server the sentinel names is not a master (a failover in progress?)",
                format!("{host}:{port}"),
            ))),
        }
    }
}

/// Read `redis_tls_ca_file`: PEM holding at least one certificate (else every TLS
/// connect would fail later with an unknown issuer).
pub(crate) fn read_ca_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut certs = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
        certs += 1;
    }
    if certs == 0 {
        return Err(format!(
            "{}: no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            path.display()
        ));
    }
    Ok(pem)
}

/// A `READONLY` answer: the server was demoted to a replica (a failover); the link must
/// go and the next connect asks Sentinel again. A script's write meets it as an error
/// whose text carries the code.
pub(crate) fn is_readonly(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || e.to_string().contains("READONLY")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse() {
        let u = parse_url("redis+sentinel://a:p%40ss@h1:26380,[::1],h3/mymaster/2").unwrap();
        assert_eq!(
            u,
            UrlForm::Sentinel(SentinelUrl {
                tls: false,
                userinfo: Some("a:p%40ss".into()),
                sentinels: vec![
                    ("h1".into(), 26380),
                    ("::1".into(), SENTINEL_PORT),
                    ("h3".into(), SENTINEL_PORT)
                ],
                master: "mymaster".into(),
                db: 2,
            })
        );
        let UrlForm::Sentinel(u) = parse_url("rediss+sentinel://[::1]:7/m-1.x").unwrap() else {
            panic!()
        };
        assert!(u.tls);
        assert_eq!(u.sentinels, vec![("::1".into(), 7)]);
        assert_eq!((u.master.as_str(), u.db), ("m-1.x", 0));
        assert_eq!(
            parse_url("redis://127.0.0.1:6379/1").unwrap(),
            UrlForm::Single { tls: false }
        );
        assert_eq!(
            parse_url("rediss://localhost:6380").unwrap(),
            UrlForm::Single { tls: true }
        );
    }

    #[test]
    fn bad_urls_say_why() {
        for (url, says) in [
            ("redis+sentinel://h1:26379", "/<master_name>"),
            ("redis+sentinel://h1:26379/", "master name"),
            ("redis+sentinel://h1:x/m", "sentinel \"h1:x\""),
            ("redis+sentinel://h1:0/m", "sentinel \"h1:0\""),
            ("redis+sentinel://h1,,h2/m", "sentinel \"\""),
            ("redis+sentinel://[::1/m", "sentinel \"[::1\""),
            ("redis+sentinel://h/m/x", "db \"x\""),
            ("redis+sentinel://h/m a", "master name"),
            ("redis+sentinel://@h/m", "empty credentials"),
            ("rediss://h:6380/#insecure", "fragment"),
            ("http://h", "expected redis://"),
            ("redis://h:notaport", "expected redis://"),
        ] {
            let e = parse_url(url).expect_err(url);
            assert!(e.contains(says), "{url}: {e}");
        }
        let many = (0..=SENTINELS_MAX)
            .map(|i| format!("h{i}"))
            .collect::<Vec<_>>();
        let e = parse_url(&format!("redis+sentinel://{}/m", many.join(","))).unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn readonly_answers_are_recognised() {
        let e = RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(is_readonly(&e));
        let e = RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "oops",
        ));
        assert!(!is_readonly(&e));
    }
}
