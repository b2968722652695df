//! One rule per kind of identifier (`src/ids.rs`), the same at every entry point: the
//! upgrade (`sub`, `user_id`, `thread_id`), the client messages (`user_message`'s
//! `thread_id`, `cancel`'s `run_id`), the emitter and the publish API.
//!
//! What v1 did differently, and these tests catch: a `thread_id` with control
//! characters was refused at the upgrade only (the emitter, the publish API and
//! `user_message` took it), and a `cancel` whose `run_id` no run can have (empty, over
//! 256 bytes) answered `not_found` instead of `bad_message`. Look-alike user ids stay
//! distinct users everywhere (ids are never normalized).

use serde_json::{json, Value};

use agentwire::{EventError, Inbound};

use crate::support::{
    bearer, config, connect, pub_event, publish, publish_ok, token, upgrade, Agent, Client,
    TestGateway, WAIT,
};

fn expect_error(c: &mut Client, code: &str) -> Value {
    let v = c.recv_json();
    assert_eq!(v["type"], "error", "expected an error frame, got {v}");
    assert_eq!(v["code"], code, "{v}");
    v
}

/// Thread ids with control characters, each as JSON text would carry it.
const CONTROL_THREADS: [&str; 5] = ["t\n1", "a\0b", "\u{1b}[2J", "tab\there", "c1\u{85}"];

/// Upgrade, emitter, publish API and `user_message` all refuse a thread id with
/// control characters (v1: only the upgrade did) and all take one of 256 bytes.
#[test]
fn thread_id_control_characters_are_refused_at_every_entry_point() {
    let mut gw = TestGateway::start(config(), Agent::Test);
    let inbound = gw.inbound();
    let user = "ids-thread";
    let mut c = gw.connect(user);
    let longest = "t".repeat(256);
    let too_long = "t".repeat(257);

    // The upgrade (unchanged from v1).
    let auth = [bearer(&token(user))];
    for (query, status) in [
        ("/ws?thread_id=t%0A1", 400),
        ("/ws?thread_id=a%00b", 400),
        ("/ws?thread_id=c1%C2%85", 400),
        (&*format!("/ws?thread_id={too_long}"), 400),
        (&*format!("/ws?thread_id={longest}"), 101),
    ] {
        assert_eq!(upgrade(gw.addr, query, &auth).status, status, "{query}");
    }

    for thread in CONTROL_THREADS.iter().copied().chain([too_long.as_str()]) {
        // The emitter.
        assert!(
            matches!(
                gw.emitter.run(user, Some(thread), "r-ctl", "ids_agent"),
                Err(EventError::BadThreadId)
            ),
            "emitter took thread {thread:?}"
        );
        // The publish API: 400 bad_event, nothing routed.
        let r = publish(
            gw.addr,
            &pub_event("agent_thinking", user, Some(thread), "r-ctl", json!(1)),
        );
        assert_eq!(
            r.status,
            400,
            "publish took thread {thread:?}: {}",
            r.text()
        );
        let body = r.json();
        assert_eq!(body["error"], "bad_event", "{body}");
        assert_eq!(
            body["message"],
            "thread_id must be null or a non-empty string of at most 256 bytes without control characters"
        );
        // user_message: bad_message stating the rule, no ack, nothing to the workers.
        c.send_json(
            &json!({"type": "user_message", "thread_id": thread, "text": "x", "ref": "bad"}),
        );
        let err = expect_error(&mut c, "bad_message");
        assert_eq!(
            err["message"],
            "thread_id must be a non-empty string of at most 256 bytes without control characters"
        );
        c.ping_pong(); // a good message between bad ones: no 1008 streak
    }

    // 256 bytes without control characters: taken everywhere.
    let mut run = gw
        .emitter
        .run(user, Some(&longest), "r-long-emit", "ids_agent")
        .expect("a 256-byte thread id is valid");
    run.agent_started(&json!({"n": 1})).expect("emit");
    publish_ok(
        gw.addr,
        &pub_event(
            "agent_thinking",
            user,
            Some(&longest),
            "r-long-pub",
            json!({"n": 2}),
        ),
    );
    // (The emitter's event goes through the channel, the publish API routes directly:
    // either may come first.)
    let events = c.recv_events(2);
    let mut ns: Vec<u64> = events
        .iter()
        .filter_map(|e| e["data"]["n"].as_u64())
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, [1, 2], "only the valid events were routed: {events:?}");
    let ack = c.user_message(Some(&longest), "hello", "good");
    match inbound.recv_timeout(WAIT) {
        Ok(Inbound::UserMessage {
            thread_id, run_id, ..
        }) => {
            assert_eq!(thread_id.as_deref(), Some(longest.as_str()));
            assert_eq!(ack["run_id"], run_id, "the first message the workers got");
        }
        other => panic!("expected the good user_message first, got {other:?}"),
    }
}

