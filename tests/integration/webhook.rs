//! The inbound webhook (PROTOCOL.md section 6b) against a real HTTP server started by
//! the test ([`WebhookServer`]): the request's fields and key, `ack` only after a 2xx,
//! `no_agent` on a 5xx, a refused connection and a timeout, the in-flight bound, cancels,
//! keep-alive, the stats, and the in-process channel left silent.
//!
//! "Not before" is shown without timing: while the server holds a request, a `ping`
//! from the client must be answered by the very next frame ([`Client::ping_pong`]), so
//! no `ack` was queued ahead of it.

use crate::support::*;
use serde_json::{json, Value};

const INBOUND_KEY: &str = "integration-inbound-key-5d1e";

fn gateway_for(url: &str, tweak: impl FnOnce(&mut agentwire::Config)) -> TestGateway {
    let mut cfg = config();
    cfg.inbound_url = Some(url.to_owned());
    cfg.inbound_key = Some(INBOUND_KEY.into());
    tweak(&mut cfg);
    TestGateway::start(cfg, Agent::None)
}

fn send_message(c: &mut Client, thread: Option<&str>, text: &str, reference: &str) {
    c.send_json(
        &json!({"type": "user_message", "thread_id": thread, "text": text, "ref": reference}),
    );
}

fn expect_no_agent(c: &mut Client, reference: Option<&str>) -> Value {
    let e = c.expect_type("error");
    assert_eq!(e["code"], "no_agent", "{e}");
    match reference {
        Some(r) => assert_eq!(e["ref"], r, "no_agent carries the message's ref: {e}"),
        None => assert!(e.get("ref").is_none_or(Value::is_null), "{e}"),
    }
    e
}

fn webhook_stats(gw: &TestGateway) -> Value {
    gw.stats()["webhook"].clone()
}

/// The `run_id` of the next request the endpoint receives (the run a message starts).
fn next_run_id(server: &WebhookServer) -> String {
    let req = server.next_request();
    req.body["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a string run_id: {}", req.body))
        .to_owned()
}

#[test]
fn webhook_request_has_every_field_and_the_key_and_ack_waits_for_the_2xx() {
    let server = WebhookServer::start(Behaviour::Hold);
    let gw = gateway_for(&server.url(), |_| {});
    let mut c = gw.connect("hook-u1");
    let before = now_ms();
    send_message(&mut c, Some("t1"), "What is agentwire?", "m1");
    let req = server.next_request();
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/agentwire/inbound");
    assert_eq!(
        req.headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {INBOUND_KEY}").as_str())
    );
    assert_eq!(
        req.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let b = &req.body;
    let keys: Vec<&str> = b
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut want = vec![
        "type",
        "user_id",
        "thread_id",
        "run_id",
        "text",
        "ref",
        "connection_id",
        "node_id",
        "ts",
    ];
    want.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, want, "exactly the nine keys of section 6b: {b}");
    assert_eq!(b["type"], "user_message");
    assert_eq!(b["user_id"], "hook-u1");
    assert_eq!(b["thread_id"], "t1");
    assert_eq!(b["text"], "What is agentwire?");
    assert_eq!(b["ref"], "m1");
    assert_eq!(b["connection_id"], c.connected["connection_id"]);
    assert_eq!(
        b["node_id"],
        Value::Null,
        "the memory engine has no node id"
    );
    let ts = b["ts"].as_u64().expect("ts in ms");
    assert!(
        ts >= before && ts <= now_ms(),
        "ts {ts} is when the message was read"
    );
    let run_id = b["run_id"].as_str().expect("run_id").to_owned();
    assert!(run_id.starts_with("r-"), "{run_id}");

    // Held: no ack yet (the pong is the very next frame).
    c.ping_pong();
    server.release(204);
    let ack = c.expect_type("ack");
    assert_eq!(ack["ref"], "m1");
    assert_eq!(
        ack["run_id"],
        run_id.as_str(),
        "the ack names the run the worker got"
    );

    // The worker publishes to that run; the client sees it on its thread.
    publish_ok(
        gw.addr,
        &json!([
            pub_event("agent_started", "hook-u1", Some("t1"), &run_id, json!({})),
            pub_event(
                "agent_completed",
                "hook-u1",
                Some("t1"),
                &run_id,
                json!({"answer": "a"})
            ),
        ]),
    );
    let evs = c.recv_events(2);
    assert_eq!(evs[0]["run_id"], run_id.as_str());
    assert_eq!(evs[1]["type"], "agent_completed");

    let w = webhook_stats(&gw);
    assert_eq!(w["sent"], 1, "{w}");
    assert_eq!(w["ok"], 1, "{w}");
    assert_eq!(w["failed_total"], 0, "{w}");
    assert_eq!(w["in_flight"], 0, "{w}");
}

