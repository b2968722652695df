//! The run's record (one JSON object), its human rendering helpers, and `--target`
//! checks (`p99=2ms`, `lost=0`, `rate=50000`, `bytes_per_conn<=8192`, ...).

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// Latency percentiles of a histogram, in microseconds.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": (h.mean() * 10.0).round() / 10.0,
    })
}

/// `1234` us as `1.23 ms`.
pub fn us(v: u64) -> String {
    if v >= 1_000_000 {
        format!("{:.2} s", v as f64 / 1e6)
    } else if v >= 1000 {
        format!("{:.2} ms", v as f64 / 1e3)
    } else {
        format!("{v} us")
    }
}

pub fn lat_line(p: &Value) -> String {
    let g = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
    if g("count") == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
        us(g("p50")),
        us(g("p90")),
        us(g("p99")),
        us(g("p999")),
        us(g("max")),
        g("count")
    )
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    AtMost,
    AtLeast,
}

/// One `--target`: a record key, a bound and its direction.
#[derive(Clone, Debug)]
pub struct Target {
    pub spec: String,
    key: &'static str,
    path: Vec<&'static str>,
    cmp: Cmp,
    bound: f64,
}

/// A name a target may use.
struct Name {
    name: &'static str,
    aliases: &'static [&'static str],
    /// Where the value is in the record.
    path: &'static [&'static str],
    /// The direction of `name=V`.
    cmp: Cmp,
    /// A duration (`2ms`) rather than a count.
    duration: bool,
}

const NAMES: &[Name] = &[
    Name {
        name: "p50",
        aliases: &[],
        path: &["latency_us", "p50"],
        cmp: Cmp::AtMost,
        duration: true,
    },
    Name {
        name: "p90",
        aliases: &[],
        path: &["latency_us", "p90"],
        cmp: Cmp::AtMost,
        duration: true,
    },
    Name {
        name: "p99",
        aliases: &[],
        path: &["latency_us", "p99"],
        cmp: Cmp::AtMost,
        duration: true,
    },
    Name {
        name: "p999",
        aliases: &["p99.9"],
        path: &["latency_us", "p999"],
        cmp: Cmp::AtMost,
        duration: true,
    },
    Name {
        name: "max",
        aliases: &[],
        path: &["latency_us", "max"],
        cmp: Cmp::AtMost,
        duration: true,
    },
    Name {
        name: "lost",
        aliases: &[],
        path: &["lost"],
        cmp: Cmp::AtMost,
        duration: false,
    },
    Name {
        name: "duplicates",
        aliases: &["dup", "dups"],
        path: &["duplicates"],
        cmp: Cmp::AtMost,
        duration: false,
    },
    Name {
        name: "out_of_order",
        aliases: &["ooo"],
        path: &["out_of_order"],
        cmp: Cmp::AtMost,
        duration: false,
    },
    Name {
        name: "unexpected",
        aliases: &[],
        path: &["unexpected"],
        cmp: Cmp::AtMost,
        duration: false,
    },
    Name {
        name: "failed",
        aliases: &["handshake_failures"],
        path: &["handshake_failures"],
        cmp: Cmp::AtMost,
        duration: false,
    },
    Name {
        name: "closed",
        aliases: &["closed_early"],
        path: &["closed_early"],
        cmp: Cmp::AtMost,
        duration: false,
    },
    Name {
        name: "send_failed",
        aliases: &["events_failed"],
        path: &["events_failed"],
        cmp: Cmp::AtMost,
        duration: false,
    },
    Name {
        name: "rate",
        aliases: &["rate_delivered"],
        path: &["rate_delivered"],
        cmp: Cmp::AtLeast,
        duration: false,
    },
    Name {
        name: "frames_per_s",
        aliases: &["fps"],
        path: &["frames_per_s"],
        cmp: Cmp::AtLeast,
        duration: false,
    },
    Name {
        name: "sustainable",
        aliases: &["sustainable_rate"],
        path: &["sustainable_rate"],
        cmp: Cmp::AtLeast,
        duration: false,
    },
    Name {
        name: "cps",
        aliases: &["connects_per_s"],
        path: &["storm", "connects_per_s"],
        cmp: Cmp::AtLeast,
        duration: false,
    },
    Name {
        name: "churn_failed",
        aliases: &[],
        path: &["storm", "failed"],
        cmp: Cmp::AtMost,
        duration: false,
    },
    Name {
        name: "bytes_per_conn",
        aliases: &[],
        path: &["bytes_per_conn"],
        cmp: Cmp::AtMost,
        duration: false,
    },
    Name {
        name: "cpu",
        aliases: &["gateway_cpu_pct"],
        path: &["gateway_cpu_pct"],
        cmp: Cmp::AtMost,
        duration: false,
    },
    Name {
        name: "connections",
        aliases: &["conns"],
        path: &["connections"],
        cmp: Cmp::AtLeast,
        duration: false,
    },
];

