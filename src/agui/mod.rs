//! The AG-UI encoding (PROTOCOL.md section 11): a connection that upgrades with
//! `encoding=agui` receives each agent event as one or more AG-UI 1.0 events (the
//! open Agent-User Interaction protocol: npm `@ag-ui/core` 1.0.0), one JSON event per
//! text frame. The `connected` frame and every client message are unchanged.
//!
//! How it fits: events are routed exactly as for every connection (the registry
//! assigns `seq` and keeps the shared agentwire frame for replay); only at the point
//! where a frame is queued on a connection does an AG-UI connection translate it
//! instead (`reactor/routing.rs`: live delivery and replay; `reactor/session.rs`:
//! opening). The agentwire JSON path is untouched: its frames are still serialized
//! once per event and shared. The translator works from the event frame alone (the
//! JSON the registry or another engine delivers) plus a small per-connection state,
//! so it serves any engine that hands the reactor `{user, seq, frame}`.
//!
//! - [`source`]: reading an agentwire event frame back ([`Source`]);
//! - [`wire`]: the AG-UI events the gateway writes, typed (no `json!`);
//! - [`stream`]: [`Stream`], one connection's translation state (which runs it has
//!   started, which text message is open, the tool-call counters), the mapping itself,
//!   and the frames that bring a connection opened or resumed mid-run to a valid
//!   state (a `RUN_STARTED` built from the run's state, an open text message).
//!
//! The mapping and every choice it makes are documented in `docs/AGUI.md`.

mod source;
mod stream;
mod wire;

pub use source::{json_payload, Source};
pub use stream::{RunInProgress, Stream};

/// How a connection's events are written (the `encoding` query parameter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    /// The agentwire JSON of PROTOCOL.md section 2 (the default; `encoding=agentwire`).
    #[default]
    Agentwire,
    /// AG-UI 1.0 events (`encoding=agui`).
    Agui,
}

impl Encoding {
    /// The query-parameter spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Encoding> {
        match s {
            "agentwire" => Some(Encoding::Agentwire),
            "agui" => Some(Encoding::Agui),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Encoding::Agentwire => "agentwire",
            Encoding::Agui => "agui",
        }
    }
}
