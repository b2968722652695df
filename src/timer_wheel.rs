//! The reactor's timers: a hierarchical hashed timer wheel, with time passed in as ticks.
//!
//! The wheel owns every pending timer (handshake deadlines, heartbeat checks, token expiry,
//! idle timeouts, accept retries) and nothing else: it never reads a clock. The reactor
//! passes the current tick (1 tick = 1 ms since it started) to [`TimerWheel::advance`] and
//! asks [`TimerWheel::next_expiry`] for its poll timeout.
//!
//! # Structure
//!
//! - **Entries** live in one `Vec` used as a slab: a free list threads the vacant entries, and
//!   each entry carries a generation bumped when it is freed, so a [`TimerId`] (index +
//!   generation) that outlived its timer is simply not found.
//! - **Levels.** With `slots = 2^B` slots per level, level `l` has slots of `2^(l·B)` ticks
//!   and spans `2^((l+1)·B)` ticks; `ceil(64 / B)` levels cover the whole `u64` tick range
//!   (6 levels for 4096 slots: 1 tick, ~4 s, ~4.7 h, ~795 days, ... per slot). A timer goes
//!   to the level of the highest bit in which its deadline differs from the current tick, so
//!   level 0 holds exact ticks of the current `2^B`-tick block and every higher level holds
//!   only slots strictly after the current one. Timers due at or before the current tick sit
//!   in a separate *due* list and fire on the next advance.
//! - **Slots** are intrusive doubly linked lists threaded through the entries by `u32`
//!   indices, so insert and cancel are O(1) and need no allocation once the slab has grown.
//! - **Occupancy.** Each level has one bit per slot plus a 64-bit summary with one bit per
//!   bitmap word, so "first occupied slot at or after position p" is two `trailing_zeros`.
//!
//! Advancing walks occupied slots in time order: a level-0 slot fires, a higher-level slot is
//! *cascaded* (each timer relinked one or more levels down, or fired if its deadline is that
//! slot's first tick). Empty stretches of time cost nothing, however large the jump.
//!
//! # Why hierarchical rather than one hashed ring
//!
//! The single ring of sozu's wheel (and mio 0.6's) keeps far timers in place with their
//! absolute deadline and skips them on every pass, so a token expiring in a day is looked at
//! ~20,000 times by a 4096-slot ring, and an occupancy bitmap cannot tell a reactor "nothing
//! due for an hour": the far timer's slot looks occupied every rotation. Here, as in
//! pushpin's wheel (after William Ahern's `timeout.c`), coarser levels hold the far timers,
//! so a timer is moved at most `levels - 1` times in its life, and
//! [`TimerWheel::next_expiry`] for a lone timer an hour away is never "now": it is the first
//! tick of the timer's slot (with 4096 slots, within ~4 s of the deadline unless a ~4.7 h
//! level-2 boundary comes first, in which case that boundary, then within ~4 s). Unlike
//! pushpin's, levels are chosen by absolute tick bits (the highest bit where deadline and
//! current tick differ), which keeps every level's slots in time order and lets the levels
//! cover all of `u64` with no cap or re-scheduling of very far timers.
//!
//! # Bounds
//!
//! - Memory: a fixed `levels × slots × 4` bytes of list heads plus `levels × slots / 8` of
//!   bitmap (≈ 99 KiB for 4096 slots), plus one entry per timer at the peak number of timers
//!   pending at once (the slab reuses freed entries and does not shrink). An entry is 24
//!   bytes of bookkeeping plus `Option<T>`: **48 bytes for a 16-byte `T`** without a niche
//!   (e.g. `(usize, u64)`), 40 when `T` has one. The number of live timers is the caller's
//!   bound (the reactor keeps one timer per connection, plus a
//!   few globals).
//! - Work: `insert`, `cancel` and `deadline` are O(1); `next_expiry` is O(levels) (at most
//!   11, 6 for 4096 slots), independent of the number of timers and of elapsed time;
//!   `advance` is O(levels × (occupied slots reached + 1)) plus O(levels) per timer it fires
//!   or cascades, independent of how many ticks it skips.

use std::fmt;

