//! The worker-side API: [`Emitter`] (a cloneable handle on the bounded channel into the
//! reactor) and [`RunHandle`] (one agent run, with a typed method per event).
//!
//! Events are serialized here, on the worker's thread; the reactor only routes bytes.
//! Sending never blocks forever: when the channel is full the emitter retries with
//! exponential backoff up to [`Emitter::max_wait`] and then returns
//! [`EmitError::ChannelFull`]. The reactor is woken through one `mio::Waker`, at most
//! once per burst (a `pending` flag coalesces wakes).
//!
//! Messages from clients (`user_message`, `cancel`) reach workers as [`Inbound`] on the
//! channel returned by `Gateway::inbound`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use serde::Serialize;

use crate::event::{Event, EventError, EventKind, RunKey};

/// Wakes the reactor at most once per burst of sends.
pub(crate) struct WakeSignal {
    pending: AtomicBool,
    waker: mio::Waker,
}

impl WakeSignal {
    pub(crate) fn new(waker: mio::Waker) -> WakeSignal {
        WakeSignal {
            pending: AtomicBool::new(false),
            waker,
        }
    }

    /// Producer side: wake unless a wake is already pending.
    pub(crate) fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                log::error!("reactor wake failed: {e}");
            }
        }
    }

    /// Reactor side: called before draining, so a send after this point wakes again.
    pub(crate) fn reset(&self) {
        self.pending.swap(false, Ordering::AcqRel);
    }
}

/// What workers and the HTTP side send into the reactor.
pub(crate) enum Command {
    /// Route one event.
    Event(Box<Event>),
    /// Start a graceful shutdown (PROTOCOL.md section 7).
    Shutdown,
}

/// A client message for the agent workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// `user_message`: start a run with the `run_id` the gateway chose (and acked).
    UserMessage {
        user_id: String,
        thread_id: Option<String>,
        text: String,
        run_id: String,
        connection_id: String,
    },
    /// `cancel`: the user asked to stop run `run_id` (the run handle's
    /// [`RunHandle::is_cancelled`] turns true as well).
    Cancel { user_id: String, run_id: String },
}

/// Why an emit failed. The event was not queued.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// The event itself is invalid (type, ids, data).
    #[error(transparent)]
    Invalid(#[from] EventError),
    /// The channel stayed full for the whole retry window: the gateway is overloaded.
    #[error("gateway channel full for {0:?}; event not sent")]
    ChannelFull(Duration),
    /// The gateway has stopped.
    #[error("gateway stopped; event not sent")]
    Closed,
    /// The run already ended with agent_completed or agent_error.
    #[error("run already ended; event not sent")]
    RunEnded,
    /// The gateway refused this run: its user already had `max_active_runs_per_user`
    /// runs in progress, or the gateway `max_active_runs`. The run's first event was
    /// dropped by the gateway (the emit that sent it returned `Ok`, the refusal
    /// happens on the reactor); every later emit of the handle returns this.
    #[error("too many active runs (max_active_runs_per_user / max_active_runs); run refused")]
    TooManyRuns,
    /// The Redis engine could not reach Redis for the whole retry window
    /// ([`Emitter::max_wait`]): the event was not sent (PROTOCOL.md section 9).
    #[error("engine (Redis) unavailable for {0:?}; event not sent")]
    EngineUnavailable(Duration),
}

/// Cloneable, thread-safe handle for emitting events into the gateway.
#[derive(Clone)]
pub struct Emitter {
    tx: Sender<Command>,
    wake: Arc<WakeSignal>,
    max_wait: Duration,
    /// Raised by the Redis engine while Redis is unreachable (never under the memory
    /// engine): events wait for it within `max_wait`, then fail.
    engine_down: Arc<AtomicBool>,
}

impl Emitter {
    pub(crate) fn new(
        tx: Sender<Command>,
        wake: Arc<WakeSignal>,
        engine_down: Arc<AtomicBool>,
    ) -> Emitter {
        Emitter {
            tx,
            wake,
            engine_down,
            max_wait: Duration::from_secs(2),
        }
    }

