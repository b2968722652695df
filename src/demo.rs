//! The built-in demo agent: answers every `user_message` with a realistic run
//! (started, a few thinking steps, a tool call and its result, streamed text, then
//! completed, with small delays), so the golden path "log in, ask, watch the agent
//! work" runs with no other software. On by default in dev mode.
//!
//! It is an ordinary worker: it reads [`Inbound`] messages and emits through an
//! [`Emitter`], exactly as an embedding application's agents would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::Receiver;
use serde_json::json;

use crate::emitter::{EmitError, Emitter, Inbound};

/// Most demo runs in flight at once; more get `agent_error {"reason":"busy"}`.
pub(crate) const MAX_CONCURRENT_RUNS: usize = 64;

/// Pause between the demo run's steps.
pub(crate) const STEP_DELAY: Duration = Duration::from_millis(120);

/// Start the demo agent on its own thread; it ends when the inbound channel closes.
pub fn spawn(
    emitter: Emitter,
    inbound: Receiver<Inbound>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("agentwire-demo".into())
        .spawn(move || serve(emitter, inbound))
}

fn serve(emitter: Emitter, inbound: Receiver<Inbound>) {
    let running = Arc::new(AtomicUsize::new(0));
    for msg in inbound.iter() {
        let Inbound::UserMessage {
            user_id,
            thread_id,
            text,
            run_id,
            ..
        } = msg
        else {
            // Cancels reach the run through its handle's flag.
            continue;
        };
        if running.load(Ordering::Acquire) >= MAX_CONCURRENT_RUNS {
            if let Ok(mut run) = emitter.run(&user_id, thread_id.as_deref(), &run_id, "demo_agent")
            {
                let _ = run
                    .agent_error(&json!({"reason": "busy", "message": "demo agent at capacity"}));
            }
            continue;
        }
        running.fetch_add(1, Ordering::AcqRel);
        let emitter = emitter.clone();
        let running = running.clone();
        let spawned = thread::Builder::new()
            .name("agentwire-demo-run".into())
            .spawn(move || {
                if let Err(e) = demo_run(&emitter, &user_id, thread_id.as_deref(), &run_id, &text) {
                    log::warn!("demo run={run_id:?} user={user_id:?} ended early: {e}");
                }
                running.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            log::error!("demo agent could not start a run thread: {e}");
        }
    }
}

/// One realistic run. Stops with `agent_error {"reason":"cancelled"}` when the user
/// cancels it.
pub(crate) fn demo_run(
    emitter: &Emitter,
    user_id: &str,
    thread_id: Option<&str>,
    run_id: &str,
    text: &str,
) -> Result<(), EmitError> {
    let mut run = emitter.run(user_id, thread_id, run_id, "demo_agent")?;
    let query: String = text.chars().take(200).collect();
    run.agent_started(&json!({"message": query}))?;
    let steps = [
        "Reading the question",
        "Deciding which tool can answer it",
        "Planning the search",
    ];
    for (i, step) in steps.iter().enumerate() {
        thread::sleep(STEP_DELAY);
        if run.is_cancelled() {
            return run.agent_error(&json!({"reason": "cancelled"}));
        }
        run.agent_thinking(&json!({"step": i + 1, "thought": step}))?;
    }
    thread::sleep(STEP_DELAY);
    run.tool_executing(&json!({"tool": "web_search", "args": {"query": query}}))?;
    thread::sleep(STEP_DELAY * 2);
    if run.is_cancelled() {
        return run.agent_error(&json!({"reason": "cancelled"}));
    }
    run.tool_completed(&json!({
        "tool": "web_search",
        "result": {"hits": 3, "top": format!("A short article about {query}")}
    }))?;
    let answer = format!("Here is what I found about \"{query}\": three sources agree.");
    for word in answer.split_inclusive(' ') {
        thread::sleep(Duration::from_millis(15));
        run.emit("text_delta", &json!({"delta": word}))?;
    }
    run.agent_completed(&json!({"answer": answer}))
}
