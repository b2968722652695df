//! Event serialization, both halves, with the library's own functions: the worker side
//! ([`Event::new`], what every `RunHandle` method does after cloning its run key, and
//! [`Event::from_raw_data`], what the publish API does with JSON it already holds) and
//! the reactor side ([`Event::frame`]: put the user's `seq` into the envelope and build
//! the one WebSocket text frame every connection of the user shares).
//!
//! Two payload sizes: a typical ~100-byte `data` (a tool call) and a ~2 KiB one (a tool
//! result with text to escape). Throughput is in events.

use std::hint::black_box;
use std::time::Duration;

use agentwire::__internal::event::Event;
use agentwire::EventKind;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Value};

mod common;
use common::key;

/// About 100 bytes of JSON: a tool call.
fn small_data() -> Value {
    json!({
        "tool": "sql",
        "args": {"query": "select count(*) from orders where day = current_date"},
        "step": 3
    })
}

/// About 2 KiB of JSON: a tool result with rows and a text excerpt that needs escaping
/// (quotes, newlines, non-ASCII).
fn large_data() -> Value {
    let rows: Vec<Value> = (0..12)
        .map(|i| json!({"day": format!("2026-11-{:02}", i + 1), "orders": 1000 + i * 37, "region": "eu-west"}))
        .collect();
    let line = "Order \"A-1042\" shipped to Zürich; customer note: \"leave at door\".\n";
    json!({
        "tool": "sql",
        "status": "ok",
        "rows": rows,
        "excerpt": line.repeat(18),
        "elapsed_ms": 42
    })
}

fn bench(c: &mut Criterion) {
    let payloads = [("small", small_data()), ("large", large_data())];
    let mut group = c.benchmark_group("event");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));

    for (name, data) in &payloads {
        let data_len = serde_json::to_vec(data).expect("serializable").len();
        let raw = serde_json::to_string(data).expect("serializable");
        let label = format!("{name}_{data_len}B");

        // Worker side, as RunHandle::send does it: clone the run key (Arc bumps),
        // serialize the envelope and `data` once.
        let run_key = key();
        group.bench_function(BenchmarkId::new("emitter_serialize", &label), |b| {
            b.iter(|| Event::new(run_key.clone(), EventKind::ToolCompleted, black_box(data)))
        });

        // Publish API side: `data` is already JSON text, copied through.
        group.bench_function(BenchmarkId::new("publish_serialize", &label), |b| {
            b.iter(|| {
                Event::from_raw_data(run_key.clone(), EventKind::ToolCompleted, black_box(&raw))
            })
        });

        // Reactor side: the frame with the next seq (digits grow as seqs do in a gateway
        // that has run a while).
        let event = Event::new(key(), EventKind::ToolCompleted, data).expect("serializable");
        let mut seq = 1_000_000u64;
        group.bench_function(BenchmarkId::new("reactor_frame", &label), |b| {
            b.iter(|| {
                seq += 1;
                black_box(&event).frame(seq)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