    /// Longest time an emit retries while the channel is full (default 2 s).
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// A copy of this emitter with another retry bound.
    pub fn with_max_wait(&self, max_wait: Duration) -> Emitter {
        Emitter {
            max_wait,
            ..self.clone()
        }
    }

    /// Start emitting events of one run. `thread_id` `None` is a null thread.
    ///
    /// # Errors
    /// [`EventError`] when an identifier breaks the rule of its kind
    /// ([`crate::ids`]): a user id is 1 to 128 bytes, a thread id 1 to 256 bytes without
    /// control characters, a run id 1 to 256 bytes, an agent name at most 256 bytes.
    pub fn run(
        &self,
        user_id: &str,
        thread_id: Option<&str>,
        run_id: &str,
        agent_name: &str,
    ) -> Result<RunHandle, EventError> {
        Ok(RunHandle {
            emitter: self.clone(),
            key: RunKey::new(user_id, thread_id, run_id, agent_name)?,
            cancelled: Arc::new(AtomicBool::new(false)),
            refused: Arc::new(AtomicBool::new(false)),
            registered: false,
            ended: false,
        })
    }

    /// Send an already built event (used by the run handle; the publish API routes its
    /// events directly in the reactor, not through this channel).
    pub(crate) fn send_event(&self, event: Event) -> Result<(), EmitError> {
        self.send(Command::Event(Box::new(event)))
    }

    pub(crate) fn send(&self, cmd: Command) -> Result<(), EmitError> {
        let mut cmd = cmd;
        let mut backoff = Duration::from_micros(50);
        let started = Instant::now();
        if matches!(cmd, Command::Event(_)) {
            self.wait_for_engine(started)?;
        }
        loop {
            match self.tx.try_send(cmd) {
                Ok(()) => {
                    self.wake.wake();
                    return Ok(());
                }
                Err(TrySendError::Disconnected(_)) => return Err(EmitError::Closed),
                Err(TrySendError::Full(back)) => {
                    // Make sure the reactor is draining, then back off.
                    self.wake.wake();
                    let waited = started.elapsed();
                    if waited >= self.max_wait {
                        return Err(EmitError::ChannelFull(waited));
                    }
                    std::thread::sleep(backoff.min(self.max_wait - waited));
                    backoff = (backoff * 2).min(Duration::from_millis(20));
                    cmd = back;
                }
            }
        }
    }

