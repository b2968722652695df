//! Routing one event to a user with 3 open connections, the reactor's per-event work:
//! registry lookup, the ended-run check, `seq` assignment, the frame, the run's
//! bookkeeping, the replay keep, the target list, and queueing the shared frame on each
//! connection's output queue.
//!
//! `Reactor::deliver` is private and owns sockets, so this benchmark runs what it is made
//! of: [`Registry::route`] (the user lookup, the ended-run and run-count checks, `seq`,
//! the frame, the run's bookkeeping, the replay keep within its bounds and the global
//! FIFO: the same code the reactor runs), [`User::targets`] and [`OutQueue::push`]. What it leaves out: the stats counters and the `Phase::Open`
//! match of a real `Conn` (a connection here is its output queue, serial and flush flag
//! in a slab, looked up by `ConnId` as the reactor does).
//!
//! Two registries: the user alone, and the user among 10,000 users with 3 connections
//! each (30,000 queues), so the hash lookup and the slab accesses miss caches as they
//! do in a busy gateway. Events go to users in a pseudo-random order. Building the event
//! (worker side) and flushing the queues are outside the timed part.

use std::hint::black_box;
use std::time::{Duration, Instant};

use agentwire::__internal::conn::{ConnId, OutQueue};
use agentwire::__internal::event::{Event, RunKey};
use agentwire::__internal::registry::{ConnEntry, Limits, Registry, Routed};
use agentwire::EventKind;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;
use slab::Slab;

const CONNS_PER_USER: usize = 3;
/// Replay events kept per user. The gateway's default is 1,024; 16 keeps the
/// benchmark's memory small (10,000 users) while every keep still evicts the oldest
/// event, the steady state of a busy user.
const REPLAY_KEPT: usize = 16;
/// Events per timed batch; queues are flushed between batches.
const BATCH: u64 = 1_000;

/// A connection as routing touches it.
struct Target {
    serial: u64,
    out: OutQueue,
    flush_queued: bool,
}

/// The reactor's routing state, reduced to what `Reactor::deliver` touches.
struct Router {
    registry: Registry,
    conns: Slab<Target>,
    dirty: Vec<ConnId>,
    scratch_targets: Vec<ConnId>,
    routed: Vec<Instant>,
    keys: Vec<RunKey>,
    now: u64,
}

impl Router {
    fn new(users: usize) -> Router {
        let mut registry = Registry::new(
            "bench".into(),
            Limits {
                replay_events: REPLAY_KEPT,
                ..Limits::default()
            },
        );
        let mut conns = Slab::with_capacity(users * CONNS_PER_USER);
        let mut keys = Vec::with_capacity(users);
        let mut serial = 0;
        for u in 0..users {
            let user_id = format!("user-{u:08x}");
            for _ in 0..CONNS_PER_USER {
                serial += 1;
                let key = conns.insert(Target {
                    serial,
                    out: OutQueue::default(),
                    flush_queued: false,
                });
                registry.add_conn(
                    &user_id,
                    ConnEntry {
                        id: ConnId { key, serial },
                        thread: None,
                        isolated: false,
                    },
                );
            }
            keys.push(
                RunKey::new(
                    &user_id,
                    Some("thread-1"),
                    &format!("run-{u}"),
                    "data_agent",
                )
                .expect("valid run key"),
            );
        }
        let mut router = Router {
            registry,
            conns,
            dirty: Vec::new(),
            scratch_targets: Vec::new(),
            routed: Vec::new(),
            keys,
            now: 1,
        };
        // Steady state: every user's run exists (one routed event each) and its replay
        // buffer is full (filled directly: routing 16 events per user is slow in the
        // debug build that `cargo test` runs).
        for u in 0..users {
            let ev = router.event(u);
            router.route(ev);
        }
        // The glue is right: every connection of every user got output and is on the
        // flush list once.
        assert_eq!(router.dirty.len(), users * CONNS_PER_USER);
        assert!(router.conns.iter().all(|(_, c)| c.out.pending() > 0));
        router.flush();
        let (_, filler) = router.registry.users().next().expect("users registered");
        let filler = filler.replay.back().expect("one kept event").clone();
        for u in 0..users {
            let name = router
                .keys
                .get(u)
                .expect("user index in range")
                .user_id
                .clone();
            while router
                .registry
                .get(&name)
                .is_some_and(|user| user.replay.len() < REPLAY_KEPT)
            {
                router.registry.keep(&name, filler.clone());
            }
        }
        router
    }

    /// A typical small event of user `u`'s run (built on the worker side).
    fn event(&self, u: usize) -> Event {
        let key = self.keys.get(u).expect("user index in range").clone();
        Event::new(
            key,
            EventKind::ToolExecuting,
            &json!({"tool": "sql", "args": {"query": "select 1"}}),
        )
        .expect("serializable")
    }

    /// `Reactor::deliver` (without stats and logging): the user's own routing, then the
    /// frame queued on every target connection.
    fn route(&mut self, ev: Event) {
        let Ok((Routed { frame, owner, .. }, user)) = self.registry.route(&ev, self.now) else {
            return;
        };
        self.scratch_targets.clear();
        self.scratch_targets
            .extend(user.targets(ev.key.thread_id.as_deref(), owner));
        for &target in &self.scratch_targets {
            let live = self
                .conns
                .get_mut(target.key)
                .filter(|c| c.serial == target.serial);
            if let Some(conn) = live {
                conn.out.push(frame.clone());
                if !conn.flush_queued {
                    conn.flush_queued = true;
                    self.dirty.push(target);
                }
            }
        }
        self.routed.push(ev.emitted);
    }

    /// What the reactor's flush does to the queues, into a sink instead of sockets.
    fn flush(&mut self) {
        for id in self.dirty.drain(..) {
            if let Some(conn) = self.conns.get_mut(id.key) {
                conn.flush_queued = false;
                let _ = conn.out.write_to(&mut std::io::sink());
            }
        }
        self.routed.clear();
        self.now += 1;
    }
}

/// Deterministic pseudo-random user indexes (xorshift64*), so runs compare.
struct Users(u64);

impl Users {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below as u64) as usize
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_event_3_conns");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));

    for users in [1usize, 10_000] {
        group.bench_function(BenchmarkId::new("users", users), |b| {
            let mut router = Router::new(users);
            let mut pick = Users(0x9e37_79b9_7f4a_7c15);
            let mut events = Vec::with_capacity(BATCH as usize);
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(BATCH);
                    events.extend((0..n).map(|_| router.event(pick.next(users))));
                    let started = Instant::now();
                    for ev in events.drain(..) {
                        router.route(black_box(ev));
                    }
                    timed += started.elapsed();
                    router.flush();
                    left -= n;
                }
                timed
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
