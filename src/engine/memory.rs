//! The memory engine (`engine = "memory"`, the default): one process's state, kept by
//! the [`Registry`] (`src/registry/`: users, seq, replay buffer, runs, idempotency
//! keys, the memory budget). Every call answers [`Step::Done`] at once, inline: the
//! engine boundary costs the memory engine nothing (no allocation, no channel hop),
//! which `cargo bench --bench routing` shows before and after.

use super::Step;
use crate::event::Event;
use crate::registry::{Refused, Registry, Routed, User};

/// The memory engine: stateless itself, its state is the registry the reactor owns.
#[derive(Debug, Default)]
pub(crate) struct Memory;

impl Memory {
    /// Publish `ev` at tick `now`: it takes its user's next seq and is kept for
    /// replay, or is refused ([`Registry::route`]).
    #[inline]
    pub(crate) fn publish<'r>(
        &mut self,
        registry: &'r mut Registry,
        ev: &Event,
        now: u64,
    ) -> Step<Result<(Routed, &'r User), Refused>> {
        Step::Done(registry.route(ev, now))
    }
}