#[test]
fn webhook_ref_null_and_non_string_refs() {
    let server = WebhookServer::start(Behaviour::Answer(200));
    let gw = gateway_for(&server.url(), |_| {});
    let mut c = gw.connect("hook-refs");
    c.send_json(&json!({"type": "user_message", "text": "no ref, no thread"}));
    let req = server.next_request();
    assert_eq!(req.body["ref"], Value::Null);
    assert_eq!(req.body["thread_id"], Value::Null);
    let ack = c.expect_type("ack");
    assert_eq!(ack["ref"], Value::Null);
    c.send_json(&json!({"type": "user_message", "text": "numeric ref", "ref": 7}));
    assert_eq!(
        server.next_request().body["ref"],
        "7",
        "a non-string ref as its JSON text"
    );
    assert_eq!(
        c.expect_type("ack")["ref"],
        7,
        "the ack echoes the ref as sent"
    );
}

#[test]
fn webhook_5xx_gives_no_agent_with_the_ref_and_drops_the_run() {
    let server = WebhookServer::start(Behaviour::Answer(503));
    let gw = gateway_for(&server.url(), |_| {});
    let mut c = gw.connect("hook-5xx");
    send_message(&mut c, None, "hello", "m5");
    let run_id = next_run_id(&server);
    let e = expect_no_agent(&mut c, Some("m5"));
    assert!(e["message"].as_str().unwrap().contains("503"), "{e}");
    // The run was never started: a cancel of it is not_found.
    c.send_json(&json!({"type": "cancel", "run_id": run_id}));
    assert_eq!(c.expect_type("error")["code"], "not_found");
    assert!(
        server.try_request().is_none(),
        "no request for a run that is not there"
    );
    let w = webhook_stats(&gw);
    assert_eq!(w["failed"]["status"], 1, "{w}");
    assert_eq!(w["ok"], 0, "{w}");
    // A 3xx is not a 2xx either (redirects are not followed).
    server.set(Behaviour::Answer(307));
    send_message(&mut c, None, "again", "m6");
    server.next_request();
    expect_no_agent(&mut c, Some("m6"));
}

#[test]
fn webhook_refused_connection_gives_no_agent() {
    let gw = gateway_for(&closed_port_url(), |_| {});
    let mut c = gw.connect("hook-refused");
    send_message(&mut c, Some("t1"), "anyone there?", "m-refused");
    let e = expect_no_agent(&mut c, Some("m-refused"));
    assert!(
        e["message"].as_str().unwrap().contains("not reachable"),
        "{e}"
    );
    let w = webhook_stats(&gw);
    assert_eq!(w["failed"]["connect"], 1, "{w}");
    // The connection is fine afterwards.
    c.ping_pong();
}

#[test]
fn webhook_timeout_gives_no_agent() {
    let server = WebhookServer::start(Behaviour::Hold);
    let gw = gateway_for(&server.url(), |c| c.inbound_timeout_ms = 300);
    let mut c = gw.connect("hook-timeout");
    send_message(&mut c, None, "slow worker", "m-slow");
    server.next_request();
    // Never released: the gateway gives up after inbound_timeout_ms.
    let e = expect_no_agent(&mut c, Some("m-slow"));
    assert!(e["message"].as_str().unwrap().contains("300 ms"), "{e}");
    let w = webhook_stats(&gw);
    assert_eq!(w["failed"]["timeout"], 1, "{w}");
    assert_eq!(w["in_flight"], 0, "{w}");
}