    /// While the engine reports Redis unreachable, wait (backing off) within
    /// `max_wait` from `started`; then [`EmitError::EngineUnavailable`].
    fn wait_for_engine(&self, started: Instant) -> Result<(), EmitError> {
        let mut backoff = Duration::from_millis(1);
        while self.engine_down.load(Ordering::Acquire) {
            let waited = started.elapsed();
            if waited >= self.max_wait {
                return Err(EmitError::EngineUnavailable(waited));
            }
            std::thread::sleep(backoff.min(self.max_wait - waited));
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Ask the gateway to shut down gracefully (close 1001 to every client, flush
    /// within `shutdown_grace_ms`, then `Gateway::run` returns).
    pub fn shutdown(&self) -> Result<(), EmitError> {
        self.send(Command::Shutdown)
    }
}

/// One agent run: a typed method per event kind. Dropping the handle before the run
/// ended emits `agent_error {"reason":"worker_dropped"}`, so no UI waits forever.
pub struct RunHandle {
    emitter: Emitter,
    key: RunKey,
    cancelled: Arc<AtomicBool>,
    /// Raised by the reactor when it refused the run (too many active runs).
    refused: Arc<AtomicBool>,
    registered: bool,
    ended: bool,
}

impl RunHandle {
    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.key.run_id
    }

    /// The user this run's events go to.
    pub fn user_id(&self) -> &str {
        &self.key.user_id
    }

    /// True once a client of the user sent `cancel` for this run.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// True once the gateway refused this run (too many active runs): every emit
    /// returns [`EmitError::TooManyRuns`].
    pub fn is_refused(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }

    /// True once `agent_completed` or `agent_error` was sent.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// `agent_started`.
    pub fn agent_started<D: Serialize + ?Sized>(&mut self, data: &D) -> Result<(), EmitError> {
        self.send(EventKind::AgentStarted, data)
    }

    /// `agent_thinking`.
    pub fn agent_thinking<D: Serialize + ?Sized>(&mut self, data: &D) -> Result<(), EmitError> {
        self.send(EventKind::AgentThinking, data)
    }

    /// `tool_executing`.
    pub fn tool_executing<D: Serialize + ?Sized>(&mut self, data: &D) -> Result<(), EmitError> {
        self.send(EventKind::ToolExecuting, data)
    }

    /// `tool_completed`.
    pub fn tool_completed<D: Serialize + ?Sized>(&mut self, data: &D) -> Result<(), EmitError> {
        self.send(EventKind::ToolCompleted, data)
    }

    /// `agent_completed`: ends the run.
    pub fn agent_completed<D: Serialize + ?Sized>(&mut self, data: &D) -> Result<(), EmitError> {
        self.send(EventKind::AgentCompleted, data)
    }

    /// `agent_error`: ends the run.
    pub fn agent_error<D: Serialize + ?Sized>(&mut self, data: &D) -> Result<(), EmitError> {
        self.send(EventKind::AgentError, data)
    }

    /// Any type matching `^[a-z][a-z0-9_]{0,63}$` (e.g. `text_delta`).
    ///
    /// # Errors
    /// [`EmitError::Invalid`] for a bad type name; the other variants as for every emit.
    pub fn emit<D: Serialize + ?Sized>(
        &mut self,
        event_type: &str,
        data: &D,
    ) -> Result<(), EmitError> {
        let kind = EventKind::parse(event_type)?;
        self.send(kind, data)
    }

    /// Like [`RunHandle::emit`] (any type, including `agent_started` and
    /// `agent_completed`), with an idempotency key (PROTOCOL.md section 6a): an event
    /// whose key the gateway already accepted for this user within `replay_ttl_ms` is
    /// routed only once (no second delivery, no second `seq`), so a worker may retry.
    ///
    /// # Errors
    /// [`EmitError::Invalid`] for a bad type name or a key that is not 1 to 128
    /// bytes; the other variants as for every emit.
    pub fn emit_idempotent<D: Serialize + ?Sized>(
        &mut self,
        event_type: &str,
        data: &D,
        key: &str,
    ) -> Result<(), EmitError> {
        let kind = EventKind::parse(event_type)?;
        self.send_keyed(kind, data, Some(key))
    }

    fn send<D: Serialize + ?Sized>(&mut self, kind: EventKind, data: &D) -> Result<(), EmitError> {
        self.send_keyed(kind, data, None)
    }

    fn send_keyed<D: Serialize + ?Sized>(
        &mut self,
        kind: EventKind,
        data: &D,
        key: Option<&str>,
    ) -> Result<(), EmitError> {
        if self.ended {
            return Err(EmitError::RunEnded);
        }
        if self.is_refused() {
            return Err(EmitError::TooManyRuns);
        }
        let ends = kind.ends_run();
        let mut event = Event::new(self.key.clone(), kind, data)?;
        if let Some(key) = key {
            event = event.with_idempotency_key(key)?;
        }
        if !self.registered {
            event.cancel_flag = Some(self.cancelled.clone());
            event.refused_flag = Some(self.refused.clone());
        }
        self.emitter.send_event(event)?;
        self.registered = true;
        if ends {
            self.ended = true;
        }
        Ok(())
    }
}

impl Drop for RunHandle {
    fn drop(&mut self) {
        // A refused run never began on the gateway: nothing to end.
        if self.ended || self.is_refused() {
            return;
        }
        let reason = serde_json::json!({"reason": "worker_dropped"});
        if let Err(e) = self.send(EventKind::AgentError, &reason) {
            log::error!(
                "run={:?} user={:?}: worker dropped its run handle and the worker_dropped event could not be sent: {e}",
                self.key.run_id,
                self.key.user_id
            );
        }
    }
}
