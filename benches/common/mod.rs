//! What several benchmarks share (`mod common;` in each bench file; a folder, not
//! `benches/common.rs`, so that Cargo does not take it for a benchmark of its own).

use agentwire::__internal::event::RunKey;

/// The run of the benchmarked events: a realistic set of identifiers (lengths as in
/// production: a user id, a dated thread id, a run id, an agent name).
pub fn key() -> RunKey {
    RunKey::new(
        "user-7f3a2c91",
        Some("thread-2026-11-30-a81f"),
        "run-4b1e9d0c7a",
        "data_agent",
    )
    .expect("valid run key")
}