/// Marks "no entry" in the intrusive lists and the free list.
const NIL: u32 = u32::MAX;
/// Fewest slots per level: one bitmap word.
const MIN_SLOTS: usize = 64;
/// Most slots per level: 64 bitmap words, so one summary word indexes them all.
const MAX_SLOTS: usize = 64 * 64;

/// Handle to a scheduled timer; stale handles (timer already fired or cancelled, slot reused)
/// are harmless.
///
/// A handle stays unambiguous until its entry has been reused 2^32 times (the generation
/// counter wraps), far beyond the life of any one timer in the reactor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId {
    index: u32,
    generation: u32,
}

/// One slab entry: a pending timer, or a vacant entry on the free list (`value` is `None`).
struct Entry<T> {
    deadline: u64,
    value: Option<T>,
    /// Previous entry in the same slot list; `NIL` at the head.
    prev: u32,
    /// Next entry in the same slot list, or the next vacant entry when free.
    next: u32,
    generation: u32,
    /// The list this entry is linked into (see `TimerWheel::heads`).
    list: u32,
}

/// A hierarchical hashed timer wheel holding values of type `T` until their deadline tick.
///
/// See the module documentation for the structure and its bounds.
pub struct TimerWheel<T> {
    entries: Vec<Entry<T>>,
    /// Head of the free list of vacant entries.
    free: u32,
    len: usize,
    /// The current tick: every pending timer outside the due list has a later deadline.
    now: u64,
    /// A lower bound on the deadlines in the due list (exact unless one was cancelled).
    due_min: u64,
    /// log2 of the slots per level.
    bits: u32,
    levels: u32,
    /// List heads: `level << bits | slot` for the wheel slots, then one last for the due list.
    heads: Vec<u32>,
    /// Per level, one bit per slot (`slots / 64` words each), set while the slot is non-empty.
    occupied: Vec<u64>,
    /// Per level, one bit per word of `occupied`, set while that word is non-zero.
    summary: Vec<u64>,
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose current tick is `now`.
    ///
    /// `slots` is the number of slots per level: rounded up to a power of two and clamped to
    /// 64..=4096 (4096 is a good default for 1 ms ticks: level 0 then spans ~4 s exactly).
    pub fn new(slots: usize, now: u64) -> Self {
        let slots = slots.clamp(MIN_SLOTS, MAX_SLOTS).next_power_of_two();
        let bits = slots.trailing_zeros();
        let levels = 63 / bits + 1;
        let wheel_slots = (levels as usize) << bits;
        TimerWheel {
            entries: Vec::new(),
            free: NIL,
            len: 0,
            now,
            due_min: now,
            bits,
            levels,
            heads: vec![NIL; wheel_slots + 1],
            occupied: vec![0; wheel_slots / 64],
            summary: vec![0; levels as usize],
        }
    }

    /// Schedule `value` to fire at tick `deadline` (a deadline <= current tick fires at the
    /// next advance). O(1).
    ///
    /// # Panics
    ///
    /// If `u32::MAX - 1` timers are already pending (about 200 GB of entries; allocation
    /// fails long before).
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerId {
        let list = self.list_for(deadline);
        if list == self.due_list() {
            let due_empty = self.heads.get(list as usize) == Some(&NIL);
            self.due_min = if due_empty {
                deadline
            } else {
                self.due_min.min(deadline)
            };
        }
        let index = match self.entries.get_mut(self.free as usize) {
            Some(entry) => {
                let index = self.free;
                self.free = entry.next;
                entry.deadline = deadline;
                entry.value = Some(value);
                index
            }
            None => {
                let index = match u32::try_from(self.entries.len()) {
                    Ok(index) if index != NIL => index,
                    _ => panic!("timer wheel: more than u32::MAX - 1 pending timers"),
                };
                self.entries.push(Entry {
                    deadline,
                    value: Some(value),
                    prev: NIL,
                    next: NIL,
                    generation: 0,
                    list,
                });
                index
            }
        };
        self.link(index, list);
        self.len += 1;
        let generation = self
            .entries
            .get(index as usize)
            .map_or(0, |entry| entry.generation);
        TimerId { index, generation }
    }

