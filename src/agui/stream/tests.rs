//! The mapping, event by event, and the property every output must have: each run's
//! frames, taken alone, follow AG-UI's stream rules (the subset of `verifyEvents`
//! the translation can break, checked by [`verify`]).

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::*;

fn ev(seq: u64, kind: &str, run: &str, thread: Option<&str>, data: Value) -> (Source, Vec<u8>) {
    let v = json!({"type": kind, "seq": seq, "user_id": "u1", "thread_id": thread,
                   "run_id": run, "agent_name": "a", "ts": 1000 + seq, "data": data});
    let bytes = serde_json::to_vec(&v).unwrap();
    (Source::parse(&bytes).unwrap(), bytes)
}

fn frames(stream: &mut Stream, events: &[(Source, Vec<u8>)]) -> Vec<Value> {
    let mut out = Vec::new();
    for (src, payload) in events {
        stream.translate(src, payload, &mut |b| out.push(decode(&b)));
    }
    out
}

fn decode(frame: &[u8]) -> Value {
    serde_json::from_slice(crate::agui::json_payload(frame).unwrap()).unwrap()
}

fn types(frames: &[Value]) -> Vec<&str> {
    frames.iter().map(|f| f["type"].as_str().unwrap()).collect()
}

/// The stream rules of `@ag-ui/client`'s `verifyEvents` the translation could break,
/// per run: the first frame is `RUN_STARTED` (or `RUN_ERROR`); no second
/// `RUN_STARTED` while the run is active; messages, reasoning and tool calls are
/// opened before use and closed before `RUN_FINISHED`; nothing after the run ended.
/// Plus the schema rules: no `null` in optional fields, an integer `timestamp`,
/// `metadata` with `seq` and `epoch`, `threadId` on run events.
fn verify(frames: &[Value]) -> Result<(), String> {
    #[derive(Default)]
    struct Run {
        started: bool,
        ended: bool,
        open: HashSet<String>,
    }
    let mut runs: HashMap<String, Run> = HashMap::new();
    for f in frames {
        let t = f["type"].as_str().ok_or("no type")?;
        let run_id = f["runId"].as_str().ok_or(format!("{t}: no runId"))?;
        if !f["timestamp"].is_u64()
            || !f["metadata"]["seq"].is_u64()
            || !f["metadata"]["epoch"].is_string()
        {
            return Err(format!("{t}: timestamp or metadata"));
        }
        for (k, v) in f.as_object().unwrap() {
            if v.is_null() && !(t == "CUSTOM" && k == "value") {
                return Err(format!("{t}: null {k}"));
            }
        }
        let r = runs.entry(run_id.to_owned()).or_default();
        if r.ended && t != "RUN_STARTED" {
            return Err(format!("{t} after the run ended"));
        }
        if !r.started && t != "RUN_STARTED" && t != "RUN_ERROR" {
            return Err(format!("first event {t}, not RUN_STARTED"));
        }
        let id = |k: &str| {
            f[k].as_str()
                .map(str::to_owned)
                .ok_or(format!("{t}: no {k}"))
        };
        // What a message, reasoning message or tool call is open under: the type's first
        // four letters and its id; `REASONING_START`/`_END` open and close the span
        // around the reasoning messages, kept apart as `span/...`.
        let open_key = || -> Result<String, String> {
            let key = format!(
                "{}/{}",
                &t[..4],
                id(if t.starts_with("TOOL") {
                    "toolCallId"
                } else {
                    "messageId"
                })?
            );
            Ok(if t == "REASONING_START" || t == "REASONING_END" {
                format!("span/{key}")
            } else {
                key
            })
        };
        match t {
            "RUN_STARTED" => {
                if r.started && !r.ended {
                    return Err("RUN_STARTED while the run is active".into());
                }
                id("threadId")?;
                *r = Run {
                    started: true,
                    ..Run::default()
                };
            }
            "RUN_FINISHED" => {
                id("threadId")?;
                if !r.open.is_empty() {
                    return Err(format!("RUN_FINISHED with {:?} open", r.open));
                }
                r.ended = true;
            }
            "RUN_ERROR" => {
                id("threadId")?;
                id("message")?;
                r.ended = true;
            }
            "TEXT_MESSAGE_START"
            | "REASONING_START"
            | "REASONING_MESSAGE_START"
            | "TOOL_CALL_START" => {
                let key = open_key()?;
                if !r.open.insert(key) {
                    return Err(format!("{t}: already open"));
                }
            }
            "TEXT_MESSAGE_CONTENT" | "REASONING_MESSAGE_CONTENT" | "TOOL_CALL_ARGS" => {
                let key = open_key()?;
                if !r.open.contains(&key) {
                    return Err(format!("{t}: {key} not open"));
                }
                if !f["delta"].is_string() {
                    return Err(format!("{t}: delta"));
                }
            }
            "TEXT_MESSAGE_END" | "REASONING_END" | "REASONING_MESSAGE_END" | "TOOL_CALL_END" => {
                let key = open_key()?;
                if !r.open.remove(&key) {
                    return Err(format!("{t}: {key} not open"));
                }
            }
            "TOOL_CALL_RESULT" => {
                id("messageId")?;
                id("toolCallId")?;
                if !f["content"].is_string() {
                    return Err("TOOL_CALL_RESULT: content".into());
                }
            }
            "CUSTOM" => {
                id("name")?;
            }
            other => return Err(format!("unexpected {other}")),
        }
    }
    Ok(())
}

