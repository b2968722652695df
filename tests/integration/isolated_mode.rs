//! Isolated mode: runs started from an isolated connection reach only that connection;
//! an isolated connection sees nothing else.

use serde_json::json;

use crate::support::{config, connect_path, Agent, TestGateway, WAIT};
use agentwire::Inbound;

fn isolated_run_reaches_only_its_connection(path: &str, user: &str) {
    let mut gw = TestGateway::start(config(), Agent::Test);
    let inbound = gw.echo_worker();
    let mut main = gw.connect(user);
    let mut iso = connect_path(gw.addr, user, path);
    assert_eq!(iso.connected["mode"], "isolated", "{path}");

    // A run started on the isolated connection.
    let ack = iso.user_message(Some("t-iso"), "from isolated", "i1");
    let run = ack["run_id"].as_str().expect("run_id").to_owned();
    match inbound.recv_timeout(WAIT).expect("worker saw the message") {
        Inbound::UserMessage {
            user_id,
            thread_id,
            run_id,
            text,
            connection_id,
        } => {
            assert_eq!(user_id, user);
            assert_eq!(thread_id.as_deref(), Some("t-iso"));
            assert_eq!(run_id, run);
            assert_eq!(text, "from isolated");
            assert_eq!(
                connection_id,
                iso.connected["connection_id"].as_str().expect("id")
            );
        }
        other => panic!("unexpected inbound {other:?}"),
    }
    let evs = iso.recv_events(2);
    assert_eq!(evs[0]["type"], "agent_started");
    assert_eq!(evs[1]["type"], "agent_completed");
    for e in &evs {
        assert_eq!(e["run_id"], run.as_str());
        assert_eq!(e["thread_id"], "t-iso");
    }

    // Those events were routed before the main connection sends anything, so if they
    // had reached it they would come before its ack.
    let ack2 = main.user_message(Some("t-main"), "from main", "m1");
    let run2 = ack2["run_id"].as_str().expect("run_id").to_owned();
    let evs2 = main.recv_events(2);
    for e in &evs2 {
        assert_eq!(
            e["run_id"],
            run2.as_str(),
            "main connection got an isolated run's event: {e}"
        );
    }
    assert_eq!(evs2[1]["type"], "agent_completed");
    // seq is per user: the main connection's first event skips the isolated run's two.
    assert_eq!(
        evs2[0]["seq"].as_u64(),
        Some(evs[1]["seq"].as_u64().expect("seq") + 1)
    );

    // ... and the main connection's run did not reach the isolated one.
    iso.ping_pong();

    // Nor does an ordinary worker event of the user.
    let mut lib = gw
        .emitter
        .run(user, None, "r-lib", "lib_agent")
        .expect("run");
    lib.agent_started(&json!({})).expect("emit");
    lib.agent_completed(&json!({})).expect("emit");
    let evs3 = main.recv_events(2);
    assert_eq!(evs3[0]["run_id"], "r-lib");
    iso.ping_pong();
}

#[test]
fn isolated_via_mode_parameter() {
    isolated_run_reaches_only_its_connection("/ws?mode=isolated", "iso-mode");
}

#[test]
fn isolated_via_route_alias() {
    isolated_run_reaches_only_its_connection("/ws/isolated", "iso-alias");
}

#[test]
fn isolated_via_connection_scope() {
    isolated_run_reaches_only_its_connection("/ws?connection_scope=true", "iso-scope");
}

/// Two isolated connections of one user do not see each other's runs.
#[test]
fn two_isolated_connections_are_isolated_from_each_other() {
    let mut gw = TestGateway::start(config(), Agent::Test);
    let _inbound = gw.echo_worker();
    let user = "iso-two";
    let mut a = connect_path(gw.addr, user, "/ws/isolated");
    let mut b = connect_path(gw.addr, user, "/ws/isolated");
    let ack = a.user_message(None, "a", "a1");
    let evs = a.recv_events(2);
    assert_eq!(evs[0]["run_id"], ack["run_id"]);
    b.ping_pong();
    let ack = b.user_message(None, "b", "b1");
    let evs = b.recv_events(2);
    assert_eq!(evs[0]["run_id"], ack["run_id"]);
    a.ping_pong();
}

/// `active_runs` on an isolated connection does not list the user's other runs.
#[test]
fn isolated_connected_frame_lists_no_foreign_runs() {
    let gw = TestGateway::plain();
    let user = "iso-active";
    let mut run = gw
        .emitter
        .run(user, None, "r-open", "lib_agent")
        .expect("run");
    run.agent_started(&json!({})).expect("emit");
    gw.wait_stats("the run to be active", |s| s["runs"]["active"] == 1);
    let mut main = gw.connect(user);
    assert_eq!(
        main.connected["active_runs"].as_array().map(Vec::len),
        Some(1)
    );
    let iso = connect_path(gw.addr, user, "/ws/isolated");
    assert_eq!(iso.connected["active_runs"], json!([]));
    main.ping_pong();
}