    /// Cancel; returns the value if the timer was still pending. O(1).
    ///
    /// A stale `id` (its timer fired or was cancelled, even if the entry now holds another
    /// timer) returns `None` and changes nothing.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let entry = self.entries.get(id.index as usize)?;
        if entry.generation != id.generation || entry.value.is_none() {
            return None;
        }
        self.unlink(id.index);
        self.release(id.index)
    }

    /// Deadline of a pending timer; `None` for a stale `id`.
    pub fn deadline(&self, id: TimerId) -> Option<u64> {
        self.entries
            .get(id.index as usize)
            .filter(|entry| entry.generation == id.generation && entry.value.is_some())
            .map(|entry| entry.deadline)
    }

    /// Move time forward to `now` and push every timer with deadline <= now onto `expired`
    /// (appended to, not cleared).
    ///
    /// Every expired timer is pushed exactly once. Timers that were in the future when
    /// inserted come out in nondecreasing deadline order, after the ones inserted already due
    /// (which come in no particular order). Time never goes backwards: a smaller `now` is
    /// treated as the current tick, so it only fires timers inserted already due.
    ///
    /// Work: O(levels) per occupied slot reached and per timer fired or cascaded, plus
    /// O(levels) once; the number of ticks skipped does not matter.
    pub fn advance(&mut self, now: u64, expired: &mut Vec<T>) {
        let now = now.max(self.now);
        let mut cursor = self.take_list(self.due_list());
        while cursor != NIL {
            let next = self.entries.get(cursor as usize).map_or(NIL, |e| e.next);
            expired.extend(self.release(cursor));
            cursor = next;
        }
        while self.len > 0 {
            let Some((list, start)) = self.next_slot() else {
                break;
            };
            if start > now {
                break;
            }
            // Every earlier slot is empty, so the wheel may stand at this slot's first tick:
            // a level-0 slot fires whole, a higher one spreads over the levels below.
            self.now = start;
            let mut cursor = self.take_list(list);
            while cursor != NIL {
                let Some(entry) = self.entries.get(cursor as usize) else {
                    break;
                };
                let (next, deadline) = (entry.next, entry.deadline);
                if deadline <= start {
                    expired.extend(self.release(cursor));
                } else {
                    let target = self.list_for(deadline);
                    self.link(cursor, target);
                }
                cursor = next;
            }
        }
        self.now = now;
    }

    /// The earliest tick at which some timer may be due; `None` when the wheel is empty.
    ///
    /// Guarantee, with `E` the earliest pending deadline and `t` the answer:
    /// - if `E <= now()` (a timer inserted already due), `t <= E`;
    /// - otherwise `now() < t <= E`. `t == E` when `E` lies in the current `2^B`-tick block
    ///   (with 4096 slots, the aligned 4096-tick block holding now); else `t` is the first
    ///   tick of the coarser slot holding `E`. Advancing to `t` moves that slot's timers to
    ///   finer levels, so the answer only gets closer: a far timer costs at most
    ///   `levels - 1` early wakeups (usually one, ~4 s early), never a spin.
    ///
    /// O(levels): two `trailing_zeros` per level, no scan of timers.
    pub fn next_expiry(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        if self.heads.get(self.due_list() as usize) != Some(&NIL) {
            return Some(self.due_min);
        }
        self.next_slot().map(|(_, start)| start)
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The current tick: the largest `now` passed to [`advance`](Self::advance), or the one
    /// given to [`new`](Self::new).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Slots per level, after rounding and clamping.
    pub fn slots(&self) -> usize {
        1 << self.bits
    }

    fn mask(&self) -> u64 {
        (1 << self.bits) - 1
    }

    fn due_list(&self) -> u32 {
        self.levels << self.bits
    }

    /// The list a timer with `deadline` belongs in, relative to the current tick.
    fn list_for(&self, deadline: u64) -> u32 {
        if deadline <= self.now {
            return self.due_list();
        }
        let mask = self.mask();
        // The highest bit in which the deadline differs from now picks the level; or-ing the
        // mask puts every deadline of the current 2^B block on level 0.
        let differing = (self.now ^ deadline) | mask;
        let level = (63 - differing.leading_zeros()) / self.bits;
        let slot = (deadline >> (level * self.bits)) & mask;
        (level << self.bits) | slot as u32
    }

    /// The first occupied wheel slot in time order and the first tick it covers.
    fn next_slot(&self) -> Option<(u32, u64)> {
        let mask = self.mask();
        for level in 0..self.levels {
            let shift = level * self.bits;
            let position = ((self.now >> shift) & mask) as u32;
            if let Some(slot) = self.next_occupied(level, position) {
                // Slots of this level partition the 2^(shift + bits)-tick block holding now.
                let block = match 1u64.checked_shl(shift + self.bits) {
                    Some(span) => self.now & !(span - 1),
                    None => 0,
                };
                let start = block | (u64::from(slot) << shift);
                return Some(((level << self.bits) | slot, start));
            }
        }
        None
    }

    /// The first occupied slot of `level` at or after `position`.
    fn next_occupied(&self, level: u32, position: u32) -> Option<u32> {
        let words = 1usize << (self.bits - 6);
        let base = level as usize * words;
        let word = (position / 64) as usize;
        let here = self.occupied.get(base + word)? & (u64::MAX << (position % 64));
        if here != 0 {
            return Some(word as u32 * 64 + here.trailing_zeros());
        }
        let later = self.summary.get(level as usize)? & u64::MAX.checked_shl(word as u32 + 1)?;
        if later == 0 {
            return None;
        }
        let word = later.trailing_zeros();
        let bits = self.occupied.get(base + word as usize)?;
        Some(word * 64 + bits.trailing_zeros())
    }

    /// Set or clear the occupancy bit of a wheel slot (the due list has none).
    fn mark(&mut self, list: u32, occupied: bool) {
        let level = list >> self.bits;
        if level >= self.levels {
            return;
        }
        let slot = list & self.mask() as u32;
        let word = (slot / 64) as usize;
        let index = ((level as usize) << (self.bits - 6)) + word;
        let Some(bits) = self.occupied.get_mut(index) else {
            return;
        };
        if occupied {
            *bits |= 1 << (slot % 64);
        } else {
            *bits &= !(1 << (slot % 64));
        }
        let nonzero = *bits != 0;
        if let Some(summary) = self.summary.get_mut(level as usize) {
            if nonzero {
                *summary |= 1 << word;
            } else {
                *summary &= !(1 << word);
            }
        }
    }

    /// Push entry `index` onto the front of `list`.
    fn link(&mut self, index: u32, list: u32) {
        let Some(head) = self.heads.get_mut(list as usize) else {
            return;
        };
        let old = std::mem::replace(head, index);
        if let Some(entry) = self.entries.get_mut(index as usize) {
            entry.prev = NIL;
            entry.next = old;
            entry.list = list;
        }
        // `get_mut(NIL)` is always `None`: the slab never reaches u32::MAX entries.
        match self.entries.get_mut(old as usize) {
            Some(entry) => entry.prev = index,
            None => self.mark(list, true),
        }
    }

    /// Take entry `index` out of its list.
    fn unlink(&mut self, index: u32) {
        let Some(entry) = self.entries.get(index as usize) else {
            return;
        };
        let (prev, next, list) = (entry.prev, entry.next, entry.list);
        match self.entries.get_mut(prev as usize) {
            Some(entry) => entry.next = next,
            None => {
                if let Some(head) = self.heads.get_mut(list as usize) {
                    *head = next;
                }
                if next == NIL {
                    self.mark(list, false);
                }
            }
        }
        if let Some(entry) = self.entries.get_mut(next as usize) {
            entry.prev = prev;
        }
    }

    /// Detach a whole list and return its first entry; the rest follow through `next`.
    fn take_list(&mut self, list: u32) -> u32 {
        let Some(head) = self.heads.get_mut(list as usize) else {
            return NIL;
        };
        let first = std::mem::replace(head, NIL);
        if first != NIL {
            self.mark(list, false);
        }
        first
    }

    /// Free an entry already out of its list and return its value.
    fn release(&mut self, index: u32) -> Option<T> {
        let entry = self.entries.get_mut(index as usize)?;
        let value = entry.value.take()?;
        entry.generation = entry.generation.wrapping_add(1);
        entry.next = self.free;
        entry.prev = NIL;
        self.free = index;
        self.len -= 1;
        Some(value)
    }
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("now", &self.now)
            .field("len", &self.len)
            .field("slots", &self.slots())
            .field("levels", &self.levels)
            .field("next_expiry", &self.next_expiry())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Advance and return what fired, sorted.
    fn fire(wheel: &mut TimerWheel<u32>, now: u64) -> Vec<u32> {
        let mut out = Vec::new();
        wheel.advance(now, &mut out);
        out.sort_unstable();
        out
    }

    /// Walk every list and check links, levels, occupancy bits and the count.
    fn check_structure<T>(wheel: &TimerWheel<T>) {
        let mut linked = 0;
        for (list, &head) in wheel.heads.iter().enumerate() {
            let list = list as u32;
            let mut prev = NIL;
            let mut cursor = head;
            while cursor != NIL {
                let entry = &wheel.entries[cursor as usize];
                assert!(entry.value.is_some(), "vacant entry linked in list {list}");
                assert_eq!(entry.prev, prev);
                assert_eq!(entry.list, list);
                assert_eq!(
                    wheel.list_for(entry.deadline),
                    list,
                    "entry on the wrong level"
                );
                linked += 1;
                prev = cursor;
                cursor = entry.next;
            }
            if list < wheel.due_list() {
                let level = list >> wheel.bits;
                let slot = list & wheel.mask() as u32;
                assert_eq!(
                    wheel.next_occupied(level, slot) == Some(slot),
                    head != NIL,
                    "occupancy bit of list {list}"
                );
            }
        }
        let words = wheel.slots() / 64;
        for (level, &summary) in wheel.summary.iter().enumerate() {
            for word in 0..words {
                let nonzero = wheel.occupied[level * words + word] != 0;
                assert_eq!(
                    summary >> word & 1 == 1,
                    nonzero,
                    "summary of level {level}"
                );
            }
        }
        assert_eq!(linked, wheel.len);
        let mut free = 0;
        let mut cursor = wheel.free;
        while cursor != NIL {
            assert!(wheel.entries[cursor as usize].value.is_none());
            free += 1;
            cursor = wheel.entries[cursor as usize].next;
        }
        assert_eq!(free + wheel.len, wheel.entries.len());
    }

    #[test]
    fn fires_at_the_deadline_not_before() {
        let mut wheel = TimerWheel::new(64, 1_000);
        wheel.insert(1_010, 7);
        assert_eq!(wheel.next_expiry(), Some(1_010));
        assert!(fire(&mut wheel, 1_009).is_empty());
        assert_eq!(wheel.len(), 1);
        assert_eq!(fire(&mut wheel, 1_010), vec![7]);
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_expiry(), None);
        assert!(fire(&mut wheel, 5_000).is_empty());
    }

    #[test]
    fn deadline_in_the_past_fires_on_next_advance() {
        let mut wheel = TimerWheel::new(4096, 500);
        wheel.insert(10, 1);
        wheel.insert(500, 2);
        assert_eq!(wheel.next_expiry(), Some(10));
        // Even an advance to the same tick, or an earlier one, fires them.
        assert_eq!(fire(&mut wheel, 400), vec![1, 2]);
        assert_eq!(wheel.now(), 500);
        assert!(wheel.is_empty());
    }

    #[test]
    fn cancel_returns_the_value_and_it_never_fires() {
        let mut wheel = TimerWheel::new(4096, 0);
        let a = wheel.insert(100, 1);
        let b = wheel.insert(100, 2);
        let far = wheel.insert(10_000_000, 3);
        assert_eq!(wheel.deadline(b), Some(100));
        assert_eq!(wheel.cancel(b), Some(2));
        assert_eq!(wheel.cancel(far), Some(3));
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.deadline(b), None);
        assert_eq!(fire(&mut wheel, u64::MAX), vec![1]);
        assert_eq!(wheel.cancel(a), None);
        check_structure(&wheel);
    }

    #[test]
    fn stale_id_after_fire_or_cancel_and_reuse_is_harmless() {
        let mut wheel = TimerWheel::new(64, 0);
        let fired = wheel.insert(5, 1);
        assert_eq!(fire(&mut wheel, 5), vec![1]);
        let reused = wheel.insert(50, 2);
        assert_eq!(reused.index, fired.index, "the entry is reused");
        assert_eq!(wheel.cancel(fired), None);
        assert_eq!(wheel.deadline(fired), None);
        assert_eq!(wheel.deadline(reused), Some(50));

        let cancelled = reused;
        assert_eq!(wheel.cancel(cancelled), Some(2));
        let again = wheel.insert(60, 3);
        assert_eq!(again.index, cancelled.index);
        assert_eq!(wheel.cancel(cancelled), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(fire(&mut wheel, 60), vec![3]);
        assert_eq!(wheel.cancel(again), None);
    }

    #[test]
    fn far_timers_fire_exactly_at_their_tick() {
        let mut wheel = TimerWheel::new(64, 3);
        let deadlines = [
            64,
            65,
            4_095,
            4_096,
            4_097,
            262_143,
            300_001,
            86_400_000,
            u64::MAX,
        ];
        for (value, &deadline) in deadlines.iter().enumerate() {
            wheel.insert(deadline, value as u32);
        }
        check_structure(&wheel);
        for (value, &deadline) in deadlines.iter().enumerate() {
            assert!(
                fire(&mut wheel, deadline - 1).is_empty(),
                "early at {deadline}"
            );
            check_structure(&wheel);
            assert_eq!(
                fire(&mut wheel, deadline),
                vec![value as u32],
                "at {deadline}"
            );
            check_structure(&wheel);
        }
        assert!(wheel.is_empty());
    }

    #[test]
    fn huge_jumps_fire_everything_due_once() {
        let mut wheel = TimerWheel::new(4096, 0);
        for value in 0..1_000u32 {
            wheel.insert(u64::from(value) * 7_919_993, value);
        }
        let cutoff = 500 * 7_919_993;
        let first = fire(&mut wheel, cutoff);
        assert_eq!(first, (0..=500).collect::<Vec<_>>());
        check_structure(&wheel);
        let rest = fire(&mut wheel, u64::MAX);
        assert_eq!(rest, (501..1_000).collect::<Vec<_>>());
        assert_eq!(wheel.now(), u64::MAX);
        wheel.insert(u64::MAX, 9);
        assert_eq!(wheel.next_expiry(), Some(u64::MAX));
        assert_eq!(fire(&mut wheel, u64::MAX), vec![9]);
    }

    #[test]
    fn fires_in_deadline_order() {
        let mut wheel = TimerWheel::new(64, 0);
        let deadlines = [9_000_000u64, 3, 70, 4_100, 70, 1 << 40, 262_144, 5];
        for &deadline in &deadlines {
            wheel.insert(deadline, deadline);
        }
        let mut out = Vec::new();
        wheel.advance(u64::MAX, &mut out);
        let mut sorted = deadlines.to_vec();
        sorted.sort_unstable();
        assert_eq!(out, sorted);
    }

    #[test]
    fn next_expiry_near_far_empty_and_after_cancel() {
        let mut wheel = TimerWheel::new(4096, 10_000);
        assert_eq!(wheel.next_expiry(), None);

        let hour = 10_000 + 3_600_000;
        let far = wheel.insert(hour, 1);
        let bound = wheel.next_expiry().unwrap();
        assert!(bound <= hour && hour - bound < 4096, "far bound {bound}");
        // The reactor sleeps until the bound, wakes, advances: no spin, and the bound tightens.
        let wakeups = wakeups_until_empty(&mut wheel);
        assert!(
            wakeups.len() <= 2 && wakeups.last() == Some(&hour),
            "{wakeups:?}"
        );
        assert_eq!(wheel.cancel(far), None);

        let near = wheel.insert(hour + 30, 2);
        let day = wheel.insert(hour + 86_400_000, 3);
        assert_eq!(wheel.next_expiry(), Some(hour + 30));
        assert_eq!(wheel.cancel(near), Some(2));
        let bound = wheel.next_expiry().unwrap();
        assert!(
            bound > hour + 4096 && bound <= hour + 86_400_000,
            "day bound {bound}"
        );
        wheel.insert(hour - 1, 4);
        assert_eq!(wheel.next_expiry(), Some(hour - 1), "already due");
        assert_eq!(fire(&mut wheel, hour), vec![4]);
        assert_eq!(wheel.cancel(day), Some(3));
        assert_eq!(wheel.next_expiry(), None);
        check_structure(&wheel);
    }

    /// Sleep until each `next_expiry`, as the reactor does; return the wakeups until empty.
    fn wakeups_until_empty(wheel: &mut TimerWheel<u32>) -> Vec<u64> {
        let mut wakeups = Vec::new();
        while let Some(at) = wheel.next_expiry() {
            assert!(
                at > wheel.now(),
                "next_expiry {at} not after now {}",
                wheel.now()
            );
            assert!(wakeups.len() < 64, "spinning: {wakeups:?}");
            wheel.advance(at, &mut Vec::new());
            wakeups.push(at);
        }
        wakeups
    }

    #[test]
    fn far_timer_across_a_level_boundary_wakes_at_most_twice_early() {
        let boundary = 1u64 << 24; // level-2 slot boundary with 4096 slots
        let now = boundary - 10;
        let mut wheel = TimerWheel::new(4096, now);
        let hour = now + 3_600_000;
        wheel.insert(hour, 1);
        let wakeups = wakeups_until_empty(&mut wheel);
        assert_eq!(wakeups.first(), Some(&boundary));
        assert_eq!(wakeups.last(), Some(&hour));
        assert!(wakeups.len() <= 3, "{wakeups:?}");

        let mut wheel = TimerWheel::new(4096, 0);
        let day = 86_400_000;
        wheel.insert(day, 2);
        let wakeups = wakeups_until_empty(&mut wheel);
        assert_eq!(wakeups.last(), Some(&day));
        assert!(wakeups.len() < wheel.levels as usize, "{wakeups:?}");
    }

    #[test]
    fn slots_are_rounded_and_clamped() {
        assert_eq!(TimerWheel::<()>::new(0, 0).slots(), 64);
        assert_eq!(TimerWheel::<()>::new(100, 0).slots(), 128);
        assert_eq!(TimerWheel::<()>::new(1 << 20, 0).slots(), 4096);
        assert_eq!(TimerWheel::<()>::new(4096, 0).levels, 6);
        assert_eq!(TimerWheel::<()>::new(64, 0).levels, 11);
    }

    #[test]
    fn entry_size_for_a_16_byte_id() {
        assert_eq!(std::mem::size_of::<Entry<(usize, u64)>>(), 48);
        assert_eq!(std::mem::size_of::<TimerId>(), 8);
    }

    /// One step of a random schedule.
    #[derive(Clone, Debug)]
    enum Op {
        /// Insert at `now + offset` (the offset may be negative: already due).
        Insert(i64),
        /// Cancel the live timer at this position (modulo the number live), or a stale id.
        Cancel(usize),
        /// Advance by this many ticks.
        Advance(u64),
        /// Advance to `next_expiry() + delta`, as the reactor does after its poll times out.
        AdvanceToNext(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (-100i64..5_000).prop_map(Op::Insert),
            2 => (-10i64..50_000_000).prop_map(Op::Insert),
            1 => (0i64..(1 << 40)).prop_map(Op::Insert),
            2 => any::<usize>().prop_map(Op::Cancel),
            2 => (0u64..100).prop_map(Op::Advance),
            1 => (0u64..10_000_000).prop_map(Op::Advance),
            1 => Just(Op::Advance(0)),
            3 => (-1i64..=1).prop_map(Op::AdvanceToNext),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn matches_a_reference_model(
            slots in prop_oneof![Just(64usize), Just(256), Just(4096)],
            start in prop_oneof![
                Just(0u64),
                0u64..1 << 50,
                Just(u64::MAX - (1 << 41)),
                Just(u64::MAX - 1_000),
            ],
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let mut wheel = TimerWheel::new(slots, start);
            // Live timers: value -> (id, deadline). Values are unique, so sets compare exactly.
            let mut model: BTreeMap<u32, (TimerId, u64)> = BTreeMap::new();
            // Values inserted with a deadline already due: exempt from the order guarantee.
            let mut inserted_due: Vec<u32> = Vec::new();
            let mut stale: Vec<TimerId> = Vec::new();
            let mut now = start;
            let mut next_value = 0u32;
            for op in ops {
                let advance_by = match op {
                    Op::Insert(offset) => {
                        let deadline = now.saturating_add_signed(offset);
                        let id = wheel.insert(deadline, next_value);
                        model.insert(next_value, (id, deadline));
                        if deadline <= now {
                            inserted_due.push(next_value);
                        }
                        next_value += 1;
                        None
                    }
                    Op::Cancel(pick) => {
                        if model.is_empty() || pick % 4 == 0 {
                            if let Some(&id) = stale.get(pick % stale.len().max(1)) {
                                prop_assert_eq!(wheel.cancel(id), None);
                            }
                        } else {
                            let value = *model.keys().nth(pick % model.len()).unwrap();
                            let (id, deadline) = model.remove(&value).unwrap();
                            prop_assert_eq!(wheel.deadline(id), Some(deadline));
                            prop_assert_eq!(wheel.cancel(id), Some(value));
                            prop_assert_eq!(wheel.cancel(id), None);
                            stale.push(id);
                        }
                        None
                    }
                    Op::Advance(by) => Some(by),
                    Op::AdvanceToNext(delta) => Some(wheel.next_expiry().map_or(0, |at| {
                        at.saturating_add_signed(delta).saturating_sub(now)
                    })),
                };
                if let Some(by) = advance_by {
                        now = now.saturating_add(by);
                        let mut fired = Vec::new();
                        wheel.advance(now, &mut fired);
                        // Already-due ones first, then the rest in deadline order.
                        let (early, timely): (Vec<u32>, Vec<u32>) =
                            fired.iter().partition(|value| inserted_due.contains(value));
                        prop_assert_eq!(&fired[..early.len()], &early[..]);
                        let deadlines: Vec<u64> = timely.iter().map(|v| model[v].1).collect();
                        prop_assert!(deadlines.is_sorted(), "out of order: {:?}", deadlines);
                        inserted_due.clear();
                        fired.sort_unstable();
                        let due: Vec<u32> = model
                            .iter()
                            .filter(|(_, &(_, deadline))| deadline <= now)
                            .map(|(&value, _)| value)
                            .collect();
                        prop_assert_eq!(&fired, &due, "fired at {}", now);
                        for value in due {
                            if let Some((id, _)) = model.remove(&value) {
                                prop_assert_eq!(wheel.deadline(id), None);
                                stale.push(id);
                            }
                        }
                        prop_assert_eq!(wheel.now(), now);
                }
                prop_assert_eq!(wheel.len(), model.len());
                prop_assert_eq!(wheel.is_empty(), model.is_empty());
                if slots <= 256 {
                    check_structure(&wheel);
                }
                let earliest = model.values().map(|&(_, deadline)| deadline).min();
                match (wheel.next_expiry(), earliest) {
                    (None, None) => {}
                    (Some(bound), Some(earliest)) => {
                        prop_assert!(bound <= earliest, "bound {} > earliest {}", bound, earliest);
                        if earliest > now {
                            prop_assert!(bound > now, "bound {} not after now {}", bound, now);
                        }
                    }
                    (bound, earliest) => {
                        prop_assert!(false, "next_expiry {:?}, earliest {:?}", bound, earliest);
                    }
                }
            }
            check_structure(&wheel);
            // Draining to the end of time fires exactly what is left.
            let mut rest = Vec::new();
            wheel.advance(u64::MAX, &mut rest);
            rest.sort_unstable();
            prop_assert_eq!(rest, model.keys().copied().collect::<Vec<_>>());
            prop_assert!(wheel.is_empty());
        }
    }
}
