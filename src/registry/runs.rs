//! Runs: a [`Run`] from its first event (or the `user_message` that pre-registers
//! it) to its end; admission of an event against the ended runs and the run caps
//! (`max_active_runs_per_user`, `max_active_runs`); the run bookkeeping done as an
//! event takes its `seq`; the bounded memory of a user's ended runs, so late events
//! of an ended run are refused; the runs the watchdog ends; and what each event did to
//! its run for the run metrics ([`RunTransition`]: begun, ended with its outcome, a
//! tool call finished), recorded by the reactor in its stats.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Limits, Refused, Registry, Routed, User};
use crate::conn::ConnId;
use crate::event::{Event, EventKind, RunKey};
use crate::stats::{RunOutcome, RunTransition};

/// A run that has started and not yet ended.
#[derive(Debug)]
pub struct Run {
    pub thread: Option<Arc<str>>,
    pub agent_name: Arc<str>,
    pub started_ts: u64,
    pub last_seq: u64,
    pub last_type: Arc<str>,
    /// Tick (ms) of the run's last event (run watchdog).
    pub last_event: u64,
    pub owner: Option<ConnId>,
    pub cancel: Option<Arc<AtomicBool>>,
    /// False until the run's first event arrived (a `user_message` pre-registers it).
    pub begun: bool,
    /// A client asked to cancel it (applied to the cancel flag once it arrives).
    pub cancel_requested: bool,
    /// When the `user_message` that pre-registered it arrived (time to first event).
    pub asked: Option<Instant>,
    /// Emit time of its first event (run duration).
    pub began_at: Option<Instant>,
    /// Tool calls awaiting their `tool_completed`; allocated at the first.
    tools: Option<Box<OpenTools>>,
}

/// `agent_error` reasons of ends the gateway (watchdog, no consumer, shutdown) or the
/// emitter (a dropped run handle) makes up: as a run's first event they say nothing of
/// the time to first event, which is then not measured.
const SYNTHETIC_ENDS: [&str; 4] = ["run_timeout", "no_agent", "shutdown", "worker_dropped"];

/// Whether an `agent_error` with `reason` is an end the gateway or the emitter made up
/// ([`SYNTHETIC_ENDS`]; the Redis engine asks it too).
pub(crate) fn is_synthetic_end(reason: Option<&str>) -> bool {
    reason.is_some_and(|r| SYNTHETIC_ENDS.contains(&r))
}

/// Most tool calls of one run awaiting their `tool_completed`; past it the oldest is
/// forgotten (its duration goes unmeasured). With ids of at most
/// [`crate::event::MAX_TOOL_CALL_ID_BYTES`], a run's open calls cost under 1 KiB.
const OPEN_TOOLS_KEPT: usize = 8;

/// A run's open tool calls in start order: the `tool_call_id` of their
/// `tool_executing` (when its `data` has one) and its emit time.
#[derive(Debug, Default)]
struct OpenTools(VecDeque<(Option<Box<str>>, Instant)>);

impl OpenTools {
    fn start(&mut self, id: Option<Box<str>>, at: Instant) {
        if self.0.len() >= OPEN_TOOLS_KEPT {
            self.0.pop_front();
        }
        self.0.push_back((id, at));
    }

    /// The start of the call a `tool_completed` with `id` finishes: the open call with
    /// that `tool_call_id`, else (no id) the oldest open call.
    fn finish(&mut self, id: Option<&str>) -> Option<Instant> {
        let i = match id {
            Some(id) => self
                .0
                .iter()
                .position(|(open, _)| open.as_deref() == Some(id))?,
            None => 0,
        };
        self.0.remove(i).map(|(_, at)| at)
    }
}

impl Run {
    /// A run not yet begun: registered by a `user_message` (with its thread and, on an
    /// isolated connection, its owner) or by its first event, which then fills in the
    /// rest (`route` in the reactor).
    pub fn pending(thread: Option<Arc<str>>, owner: Option<ConnId>, now: u64) -> Run {
        Run {
            thread,
            agent_name: Arc::from(""),
            started_ts: 0,
            last_seq: 0,
            last_type: Arc::from(""),
            last_event: now,
            owner,
            cancel: None,
            begun: false,
            cancel_requested: false,
            asked: None,
            began_at: None,
            tools: None,
        }
    }

