//! The timer wheel's hot paths with 100,000 live timers spread over 0..300,000 ticks, the
//! shape of a busy gateway (heartbeats every 30 s, idle timeouts at 300 s).

use std::hint::black_box;
use std::time::{Duration, Instant};

use agentwire::__internal::timer_wheel::TimerWheel;
use criterion::{criterion_group, criterion_main, Criterion};

const LIVE: usize = 100_000;
const SPREAD: u64 = 300_000;
/// Operations per timed batch in the insert and cancel benchmarks.
const BATCH: u64 = 1_000;

/// A 16-byte payload, like the reactor's connection ids.
type Payload = (usize, u64);

/// Deterministic pseudo-random ticks (xorshift64*), so runs compare.
struct Ticks(u64);

impl Ticks {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
    }

    /// `n` deadlines spread over the next SPREAD ticks of `wheel`.
    fn deadlines(&mut self, wheel: &TimerWheel<Payload>, n: u64) -> Vec<u64> {
        (0..n)
            .map(|_| wheel.now() + 1 + self.next(SPREAD))
            .collect()
    }
}

/// A wheel at tick 0 holding `LIVE` timers with deadlines in 1..=SPREAD, and the tick source.
fn loaded() -> (TimerWheel<Payload>, Ticks) {
    let mut ticks = Ticks(0x9e37_79b9_7f4a_7c15);
    let mut wheel = TimerWheel::new(4096, 0);
    for i in 0..LIVE {
        wheel.insert(1 + ticks.next(SPREAD), (i, i as u64));
    }
    (wheel, ticks)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("timer_wheel_100k");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    // Insert and cancel are timed in batches of BATCH single operations on the loaded wheel;
    // the untimed half of each round undoes the timed half, so 100k stay live throughout.
    group.bench_function("insert", |b| {
        let (mut wheel, mut ticks) = loaded();
        let mut ids = Vec::with_capacity(BATCH as usize);
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let deadlines = ticks.deadlines(&wheel, left.min(BATCH));
                let started = Instant::now();
                for &at in &deadlines {
                    ids.push(wheel.insert(at, (1, at)));
                }
                timed += started.elapsed();
                for id in ids.drain(..) {
                    black_box(wheel.cancel(id));
                }
                left -= deadlines.len() as u64;
            }
            timed
        });
    });

    group.bench_function("cancel", |b| {
        let (mut wheel, mut ticks) = loaded();
        let mut ids = Vec::with_capacity(BATCH as usize);
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                for at in ticks.deadlines(&wheel, left.min(BATCH)) {
                    ids.push(wheel.insert(at, (1, at)));
                }
                left -= ids.len() as u64;
                let started = Instant::now();
                for id in ids.drain(..) {
                    black_box(wheel.cancel(id));
                }
                timed += started.elapsed();
            }
            timed
        });
    });

    group.bench_function("insert_cancel_pair", |b| {
        let (mut wheel, mut ticks) = loaded();
        b.iter(|| {
            let at = wheel.now() + 1 + ticks.next(SPREAD);
            let id = wheel.insert(at, (1, at));
            black_box(wheel.cancel(id))
        });
    });

    group.bench_function("advance_1_tick", |b| {
        // Steady state: each fired timer is re-armed up to SPREAD ahead, so 100k stay live.
        let (mut wheel, mut ticks) = loaded();
        let mut expired = Vec::new();
        b.iter(|| {
            let now = wheel.now() + 1;
            wheel.advance(now, &mut expired);
            for payload in expired.drain(..) {
                wheel.insert(now + 1 + ticks.next(SPREAD), payload);
            }
        });
    });

    group.bench_function("next_expiry", |b| {
        let (wheel, _) = loaded();
        b.iter(|| black_box(&wheel).next_expiry());
    });

    group.bench_function("next_expiry_one_far_timer", |b| {
        let mut wheel = TimerWheel::new(4096, 0);
        wheel.insert(86_400_000, (0usize, 0u64));
        b.iter(|| black_box(&wheel).next_expiry());
    });

    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
