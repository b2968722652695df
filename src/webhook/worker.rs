//! The webhook's sending threads: [`WORKERS`] threads share one `ureq` agent (so one
//! pool of keep-alive connections to `inbound_url`), each takes one [`Job`] at a time
//! from the bounded job channel, POSTs it, and hands the [`Answer`] back to the reactor
//! through the answer channel, then wakes the loop (the same coalescing
//! [`WakeSignal`] the emitters use). The reactor thread never waits on the endpoint.
//!
//! A job's deadline counts from the client's message, so time spent queued behind
//! other jobs counts: a job taken after its deadline is answered `Timeout` without a
//! request; otherwise the request gets what is left as `ureq`'s global timeout
//! (resolve, connect, TLS, send and the whole answer).
//!
//! The agent: rustls with the aws-lc-rs provider, certificates checked against the
//! system's trust store; no redirects followed (a 3xx is not a 2xx); no proxy (the
//! `*_proxy` environment is not read: the endpoint is usually internal); answers read up
//! to [`MAX_ANSWER_BYTES`] and discarded, so the connection goes back to the pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::request::InboundRequest;
use crate::emitter::WakeSignal;

/// Sending threads. A thread holds one request at a time and the endpoint is meant to
/// answer at once (it starts the run and publishes later), so a few threads carry
/// thousands of messages a second over kept-alive connections; eight leave room for
/// some slow answers without one stalling the rest, and cost eight idle threads.
pub const WORKERS: usize = 8;
/// Longest a kept-alive connection waits idle in the pool before it is closed: below
/// the 5 s idle timeout of common worker servers (uvicorn, Node's http), so the gateway
/// closes first and never sends a request into a connection the endpoint is closing.
pub const MAX_IDLE: Duration = Duration::from_secs(4);
/// Bytes of an answer read (and discarded) so its connection can be reused; a longer
/// answer is cut and its connection closed.
pub const MAX_ANSWER_BYTES: u64 = 64 * 1024;

/// One request to send.
pub struct Job {
    pub id: u64,
    pub request: InboundRequest,
    /// No answer by then is a `Timeout`.
    pub deadline: Instant,
}

/// What became of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered 2xx (the status).
    Delivered(u16),
    Failed(Failure),
}

/// Why a job failed, one counter each in the stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The endpoint answered with this status, not 2xx.
    Status(u16),
    /// No connection: refused, unreachable, unknown host.
    Connect,
    /// No answer before the deadline (queued or sent).
    Timeout,
    /// TLS handshake or certificate failed.
    Tls,
    /// Anything else (connection dropped mid-answer, malformed answer).
    Io,
}

/// A job's result, for the reactor.
pub struct Answer {
    pub id: u64,
    pub outcome: Outcome,
}

/// Start the sending threads.
///
/// # Errors
/// A thread could not be spawned.
pub fn spawn(
    url: &str,
    key: &str,
    jobs: Receiver<Job>,
    answers: Sender<Answer>,
    wake: Arc<WakeSignal>,
) -> std::io::Result<()> {
    let agent = agent();
    let auth: Arc<str> = Arc::from(format!("Bearer {key}"));
    let url: Arc<str> = Arc::from(url);
    for n in 0..WORKERS {
        let (agent, auth, url) = (agent.clone(), auth.clone(), url.clone());
        let (jobs, answers, wake) = (jobs.clone(), answers.clone(), wake.clone());
        std::thread::Builder::new()
            .name(format!("agentwire-webhook-{n}"))
            .spawn(move || {
                // Ends when the reactor drops the job channel's sender.
                while let Ok(job) = jobs.recv() {
                    let outcome = post(&agent, &url, &auth, &job);
                    if answers
                        .send(Answer {
                            id: job.id,
                            outcome,
                        })
                        .is_err()
                    {
                        return;
                    }
                    wake.wake();
                }
            })?;
    }
    Ok(())
}

/// The shared agent (see the module docs).
fn agent() -> ureq::Agent {
    use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
    let crypto = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(crypto)
        .root_certs(RootCerts::PlatformVerifier)
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .max_idle_connections(WORKERS)
        .max_idle_connections_per_host(WORKERS)
        .max_idle_age(MAX_IDLE)
        .user_agent(concat!("agentwire/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

/// POST one job and classify the result.
fn post(agent: &ureq::Agent, url: &str, auth: &str, job: &Job) -> Outcome {
    let Some(left) = job.deadline.checked_duration_since(Instant::now()) else {
        return Outcome::Failed(Failure::Timeout);
    };
    if left < Duration::from_millis(1) {
        return Outcome::Failed(Failure::Timeout);
    }
    let body = job.request.to_json();
    let sent = agent
        .post(url)
        .header("Authorization", auth)
        .header("Content-Type", "application/json")
        .config()
        .timeout_global(Some(left))
        .build()
        .send(&body[..]);
    match sent {
        Ok(mut answer) => {
            let status = answer.status().as_u16();
            // Read the answer out so the connection can go back to the pool; its
            // content does not matter.
            let _ = answer
                .body_mut()
                .with_config()
                .limit(MAX_ANSWER_BYTES)
                .read_to_vec();
            if (200..300).contains(&status) {
                Outcome::Delivered(status)
            } else {
                Outcome::Failed(Failure::Status(status))
            }
        }
        Err(e) => Outcome::Failed(classify(&e)),
    }
}

fn classify(e: &ureq::Error) -> Failure {
    use std::io::ErrorKind;
    match e {
        ureq::Error::Timeout(_) => Failure::Timeout,
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => Failure::Connect,
        // rustls reports handshake and certificate failures through the stream.
        ureq::Error::Io(io)
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
        {
            Failure::Tls
        }
        ureq::Error::Io(io) => match io.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::Timeout,
            ErrorKind::ConnectionRefused
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::AddrNotAvailable => Failure::Connect,
            _ => Failure::Io,
        },
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::TlsRequired => Failure::Tls,
        _ => Failure::Io,
    }
}
