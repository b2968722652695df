//! What an `encoding=agui` connection costs the reactor per event, next to an agentwire
//! one: an agentwire connection takes the event's shared frame (a reference-count bump
//! and a queue push); an AG-UI connection reads the event back from that frame (once
//! per event for all the user's AG-UI connections it reaches) and serializes its own
//! AG-UI frames. Also the cost of opening an AG-UI connection: rebuilding its state
//! from a full replay buffer (1,024 kept events).
//!
//! Events: a `text_delta` (the common case: one `TEXT_MESSAGE_CONTENT`) and a
//! `tool_executing` (three frames). Throughput is in events.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use agentwire::__internal::agui::{json_payload, Source, Stream};
use agentwire::__internal::conn::OutQueue;
use agentwire::__internal::event::{Event, RunKey};
use agentwire::EventKind;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;

mod common;
use common::key;

fn frame(kind: &str, data: serde_json::Value, seq: u64) -> Bytes {
    let kind = EventKind::parse(kind).expect("kind");
    Event::new(key(), kind, &data).expect("event").frame(seq)
}

/// A stream already inside the run's text message, as a live connection is.
fn stream_in_text() -> Stream {
    let mut s = Stream::new(Arc::from("9f2c41d0"), 256);
    for (seq, f) in [
        (1, frame("agent_started", json!({"message": "hi"}), 1)),
        (2, frame("text_delta", json!({"delta": "Hello "}), 2)),
    ] {
        let src = Source::parse(json_payload(&f).unwrap()).unwrap();
        assert_eq!(src.seq, seq);
        s.translate(&src, json_payload(&f).unwrap(), &mut |_| {});
    }
    s
}

fn per_event(c: &mut Criterion) {
    let delta = frame("text_delta", json!({"delta": "three "}), 3);
    let tool = frame(
        "tool_executing",
        json!({"tool": "sql", "args": {"query": "select count(*) from orders where day = current_date"}}),
        3,
    );
    let mut g = c.benchmark_group("per_connection_per_event");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("agentwire_shared_frame", |b| {
        let mut out = OutQueue::default();
        b.iter(|| {
            out.push(black_box(&delta).clone());
            if out.pending() > 1 << 20 {
                out = OutQueue::default();
            }
        })
    });
    for (name, f) in [("agui_text_delta", &delta), ("agui_tool_executing", &tool)] {
        g.bench_function(format!("{name}_parse_and_translate"), |b| {
            let mut out = OutQueue::default();
            b.iter_batched_ref(
                stream_in_text,
                |s| {
                    let payload = json_payload(f).unwrap();
                    let src = Source::parse(payload).unwrap();
                    s.translate(&src, payload, &mut |fr| out.push(fr));
                    if out.pending() > 1 << 20 {
                        out = OutQueue::default();
                    }
                },
                criterion::BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("{name}_translate_only"), |b| {
            let payload = json_payload(f).unwrap();
            let src = Source::parse(payload).unwrap();
            let mut out = OutQueue::default();
            b.iter_batched_ref(
                stream_in_text,
                |s| {
                    s.translate(&src, payload, &mut |fr| out.push(fr));
                    if out.pending() > 1 << 20 {
                        out = OutQueue::default();
                    }
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn opening(c: &mut Criterion) {
    // A full replay buffer: 32 runs of 32 events (thinking, tool calls, text), the
    // last 4 runs still in progress.
    let mut kept = Vec::new();
    let mut seq = 0;
    for run in 0..32 {
        let key = RunKey::new(
            "user-7f3a2c91",
            Some("t"),
            &format!("run-{run}"),
            "data_agent",
        )
        .unwrap();
        let mut push = |kind: &str, data: serde_json::Value| {
            seq += 1;
            let kind = EventKind::parse(kind).unwrap();
            kept.push(Event::new(key.clone(), kind, &data).unwrap().frame(seq));
        };
        push("agent_started", json!({"message": "What is agentwire?"}));
        push(
            "agent_thinking",
            json!({"step": 1, "thought": "Reading the question"}),
        );
        push(
            "tool_executing",
            json!({"tool": "web_search", "args": {"query": "agentwire"}}),
        );
        push(
            "tool_completed",
            json!({"tool": "web_search", "result": {"hits": 3, "top": "A short article"}}),
        );
        for i in 0..27 {
            push("text_delta", json!({"delta": format!("word{i} ")}));
        }
        if run < 28 {
            push("agent_completed", json!({"answer": "..."}));
        }
    }
    let mut g = c.benchmark_group("agui_open");
    g.throughput(Throughput::Elements(kept.len() as u64));
    g.bench_function("rebuild_from_1024_kept_events", |b| {
        b.iter(|| {
            let s = Stream::rebuild(
                Arc::from("9f2c41d0"),
                256,
                kept.iter().map(|f| &f[..]),
                &[],
                seq,
                false,
            );
            let mut n = 0;
            s.opening_frames(&mut |_| n += 1);
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, per_event, opening);
criterion_main!(benches);
