//! Embedding agentwire: run the gateway on its own thread with the binary's signal
//! handling, and answer every `user_message` with an agent run computed by worker
//! threads: arithmetic (`2 + 3 * (4 - 1)`) is evaluated by a `calculator` tool, any
//! other text gets a `word_count` tool's figures.
//!
//! ```text
//! cargo run --release --example worker [-- --listen 127.0.0.1:8080]
//! ```
//! then connect with the token it prints and send
//! `{"type":"user_message","thread_id":"t1","text":"2+2"}`.
//!
//! Ctrl-C or SIGTERM drains the gateway as the `agentwire` binary does (new upgrades get
//! 503, runs in progress end with `agent_error` `shutdown`, every session gets close
//! 1001); the inbound channel then closes, the workers finish, and the program exits 0.
//! SIGHUP reloads the JWT keys, secret and allowed origins.

use std::thread;

use agentwire::{Config, Gateway, Inbound, RunHandle};
use serde_json::json;

/// Worker threads answering user messages.
const WORKERS: usize = 4;
/// Longest expression the calculator takes, in bytes, and deepest nesting.
const MAX_EXPR_BYTES: usize = 1024;
const MAX_DEPTH: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let listen = listen_arg()?.unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let config = Config {
        listen: listen.parse()?,
        jwt_secret: Some("example-secret-change-me-0123456789".into()),
        ..Config::default()
    };
    let mut gateway = Gateway::new(config.clone())?;
    let emitter = gateway.emitter();
    let inbound = gateway.inbound().ok_or("inbound channel already taken")?;
    let addr = gateway.local_addr();
    // SIGTERM / SIGINT drain, SIGHUP reloads: as the binary.
    let handle = gateway.spawn_with_signals()?;

    let auth = agentwire::authenticator(&config)?;
    println!("gateway on ws://{addr}/ws");
    println!("token for user alice: {}", auth.mint("alice", 3600)?);

    // A small pool of workers; each user message becomes one run. `inbound.iter()`
    // ends when the gateway has drained and dropped its end of the channel.
    let workers: Vec<_> = (0..WORKERS)
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
                    let agent = "calculator_agent";
                    let Ok(run) = emitter.run(&user_id, thread_id.as_deref(), &run_id, agent)
                    else {
                        continue;
                    };
                    if let Err(e) = answer(run, &text) {
                        log::warn!("run {run_id}: {e}");
                    }
                    // Dropping a run before agent_completed would emit
                    // agent_error {"reason":"worker_dropped"} automatically.
                }
            })
        })
        .collect();
    drop(inbound);

    for w in workers {
        let _ = w.join();
    }
    handle.join()?;
    log::info!("gateway drained, workers done: exiting");
    Ok(())
}

/// `--listen ADDR` from the command line, if given.
fn listen_arg() -> Result<Option<String>, String> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => Ok(None),
        (Some("--listen"), Some(addr)) => Ok(Some(addr)),
        _ => Err("usage: worker [--listen ADDR]".to_owned()),
    }
}

/// One run: the tool call and the answer it computes.
fn answer(mut run: RunHandle, text: &str) -> Result<(), agentwire::EmitError> {
    run.agent_started(&json!({"message": text}))?;
    match evaluate(text) {
        Ok(value) => {
            run.agent_thinking(&json!({"thought": "This is arithmetic: calling the calculator"}))?;
            run.tool_executing(&json!({"tool": "calculator", "args": {"expr": text}}))?;
            if run.is_cancelled() {
                return run.agent_error(&json!({"reason": "cancelled"}));
            }
            let result = format_number(value);
            run.tool_completed(&json!({"tool": "calculator", "result": result}))?;
            run.emit(
                "text_delta",
                &json!({"delta": format!("{} = {result}", text.trim())}),
            )?;
            run.agent_completed(&json!({"answer": result}))
        }
        Err(why) => {
            run.agent_thinking(
                &json!({"thought": format!("Not arithmetic ({why}): counting words")}),
            )?;
            run.tool_executing(&json!({"tool": "word_count", "args": {"text": text}}))?;
            if run.is_cancelled() {
                return run.agent_error(&json!({"reason": "cancelled"}));
            }
            let counts = word_count(text);
            run.tool_completed(&json!({"tool": "word_count", "result": counts}))?;
            let summary = format!(
                "{} words, {} characters",
                counts["words"], counts["characters"]
            );
            run.emit("text_delta", &json!({"delta": summary}))?;
            run.agent_completed(&json!({"answer": summary, "counts": counts}))
        }
    }
}

/// Words (whitespace-separated), characters, lines and the longest word.
fn word_count(text: &str) -> serde_json::Value {
    let words: Vec<&str> = text.split_whitespace().collect();
    // The first of the longest (`max_by_key` keeps the last, so look from the end).
    let longest = words
        .iter()
        .rev()
        .copied()
        .max_by_key(|w| w.chars().count())
        .unwrap_or("");
    json!({
        "words": words.len(),
        "characters": text.chars().count(),
        "lines": text.lines().count(),
        "longest_word": longest,
    })
}

