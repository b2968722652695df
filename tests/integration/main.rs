//! The one integration test binary. Every test starts its own gateway in-process on
//! `127.0.0.1:0` (see `support/`) and talks to it with real sockets:
//! WebSocket clients, raw HTTP, the publish API and the library's emitter. Every wait
//! has a deadline, so a misbehaving gateway fails a test instead of hanging it.

mod support;

mod admin_listener;
mod agui;
mod chaos;
mod client_input;
mod cluster;
mod cluster_agui;
mod cluster_chaos;
mod cluster_gaps;
mod cluster_runs;
mod cluster_sentinel;
mod conformance_route;
mod deadlines;
mod demo_page;
mod embedding;
mod fd_limit;
mod golden;
mod hostile_auth;
mod hostile_frames;
mod hostile_handshake;
mod hostile_limits;
mod idempotency;
mod ids;
mod isolated_mode;
mod jwt;
mod key_rotation;
mod library;
mod limits;
mod log_json;
mod model;
mod publish_api;
mod redteam_http;
mod redteam_memory;
mod redteam_process;
mod redteam_session;
mod refusals;
mod resume;
mod revocation;
mod session;
mod slot_reuse;
mod stats;
mod thread_filter;
mod tls;
mod user_isolation;
mod webhook;