    /// The run-metric part of routing `ev` (an event of this run, at its emit time):
    /// tool calls opened and finished, and the end with its outcome and duration.
    /// `transition.began` is set by the caller. Returns true when `ev` is an end the
    /// gateway or the emitter made up rather than the agent's work ([`SYNTHETIC_ENDS`]).
    fn follow(&mut self, ev: &Event, transition: &mut RunTransition) -> bool {
        let at = ev.emitted;
        match ev.kind {
            EventKind::ToolExecuting => {
                let id = ev.tool_call_id();
                self.tools.get_or_insert_with(Box::default).start(id, at);
            }
            EventKind::ToolCompleted => {
                if let Some(tools) = self.tools.as_mut() {
                    let id = ev.tool_call_id();
                    transition.tool = tools
                        .finish(id.as_deref())
                        .map(|start| at.saturating_duration_since(start));
                }
            }
            EventKind::AgentCompleted => {
                transition.ended = Some((RunOutcome::Completed, self.age(at)));
            }
            EventKind::AgentError => {
                let reason = ev.data_markers().reason;
                let outcome = RunOutcome::of_error(reason.as_deref(), self.cancel_requested);
                transition.ended = Some((outcome, self.age(at)));
                return is_synthetic_end(reason.as_deref());
            }
            _ => {}
        }
        false
    }

    /// Time from the run's first event to `at`.
    fn age(&self, at: Instant) -> Duration {
        self.began_at
            .map_or(Duration::ZERO, |b| at.saturating_duration_since(b))
    }
}

/// How many ended run ids a user remembers, to refuse late events of ended runs.
const ENDED_RUNS_KEPT: usize = 256;

/// The ids of a user's last [`ENDED_RUNS_KEPT`] ended runs: arrival order and a set.
#[derive(Debug, Default)]
pub(super) struct EndedRuns {
    order: VecDeque<Arc<str>>,
    set: HashSet<Arc<str>>,
}

impl User {
    /// Whether `ev` may be routed: not for an ended run, and a run it would start must
    /// fit under the per-user bound and the total (`active_total` runs now).
    pub(super) fn admit(
        &self,
        ev: &Event,
        limits: &Limits,
        active_total: usize,
    ) -> Result<(), Refused> {
        if self.run_ended(&ev.key.run_id) {
            return Err(Refused::RunEnded);
        }
        if !ev.kind.ends_run()
            && (self.runs.len() >= limits.max_active_runs_per_user
                || active_total >= limits.max_active_runs)
            && !self.runs.contains_key(&ev.key.run_id)
        {
            return Err(Refused::TooManyRuns);
        }
        Ok(())
    }

    /// Route an admitted `ev` within this user at tick `now`: the event takes the next
    /// `seq` and its frame is built; its run begins (a `user_message` only
    /// pre-registers it) or is updated (last seq, type, time, the worker's cancel flag,
    /// set at once if a cancel already arrived, open tool calls) and ends when `ev`
    /// ends it. Returns the routing (with what `ev` did to its run, for the metrics)
    /// and the change in this user's run count (+1, 0 or -1).
    pub(super) fn route_admitted(&mut self, ev: &Event, now: u64) -> (Routed, isize) {
        self.seq += 1;
        self.last_active = now;
        let seq = self.seq;
        let frame = ev.frame(seq);
        let before = self.runs.len();
        let run = self
            .runs
            .entry(ev.key.run_id.clone())
            .or_insert_with(|| Run::pending(ev.key.thread_id.clone(), None, now));
        let mut transition = RunTransition::default();
        if !run.begun {
            run.begun = true;
            run.started_ts = ev.ts_ms;
            run.agent_name = ev.key.agent_name.clone();
            run.thread = ev.key.thread_id.clone();
            run.began_at = Some(ev.emitted);
            transition.began = true;
            transition.since_message = run
                .asked
                .map(|asked| ev.emitted.saturating_duration_since(asked));
        }
        if run.follow(ev, &mut transition) {
            transition.since_message = None;
        }
        if let Some(flag) = &ev.cancel_flag {
            if run.cancel_requested {
                flag.store(true, Ordering::Release);
            }
            run.cancel = Some(flag.clone());
        }
        run.last_seq = seq;
        run.last_event = now;
        if &*run.last_type != ev.kind.as_str() {
            run.last_type = Arc::from(ev.kind.as_str());
        }
        let owner = run.owner;
        if ev.kind.ends_run() {
            self.end_run(&ev.key.run_id);
            if self.runs.is_empty() && self.runs.capacity() > 0 {
                // Give the table back: most users run one thing at a time.
                self.runs = HashMap::new();
            }
        }
        let delta = self.runs.len() as isize - before as isize;
        (
            Routed {
                frame,
                owner,
                run: transition,
            },
            delta,
        )
    }

