//! The connection [`Mode`] a client asks for (PROTOCOL.md section 3): which events a
//! session receives. Chosen at the upgrade (path alias, `mode=`, `connection_scope=`),
//! then kept by the connection and read by routing.

use std::fmt;

/// Connection scope requested by the client (PROTOCOL.md section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every event of the user (the default).
    Main,
    /// Every event of the user; the `/ws/factory` alias.
    Factory,
    /// Every event of the user; the `/websocket` alias.
    Legacy,
    /// Only events of runs started from this very connection.
    Isolated,
    /// Conformance builds only: `GET /conformance/echo`, a session that receives no
    /// events and echoes every client message back (Autobahn|Testsuite runs). Never
    /// parsed from `mode=`; it exists only as that path's mode.
    #[cfg(feature = "conformance")]
    Echo,
}

impl Mode {
    /// The query-parameter spelling: `main`, `factory`, `legacy` or `isolated` (`echo`
    /// for the conformance echo path, which no `mode=` selects).
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Main => "main",
            Mode::Factory => "factory",
            Mode::Legacy => "legacy",
            Mode::Isolated => "isolated",
            #[cfg(feature = "conformance")]
            Mode::Echo => "echo",
        }
    }

    /// True for [`Mode::Isolated`], the only mode that narrows delivery to the connection.
    pub fn is_isolated(&self) -> bool {
        matches!(self, Mode::Isolated)
    }

    /// Parse the exact (lower-case) query spelling; anything else is `None`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "main" => Some(Mode::Main),
            "factory" => Some(Mode::Factory),
            "legacy" => Some(Mode::Legacy),
            "isolated" => Some(Mode::Isolated),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_strings() {
        for m in [Mode::Main, Mode::Factory, Mode::Legacy, Mode::Isolated] {
            assert_eq!(Mode::parse(m.as_str()), Some(m));
            assert_eq!(m.to_string(), m.as_str());
            assert_eq!(m.is_isolated(), m == Mode::Isolated);
        }
        assert_eq!(Mode::parse("Main"), None);
        assert_eq!(Mode::parse(""), None);
    }
}