impl Target {
    /// Parse `name=V` (default direction), `name<=V` or `name>=V`. Durations take
    /// `us`/`ms`/`s` (plain numbers are microseconds); counts take `k`/`M`.
    pub fn parse(spec: &str) -> Result<Target, String> {
        let (name, cmp, value) = if let Some((n, v)) = spec.split_once("<=") {
            (n, Some(Cmp::AtMost), v)
        } else if let Some((n, v)) = spec.split_once(">=") {
            (n, Some(Cmp::AtLeast), v)
        } else if let Some((n, v)) = spec.split_once('=') {
            (n, None, v)
        } else {
            return Err(format!(
                "--target {spec:?}: expected NAME=VALUE, NAME<=VALUE or NAME>=VALUE"
            ));
        };
        let name = name.trim().to_ascii_lowercase();
        let Some(found) = NAMES
            .iter()
            .find(|n| n.name == name || n.aliases.contains(&name.as_str()))
        else {
            let known: Vec<&str> = NAMES.iter().map(|n| n.name).collect();
            return Err(format!(
                "--target {spec:?}: unknown name (known: {})",
                known.join(", ")
            ));
        };
        let bound = if found.duration {
            parse_duration_us(value.trim())
        } else {
            parse_count(value.trim())
        }
        .ok_or_else(|| format!("--target {spec:?}: bad value {value:?}"))?;
        Ok(Target {
            spec: spec.to_owned(),
            key: found.name,
            path: found.path.to_vec(),
            cmp: cmp.unwrap_or(found.cmp),
            bound,
        })
    }

    /// Check against the record: (passed, measured value, text).
    pub fn check(&self, record: &Value) -> (bool, Option<f64>, String) {
        let mut v = record;
        for p in &self.path {
            match v.get(p) {
                Some(x) => v = x,
                None => return (false, None, format!("FAIL {}: not measured", self.spec)),
            }
        }
        let Some(got) = v.as_f64() else {
            return (false, None, format!("FAIL {}: not measured", self.spec));
        };
        let pass = match self.cmp {
            Cmp::AtMost => got <= self.bound,
            Cmp::AtLeast => got >= self.bound,
        };
        let op = match self.cmp {
            Cmp::AtMost => "<=",
            Cmp::AtLeast => ">=",
        };
        let verdict = if pass { "PASS" } else { "FAIL" };
        (
            pass,
            Some(got),
            format!(
                "{verdict} {}: measured {got} (want {op} {})",
                self.key, self.bound
            ),
        )
    }
}

/// `2ms`, `500us`, `1.5s`, `800` (us) to microseconds.
pub fn parse_duration_us(s: &str) -> Option<f64> {
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v * mul)
}

/// `50000`, `50k`, `1.5M` to a number.
pub fn parse_count(s: &str) -> Option<f64> {
    let (num, mul) = if let Some(n) = s.strip_suffix(['k', 'K']) {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('M') {
        (n, 1e6)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    v.is_finite().then_some(v * mul)
}

/// Evaluate every target, print PASS/FAIL lines, store them in the record; true when
/// all passed.
pub fn apply_targets(targets: &[Target], record: &mut Map<String, Value>) -> bool {
    let snapshot = Value::Object(record.clone());
    let mut all = true;
    let mut out = Vec::new();
    for t in targets {
        let (pass, got, text) = t.check(&snapshot);
        println!("{text}");
        all &= pass;
        out.push(json!({"target": t.spec, "measured": got, "pass": pass}));
    }
    if !targets.is_empty() {
        record.insert("targets".into(), Value::Array(out));
        record.insert("pass".into(), Value::Bool(all));
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets_and_checks_directions() {
        let rec = json!({"latency_us": {"p99": 1800}, "lost": 0, "rate_delivered": 49000.0});
        assert!(Target::parse("p99=2ms").unwrap().check(&rec).0);
        assert!(!Target::parse("p99=1ms").unwrap().check(&rec).0);
        assert!(Target::parse("lost=0").unwrap().check(&rec).0);
        assert!(!Target::parse("rate=50k").unwrap().check(&rec).0);
        assert!(Target::parse("rate>=49000").unwrap().check(&rec).0);
        assert!(
            !Target::parse("cps=10").unwrap().check(&rec).0,
            "unmeasured fails"
        );
        assert!(Target::parse("nope=1").is_err());
        assert!(Target::parse("p99=fast").is_err());
        assert_eq!(parse_duration_us("1.5s"), Some(1.5e6));
        assert_eq!(parse_duration_us("250"), Some(250.0));
    }
}