/// `cancel` with a `run_id` no run can have (empty, over 256 bytes) is a bad message
/// stating the rule (v1: `not_found`); an unknown valid one is still `not_found`.
#[test]
fn cancel_run_id_follows_the_run_id_rule() {
    let gw = TestGateway::plain();
    let mut c = gw.connect("ids-cancel");
    for run_id in [String::new(), "r".repeat(257)] {
        c.send_json(&json!({"type": "cancel", "run_id": run_id}));
        let err = expect_error(&mut c, "bad_message");
        assert_eq!(
            err["message"],
            "run_id must be a non-empty string of at most 256 bytes"
        );
    }
    c.send_json(&json!({"type": "cancel", "run_id": "r".repeat(256)}));
    expect_error(&mut c, "not_found");
    c.send_json(&json!({"type": "cancel", "run_id": "r\n1"}));
    expect_error(&mut c, "not_found");
    c.ping_pong();
}

/// The 128-byte user id limit is one rule: the token's `sub`, the `user_id` query
/// parameter (a mismatch: 403), the emitter and the publish API agree on it.
#[test]
fn user_id_limit_is_the_same_everywhere() {
    let gw = TestGateway::plain();
    let longest = "é".repeat(64); // 128 bytes
    let too_long = "é".repeat(65); // 130 bytes
    for (user, upgraded, emitted, published) in
        [(&longest, 101, true, 202), (&too_long, 401, false, 400)]
    {
        let auth = [bearer(&token(user))];
        assert_eq!(upgrade(gw.addr, "/ws", &auth).status, upgraded, "{user}");
        assert_eq!(
            gw.emitter.run(user, None, "r-u-emit", "ids_agent").is_ok(),
            emitted
        );
        let r = publish(
            gw.addr,
            &pub_event("agent_thinking", user, None, "r-u-pub", json!(null)),
        );
        assert_eq!(r.status, published, "{}", r.text());
    }
    // A claimed user_id that is no user id can never be the sub: 403 like a mismatch.
    let auth = [bearer(&token("ids-u"))];
    for query in ["/ws?user_id=", &format!("/ws?user_id={}", "u".repeat(129))] {
        assert_eq!(upgrade(gw.addr, query, &auth).status, 403, "{query}");
    }
    assert_eq!(upgrade(gw.addr, "/ws?user_id=ids-u", &auth).status, 101);
}

/// Look-alike user ids are distinct users at the upgrade, the emitter and the publish
/// API: letter case, NUL, NFC and NFD, zero-width, full-width and Cyrillic letters.
/// Each connection gets exactly its own user's events, with its `user_id` byte for byte.
#[test]
fn look_alike_user_ids_stay_distinct_users() {
    let gw = TestGateway::plain();
    let users = [
        "ids-alice",
        "IDS-ALICE",
        "ids-Alice",
        "ids-alice\0",
        "ids-al\0ice",
        "ids-caf\u{e9}",   // NFC
        "ids-cafe\u{301}", // NFD
        "ids-al\u{200b}ice",
        "ids-\u{ff41}lice", // full-width a
        "ids-\u{430}lice",  // Cyrillic a
        "ids-alice ",
    ];
    let mut clients: Vec<Client> = users.iter().map(|u| connect(gw.addr, u)).collect();
    for (c, user) in clients.iter().zip(users) {
        assert_eq!(c.connected["user_id"], user);
    }
    for (i, user) in users.iter().enumerate() {
        let mut run = gw
            .emitter
            .run(user, None, &format!("r-emit-{i}"), "ids_agent")
            .expect("run");
        run.agent_started(&json!({"i": i})).expect("emit");
        run.agent_completed(&json!({"i": i})).expect("emit");
        publish_ok(
            gw.addr,
            &pub_event(
                "agent_thinking",
                user,
                None,
                &format!("r-pub-{i}"),
                json!({"i": i}),
            ),
        );
    }
    for (i, (c, user)) in clients.iter_mut().zip(users).enumerate() {
        let events = c.recv_events(3);
        for e in &events {
            assert_eq!(e["user_id"], user, "{e}");
            assert_eq!(e["data"]["i"], i, "{e}");
        }
        // Nothing else is queued for this user: the next frame is the pong.
        c.ping_pong();
    }
}
