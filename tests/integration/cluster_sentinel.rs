//! The Redis engine behind Sentinel and over TLS (PROTOCOL.md section 9, docs/CLUSTER.md
//! "Sentinel and TLS"), against real processes: a master, a replica and three sentinels
//! (`support/sentinel.rs`), `kill -9` of the master, and a TLS-only `redis-server` with
//! a private CA (and with the wrong one). Every check is per event (seq and data).

use serde_json::json;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::*;

/// Publish event `i` of `user` through `addr` with an idempotency key (a retry of a
/// 503 whose outcome is unknown is stored once), retrying until 202 for up to `within`.
fn publish_until_accepted(addr: SocketAddr, user: &str, i: u64, within: Duration) {
    let mut ev = pub_event("text_delta", user, None, "r-1", json!({ "i": i }));
    ev["idempotency_key"] = json!(format!("{user}-{i}"));
    let body = json!([ev]);
    let deadline = Instant::now() + within;
    loop {
        let r = publish(addr, &body);
        match r.status {
            202 => return,
            503 => {
                let last = r.text();
                assert!(
                    Instant::now() < deadline,
                    "event {i} not accepted within {within:?}; last answer: 503 {last}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            other => panic!("publish of event {i}: {other} {}", r.text()),
        }
    }
}

/// A node on `url` whose engine is connected (`/health` 200).
fn ready_node(url: &str, name: &str, more: &[(&str, &str)]) -> TestGateway {
    let mut cfg = engine_config(url, name);
    for (k, v) in more {
        cfg.set(k, v).expect("setting");
    }
    let node = TestGateway::start(cfg, Agent::None);
    wait_long("the node's engine connects", FAILOVER_WAIT, || {
        get_json(node.addr, "/health").0 == 200
    });
    // /health follows the store thread; an upgrade also needs the feed thread's
    // connection (a TLS connect takes longer): 503 until then.
    wait_long("the node takes connections", FAILOVER_WAIT, || {
        let auth = format!("Bearer {}", token("probe"));
        connect_with(node.addr, "/ws", &[("Authorization", &auth)]).is_ok()
    });
    node
}

/// A connection of `user` to `path` on a node that is following a failover: its store
/// connection may be back (a publish accepted) before its pub/sub connection (an upgrade
/// is 503 `engine_unavailable` until then, longer over TLS), so upgrades are retried.
fn connect_when_taken(addr: std::net::SocketAddr, user: &str, path: &str) -> Client {
    let auth = format!("Bearer {}", token(user));
    let mut client = None;
    wait_long("the node takes the connection", FAILOVER_WAIT, || {
        client = connect_with(addr, path, &[("Authorization", &auth)]).ok();
        client.is_some()
    });
    client.expect("connected")
}

/// Two ready nodes on `url` (`{tag}0`, `{tag}1`, with `more` settings), a client of
/// `user` on the first and events `0..n` published through the second, received in
/// order: the nodes, the client and its epoch.
fn delivering(
    url: &str,
    tag: &str,
    more: &[(&str, &str)],
    user: &str,
    n: u64,
) -> (TestGateway, TestGateway, Client, String) {
    let n0 = ready_node(url, &format!("{tag}0"), more);
    let n1 = ready_node(url, &format!("{tag}1"), more);
    let mut c = n0.connect(user);
    for i in 0..n {
        publish_until_accepted(n1.addr, user, i, WAIT);
    }
    let seen = c.recv_events(n as usize);
    assert_contiguous(&seen, 1);
    assert_eq!(ids(&seen, user), (0..n).collect::<Vec<_>>());
    let epoch = epoch_of(&c);
    (n0, n1, c, epoch)
}

/// After a failover: the client's next frame is the event `seq` (pub/sub delivered it)
/// or a 1013 close (the node saw it may have missed some: resume).
fn next_event_or_1013(c: &mut Client, seq: u64) {
    match c.next_frame(FAILOVER_WAIT) {
        Frame::Json(v) => assert_eq!(v["seq"], seq, "{v}"),
        Frame::Close(Some((1013, _))) => {}
        other => panic!("expected event {seq} or 1013 after the failover, got {other:?}"),
    }
}

#[test]
fn nodes_follow_a_sentinel_failover_after_kill_9_of_the_master_and_clients_resume_exactly() {
    follow_a_kill_9(SentinelSet::start(), &[], "fo-u1");
}

/// `rediss+sentinel://`: TLS to the sentinels and to the master, one private CA.
#[test]
fn over_tls_too_nodes_follow_a_sentinel_failover_after_kill_9_of_the_master() {
    let cert = tls::TestCert::new();
    let files = tls::CertFiles::new("sentinel", &cert);
    let set = SentinelSet::start_with(Some(&files));
    assert!(set.url().starts_with("rediss+sentinel://"));
    let ca = files.cert.to_str().expect("utf-8").to_owned();
    follow_a_kill_9(set, &[("redis_tls_ca_file", &ca)], "fot-u1");
}

/// Sentinels with `requirepass`: `redis_sentinel_password` gets the nodes through; a
/// node without it (or with a wrong one) is degraded, not crashed.
#[test]
fn sentinels_with_a_password_are_asked_with_redis_sentinel_password() {
    let set = SentinelSet::start_opts(None, Some("s3ntinel-secret"));
    let url = set.url();
    let n0 = ready_node(
        &url,
        "sp0",
        &[("redis_sentinel_password", "s3ntinel-secret")],
    );
    let user = "sp-u1";
    let mut c = n0.connect(user);
    publish_until_accepted(n0.addr, user, 0, WAIT);
    assert_eq!(ids(&c.recv_events(1), user), [0]);
    for (wrong, says) in [
        (None, "NOAUTH"),
        (Some("not-it-either"), "Password authentication failed"),
    ] {
        let mut cfg = engine_config(&url, "sp1");
        if let Some(pw) = wrong {
            cfg.set("redis_sentinel_password", pw).expect("setting");
        }
        let n1 = TestGateway::start(cfg, Agent::None);
        wait_until("/health degraded without the sentinels' password", || {
            let (status, body) = get_json(n1.addr, "/health");
            status == 503 && body["status"] == "degraded"
        });
        assert_eq!(n1.stats()["engine"]["connected"], false);
        wait_until("the reason in the log", || {
            log_capture::lines().iter().any(|l| {
                l.contains("redis store: connect failed: no sentinel named a reachable master")
                    && l.contains(says)
            })
        });
    }
    // A secret: never in a log line.
    assert!(!log_capture::lines()
        .iter()
        .any(|l| l.contains("s3ntinel-secret")));
}

/// Two nodes on `set`; events delivered; `kill -9` of the master; the sentinels promote
/// the replica; both nodes publish and deliver again, the client resumes exactly.
fn follow_a_kill_9(mut set: SentinelSet, more: &[(&str, &str)], user: &str) {
    let (n0, n1, mut c, epoch) = delivering(&set.url(), "s", more, user, 3);
    // Replication is asynchronous: what the replica has is what survives. Here it has
    // everything (WAIT); docs/CLUSTER.md says what happens to writes it lacks.
    set.sync_replica();

    let killed = Instant::now();
    set.master.kill();
    wait_long("the sentinels promote the replica", FAILOVER_WAIT, || {
        set.master_port() == Some(set.replica.port)
    });
    let promoted = killed.elapsed();
    // The nodes follow by themselves: publishing through either works again.
    publish_until_accepted(n1.addr, user, 3, FAILOVER_WAIT);
    // A figure, not a check (`--nocapture` shows it).
    eprintln!(
        "failover ({user}): the sentinels named the replica {:.1} s after kill -9, a \
         publish was accepted again after {:.1} s",
        promoted.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    next_event_or_1013(&mut c, 4);
    // The history survived: same epoch, exact resume on the other node.
    let mut back = connect_when_taken(n1.addr, user, &format!("/ws?last_seq=3&epoch={epoch}"));
    assert_eq!(back.connected["resumed"], true, "{}", back.connected);
    assert_eq!(back.connected["epoch"], epoch.as_str());
    assert_eq!(back.last_seq(), 4);
    let missed = back.recv_events(1);
    assert_contiguous(&missed, 4);
    assert_eq!(ids(&missed, user), [3]);
    // Delivery goes on through both nodes, to connections on both.
    let mut fresh = connect_when_taken(n0.addr, user, "/ws");
    assert_eq!(fresh.last_seq(), 4);
    publish_until_accepted(n0.addr, user, 4, FAILOVER_WAIT);
    for cl in [&mut back, &mut fresh] {
        let got = cl.recv_events(1);
        assert_contiguous(&got, 5);
        assert_eq!(ids(&got, user), [4]);
    }
    for n in [&n0, &n1] {
        let engine = &n.stats()["engine"];
        assert_eq!(engine["connected"], true, "{engine}");
        assert!(engine["reconnects"].as_u64() >= Some(1), "{engine}");
    }
}

#[test]
fn nodes_follow_a_graceful_sentinel_failover_away_from_a_master_that_stays_up() {
    let set = SentinelSet::start();
    let user = "gf-u1";
    let (n0, n1, mut c, epoch) = delivering(&set.url(), "g", &[], user, 1);

    // The old master becomes a replica of the new one: writes to it are READONLY.
    let mut s = plain_con(set.sentinels[0].port).expect("sentinel");
    let _: String = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER_NAME)
        .query(&mut s)
        .expect("SENTINEL FAILOVER");
    wait_long("the replica is the master", FAILOVER_WAIT, || {
        set.master_port() == Some(set.replica.port)
    });
    wait_long("the old master is a replica", FAILOVER_WAIT, || {
        plain_con(set.master.port)
            .and_then(|mut c| redis::cmd("ROLE").query::<Vec<redis::Value>>(&mut c))
            .is_ok_and(|r| matches!(r.first(), Some(redis::Value::BulkString(b)) if b == b"slave"))
    });
    publish_until_accepted(n1.addr, user, 1, FAILOVER_WAIT);
    next_event_or_1013(&mut c, 2);
    // A graceful failover loses nothing: the resume is exact.
    let mut back = connect_path(n0.addr, user, &format!("/ws?last_seq=1&epoch={epoch}"));
    assert_eq!(back.connected["resumed"], true, "{}", back.connected);
    assert_eq!(ids(&back.recv_events(1), user), [1]);
    // The new master holds it (the nodes write there, not to the old one).
    let mut m = plain_con(set.replica.port).expect("new master");
    let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut m).expect("ROLE");
    assert!(
        matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master"),
        "{role:?}"
    );
}

#[test]
fn a_master_demoted_under_a_nodes_feet_answers_readonly_and_the_node_asks_sentinel_again() {
    let set = SentinelSet::start();
    let user = "ro-u1";
    let (n0, n1, c, epoch) = delivering(&set.url(), "ro", &[], user, 1);
    set.sync_replica();

    // A switch Sentinel did not make itself, so nobody closes the nodes' connections
    // to the old master: the replica becomes master, the sentinels are pointed at it,
    // then the old master becomes its replica. The nodes' connections to it stay up
    // (PING answers), only writes fail: READONLY.
    let (old, new) = (set.master.port, set.replica.port);
    let mut r = plain_con(new).expect("replica");
    let _: String = ::redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut r)
        .expect("REPLICAOF NO ONE");
    for s in &set.sentinels {
        let mut con = plain_con(s.port).expect("sentinel");
        let _: String = ::redis::cmd("SENTINEL")
            .arg("REMOVE")
            .arg(MASTER_NAME)
            .query(&mut con)
            .expect("SENTINEL REMOVE");
        let _: String = ::redis::cmd("SENTINEL")
            .arg("MONITOR")
            .arg(MASTER_NAME)
            .arg("127.0.0.1")
            .arg(new)
            .arg(2)
            .query(&mut con)
            .expect("SENTINEL MONITOR");
    }
    assert_eq!(set.master_port(), Some(new));
    let mut m = plain_con(old).expect("old master");
    let _: String = ::redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(new)
        .query(&mut m)
        .expect("REPLICAOF");
    let readonly = ::redis::cmd("SET")
        .arg("probe")
        .arg(1)
        .query::<()>(&mut m)
        .expect_err("the old master refuses writes");
    assert!(readonly.to_string().contains("read only"), "{readonly}");

    // The publishing node's store connection meets READONLY, drops it and finds the
    // new master through the sentinels; so does the other node on its next write.
    publish_until_accepted(n1.addr, user, 1, FAILOVER_WAIT);
    publish_until_accepted(n0.addr, user, 2, FAILOVER_WAIT);
    let mut back = connect_path(n1.addr, user, &format!("/ws?last_seq=1&epoch={epoch}"));
    assert_eq!(back.connected["resumed"], true, "{}", back.connected);
    assert_eq!(back.last_seq(), 3);
    let missed = back.recv_events(2);
    assert_contiguous(&missed, 2);
    assert_eq!(ids(&missed, user), [1, 2]);
    // Both were written to the new master.
    let mut nm = plain_con(new).expect("new master");
    let top: String = ::redis::cmd("HGET")
        .arg(format!("agentwire:{{u:{user}}}:meta"))
        .arg("seq")
        .query(&mut nm)
        .expect("the user's top seq on the new master");
    assert_eq!(top, "3");
    drop(c);
}

