//! `loadgen compare`: one scenario against agentwire and each comparison peer in the same
//! invocation, a table side by side and agentwire's ratio against each peer.
//!
//! Every run is a child `loadgen SCENARIO ... --server NAME --json FILE --quiet` (a fresh
//! process: its own fds, threads and histograms), one after another, never two at once.
//! With `--repeat N` the servers take turns (a, b, c, a, b, c, ...) so slow drifts of a
//! shared machine spread over all of them, and each server's median run (by the
//! scenario's headline figure) is reported with the range.
//!
//! Ratios are agentwire's advantage (above 1: agentwire better): for throughput
//! agentwire / peer (the sustainable rate of `ramp`, events/s delivered), for costs
//! peer / agentwire (p99, CPU per delivered event, memory per connection).
//!
//! With `floor` among the servers (the kernel floor, src/floor.rs) every other server's
//! rate and CPU per delivered event are also given as a ratio to the floor's: the rate
//! as server / floor (1 = all the kernel allows), CPU per event as server / floor (how
//! many times the bare writes' cost).

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Map, Value};

use crate::report::{mib, us};
use crate::ServerKind;

/// Options of `compare` itself (the scenario's own follow it).
pub struct CompareSpec {
    pub servers: Vec<ServerKind>,
    pub repeat: usize,
    pub json: Option<PathBuf>,
    /// The scenario name and its options, as given.
    pub scenario: Vec<String>,
}

/// One server's figures, as a row of the table.
#[derive(Clone, Debug, Default)]
struct Row {
    conns: Option<f64>,
    offered: Option<f64>,
    delivered: Option<f64>,
    lost: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    max: Option<f64>,
    rss_kib: Option<f64>,
    bytes_per_conn: Option<f64>,
    cpu: Option<f64>,
    sustainable: Option<f64>,
    /// ramp: every step as (offered rate, p99 us, CPU %, within the bound).
    steps: Vec<(f64, f64, f64, bool)>,
}

fn num(v: &Value, ptr: &str) -> Option<f64> {
    v.pointer(ptr).and_then(Value::as_f64)
}

/// A cluster run's CPU (`--server redis1|redis2`): every node plus redis-server, in %
/// of one core, from one phase's figures (src/cluster.rs); None when not sampled.
fn cluster_cpu(phase: &Value) -> Option<f64> {
    let nodes = phase.get("node_cpu_pct")?.as_array()?;
    let mut sum = num(phase, "/redis_cpu_pct")?;
    for n in nodes {
        sum += n.as_f64()?;
    }
    Some(sum)
}