    pub fn run_ended(&self, run_id: &str) -> bool {
        self.ended.as_ref().is_some_and(|e| e.set.contains(run_id))
    }

    /// Record that a run ended (and forget the oldest ended run past the bound).
    pub fn end_run(&mut self, run_id: &Arc<str>) -> Option<Run> {
        let run = self.runs.remove(run_id);
        let ended = self.ended.get_or_insert_with(Box::default);
        if ended.set.insert(run_id.clone()) {
            ended.order.push_back(run_id.clone());
            if ended.order.len() > ENDED_RUNS_KEPT {
                if let Some(old) = ended.order.pop_front() {
                    ended.set.remove(&old);
                }
            }
        }
        run
    }
}

impl Registry {
    /// Runs in progress over all users (see the field's note on pre-registered runs).
    pub fn active_runs(&self) -> usize {
        self.active_runs
    }

    /// Whether a batch of runs may start: `new_for_user` more runs for a user that has
    /// `user_runs` now, `new_total` more in all.
    pub fn runs_fit(&self, user_runs: usize, new_for_user: usize, new_total: usize) -> bool {
        user_runs + new_for_user <= self.limits.max_active_runs_per_user
            && self.active_runs + new_total <= self.limits.max_active_runs
    }

    /// Runs with no event since tick `cutoff`, at most `max` of them (the watchdog
    /// ends these; the rest wait for the next sweep).
    pub fn stale_runs(&self, cutoff: u64, max: usize) -> Vec<RunKey> {
        let mut stale = Vec::new();
        for (_, user) in self.slots.iter() {
            for (run_id, run) in user.runs.iter() {
                if stale.len() >= max {
                    return stale;
                }
                if run.last_event < cutoff {
                    stale.push(RunKey {
                        user_id: user.name.clone(),
                        thread_id: run.thread.clone(),
                        run_id: run_id.clone(),
                        agent_name: run.agent_name.clone(),
                    });
                }
            }
        }
        stale
    }
}