#[test]
fn rediss_with_a_private_ca_carries_everything_and_a_wrong_ca_is_degraded_not_a_crash() {
    let cert = tls::TestCert::new();
    let files = tls::CertFiles::new("redis", &cert);
    let server = TlsRedis::start(&files);
    let url = server.url();
    let ca = files.cert.to_str().expect("utf-8").to_owned();
    let user = "tls-u1";
    let (n0, n1, mut c, epoch) = delivering(&url, "t", &[("redis_tls_ca_file", &ca)], user, 3);
    let mut back = connect_path(n1.addr, user, &format!("/ws?last_seq=1&epoch={epoch}"));
    assert_eq!(back.connected["resumed"], true, "{}", back.connected);
    assert_eq!(ids(&back.recv_events(2), user), [1, 2]);

    // A CA that did not sign the server's certificate: the node starts, says Redis is
    // unavailable (degraded, 503 on publish), and the reason is in its log.
    let other = tls::TestCert::new();
    let other_files = tls::CertFiles::new("redis-wrong", &other);
    let wrong = other_files.cert.to_str().expect("utf-8").to_owned();
    let mut cfg = engine_config(&url, "t2");
    cfg.set("redis_tls_ca_file", &wrong).expect("setting");
    let n2 = TestGateway::start(cfg, Agent::None);
    wait_until("/health degraded with the wrong CA", || {
        let (status, body) = get_json(n2.addr, "/health");
        status == 503 && body["status"] == "degraded"
    });
    assert_publish_unavailable(n2.addr, user, 9);
    assert_eq!(n2.stats()["engine"]["connected"], false);
    wait_until("the reason in the log", || {
        log_capture::lines()
            .iter()
            .any(|l| l.contains("redis store: connect failed: invalid peer certificate"))
    });
    // The other nodes are unharmed.
    publish_until_accepted(n0.addr, user, 3, WAIT);
    assert_eq!(ids(&c.recv_events(1), user), [3]);
}

#[test]
fn a_missing_or_empty_ca_file_and_a_bad_url_refuse_to_start_with_a_clear_error() {
    let dir = Scratch::new("redis-ca");
    let empty = dir.0.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    let missing = dir.0.join("missing.pem");
    for (url, ca, says) in [
        (
            "rediss://127.0.0.1:1",
            missing.to_str(),
            "redis_tls_ca_file: cannot read",
        ),
        ("rediss://127.0.0.1:1", empty.to_str(), "no certificate"),
        ("redis+sentinel://127.0.0.1:1", None, "/<master_name>"),
        ("redis://127.0.0.1:1", empty.to_str(), "does not use TLS"),
    ] {
        let mut cfg = engine_config(url, "bad");
        if let Some(ca) = ca {
            cfg.set("redis_tls_ca_file", ca).expect("setting");
        }
        let err = match agentwire::Gateway::new(cfg) {
            Ok(_) => panic!("{url} with {ca:?} started"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(says), "{url} {ca:?}: {err}");
    }
}
