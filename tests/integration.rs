//! The one integration test binary. Every test starts its own gateway in-process on
//! `127.0.0.1:0` (see `integration/support.rs`) and talks to it with real sockets:
//! WebSocket clients, raw HTTP, the publish API and the library's emitter. Every wait
//! has a deadline, so a misbehaving gateway fails a test instead of hanging it.

#[path = "integration/support.rs"]
mod support;

#[path = "integration/chaos.rs"]
mod chaos;
#[path = "integration/client_input.rs"]
mod client_input;
#[path = "integration/conformance_route.rs"]
mod conformance_route;
#[path = "integration/deadlines.rs"]
mod deadlines;
#[path = "integration/fd_limit.rs"]
mod fd_limit;
#[path = "integration/golden.rs"]
mod golden;
#[path = "integration/hostile_auth.rs"]
mod hostile_auth;
#[path = "integration/hostile_frames.rs"]
mod hostile_frames;
#[path = "integration/hostile_handshake.rs"]
mod hostile_handshake;
#[path = "integration/hostile_limits.rs"]
mod hostile_limits;
#[path = "integration/isolated.rs"]
mod isolated;
#[path = "integration/isolation.rs"]
mod isolation;
#[path = "integration/jwt.rs"]
mod jwt;
#[path = "integration/library.rs"]
mod library;
#[path = "integration/limits.rs"]
mod limits;
#[path = "integration/model.rs"]
mod model;
#[path = "integration/publish_api.rs"]
mod publish_api;
#[path = "integration/redteam_memory.rs"]
mod redteam_memory;
#[path = "integration/refusals.rs"]
mod refusals;
#[path = "integration/resume.rs"]
mod resume;
#[path = "integration/session.rs"]
mod session;
#[path = "integration/slot_reuse.rs"]
mod slot_reuse;
#[path = "integration/stats.rs"]
mod stats;
#[path = "integration/thread_filter.rs"]
mod thread_filter;