impl User {
    /// The runs a new connection's `connected` frame lists (`active_runs`): begun, not
    /// owned by an isolated connection, and on `thread` when the connection follows one
    /// (a run with no thread, or a connection with none, matches). At most `max`, the
    /// most recently started (started in the same millisecond: by their last event),
    /// listed oldest first; true when more were left out.
    pub fn active_runs(&self, thread: Option<&str>, max: usize) -> (Vec<(&Arc<str>, &Run)>, bool) {
        let mut runs: Vec<(&Arc<str>, &Run)> = self
            .runs
            .iter()
            .filter(|(_, r)| r.begun && r.owner.is_none())
            .filter(|(_, r)| match (thread, &r.thread) {
                (Some(want), Some(got)) => want == &**got,
                _ => true,
            })
            .collect();
        runs.sort_by_key(|(_, r)| std::cmp::Reverse((r.started_ts, r.last_seq)));
        let truncated = runs.len() > max;
        runs.truncate(max);
        runs.reverse();
        (runs, truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::registry::tests::event;

    #[test]
    fn ended_runs_are_remembered_within_a_bound() {
        let mut u = User::default();
        for i in 0..(ENDED_RUNS_KEPT + 10) {
            u.end_run(&Arc::from(format!("r{i}").as_str()));
        }
        assert!(!u.run_ended("r0"));
        assert!(u.run_ended(&format!("r{}", ENDED_RUNS_KEPT + 9)));
        let ended = u.ended.as_ref().expect("allocated at the first end");
        assert_eq!(ended.order.len(), ENDED_RUNS_KEPT);
        assert_eq!(ended.set.len(), ENDED_RUNS_KEPT);
    }

    #[test]
    fn runs_are_capped_per_user_and_in_total() {
        let mut r = Registry::new(
            "p".into(),
            Limits {
                max_active_runs_per_user: 3,
                max_active_runs: 5,
                ..Limits::default()
            },
        );
        for i in 0..3 {
            r.route(&event("a", &format!("r{i}"), EventKind::AgentStarted, 1), 0)
                .unwrap();
        }
        let refused = r.route(&event("a", "r3", EventKind::AgentStarted, 1), 0);
        assert_eq!(refused.err(), Some(Refused::TooManyRuns));
        // Events of runs in progress and run-ending events still pass.
        r.route(&event("a", "r0", EventKind::AgentThinking, 1), 0)
            .unwrap();
        r.route(&event("a", "x", EventKind::AgentCompleted, 1), 0)
            .unwrap();
        assert_eq!(r.get("a").unwrap().seq, 5, "the refused event took no seq");
        for i in 0..2 {
            r.route(&event("b", &format!("r{i}"), EventKind::AgentStarted, 1), 0)
                .unwrap();
        }
        let refused = r.route(&event("c", "r0", EventKind::AgentStarted, 1), 0);
        assert_eq!(refused.err(), Some(Refused::TooManyRuns), "total reached");
        assert_eq!(r.active_runs(), 5);
        assert_eq!(r.counters.runs_refused, 2);
        // Ending one frees a place.
        r.route(&event("a", "r0", EventKind::AgentCompleted, 1), 0)
            .unwrap();
        assert_eq!(r.active_runs(), 4);
        r.route(&event("c", "r0", EventKind::AgentStarted, 1), 0)
            .unwrap();
        assert!(r.runs_fit(0, 0, 0));
        assert!(!r.runs_fit(0, 1, 1));
    }

    #[test]
    fn the_watchdog_list_is_bounded() {
        let mut r = Registry::default();
        for i in 0..50 {
            r.route(&event("a", &format!("r{i}"), EventKind::AgentStarted, 1), 0)
                .unwrap();
        }
        assert_eq!(r.stale_runs(1, 20).len(), 20);
        assert_eq!(r.stale_runs(0, 20).len(), 0);
    }

    fn begun(thread: Option<&str>, started_ts: u64, last_seq: u64) -> Run {
        let mut run = Run::pending(thread.map(Arc::from), None, 0);
        run.begun = true;
        run.started_ts = started_ts;
        run.last_seq = last_seq;
        run
    }

    #[test]
    fn lists_the_latest_begun_shared_runs_of_the_thread_oldest_first() {
        let mut r = Registry::new("p".into(), Limits::default());
        let u = r.entry("u");
        u.runs.insert("a".into(), begun(Some("t1"), 10, 1));
        u.runs.insert("b".into(), begun(None, 20, 2));
        u.runs.insert("c".into(), begun(Some("t2"), 30, 3));
        u.runs.insert("d".into(), begun(Some("t1"), 30, 4));
        u.runs.insert("pending".into(), Run::pending(None, None, 0));
        let mut owned = begun(None, 40, 5);
        owned.owner = Some(ConnId { key: 1, serial: 1 });
        u.runs.insert("owned".into(), owned);
        let names = |(runs, truncated): (Vec<(&Arc<str>, &Run)>, bool)| {
            (
                runs.iter()
                    .map(|(id, _)| id.to_string())
                    .collect::<Vec<_>>(),
                truncated,
            )
        };
        let u = r.get("u").unwrap();
        assert_eq!(
            names(u.active_runs(None, 10)),
            (vec!["a".into(), "b".into(), "c".into(), "d".into()], false)
        );
        assert_eq!(
            names(u.active_runs(Some("t1"), 10)),
            (vec!["a".into(), "b".into(), "d".into()], false)
        );
        // The most recent two; the same start: the later last event wins.
        assert_eq!(
            names(u.active_runs(None, 2)),
            (vec!["c".into(), "d".into()], true)
        );
    }

    fn with_data(user: &str, run: &str, kind: EventKind, data: serde_json::Value) -> Event {
        let key = RunKey::new(user, None, run, "agent").unwrap();
        Event::new(key, kind, &data).unwrap()
    }

    #[test]
    fn transitions_report_begin_tools_and_outcome() {
        use serde_json::json;
        let mut r = Registry::default();
        // A run pre-registered by a user_message: its first event measures the wait.
        let asked = Instant::now();
        let mut pending = Run::pending(None, None, 0);
        pending.asked = Some(asked);
        r.entry("u").runs.insert("r1".into(), pending);
        let first = with_data("u", "r1", EventKind::AgentStarted, json!({}));
        let (routed, _) = r.route(&first, 0).unwrap();
        assert!(routed.run.began);
        assert_eq!(
            routed.run.since_message,
            Some(first.emitted.saturating_duration_since(asked))
        );
        assert_eq!(routed.run.ended, None);
        // Two tools: completed out of order by tool_call_id, then one without an id by
        // order.
        for (id, kind) in [
            (Some("a"), EventKind::ToolExecuting),
            (Some("b"), EventKind::ToolExecuting),
            (None, EventKind::ToolExecuting),
        ] {
            let ev = with_data("u", "r1", kind, json!({"tool_call_id": id, "tool": "t"}));
            let (routed, _) = r.route(&ev, 0).unwrap();
            assert_eq!(routed.run, RunTransition::default());
        }
        let tools = |r: &Registry| {
            r.get("u").unwrap().runs["r1"].tools.as_ref().map(|t| {
                t.0.iter()
                    .map(|(id, _)| id.as_deref().map(str::to_owned))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            tools(&r),
            Some(vec![Some("a".into()), Some("b".into()), None])
        );
        let done_b = with_data(
            "u",
            "r1",
            EventKind::ToolCompleted,
            json!({"tool_call_id": "b"}),
        );
        assert!(r.route(&done_b, 0).unwrap().0.run.tool.is_some());
        assert_eq!(tools(&r), Some(vec![Some("a".into()), None]));
        let unknown = with_data(
            "u",
            "r1",
            EventKind::ToolCompleted,
            json!({"tool_call_id": "zz"}),
        );
        assert_eq!(
            r.route(&unknown, 0).unwrap().0.run.tool,
            None,
            "no such call"
        );
        let by_order = with_data("u", "r1", EventKind::ToolCompleted, json!({"result": 1}));
        assert!(r.route(&by_order, 0).unwrap().0.run.tool.is_some());
        assert_eq!(tools(&r), Some(vec![None]));
        // The end: a cancel was asked, the worker ends with its own error.
        r.get_mut("u")
            .unwrap()
            .runs
            .get_mut("r1")
            .unwrap()
            .cancel_requested = true;
        let end = with_data(
            "u",
            "r1",
            EventKind::AgentError,
            json!({"message": "stopped"}),
        );
        let (routed, _) = r.route(&end, 0).unwrap();
        let (outcome, took) = routed.run.ended.unwrap();
        assert_eq!(outcome, RunOutcome::Cancelled);
        assert_eq!(took, end.emitted.saturating_duration_since(first.emitted));
        // A run a worker starts by itself: no wait measured; ends by the watchdog.
        let (routed, _) = r
            .route(
                &with_data("u", "r2", EventKind::AgentThinking, json!("x")),
                0,
            )
            .unwrap();
        assert!(routed.run.began && routed.run.since_message.is_none());
        let timeout = with_data(
            "u",
            "r2",
            EventKind::AgentError,
            json!({"reason": "run_timeout"}),
        );
        assert_eq!(
            r.route(&timeout, 0).unwrap().0.run.ended.unwrap().0,
            RunOutcome::RunTimeout
        );
        // A user_message whose run never got an event: the watchdog's end is not a
        // first event worth measuring.
        let mut pending = Run::pending(None, None, 0);
        pending.asked = Some(Instant::now());
        r.entry("u").runs.insert("r4".into(), pending);
        let timeout = with_data(
            "u",
            "r4",
            EventKind::AgentError,
            json!({"reason": "run_timeout"}),
        );
        let t = r.route(&timeout, 0).unwrap().0.run;
        assert!(t.began && t.since_message.is_none(), "{t:?}");
        let done = with_data("u", "r3", EventKind::AgentCompleted, json!(null));
        let t = r.route(&done, 0).unwrap().0.run;
        assert!(t.began, "an end as the first event begins and ends the run");
        assert_eq!(t.ended, Some((RunOutcome::Completed, Duration::ZERO)));
    }

    #[test]
    fn open_tool_calls_are_bounded() {
        let mut tools = OpenTools::default();
        let t0 = Instant::now();
        for i in 0..(OPEN_TOOLS_KEPT + 5) {
            tools.start(Some(format!("c{i}").into()), t0);
        }
        assert_eq!(tools.0.len(), OPEN_TOOLS_KEPT);
        assert_eq!(tools.finish(Some("c0")), None, "the oldest was forgotten");
        assert_eq!(tools.finish(Some("c5")), Some(t0));
    }
}