#[test]
fn webhook_in_flight_bound_refuses_the_excess_at_once_and_answers_the_held_later() {
    let server = WebhookServer::start(Behaviour::Hold);
    let gw = gateway_for(&server.url(), |c| c.inbound_max_in_flight = 2);
    let mut c = gw.connect("hook-bound");
    send_message(&mut c, None, "one", "m1");
    send_message(&mut c, None, "two", "m2");
    let first = server.next_request();
    let second = server.next_request();
    let s = gw.stats();
    assert_eq!(
        s["budgets"]["inbound_in_flight"],
        json!({"limit": 2, "used": 2}),
        "{s}"
    );
    // The third is refused at once, while the two are still held.
    send_message(&mut c, None, "three", "m3");
    expect_no_agent(&mut c, Some("m3"));
    assert!(server.try_request().is_none(), "the third was never sent");
    // Another user is refused too: the bound is the gateway's.
    let mut other = gw.connect("hook-bound-2");
    send_message(&mut other, None, "four", "m4");
    expect_no_agent(&mut other, Some("m4"));
    // The held ones get their acks when answered.
    server.release(200);
    server.release(200);
    let mut acks: Vec<(String, String)> = (0..2)
        .map(|_| {
            let a = c.expect_type("ack");
            (
                a["ref"].as_str().unwrap().to_owned(),
                a["run_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    acks.sort();
    let mut sent: Vec<(String, String)> = [first, second]
        .iter()
        .map(|r| {
            (
                r.body["ref"].as_str().unwrap().to_owned(),
                r.body["run_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    sent.sort();
    assert_eq!(acks, sent, "each held message acked with its own run");
    let w = webhook_stats(&gw);
    assert_eq!(w["failed"]["full"], 2, "{w}");
    assert_eq!(w["ok"], 2, "{w}");
    // Room again: the next message goes out.
    server.set(Behaviour::Answer(200));
    send_message(&mut c, None, "five", "m5");
    assert_eq!(server.next_request().body["ref"], "m5");
    assert_eq!(c.expect_type("ack")["ref"], "m5");
}

#[test]
fn webhook_cancel_is_delivered_and_cancel_requested_waits_for_the_2xx() {
    let server = WebhookServer::start(Behaviour::Answer(200));
    let gw = gateway_for(&server.url(), |_| {});
    let mut c = gw.connect("hook-cancel");
    send_message(&mut c, Some("t9"), "long job", "m1");
    let run_id = next_run_id(&server);
    c.expect_type("ack");
    publish_ok(
        gw.addr,
        &pub_event(
            "agent_started",
            "hook-cancel",
            Some("t9"),
            &run_id,
            json!({}),
        ),
    );
    c.recv_events(1);
    // The worker's next event of the run: its answer lists the runs cancelled so far.
    let publish_thinking = || {
        publish(
            gw.addr,
            &pub_event(
                "agent_thinking",
                "hook-cancel",
                Some("t9"),
                &run_id,
                json!({}),
            ),
        )
    };

    // A cancel of a run the user does not have: not_found, nothing sent.
    c.send_json(&json!({"type": "cancel", "run_id": "r-not-there"}));
    assert_eq!(c.expect_type("error")["code"], "not_found");

    server.set(Behaviour::Hold);
    c.send_json(&json!({"type": "cancel", "run_id": run_id}));
    let req = server.next_request();
    assert_eq!(
        req.headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {INBOUND_KEY}").as_str())
    );
    let b = &req.body;
    assert_eq!(b["type"], "cancel");
    assert_eq!(b["user_id"], "hook-cancel");
    assert_eq!(b["run_id"], run_id.as_str());
    assert_eq!(b["thread_id"], "t9", "the run's thread");
    assert_eq!(b["text"], Value::Null);
    assert_eq!(b["ref"], Value::Null);
    assert_eq!(b["connection_id"], c.connected["connection_id"]);
    assert!(b["ts"].is_u64());
    // Not marked cancelled before the worker took it.
    let r = publish_thinking();
    assert_eq!(
        r.json()["cancelled"],
        json!([]),
        "not cancelled before the 2xx"
    );
    c.recv_events(1);
    c.ping_pong();
    // A repeat while it is out joins it: no second request.
    c.send_json(&json!({"type": "cancel", "run_id": run_id}));
    c.ping_pong();
    server.release(200);
    for _ in 0..2 {
        let cr = c.expect_type("cancel_requested");
        assert_eq!(cr["run_id"], run_id.as_str());
    }
    assert!(
        server.try_request().is_none(),
        "one request for the two cancels"
    );
    // The worker learns it at its next publish too.
    let r = publish_thinking();
    assert_eq!(r.json()["cancelled"], json!([run_id]));
    c.recv_events(1);
    // Taken already: a later cancel is answered at once, without a request.
    c.send_json(&json!({"type": "cancel", "run_id": run_id}));
    assert_eq!(c.expect_type("cancel_requested")["run_id"], run_id.as_str());
    assert!(server.try_request().is_none());
    let w = webhook_stats(&gw);
    assert_eq!(w["sent"], 2, "one message, one cancel: {w}");
}

#[test]
fn webhook_cancel_failure_gives_no_agent_and_leaves_the_run_unmarked() {
    let server = WebhookServer::start(Behaviour::Answer(200));
    let gw = gateway_for(&server.url(), |_| {});
    let mut c = gw.connect("hook-cancel-fail");
    send_message(&mut c, None, "job", "m1");
    let run_id = next_run_id(&server);
    c.expect_type("ack");
    server.set(Behaviour::Answer(500));
    c.send_json(&json!({"type": "cancel", "run_id": run_id}));
    server.next_request();
    let e = expect_no_agent(&mut c, None);
    assert!(
        e["message"].as_str().unwrap().contains(&run_id),
        "names the run: {e}"
    );
    let r = publish(
        gw.addr,
        &pub_event(
            "agent_started",
            "hook-cancel-fail",
            None,
            &run_id,
            json!({}),
        ),
    );
    assert_eq!(r.json()["cancelled"], json!([]));
    // A retry goes out again and succeeds.
    server.set(Behaviour::Answer(200));
    c.recv_events(1);
    c.send_json(&json!({"type": "cancel", "run_id": run_id}));
    assert_eq!(server.next_request().body["type"], "cancel");
    assert_eq!(c.expect_type("cancel_requested")["run_id"], run_id.as_str());
}

#[test]
fn webhook_keeps_the_connection_alive() {
    let server = WebhookServer::start(Behaviour::Answer(200));
    let gw = gateway_for(&server.url(), |_| {});
    let mut c = gw.connect("hook-keepalive");
    for i in 0..6 {
        let r = format!("m{i}");
        send_message(&mut c, None, "again", &r);
        let req = server.next_request();
        assert_eq!(req.body["ref"], r.as_str());
        assert_eq!(
            req.connection, 1,
            "request {i} came on the first connection"
        );
        assert_eq!(c.expect_type("ack")["ref"], r.as_str());
    }
    assert_eq!(server.accepts(), 1, "six requests over one TCP connection");
}

#[test]
fn webhook_replaces_the_in_process_channel_and_counts_in_metrics() {
    let server = WebhookServer::start(Behaviour::Answer(200));
    let mut cfg = config();
    cfg.inbound_url = Some(server.url());
    // No inbound_key: the publish key is the default.
    let mut gw = TestGateway::start(cfg, Agent::Test);
    let inbound = gw.inbound();
    let mut c = gw.connect("hook-metrics");
    send_message(&mut c, None, "hi", "m1");
    let req = server.next_request();
    assert_eq!(
        req.headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {PUBLISH_KEY}").as_str()),
        "inbound_key defaults to the publish key"
    );
    c.expect_type("ack");
    assert!(
        inbound.try_recv().is_err(),
        "the in-process channel got nothing"
    );
    let metrics = get(gw.addr, "/metrics").text();
    let samples = prometheus(&metrics);
    assert_eq!(metric(&samples, "agentwire_webhook_requests_total"), 1.0);
    assert_eq!(metric(&samples, "agentwire_webhook_ok_total"), 1.0);
    assert_eq!(metric(&samples, "agentwire_webhook_in_flight"), 0.0);
    assert_eq!(metric_sum(&samples, "agentwire_webhook_failed_total"), 0.0);
    let cfg = get_json(gw.addr, "/ws/config").1;
    assert_eq!(cfg["inbound_url"], server.url().as_str());
    assert_eq!(cfg["inbound_key_set"], false);
    assert!(!metrics.contains(PUBLISH_KEY));
}

#[test]
fn webhook_bad_url_stops_the_start() {
    let mut cfg = config();
    cfg.inbound_url = Some("ftp://worker.example/inbound".into());
    let err = agentwire::Gateway::new(cfg)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("inbound_url") && err.contains("http://"),
        "{err}"
    );
}

/// The binary, spawned with `SSL_CERT_FILE` naming the test CA (the webhook checks
/// certificates against the system's trust store, which honours it): an `https://`
/// inbound_url with a certificate from that CA works, keep-alive included.
#[test]
fn webhook_https_url_works_with_a_trusted_certificate() {
    use std::process::{Command, Stdio};
    let server = WebhookServer::start_tls(Behaviour::Answer(200));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentwire"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--jwt-secret", SECRET, "--publish-key", PUBLISH_KEY])
        .args([
            "--inbound-url",
            &server.https_url(),
            "--inbound-key",
            INBOUND_KEY,
        ])
        .env("SSL_CERT_FILE", test_ca_file())
        .env_remove("SSL_CERT_DIR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the agentwire binary");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_until("the binary answers /health", || {
        std::net::TcpStream::connect(addr).is_ok() && get(addr, "/health").status == 200
    });
    let result = std::panic::catch_unwind(|| {
        let mut c = connect(addr, "hook-tls");
        for i in 0..3 {
            let r = format!("m{i}");
            send_message(&mut c, None, "over TLS", &r);
            let req = server.next_request();
            assert_eq!(req.body["ref"], r.as_str());
            assert_eq!(
                req.headers.get("authorization").map(String::as_str),
                Some(format!("Bearer {INBOUND_KEY}").as_str())
            );
            assert_eq!(c.expect_type("ack")["ref"], r.as_str());
        }
        assert_eq!(
            server.accepts(),
            1,
            "three requests over one TLS connection"
        );
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// An `https://` inbound_url whose certificate is not trusted (the test CA is not in
/// this process's trust store) is a TLS failure: `no_agent`, nothing delivered.
#[test]
fn webhook_https_url_with_an_untrusted_certificate_gives_no_agent() {
    let server = WebhookServer::start_tls(Behaviour::Answer(200));
    let gw = gateway_for(&server.https_url(), |_| {});
    let mut c = gw.connect("hook-tls-untrusted");
    send_message(&mut c, None, "over TLS", "m1");
    let e = expect_no_agent(&mut c, Some("m1"));
    assert!(e["message"].as_str().unwrap().contains("TLS"), "{e}");
    assert!(
        server.try_request().is_none(),
        "no request reached the server"
    );
    let w = webhook_stats(&gw);
    assert_eq!(w["failed"]["tls"], 1, "{w}");
}

#[test]
fn webhook_answer_for_a_closed_connection_is_skipped() {
    let server = WebhookServer::start(Behaviour::Hold);
    let gw = gateway_for(&server.url(), |_| {});
    let mut gone = gw.connect("hook-gone");
    send_message(&mut gone, None, "then I leave", "m1");
    server.next_request();
    gone.close();
    gw.wait_open(0);
    server.release(200);
    gw.wait_stats("the answer taken back", |s| s["webhook"]["ok"] == 1);
    // The gateway goes on serving: another user's message goes through.
    server.set(Behaviour::Answer(200));
    let mut other = gw.connect("hook-stays");
    send_message(&mut other, None, "hello", "m2");
    server.next_request();
    assert_eq!(other.expect_type("ack")["ref"], "m2");
}

#[test]
fn webhook_keeps_the_per_user_pending_run_bound() {
    let server = WebhookServer::start(Behaviour::Hold);
    let gw = gateway_for(&server.url(), |c| c.max_pending_runs_per_user = 1);
    let mut c = gw.connect("hook-pending");
    send_message(&mut c, None, "first", "m1");
    server.next_request();
    send_message(&mut c, None, "second", "m2");
    let e = c.expect_type("error");
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("busy"), Some("m2")),
        "{e}"
    );
    assert!(server.try_request().is_none(), "the second was never sent");
    // Another user is not affected by this user's bound.
    server.set(Behaviour::Answer(200));
    let mut other = gw.connect("hook-pending-2");
    send_message(&mut other, None, "mine", "m3");
    assert_eq!(server.next_request().body["ref"], "m3");
    assert_eq!(other.expect_type("ack")["ref"], "m3");
    server.release(200);
    assert_eq!(c.expect_type("ack")["ref"], "m1");
}

#[test]
fn webhook_request_held_by_the_endpoint_does_not_hold_up_shutdown() {
    let server = WebhookServer::start(Behaviour::Hold);
    let mut gw = gateway_for(&server.url(), |_| {});
    let mut c = gw.connect("hook-shutdown");
    send_message(&mut c, None, "never answered", "m1");
    server.next_request();
    let (result, _) = gw.shutdown_and_join(WAIT);
    assert_eq!(result, Ok(()));
}