impl Row {
    fn from_record(scenario: &str, r: &Value) -> Row {
        let mut row = Row {
            conns: num(r, "/connections"),
            offered: num(r, "/rate_offered"),
            delivered: num(r, "/rate_delivered"),
            lost: num(r, "/lost"),
            p50: num(r, "/latency_us/p50"),
            p99: num(r, "/latency_us/p99"),
            p999: num(r, "/latency_us/p999"),
            max: num(r, "/latency_us/max"),
            rss_kib: num(r, "/rss_kib/peak"),
            bytes_per_conn: num(r, "/bytes_per_conn"),
            // A cluster's CPU is all of it: every node and Redis.
            cpu: r
                .pointer("/cluster/phases/0")
                .and_then(cluster_cpu)
                .or_else(|| num(r, "/gateway_cpu_pct")),
            sustainable: None,
            steps: Vec::new(),
        };
        if scenario == "ramp" {
            // The figures of the last step within the bound (the sustainable rate).
            row.sustainable = num(r, "/sustainable_rate");
            let steps = r.get("steps").and_then(Value::as_array);
            row.steps = steps
                .map(|s| {
                    s.iter()
                        .map(|st| {
                            (
                                num(st, "/rate_offered").unwrap_or(0.0),
                                num(st, "/latency_us/p99").unwrap_or(f64::NAN),
                                st.get("cluster")
                                    .and_then(cluster_cpu)
                                    .or_else(|| num(st, "/gateway_cpu_pct"))
                                    .unwrap_or(f64::NAN),
                                st.get("pass").and_then(Value::as_bool) == Some(true),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let best = steps.and_then(|s| {
                s.iter()
                    .rfind(|st| st.get("pass").and_then(Value::as_bool) == Some(true))
            });
            if let Some(st) = best {
                row.offered = num(st, "/rate_offered");
                row.delivered = num(st, "/rate_delivered");
                row.p50 = num(st, "/latency_us/p50");
                row.p99 = num(st, "/latency_us/p99");
                row.p999 = num(st, "/latency_us/p999");
                row.max = num(st, "/latency_us/max");
                row.cpu = st
                    .get("cluster")
                    .and_then(cluster_cpu)
                    .or_else(|| num(st, "/gateway_cpu_pct"));
            } else {
                row.offered = None;
                row.delivered = None;
                row.p50 = None;
                row.p99 = None;
                row.p999 = None;
                row.max = None;
                row.cpu = None;
            }
        }
        if scenario == "idle" {
            row.offered = None;
            row.delivered = None;
            row.cpu = None;
        }
        row
    }

    /// The headline figure a median is taken by, and whether higher is better.
    fn headline(&self, scenario: &str) -> (Option<f64>, bool) {
        match scenario {
            "idle" => (self.bytes_per_conn, false),
            "ramp" => (Some(self.sustainable.unwrap_or(0.0)), true),
            "burst" => (self.delivered, true),
            _ => (self.p99, false),
        }
    }
}

/// A server, its median run (row and record) and every run's headline figure.
type Median = (ServerKind, Option<(Row, Value)>, Vec<f64>);

/// One finished child run.
struct Outcome {
    server: ServerKind,
    exit: i32,
    record: Option<Value>,
    log: PathBuf,
}

fn scenario_has(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

/// Run the comparison; Ok(exit code: 0 all ran and met their targets, 1 a target
/// missed).
pub fn run(spec: CompareSpec) -> Result<u8, String> {
    let Some(scenario) = spec.scenario.first().cloned() else {
        return Err(
            "compare needs a scenario: loadgen compare [--servers ...] SCENARIO [options]".into(),
        );
    };
    if !["idle", "fanout", "burst", "storm", "ramp"].contains(&scenario.as_str()) {
        return Err(format!(
            "compare: unknown scenario {scenario:?} (idle, fanout, burst, storm, ramp)"
        ));
    }
    let rest: Vec<String> = spec.scenario.iter().skip(1).cloned().collect();
    for f in ["--server", "--json", "--connect"] {
        if scenario_has(&rest, f) {
            return Err(format!(
                "compare sets {f} for each run itself: leave it out"
            ));
        }
    }
    if spec.servers.is_empty() {
        return Err("--servers must name at least one server".into());
    }
    let mut extra: Vec<String> = Vec::new();
    if scenario != "idle" && !scenario_has(&rest, "--driver") {
        // The peers take events from the publish API only: agentwire too, so all of
        // them run the same driver.
        extra.extend(["--driver".into(), "publish".into()]);
    }
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let dir = std::env::temp_dir().join("agentwire-loadgen");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tag = std::process::id();
    let repeat = spec.repeat.max(1);
    let total = repeat * spec.servers.len();
    let mut outcomes: Vec<Outcome> = Vec::new();
    eprintln!(
        "loadgen compare: {scenario} {} against {} ({} run{} each, one at a time)",
        rest.join(" "),
        spec.servers
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        repeat,
        if repeat == 1 { "" } else { "s" }
    );
    for k in 0..repeat {
        for server in &spec.servers {
            let name = server.name();
            let json_path = dir.join(format!("compare-{tag}-{name}-{k}.json"));
            let log = dir.join(format!("compare-{tag}-{name}-{k}.log"));
            let _ = std::fs::remove_file(&json_path);
            let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            let err = out
                .try_clone()
                .map_err(|e| format!("{}: {e}", log.display()))?;
            let n = outcomes.len() + 1;
            eprintln!("  [{n}/{total}] {name} ...");
            let status = Command::new(&exe)
                .arg(&scenario)
                .args(&rest)
                .args(&extra)
                .args(["--server", name, "--quiet", "--json"])
                .arg(&json_path)
                .stdout(out)
                .stderr(err)
                .status()
                .map_err(|e| format!("running {}: {e}", exe.display()))?;
            let exit = status.code().unwrap_or(-1);
            let record = std::fs::read_to_string(&json_path)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let _ = std::fs::remove_file(&json_path);
            let summary = match &record {
                Some(r) => one_line(&scenario, &Row::from_record(&scenario, r)),
                None => "no record".into(),
            };
            eprintln!(
                "  [{n}/{total}] {name}: exit {exit}{}; {summary} (log {})",
                match exit {
                    0 => "",
                    1 => " (a target missed)",
                    _ => " (the run failed)",
                },
                log.display()
            );
            if record.is_none() {
                if let Ok(text) = std::fs::read_to_string(&log) {
                    for line in text
                        .lines()
                        .rev()
                        .take(8)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                    {
                        eprintln!("      | {line}");
                    }
                }
            }
            outcomes.push(Outcome {
                server: *server,
                exit,
                record,
                log,
            });
        }
    }

    report(&Report {
        scenario: &scenario,
        rest: &rest,
        repeat,
        servers: &spec.servers,
        outcomes: &outcomes,
        driver_added: !extra.is_empty(),
        json: spec.json.as_ref(),
    })?;
    if outcomes.iter().any(|o| o.record.is_none() || o.exit >= 2) {
        return Err("at least one run failed (see its log above)".into());
    }
    Ok(u8::from(outcomes.iter().any(|o| o.exit == 1)))
}

/// `compare --render FILE`: the table and ratios of a saved comparison, again (with
/// this build's rendering).
pub fn render_saved(path: &std::path::Path) -> Result<u8, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let scenario = v
        .get("scenario")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let rest: Vec<String> = v
        .get("args")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let servers: Vec<ServerKind> = v
        .get("servers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().and_then(ServerKind::parse))
                .collect()
        })
        .unwrap_or_default();
    let outcomes: Vec<Outcome> = v
        .get("runs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| {
                    Some(Outcome {
                        server: ServerKind::parse(r.get("server")?.as_str()?)?,
                        exit: r.get("exit").and_then(Value::as_i64).unwrap_or(-1) as i32,
                        record: r.get("record").filter(|x| !x.is_null()).cloned(),
                        log: PathBuf::from(r.get("log").and_then(Value::as_str).unwrap_or("")),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let repeat = v.get("repeat").and_then(Value::as_u64).unwrap_or(1) as usize;
    report(&Report {
        scenario: &scenario,
        rest: &rest,
        repeat,
        servers: &servers,
        outcomes: &outcomes,
        driver_added: v.get("driver_added").and_then(Value::as_bool) == Some(true),
        json: None,
    })?;
    Ok(0)
}

/// What the table, the ratios and the JSON are made from.
struct Report<'a> {
    scenario: &'a str,
    rest: &'a [String],
    repeat: usize,
    servers: &'a [ServerKind],
    outcomes: &'a [Outcome],
    driver_added: bool,
    json: Option<&'a PathBuf>,
}

fn report(rep: &Report<'_>) -> Result<(), String> {
    let Report {
        scenario,
        rest,
        repeat,
        servers,
        outcomes,
        driver_added,
        json,
    } = *rep;
    let scenario = scenario.to_owned();
    // Per server: the median run by the headline figure, and the range.
    let mut medians: Vec<Median> = Vec::new();
    for server in servers {
        let mut runs: Vec<(Row, Value)> = outcomes
            .iter()
            .filter(|o| o.server == *server)
            .filter_map(|o| o.record.clone())
            .map(|r| (Row::from_record(&scenario, &r), r))
            .collect();
        let higher_better = Row::default().headline(&scenario).1;
        runs.sort_by(|a, b| {
            let x = a.0.headline(&scenario).0.unwrap_or(f64::NAN);
            let y = b.0.headline(&scenario).0.unwrap_or(f64::NAN);
            x.total_cmp(&y)
        });
        let heads: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.0.headline(&scenario).0)
            .collect();
        // The lower median for an even count, the worse one by the headline.
        let idx = if runs.is_empty() {
            None
        } else if higher_better {
            Some(runs.len() / 2 - usize::from(runs.len() % 2 == 0))
        } else {
            Some(runs.len() / 2)
        };
        let chosen = idx.and_then(|i| runs.get(i).cloned());
        medians.push((*server, chosen, heads));
    }

    let human = render(&scenario, rest, repeat, &medians);
    println!();
    for line in &human {
        println!("{line}");
    }
    let ratios = ratios(&scenario, &medians);
    for line in ratio_lines(&medians, &ratios) {
        println!("{line}");
    }

    let mut record = Map::new();
    record.insert("compare".into(), json!(true));
    record.insert("scenario".into(), json!(scenario));
    record.insert("args".into(), json!(rest));
    record.insert("driver_added".into(), json!(driver_added));
    record.insert("repeat".into(), json!(repeat));
    record.insert(
        "servers".into(),
        json!(servers.iter().map(|s| s.name()).collect::<Vec<_>>()),
    );
    record.insert(
        "runs".into(),
        Value::Array(
            outcomes
                .iter()
                .map(|o| {
                    json!({
                        "server": o.server.name(),
                        "exit": o.exit,
                        "log": o.log.display().to_string(),
                        "record": o.record,
                    })
                })
                .collect(),
        ),
    );
    let mut med = Map::new();
    for (server, chosen, heads) in &medians {
        med.insert(
            server.name().into(),
            json!({
                "headline_values": heads,
                "record": chosen.as_ref().map(|c| c.1.clone()),
            }),
        );
    }
    record.insert("median".into(), Value::Object(med));
    record.insert("ratios".into(), ratios);
    let floor = floor_ratios(&scenario, &medians);
    for line in floor_lines(&medians, &floor) {
        println!("{line}");
    }
    record.insert("floor_ratios".into(), floor);
    let text = Value::Object(record).to_string();
    println!("JSON {text}");
    if let Some(path) = json {
        std::fs::write(path, format!("{text}\n"))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

fn one_line(scenario: &str, r: &Row) -> String {
    let lat = format!(
        "p50 {} p99 {}",
        r.p50.map_or("-".into(), |v| us(v as u64)),
        r.p99.map_or("-".into(), |v| us(v as u64))
    );
    match scenario {
        "idle" => format!(
            "{} connections, {} B/connection",
            r.conns.unwrap_or(0.0),
            r.bytes_per_conn.map_or("-".into(), |v| format!("{v:.0}"))
        ),
        "ramp" => format!(
            "sustainable {}/s ({lat} there)",
            r.sustainable.map_or("none".into(), |v| format!("{v:.0}"))
        ),
        _ => format!(
            "delivered {}/s, lost {}, {lat}",
            r.delivered.map_or("-".into(), |v| format!("{v:.0}")),
            r.lost.unwrap_or(0.0)
        ),
    }
}

fn cell(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

fn render(scenario: &str, rest: &[String], repeat: usize, medians: &[Median]) -> Vec<String> {
    let mut lines = vec![format!(
        "loadgen compare: {scenario} {}{}",
        rest.join(" "),
        if repeat > 1 {
            format!(
                " (median of {repeat} runs by {}; range in the last column)",
                headline_name(scenario)
            )
        } else {
            String::new()
        }
    )];
    let rate_head = if scenario == "ramp" {
        "sustainable/s"
    } else {
        "offered/s"
    };
    lines.push(format!(
        "  {:<10} {:>7} {:>13} {:>12} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>6}  {}",
        "server",
        "conns",
        rate_head,
        "delivered/s",
        "lost",
        "p50",
        "p99",
        "p99.9",
        "max",
        "RSS peak",
        "B/conn",
        "CPU",
        "range"
    ));
    for (server, chosen, heads) in medians {
        let Some((r, _)) = chosen else {
            lines.push(format!("  {:<10} (no successful run)", server.name()));
            continue;
        };
        let lat = |v: Option<f64>| cell(v, |x| us(x as u64));
        let range = if heads.len() > 1 {
            let lo = heads.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = heads.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            match scenario {
                "idle" | "ramp" | "burst" => format!("[{lo:.0}-{hi:.0}]"),
                _ => format!("[{}-{}]", us(lo as u64), us(hi as u64)),
            }
        } else {
            String::new()
        };
        let rate = if scenario == "ramp" {
            r.sustainable.map_or("none".into(), |v| format!("{v:.0}"))
        } else {
            cell(r.offered, |v| format!("{v:.0}"))
        };
        lines.push(format!(
            "  {:<10} {:>7} {:>13} {:>12} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>6}  {}",
            server.name(),
            cell(r.conns, |v| format!("{v:.0}")),
            rate,
            cell(r.delivered, |v| format!("{v:.0}")),
            cell(r.lost, |v| format!("{v:.0}")),
            lat(r.p50),
            lat(r.p99),
            lat(r.p999),
            lat(r.max),
            cell(r.rss_kib, |v| mib(v as u64)),
            cell(r.bytes_per_conn, |v| format!("{v:.0}")),
            cell(r.cpu, |v| format!("{v:.0}%")),
            range
        ));
    }
    if scenario == "ramp" {
        lines.push(
            "  (ramp: latency, delivered and CPU are those of the last step within the bound)"
                .into(),
        );
    }
    lines
}

fn headline_name(scenario: &str) -> &'static str {
    match scenario {
        "idle" => "bytes per connection",
        "ramp" => "sustainable rate",
        "burst" => "events/s delivered",
        _ => "p99",
    }
}

/// agentwire's advantage over each peer, per figure (above 1: agentwire better).
fn ratios(scenario: &str, medians: &[Median]) -> Value {
    let Some(aw) = medians
        .iter()
        .find(|m| m.0 == ServerKind::Agentwire)
        .and_then(|m| m.1.as_ref().map(|c| c.0.clone()))
    else {
        return json!({});
    };
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => {
            Some((a / b * 100.0).round() / 100.0)
        }
        _ => None,
    };
    let per_event = |r: &Row| match (r.cpu, r.delivered) {
        (Some(c), Some(d)) if d > 0.0 => Some(c / d),
        _ => None,
    };
    let mut out = Map::new();
    for (server, chosen, _) in medians {
        if matches!(server, ServerKind::Agentwire | ServerKind::Floor) {
            continue;
        }
        let Some((p, _)) = chosen else { continue };
        let mut m = Map::new();
        m.insert(
            "bytes_per_conn".into(),
            json!(div(p.bytes_per_conn, aw.bytes_per_conn)),
        );
        if scenario == "ramp" {
            // Latency and CPU at the same offered rate: the highest step both passed
            // (CPU per event falls as the rate rises, so different rates do not compare).
            let common = aw
                .steps
                .iter()
                .filter(|a| a.3)
                .filter_map(|a| {
                    p.steps
                        .iter()
                        .find(|b| b.3 && (b.0 - a.0).abs() < 1.0)
                        .map(|b| (*a, *b))
                })
                .max_by(|x, y| x.0 .0.total_cmp(&y.0 .0));
            m.insert("common_rate".into(), json!(common.map(|c| c.0 .0)));
            m.insert(
                "p99".into(),
                json!(common.and_then(|(a, b)| div(Some(b.1), Some(a.1)))),
            );
            m.insert(
                "cpu_per_event".into(),
                json!(common.and_then(|(a, b)| div(Some(b.2), Some(a.2)))),
            );
        } else if scenario != "idle" {
            m.insert("p99".into(), json!(div(p.p99, aw.p99)));
            m.insert(
                "cpu_per_event".into(),
                json!(div(per_event(p), per_event(&aw))),
            );
        }
        if scenario == "ramp" {
            m.insert(
                "sustainable_rate".into(),
                json!(div(aw.sustainable, p.sustainable)),
            );
        }
        if scenario == "burst" {
            m.insert("delivered".into(), json!(div(aw.delivered, p.delivered)));
        }
        out.insert(server.name().into(), Value::Object(m));
    }
    Value::Object(out)
}

fn ratio_lines(medians: &[Median], ratios: &Value) -> Vec<String> {
    let Some(obj) = ratios.as_object().filter(|o| !o.is_empty()) else {
        return vec!["  ratios: none (agentwire must be among --servers and have run)".into()];
    };
    let mut lines =
        vec!["  agentwire's advantage over each peer (above 1: agentwire better):".to_owned()];
    let names: &[(&str, &str)] = &[
        (
            "sustainable_rate",
            "sustainable events/s at the p99 bound (agentwire / peer)",
        ),
        ("delivered", "events/s delivered (agentwire / peer)"),
        ("p99", "p99 latency (peer / agentwire)"),
        (
            "cpu_per_event",
            "CPU per delivered event (peer / agentwire)",
        ),
        ("bytes_per_conn", "memory per connection (peer / agentwire)"),
    ];
    for (server, _, _) in medians {
        let Some(m) = obj.get(server.name()) else {
            continue;
        };
        let at = m
            .get("common_rate")
            .and_then(Value::as_f64)
            .map(|r| format!("(latency and CPU at {r:.0} events/s, the highest step both passed) "))
            .unwrap_or_default();
        let parts: Vec<String> = names
            .iter()
            .filter_map(|(k, label)| {
                let v = m.get(*k)?;
                Some(match v.as_f64() {
                    Some(x) => format!("{label} x{x:.2}"),
                    None => format!("{label} n/a"),
                })
            })
            .collect();
        lines.push(format!(
            "    vs {:<7} {at}{}",
            server.name(),
            parts.join("; ")
        ));
    }
    lines
}

/// Per figure and per row: (offered rate, p99 us, CPU %, within the bound) of ramp steps.
type Step = (f64, f64, f64, bool);

/// The highest offered rate both `a` and `b` passed: their steps there.
fn common_step(a: &[Step], b: &[Step]) -> Option<(Step, Step)> {
    a.iter()
        .filter(|x| x.3)
        .filter_map(|x| {
            b.iter()
                .find(|y| y.3 && (y.0 - x.0).abs() < 1.0)
                .map(|y| (*x, *y))
        })
        .max_by(|x, y| x.0 .0.total_cmp(&y.0 .0))
}

/// Every server's figures as a ratio to the kernel floor's (`{}` without a floor run):
/// `rate` server / floor (the sustainable rate of ramp, events/s delivered otherwise;
/// 1 = all the kernel allows), `cpu_per_event` and `p99` server / floor (ramp: at the
/// highest offered rate both passed).
fn floor_ratios(scenario: &str, medians: &[Median]) -> Value {
    let Some(fl) = medians
        .iter()
        .find(|m| m.0 == ServerKind::Floor)
        .and_then(|m| m.1.as_ref().map(|c| c.0.clone()))
    else {
        return json!({});
    };
    if scenario == "idle" {
        return json!({});
    }
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => {
            Some((a / b * 100.0).round() / 100.0)
        }
        _ => None,
    };
    let per_event = |r: &Row| match (r.cpu, r.delivered) {
        (Some(c), Some(d)) if d > 0.0 => Some(c / d),
        _ => None,
    };
    let mut out = Map::new();
    for (server, chosen, _) in medians {
        if *server == ServerKind::Floor {
            continue;
        }
        let Some((p, _)) = chosen else { continue };
        let mut m = Map::new();
        if scenario == "ramp" {
            m.insert("rate".into(), json!(div(p.sustainable, fl.sustainable)));
            let common = common_step(&p.steps, &fl.steps);
            m.insert("common_rate".into(), json!(common.map(|c| c.0 .0)));
            // Same offered rate, so CPU % is CPU per event.
            m.insert(
                "cpu_per_event".into(),
                json!(common.and_then(|(a, b)| div(Some(a.2), Some(b.2)))),
            );
            m.insert(
                "p99".into(),
                json!(common.and_then(|(a, b)| div(Some(a.1), Some(b.1)))),
            );
        } else {
            m.insert("rate".into(), json!(div(p.delivered, fl.delivered)));
            m.insert(
                "cpu_per_event".into(),
                json!(div(per_event(p), per_event(&fl))),
            );
            m.insert("p99".into(), json!(div(p.p99, fl.p99)));
        }
        out.insert(server.name().into(), Value::Object(m));
    }
    Value::Object(out)
}

fn floor_lines(medians: &[Median], ratios: &Value) -> Vec<String> {
    let Some(obj) = ratios.as_object().filter(|o| !o.is_empty()) else {
        return Vec::new();
    };
    let mut lines = vec![
        "  against the kernel floor (server / floor; rate 1 = all the kernel allows, CPU per event: times the bare writes' cost):"
            .to_owned(),
    ];
    for (server, _, _) in medians {
        let Some(m) = obj.get(server.name()) else {
            continue;
        };
        let f = |k: &str| {
            m.get(k)
                .and_then(Value::as_f64)
                .map_or("n/a".to_owned(), |x| format!("x{x:.2}"))
        };
        let at = m
            .get("common_rate")
            .and_then(Value::as_f64)
            .map(|r| format!(" (CPU and p99 at {r:.0} events/s, the highest step both passed)"))
            .unwrap_or_default();
        lines.push(format!(
            "    {:<9} rate {}; CPU per delivered event {}; p99 {}{at}",
            server.name(),
            f("rate"),
            f("cpu_per_event"),
            f("p99")
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp_record(sustainable: Option<f64>, steps: &[(f64, u64, f64, bool)]) -> Value {
        json!({
            "scenario": "ramp",
            "connections": 30,
            "bytes_per_conn": 1000,
            "sustainable_rate": sustainable,
            "steps": steps.iter().map(|(rate, p99, cpu, pass)| json!({
                "rate_offered": rate,
                "rate_delivered": rate,
                "latency_us": {"p50": 100, "p99": p99, "p999": p99, "max": p99},
                "gateway_cpu_pct": cpu,
                "pass": pass,
            })).collect::<Vec<_>>(),
        })
    }

    /// One server's ramp median: its record (of `sustainable` and `steps`), its row,
    /// and the sustainable rate as the one rate seen.
    fn ramp_median(kind: ServerKind, sustainable: f64, steps: &[(f64, u64, f64, bool)]) -> Median {
        let rec = ramp_record(Some(sustainable), steps);
        (
            kind,
            Some((Row::from_record("ramp", &rec), rec)),
            vec![sustainable],
        )
    }

    #[test]
    fn ramp_row_takes_the_last_step_within_the_bound() {
        let r = ramp_record(
            Some(2000.0),
            &[
                (1000.0, 500, 10.0, true),
                (2000.0, 900, 20.0, true),
                (4000.0, 9000, 40.0, false),
            ],
        );
        let row = Row::from_record("ramp", &r);
        assert_eq!(row.sustainable, Some(2000.0));
        assert_eq!(row.offered, Some(2000.0));
        assert_eq!(row.p99, Some(900.0));
        assert_eq!(row.cpu, Some(20.0));
    }

    #[test]
    fn ramp_ratios_compare_latency_and_cpu_at_the_highest_common_passed_step() {
        let medians: Vec<Median> = vec![
            ramp_median(
                ServerKind::Agentwire,
                4000.0,
                &[
                    (1000.0, 500, 10.0, true),
                    (2000.0, 600, 20.0, true),
                    (4000.0, 800, 40.0, true),
                ],
            ),
            ramp_median(
                ServerKind::Tokio,
                2000.0,
                &[
                    (1000.0, 700, 15.0, true),
                    (2000.0, 1200, 30.0, true),
                    (4000.0, 9000, 90.0, false),
                ],
            ),
        ];
        let r = ratios("ramp", &medians);
        let t = &r["tokio"];
        assert_eq!(t["sustainable_rate"], json!(2.0));
        assert_eq!(t["common_rate"], json!(2000.0));
        assert_eq!(t["p99"], json!(2.0));
        assert_eq!(t["cpu_per_event"], json!(1.5));
        assert_eq!(t["bytes_per_conn"], json!(1.0));
    }

    #[test]
    fn floor_ratios_give_each_server_against_the_floor() {
        let medians: Vec<Median> = vec![
            ramp_median(
                ServerKind::Agentwire,
                2000.0,
                &[(1000.0, 500, 10.0, true), (2000.0, 600, 20.0, true)],
            ),
            ramp_median(
                ServerKind::Floor,
                4000.0,
                &[
                    (1000.0, 250, 4.0, true),
                    (2000.0, 300, 8.0, true),
                    (4000.0, 400, 16.0, true),
                ],
            ),
        ];
        let r = floor_ratios("ramp", &medians);
        let a = &r["agentwire"];
        assert_eq!(a["rate"], json!(0.5));
        assert_eq!(a["common_rate"], json!(2000.0));
        assert_eq!(a["cpu_per_event"], json!(2.5));
        assert_eq!(a["p99"], json!(2.0));
        assert!(r.get("floor").is_none());
        // The floor is no peer of agentwire's ratios.
        assert_eq!(ratios("ramp", &medians), json!({}));
        assert_eq!(floor_ratios("ramp", &medians[..1]), json!({}));
    }

    #[test]
    fn no_ratios_without_agentwire() {
        let medians: Vec<Median> = vec![ramp_median(
            ServerKind::Node,
            2000.0,
            &[(2000.0, 900, 20.0, true)],
        )];
        assert_eq!(ratios("ramp", &medians), json!({}));
    }

    #[test]
    fn compare_flags_are_found_with_and_without_a_value_sign() {
        let args: Vec<String> = ["--users", "3", "--driver=publish"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(scenario_has(&args, "--driver"));
        assert!(!scenario_has(&args, "--server"));
    }
}
