//! `/ws/stats`, `/metrics`, `/health`, `/ws/config` after known activity.

use serde_json::json;

use crate::support::{
    bearer, get, get_json, metric, metric_sum, prometheus, pub_event, publish_ok, upgrade,
    TestGateway, PUBLISH_KEY, SECRET,
};

/// Known activity on a fresh gateway: 3 connections opened, 2 closed by their
/// clients, 1 refused for a bad token, 4 events emitted to the remaining user.
#[test]
fn stats_and_metrics_count_known_activity() {
    let gw = TestGateway::plain();
    let mut keep = gw.connect("st-keep");
    let a = gw.connect("st-a");
    let b = gw.connect("st-b");
    a.close();
    b.close();
    gw.wait_stats("two closes counted", |s| s["connections"]["closed"] == 2);
    let r = upgrade(gw.addr, "/ws", &[bearer("bad.token.here")]);
    assert_eq!(r.status, 401);

    let mut run = gw
        .emitter
        .run("st-keep", None, "r-st", "st_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    run.emit("text_delta", &json!({})).expect("emit");
    run.emit("text_delta", &json!({})).expect("emit");
    run.agent_completed(&json!({})).expect("emit");
    keep.recv_events(4);

    let s = gw.stats();
    let c = &s["connections"];
    assert_eq!(c["opened"], 3, "{s}");
    assert_eq!(c["closed"], 2, "{s}");
    assert_eq!(c["open"], 1, "{s}");
    assert_eq!(c["refused"]["invalid_token"], 1, "{s}");
    assert_eq!(c["refused_total"], 1, "{s}");
    assert_eq!(s["events"]["emitted"], 4, "{s}");
    assert_eq!(s["events"]["delivered"], 4, "{s}");
    assert_eq!(s["users_online"], 1, "{s}");
    for p in ["p50", "p99", "p999", "max"] {
        assert!(s["latency_us"][p].is_u64(), "latency {p}: {s}");
    }
    assert!(
        s["loop"]["iterations"].as_u64().is_some_and(|n| n > 0),
        "{s}"
    );
    assert!(s["bytes"]["in"].as_u64().is_some_and(|n| n > 0), "{s}");
    assert!(s["bytes"]["out"].as_u64().is_some_and(|n| n > 0), "{s}");

    let r = get(gw.addr, "/metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    let text = r.text();
    let m = prometheus(&text);
    for (name, _) in &m {
        assert!(
            name.starts_with("agentwire_"),
            "metric without the prefix: {name}"
        );
    }
    assert_eq!(
        metric(&m, "agentwire_connections_opened_total"),
        3.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&m, "agentwire_connections_closed_total"),
        2.0,
        "{text}"
    );
    assert_eq!(metric(&m, "agentwire_connections_open"), 1.0, "{text}");
    assert_eq!(
        metric(
            &m,
            "agentwire_connections_refused_total{reason=\"invalid_token\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&m, "agentwire_events_emitted_total"), 4.0, "{text}");
    assert_eq!(
        metric(&m, "agentwire_events_delivered_total"),
        4.0,
        "{text}"
    );
    assert_eq!(metric(&m, "agentwire_users_online"), 1.0, "{text}");
    keep.ping_pong();
}

/// The `events.emitted` figure (whose metric help says "Events accepted from workers
/// and the publish API") counts published events too.
#[test]
fn emitted_counts_worker_and_published_events() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("st-pub");
    let mut run = gw
        .emitter
        .run("st-pub", None, "r-w", "st_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    run.agent_completed(&json!({})).expect("emit");
    publish_ok(
        gw.addr,
        &json!([
            pub_event("agent_started", "st-pub", None, "r-p", json!({})),
            pub_event("agent_completed", "st-pub", None, "r-p", json!({})),
            pub_event("agent_started", "st-pub", None, "r-q", json!({})),
        ]),
    );
    c.recv_events(5);
    let s = gw.stats();
    assert_eq!(s["events"]["published"], 3, "{s}");
    assert_eq!(s["events"]["delivered"], 5, "{s}");
    assert_eq!(
        s["events"]["emitted"], 5,
        "2 from the worker + 3 published: {s}"
    );
    let m = prometheus(&get(gw.addr, "/metrics").text());
    assert_eq!(metric(&m, "agentwire_events_emitted_total"), 5.0);
}

#[test]
fn health_counts_open_sessions_on_both_routes() {
    let gw = TestGateway::plain();
    let (status, body) = get_json(gw.addr, "/health");
    assert_eq!(status, 200);
    assert_eq!(body["status"], "healthy", "{body}");
    assert_eq!(body["connections"], 0, "{body}");
    assert!(
        body["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{body}"
    );
    assert!(body["uptime_s"].is_u64(), "{body}");

    let _a = gw.connect("st-h1");
    let _b = gw.connect("st-h2");
    let c = gw.connect("st-h2");
    for path in ["/health", "/ws/health"] {
        let (status, body) = get_json(gw.addr, path);
        assert_eq!(status, 200, "{path}");
        assert_eq!(body["status"], "healthy", "{path}: {body}");
        assert_eq!(body["connections"], 3, "{path}: {body}");
    }
    c.close();
    crate::support::wait_until("/ws/health to count 2", || {
        get_json(gw.addr, "/ws/health").1["connections"] == 2
    });
}

#[test]
fn config_lists_every_setting_and_never_a_secret() {
    let gw = TestGateway::plain();
    let r = get(gw.addr, "/ws/config");
    assert_eq!(r.status, 200);
    let text = r.text();
    let body = r.json();
    let obj = body.as_object().expect("config is an object");
    let names = [
        "listen",
        "jwt_algorithm",
        "jwt_public_key_file",
        "jwt_issuer",
        "jwt_audience",
        "jwt_leeway_s",
        "allow_query_token",
        "allowed_origins",
        "max_connections",
        "max_connections_per_user",
        "per_user_policy",
        "max_message_bytes",
        "max_publish_bytes",
        "max_pending_bytes",
        "max_user_message_bytes",
        "max_pending_runs_per_user",
        "heartbeat_interval_ms",
        "heartbeat_timeout_ms",
        "handshake_timeout_ms",
        "replay_events",
        "replay_ttl_ms",
        "run_idle_timeout_ms",
        "max_active_runs_per_user",
        "max_active_runs",
        "replay_bytes_per_user",
        "replay_memory_bytes",
        "shutdown_grace_ms",
        "demo_agent",
    ];
    for name in names {
        assert!(obj.contains_key(name), "/ws/config lacks {name}: {body}");
    }
    assert_eq!(body["jwt_algorithm"], "HS256");
    assert_eq!(body["max_connections_per_user"], 3);
    assert_eq!(body["per_user_policy"], "evict_oldest");
    assert!(
        !text.contains(SECRET),
        "the JWT secret leaked into /ws/config"
    );
    assert!(
        !text.contains(PUBLISH_KEY),
        "the publish key leaked into /ws/config"
    );
    for v in obj.values() {
        assert_ne!(v, SECRET);
        assert_ne!(v, PUBLISH_KEY);
    }
}

/// `bytes.in` ("Bytes read from sockets", per its metric help) counts what clients
/// sent over plain HTTP (here a publish request), not only WebSocket frames.
#[test]
fn bytes_in_counts_plain_http_request_bytes() {
    let gw = TestGateway::plain();
    let body = json!([pub_event(
        "agent_started",
        "st-bytes",
        None,
        "r-b",
        json!({"pad": "p".repeat(2000)})
    )]);
    publish_ok(gw.addr, &body);
    let sent = body.to_string().len();
    let s = gw.stats();
    let bytes_in = s["bytes"]["in"].as_u64().unwrap_or(0);
    assert!(
        bytes_in >= sent as u64,
        "bytes.in {bytes_in} < the {sent}-byte publish body alone: {s}"
    );
}

/// `/health` carries the epoch; HEAD answers like GET without a body.
#[test]
fn health_epoch_and_head() {
    let gw = TestGateway::plain();
    let (_, body) = get_json(gw.addr, "/health");
    assert_eq!(body["epoch"], gw.epoch.as_str(), "{body}");
    let r = crate::support::http_request(
        gw.addr,
        b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "HEAD has no body: {:?}", r.text());
    assert!(
        r.header("content-length").is_some_and(|n| n != "0"),
        "{:?}",
        r.headers
    );
}

/// Events for a user with no connection are counted as dropped `no_connection` (and
/// still take a seq).
#[test]
fn events_without_a_connection_are_counted_as_no_connection() {
    let gw = TestGateway::plain();
    let mut run = gw
        .emitter
        .run("st-offline", None, "r-off", "st_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    run.agent_completed(&json!({})).expect("emit");
    let s = gw.wait_stats("events routed", |s| s["events"]["emitted"] == 2);
    assert_eq!(s["events"]["dropped"]["no_connection"], 2, "{s}");
    assert_eq!(s["events"]["delivered"], 0, "{s}");
    let c = gw.connect("st-offline");
    assert_eq!(c.last_seq(), 2);
}

/// The run metrics of PROTOCOL.md section 12 from in-process runs: a run with a tool
/// that completes, one whose handle is dropped (`worker_dropped`), one that fails, and
/// one started by a `user_message` (time to first event); in flight while they run.
#[test]
fn run_metrics_count_outcomes_durations_and_runs_in_flight() {
    let mut gw = TestGateway::start(crate::support::config(), crate::support::Agent::Test);
    let inbound = gw.inbound();
    let mut c = gw.connect("rm-user");
    let runs = |gw: &TestGateway| prometheus(&get(gw.addr, "/metrics").text());
    let count = |m: &[(String, f64)], name: &str| metric(m, &format!("{name}_count"));
    let ended = |m: &[(String, f64)], outcome: &str| {
        metric(
            m,
            &format!("agentwire_runs_ended_total{{outcome=\"{outcome}\"}}"),
        )
    };

    let mut done = gw
        .emitter
        .run("rm-user", None, "r-done", "rm_agent")
        .expect("run");
    done.agent_started(&json!({})).expect("emit");
    done.tool_executing(&json!({"tool": "sql"})).expect("emit");
    let mut dropped = gw
        .emitter
        .run("rm-user", None, "r-drop", "rm_agent")
        .expect("run");
    dropped.agent_started(&json!({})).expect("emit");
    c.recv_events(3);
    let m = runs(&gw);
    assert_eq!(metric(&m, "agentwire_runs_started_total"), 2.0);
    assert_eq!(metric(&m, "agentwire_runs_in_flight"), 2.0);
    assert_eq!(count(&m, "agentwire_run_duration_seconds"), 0.0);

    done.tool_completed(&json!({"tool": "sql"})).expect("emit");
    done.agent_completed(&json!({})).expect("emit");
    drop(dropped);
    let mut failed = gw
        .emitter
        .run("rm-user", None, "r-fail", "rm_agent")
        .expect("run");
    failed.agent_started(&json!({})).expect("emit");
    failed
        .agent_error(&json!({"message": "out of tokens"}))
        .expect("emit");
    let evs = c.recv_events(5);
    assert_eq!(evs[2]["data"]["reason"], "worker_dropped", "{evs:?}");

    // A user_message pre-registers its run: its first event measures the wait.
    let ack = c.user_message(None, "hi", "m1");
    let run_id = ack["run_id"].as_str().expect("run_id").to_owned();
    let msg = inbound
        .recv_timeout(crate::support::WAIT)
        .expect("user_message reaches the worker");
    assert!(matches!(msg, agentwire::Inbound::UserMessage { .. }));
    let mut asked = gw
        .emitter
        .run("rm-user", None, &run_id, "rm_agent")
        .expect("run");
    asked.agent_started(&json!({})).expect("emit");
    asked.agent_completed(&json!({})).expect("emit");
    c.recv_events(2);

    let m = runs(&gw);
    assert_eq!(metric(&m, "agentwire_runs_started_total"), 4.0);
    assert_eq!(metric(&m, "agentwire_runs_in_flight"), 0.0);
    assert_eq!(ended(&m, "completed"), 2.0);
    assert_eq!(ended(&m, "worker_dropped"), 1.0);
    assert_eq!(ended(&m, "error"), 1.0);
    assert_eq!(ended(&m, "run_timeout"), 0.0);
    assert_eq!(ended(&m, "cancelled"), 0.0);
    assert_eq!(count(&m, "agentwire_run_duration_seconds"), 4.0);
    assert_eq!(count(&m, "agentwire_tool_duration_seconds"), 1.0);
    assert_eq!(count(&m, "agentwire_run_first_event_seconds"), 1.0);
    assert_eq!(
        metric(&m, "agentwire_run_first_event_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    let s = gw.stats();
    assert_eq!(s["runs"]["started"], 4, "{s}");
    assert_eq!(s["runs"]["ended"]["worker_dropped"], 1, "{s}");
    assert_eq!(s["runs"]["in_flight"], 0, "{s}");
}

/// docs/grafana/agentwire.json is valid JSON and queries only metrics `/metrics` has.
#[test]
fn grafana_dashboard_queries_exported_metrics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/agentwire.json");
    let text = std::fs::read_to_string(path).expect("the dashboard file");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let gw = TestGateway::plain();
    // Sample names, and the family names of the TYPE lines (a labelled counter has no
    // sample before its first count, e.g. connections closed by reason).
    let text = get(gw.addr, "/metrics").text();
    let mut exported: std::collections::HashSet<String> = prometheus(&text)
        .into_iter()
        .map(|(n, _)| n.split('{').next().unwrap_or_default().to_owned())
        .collect();
    exported.extend(
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(str::to_owned),
    );
    let mut used = 0;
    for expr in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().expect("every target has an expr"))
    {
        let mut rest = expr;
        while let Some(at) = rest.find("agentwire_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exported.contains(&name),
                "{name} (in {expr}) is not in /metrics"
            );
            used += 1;
            rest = &rest[at + name.len()..];
        }
    }
    assert!(used >= 10, "the dashboard uses {used} metric names");
}