/// An integer when the value is whole and small enough to print exactly.
fn format_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Evaluate `+ - * / ^`, parentheses, unary minus and decimal numbers (`^` binds
/// tighter than unary minus, and to the right: `-2^2` is -4, `2^3^2` is 512). At least one operator is required, so a lone number
/// or a word is not arithmetic.
fn evaluate(text: &str) -> Result<f64, String> {
    if text.len() > MAX_EXPR_BYTES {
        return Err("too long".into());
    }
    let tokens = tokenize(text)?;
    if !tokens.iter().any(|t| matches!(t, Tok::Op(_))) {
        return Err("no operator".into());
    }
    let mut p = Parser { tokens, pos: 0 };
    let v = p.sum(0)?;
    if p.pos != p.tokens.len() {
        return Err("unexpected input after the expression".into());
    }
    if !v.is_finite() {
        return Err("the result is not a finite number (division by zero?)".into());
    }
    Ok(v)
}

#[derive(Clone, Copy, Debug)]
enum Tok {
    Num(f64),
    Op(char),
    Open,
    Close,
}

fn tokenize(text: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {}
            '+' | '-' | '*' | '/' | '^' => out.push(Tok::Op(c)),
            '(' => out.push(Tok::Open),
            ')' => out.push(Tok::Close),
            '0'..='9' | '.' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_digit() || d == '.' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let n = text[i..end]
                    .parse()
                    .map_err(|_| format!("bad number {:?}", &text[i..end]))?;
                out.push(Tok::Num(n));
            }
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.pos).copied();
        self.pos += 1;
        t
    }

    fn peek(&self) -> Option<Tok> {
        self.tokens.get(self.pos).copied()
    }

    /// sum := product (('+' | '-') product)*
    fn sum(&mut self, depth: usize) -> Result<f64, String> {
        let mut v = self.product(depth)?;
        while let Some(Tok::Op(op @ ('+' | '-'))) = self.peek() {
            self.pos += 1;
            let rhs = self.product(depth)?;
            v = if op == '+' { v + rhs } else { v - rhs };
        }
        Ok(v)
    }

    /// product := unary (('*' | '/') unary)*
    fn product(&mut self, depth: usize) -> Result<f64, String> {
        let mut v = self.unary(depth)?;
        while let Some(Tok::Op(op @ ('*' | '/'))) = self.peek() {
            self.pos += 1;
            let rhs = self.unary(depth)?;
            v = if op == '*' { v * rhs } else { v / rhs };
        }
        Ok(v)
    }

    /// unary := '-' unary | power
    fn unary(&mut self, depth: usize) -> Result<f64, String> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply".into());
        }
        if let Some(Tok::Op('-')) = self.peek() {
            self.pos += 1;
            return Ok(-self.unary(depth + 1)?);
        }
        self.power(depth)
    }

    /// power := atom ('^' unary)?
    fn power(&mut self, depth: usize) -> Result<f64, String> {
        let base = self.atom(depth)?;
        if let Some(Tok::Op('^')) = self.peek() {
            self.pos += 1;
            let exp = self.unary(depth + 1)?;
            return Ok(base.powf(exp));
        }
        Ok(base)
    }

    /// atom := number | '(' sum ')'
    fn atom(&mut self, depth: usize) -> Result<f64, String> {
        match self.next() {
            Some(Tok::Num(n)) => Ok(n),
            Some(Tok::Open) => {
                let v = self.sum(depth + 1)?;
                match self.next() {
                    Some(Tok::Close) => Ok(v),
                    _ => Err("missing )".into()),
                }
            }
            _ => Err("expected a number".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic() {
        assert_eq!(evaluate("2+2"), Ok(4.0));
        assert_eq!(evaluate("2 + 3 * (4 - 1)"), Ok(11.0));
        assert_eq!(evaluate("-2^2"), Ok(-4.0));
        assert_eq!(evaluate("2^3^2"), Ok(512.0));
        assert_eq!(evaluate("7 / 2"), Ok(3.5));
        assert!(evaluate("1/0").is_err());
        assert!(evaluate("42").is_err());
        assert!(evaluate("hello world").is_err());
        assert!(evaluate("(1+2").is_err());
        assert!(evaluate(&"(".repeat(500)).is_err());
        assert_eq!(format_number(11.0), "11");
        assert_eq!(format_number(3.5), "3.5");
    }

    #[test]
    fn words() {
        let c = word_count("the quick  brown\nfox");
        assert_eq!(c["words"], 4);
        assert_eq!(c["longest_word"], "quick");
        assert_eq!(c["lines"], 2);
    }
}