fn demo_run(run: &str, first_seq: u64) -> Vec<(Source, Vec<u8>)> {
    let t = Some("t1");
    let s = first_seq;
    vec![
        ev(s, "agent_started", run, t, json!({"message": "hi"})),
        ev(
            s + 1,
            "agent_thinking",
            run,
            t,
            json!({"step": 1, "thought": "Reading"}),
        ),
        ev(
            s + 2,
            "tool_executing",
            run,
            t,
            json!({"tool": "web_search", "args": {"q": "hi"}}),
        ),
        ev(
            s + 3,
            "tool_completed",
            run,
            t,
            json!({"tool": "web_search", "result": {"hits": 3}}),
        ),
        ev(s + 4, "text_delta", run, t, json!({"delta": "Hello "})),
        ev(s + 5, "text_delta", run, t, json!({"delta": "world."})),
        ev(
            s + 6,
            "agent_completed",
            run,
            t,
            json!({"answer": "Hello world."}),
        ),
    ]
}

fn stream() -> Stream {
    Stream::new(Arc::from("ep1"), 256)
}

#[test]
fn a_whole_run_maps_to_the_ag_ui_sequence() {
    let mut s = stream();
    let out = frames(&mut s, &demo_run("r1", 1));
    assert_eq!(
        types(&out),
        [
            "RUN_STARTED",
            "REASONING_START",
            "REASONING_MESSAGE_START",
            "REASONING_MESSAGE_CONTENT",
            "REASONING_MESSAGE_END",
            "REASONING_END",
            "TOOL_CALL_START",
            "TOOL_CALL_ARGS",
            "TOOL_CALL_END",
            "TOOL_CALL_RESULT",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "RUN_FINISHED",
        ]
    );
    verify(&out).unwrap();
    let started = &out[0];
    assert_eq!(started["threadId"], "t1");
    assert_eq!(started["runId"], "r1");
    assert_eq!(started["timestamp"], 1001);
    assert_eq!(started["metadata"], json!({"seq": 1, "epoch": "ep1"}));
    assert_eq!(started["rawEvent"]["data"], json!({"message": "hi"}));
    assert_eq!(out[3]["delta"], "Reading");
    assert_eq!(out[6]["toolCallName"], "web_search");
    assert_eq!(out[7]["delta"], r#"{"q":"hi"}"#);
    assert_eq!(out[9]["toolCallId"], out[6]["toolCallId"]);
    assert_eq!(out[9]["content"], r#"{"hits":3}"#);
    assert_eq!(out[9]["role"], "tool");
    assert_eq!(out[11]["delta"], "Hello ");
    assert_eq!(out[11]["messageId"], "r1:text:5");
    // The end of the text message is written with the event that closed it.
    assert_eq!(out[13]["metadata"]["seq"], 7);
    assert_eq!(out[14]["result"], json!({"answer": "Hello world."}));
    assert_eq!(out[14]["outcome"], json!({"type": "success"}));
    // Every frame of one event carries that event's seq.
    assert!(out[6..9].iter().all(|f| f["metadata"]["seq"] == 3));
    assert_eq!(s.runs(), 0, "an ended run leaves the state");
}

#[test]
fn tool_calls_pair_by_id_when_given_else_by_order() {
    let mut s = stream();
    let t = Some("t");
    let out = frames(
        &mut s,
        &[
            ev(1, "agent_started", "r", t, json!(null)),
            ev(
                2,
                "tool_executing",
                "r",
                t,
                json!({"tool": "a", "tool_call_id": "call-a"}),
            ),
            ev(3, "tool_executing", "r", t, json!({"tool": "b"})),
            ev(
                4,
                "tool_executing",
                "r",
                t,
                json!({"tool": "c", "args": "{\"raw\":1}"}),
            ),
            ev(5, "tool_completed", "r", t, json!({"result": "B done"})),
            ev(
                6,
                "tool_completed",
                "r",
                t,
                json!({"tool_call_id": "call-a", "result": 1}),
            ),
            ev(7, "tool_completed", "r", t, json!({"ok": true})),
            ev(8, "agent_completed", "r", t, json!(null)),
        ],
    );
    verify(&out).unwrap();
    let starts: Vec<&Value> = out
        .iter()
        .filter(|f| f["type"] == "TOOL_CALL_START")
        .collect();
    let ids: Vec<&str> = starts
        .iter()
        .map(|f| f["toolCallId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["call-a", "r:tool:1", "r:tool:2"]);
    let args: Vec<&Value> = out
        .iter()
        .filter(|f| f["type"] == "TOOL_CALL_ARGS")
        .map(|f| &f["delta"])
        .collect();
    assert_eq!(args, [&json!("{}"), &json!("{}"), &json!("{\"raw\":1}")]);
    let results: Vec<(&str, &str)> = out
        .iter()
        .filter(|f| f["type"] == "TOOL_CALL_RESULT")
        .map(|f| {
            (
                f["toolCallId"].as_str().unwrap(),
                f["content"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("r:tool:1", "B done"),
            ("call-a", "1"),
            ("r:tool:2", r#"{"ok":true}"#)
        ]
    );
    let finished = out.last().unwrap();
    assert!(finished.get("result").is_none(), "null data: no result key");
}

#[test]
fn a_stream_that_joins_mid_run_starts_the_run_first() {
    let mut s = stream();
    let out = frames(
        &mut s,
        &[
            ev(40, "text_delta", "r9", None, json!({"delta": "lo"})),
            ev(41, "agent_completed", "r9", None, json!({})),
        ],
    );
    assert_eq!(
        types(&out),
        [
            "RUN_STARTED",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "RUN_FINISHED"
        ]
    );
    verify(&out).unwrap();
    // No thread: the run is its own thread; the synthetic start has no rawEvent.
    assert_eq!(out[0]["threadId"], "r9");
    assert!(out[0].get("rawEvent").is_none());
    assert_eq!(out[0]["metadata"]["seq"], 40);
}

#[test]
fn errors_and_gateway_ends_close_the_text_and_carry_run_and_thread() {
    for (data, message, code) in [
        (
            json!({"reason": "run_timeout"}),
            "the run sent no event within run_idle_timeout_ms and the gateway ended it",
            Some("run_timeout"),
        ),
        (
            json!({"reason": "worker_dropped"}),
            "the worker stopped before the run ended",
            Some("worker_dropped"),
        ),
        (
            json!({"reason": "cancelled"}),
            "the run was cancelled",
            Some("cancelled"),
        ),
        (
            json!({"error": "quota exceeded", "code": "quota"}),
            "quota exceeded",
            Some("quota"),
        ),
        (json!(null), "the agent reported an error", None),
    ] {
        let mut s = stream();
        let out = frames(
            &mut s,
            &[
                ev(1, "agent_started", "r", Some("t"), json!({})),
                ev(2, "text_delta", "r", Some("t"), json!({"delta": "par"})),
                ev(3, "agent_error", "r", Some("t"), data.clone()),
            ],
        );
        assert_eq!(
            types(&out),
            [
                "RUN_STARTED",
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END",
                "RUN_ERROR"
            ]
        );
        verify(&out).unwrap();
        let err = out.last().unwrap();
        assert_eq!(
            (&err["runId"], &err["threadId"]),
            (&json!("r"), &json!("t"))
        );
        assert_eq!(err["message"], message, "{data}");
        assert_eq!(err.get("code").and_then(Value::as_str), code);
        assert_eq!(err["rawEvent"]["type"], "agent_error");
        assert_eq!(s.runs(), 0);
    }
}

#[test]
fn other_types_are_custom_and_a_repeated_start_too() {
    let mut s = stream();
    let out = frames(
        &mut s,
        &[
            ev(1, "agent_thinking", "r", None, json!({"step": 1})),
            ev(2, "agent_started", "r", None, json!({"late": true})),
            ev(3, "usage", "r", None, json!({"tokens": 12})),
            ev(4, "status_ping", "r", None, json!(null)),
        ],
    );
    verify(&out).unwrap();
    let customs: Vec<(&Value, &Value)> = out
        .iter()
        .filter(|f| f["type"] == "CUSTOM")
        .map(|f| (&f["name"], &f["value"]))
        .collect();
    assert_eq!(
        customs,
        [
            (&json!("agent_started"), &json!({"late": true})),
            (&json!("usage"), &json!({"tokens": 12})),
            (&json!("status_ping"), &Value::Null),
        ]
    );
    // A thought without text: the data as JSON.
    assert_eq!(out[3]["delta"], r#"{"step":1}"#);
}

#[test]
fn interleaved_runs_each_stay_valid_on_their_own() {
    let mut s = stream();
    let a = demo_run("ra", 1);
    let b = demo_run("rb", 100);
    let mixed: Vec<(Source, Vec<u8>)> = a.into_iter().zip(b).flat_map(|(x, y)| [x, y]).collect();
    let out = frames(&mut s, &mixed);
    verify(&out).unwrap();
    assert_eq!(
        out.iter().filter(|f| f["type"] == "RUN_FINISHED").count(),
        2
    );
}

#[test]
fn a_rebuilt_state_continues_exactly_and_its_opening_frames_stand_for_the_past() {
    // The whole run seen live by one stream...
    let run = demo_run("r1", 1);
    let mut live = stream();
    let all = frames(&mut live, &run);
    // ...and a stream resuming after seq 5 (inside the text message): rebuilt from the
    // kept events up to 5, its opening frames, then the events after 5.
    for cut in 1..run.len() {
        let mut resumed = stream();
        for (src, payload) in &run[..cut] {
            resumed.observe(&Source::parse_light(payload).unwrap_or_else(|| panic!("{src:?}")));
        }
        let mut opening = Vec::new();
        resumed.opening_frames(&mut |b| opening.push(decode(&b)));
        let rest = frames(&mut resumed, &run[cut..]);
        let last_seen = cut as u64;
        // Alone, the resumed connection's stream is valid from its start.
        let alone: Vec<Value> = opening.iter().chain(&rest).cloned().collect();
        verify(&alone).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        // The opening frames stand for events the client had: seq <= its last_seq.
        assert!(opening
            .iter()
            .all(|f| f["metadata"]["seq"].as_u64().unwrap() <= last_seen));
        // What the client had (frames up to its last_seq) plus the rest, deduplicated
        // by seq, is exactly the live stream.
        let had: Vec<Value> = all
            .iter()
            .filter(|f| f["metadata"]["seq"].as_u64().unwrap() <= last_seen)
            .cloned()
            .collect();
        let joined: Vec<Value> = had.into_iter().chain(rest).collect();
        assert_eq!(joined, all, "cut {cut}");
    }
}

#[test]
fn adopted_runs_open_with_the_registry_state() {
    let mut s = stream();
    s.adopt("r7", Some("t7"), 555, 42);
    s.adopt("r7", Some("t7"), 555, 42);
    let mut opening = Vec::new();
    s.opening_frames(&mut |b| opening.push(decode(&b)));
    assert_eq!(types(&opening), ["RUN_STARTED"]);
    assert_eq!(opening[0]["threadId"], "t7");
    assert_eq!(opening[0]["timestamp"], 555);
    assert_eq!(opening[0]["metadata"]["seq"], 42);
    let rest = frames(
        &mut s,
        &[ev(43, "agent_completed", "r7", Some("t7"), json!({}))],
    );
    assert_eq!(types(&rest), ["RUN_FINISHED"]);
}

#[test]
fn the_runs_kept_are_bounded_least_recently_active_first() {
    let mut s = Stream::new(Arc::from("e"), 2);
    frames(
        &mut s,
        &[
            ev(1, "agent_started", "a", None, json!({})),
            ev(2, "agent_started", "b", None, json!({})),
            ev(3, "agent_thinking", "a", None, json!({})),
            ev(4, "agent_started", "c", None, json!({})),
        ],
    );
    assert_eq!(s.runs(), 2);
    assert!(s.knows("a") && s.knows("c") && !s.knows("b"));
    s.retain_runs(|id| id == "c");
    assert!(!s.knows("a") && s.knows("c"));
}

#[test]
fn a_runs_thread_id_is_the_one_its_start_said() {
    let mut s = stream();
    let out = frames(
        &mut s,
        &[
            ev(1, "agent_started", "r", None, json!({})),
            ev(
                2,
                "agent_thinking",
                "r",
                Some("t-late"),
                json!({"thought": "x"}),
            ),
            ev(3, "agent_error", "r", Some("t-late"), json!({"error": "e"})),
        ],
    );
    let threads: Vec<&Value> = out.iter().filter_map(|f| f.get("threadId")).collect();
    assert_eq!(threads, [&json!("r"), &json!("r")]);
}
