//! Embedding agentwire: run the gateway on its own thread and answer every
//! `user_message` with an agent run emitted from worker threads.
//!
//! ```text
//! cargo run --release --example worker
//! ```
//! then connect with the token it prints and send
//! `{"type":"user_message","thread_id":"t1","text":"2+2"}`.

use std::thread;
use std::time::Duration;

use agentwire::{Config, Gateway, Inbound};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let config = Config {
        listen: "127.0.0.1:8080".parse()?,
        jwt_secret: Some("example-secret-change-me-0123456789".into()),
        ..Config::default()
    };
    let mut gateway = Gateway::new(config.clone())?;
    let emitter = gateway.emitter();
    let inbound = gateway.inbound().ok_or("inbound channel already taken")?;
    let addr = gateway.local_addr();
    let handle = gateway.spawn()?;

    let auth = agentwire::authenticator(&config)?;
    println!("gateway on ws://{addr}/ws");
    println!("token for user alice: {}", auth.mint("alice", 3600)?);

    // A small pool of workers; each user message becomes one run.
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let inbound = inbound.clone();
            let emitter = emitter.clone();
            thread::spawn(move || {
                for msg in inbound.iter() {
                    let Inbound::UserMessage {
                        user_id,
                        thread_id,
                        text,
                        run_id,
                        ..
                    } = msg
                    else {
                        continue; // cancels arrive on the run handle
                    };
                    let run = emitter.run(&user_id, thread_id.as_deref(), &run_id, "calculator");
                    let Ok(mut run) = run else { continue };
                    let result = (|| -> Result<(), agentwire::EmitError> {
                        run.agent_started(&json!({"message": text}))?;
                        run.agent_thinking(&json!({"thought": "This looks like arithmetic"}))?;
                        run.tool_executing(&json!({"tool": "calculator", "args": {"expr": text}}))?;
                        thread::sleep(Duration::from_millis(50));
                        if run.is_cancelled() {
                            return run.agent_error(&json!({"reason": "cancelled"}));
                        }
                        run.tool_completed(&json!({"tool": "calculator", "result": 4}))?;
                        run.emit("text_delta", &json!({"delta": "The answer is 4."}))?;
                        run.agent_completed(&json!({"answer": "4"}))
                    })();
                    if let Err(e) = result {
                        log::warn!("run {run_id}: {e}");
                    }
                    // Dropping `run` before agent_completed would emit
                    // agent_error {"reason":"worker_dropped"} automatically.
                }
            })
        })
        .collect();

    // Runs until Ctrl-C kills the process; a real service would call
    // handle.shutdown() on its own shutdown path.
    for w in workers {
        let _ = w.join();
    }
    handle.shutdown()?;
    Ok(())
}
