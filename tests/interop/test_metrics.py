#!/usr/bin/env python3
"""Metrics checks: agentwire's /metrics read by Prometheus's own text parser.

Starts the RELEASE gateway binary (as tests/interop/test_interop.py does, whose gateway
and client helpers it reuses) with a short run watchdog

    AGENTWIRE_RUN_IDLE_TIMEOUT_MS=1500 agentwire serve --listen 127.0.0.1:PORT
        --jwt-secret S --publish-key K --demo-agent true

and parses `GET /metrics` with `prometheus_client.parser.text_string_to_metric_families`
(the pinned `prometheus_client` of tools/requirements-test.txt). Checks:

    histograms_valid     every histogram family: ascending `le`, cumulative buckets,
                         `+Inf` bucket == `_count`, a `_sum`; the five latency/run
                         histograms are there, no summary is left
    run_completed        a demo run (user_message over a WebSocket): runs started +1,
                         ended{completed} +1, one run duration, one user_message-to-first-
                         event and one tool duration observed, in flight back where it was
    run_cancelled        a demo run cancelled by its client: ended{cancelled} +1
    run_error            a published run ending with agent_error: ended{error} +1; its
                         tool call paired by tool_call_id; in flight +1 while it runs
    run_timeout          a published run left silent: the watchdog ends it,
                         ended{run_timeout} +1
    grafana_dashboard    docs/grafana/agentwire.json is valid JSON, and every agentwire_
                         metric its queries use is in this gateway's /metrics

Checks run one after another on one gateway, so the deltas are exact. Prints one
`PASS name: ...` / `FAIL name: reason` line per check and `N passed, M failed` alone on
the last line; exits 1 on any failure.

    target/test-venv/bin/python tests/interop/test_metrics.py [--bin PATH] [FILTER...]
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:  # pragma: no cover - environment problem, not a check
    print(f"metrics: missing Python package ({e}); run `bash tools/test.sh`, which installs "
          "tools/requirements-test.txt into target/test-venv", file=sys.stderr)
    print("0 passed, 1 failed")
    sys.exit(1)

from test_interop import (  # noqa: E402 - after the path set-up
    REPO, CheckFailed, Deadline, Gateway, diag, expect, finish, mint, recv_json, run_one, setup_failed,
    short, suite_args,
)

RUN_IDLE_TIMEOUT_MS = 1500
HISTOGRAMS = ("agentwire_emit_to_write_latency_seconds", "agentwire_loop_iteration_seconds",
              "agentwire_run_duration_seconds", "agentwire_run_first_event_seconds",
              "agentwire_tool_duration_seconds")
# The run histograms (the gateway's own latencies move with any traffic: not compared).
RUN_HISTOGRAMS = HISTOGRAMS[2:]
OUTCOMES = ("completed", "error", "run_timeout", "worker_dropped", "cancelled")
DASHBOARD = os.path.join(REPO, "docs", "grafana", "agentwire.json")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(gw: Gateway) -> tuple[list[Any], Samples, str]:
    """GET /metrics parsed: the families, every sample by (name, sorted labels), the text."""
    status, raw = gw.request("GET", "/metrics")
    expect(status == 200, f"GET /metrics: {status}")
    text = raw.decode()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # noqa: BLE001 - the parser's own complaint is the finding
        raise CheckFailed(f"prometheus_client cannot parse /metrics: {type(e).__name__}: {e}") from None
    samples: Samples = {}
    for fam in families:
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples, text


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    expect(key in samples, f"no sample {name}{labels or ''} in /metrics")
    return samples[key]


def figures(gw: Gateway) -> dict[str, float]:
    """The run figures the checks compare before and after."""
    _, s, _ = scrape(gw)
    out = {
        "started": value(s, "agentwire_runs_started_total"),
        "in_flight": value(s, "agentwire_runs_in_flight"),
        "timed_out": value(s, "agentwire_runs_timed_out_total"),
    }
    for o in OUTCOMES:
        out[o] = value(s, "agentwire_runs_ended_total", outcome=o)
    for h in RUN_HISTOGRAMS:
        out[h] = value(s, h + "_count")
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


def expect_delta(before: dict[str, float], after: dict[str, float], want: dict[str, float]) -> str:
    got = delta(before, after)
    expect(got == want, f"expected the run figures to change by {want}, they changed by {got}")
    return f"changed by {got}"


class Ctx:
    def __init__(self, gw: Gateway):
        self.gw = gw
        self.n = 0

    def user(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}-{uuid.uuid4().hex[:6]}"


def frames_until(ws: Any, types: tuple[str, ...], what: str, seconds: float = 10.0) -> dict:
    d = Deadline(seconds)
    while True:
        f = recv_json(ws, d.remaining(), what)
        if f.get("type") in types:
            return f


def demo_run(ctx: Ctx, cancel: bool) -> dict:
    """A demo run over a WebSocket: its last frame (agent_completed, or agent_error when
    cancelled after agent_started)."""
    user = ctx.user("m-demo")
    ws = ctx.gw.open(mint(ctx.gw.secret, user))
    try:
        frames_until(ws, ("connected",), "connected")
        ws.send(json.dumps({"type": "user_message", "thread_id": "t1", "text": "metrics?", "ref": "m1"}))
        ack = frames_until(ws, ("ack", "error"), "ack")
        expect(ack.get("type") == "ack", f"user_message answered {short(ack)}")
        frames_until(ws, ("agent_started",), "agent_started")
        if cancel:
            ws.send(json.dumps({"type": "cancel", "run_id": ack["run_id"]}))
        return frames_until(ws, ("agent_completed", "agent_error"), "the run's end")
    finally:
        ws.close()


def publish_run_event(ctx: Ctx, user: str, run: str, kind: str, data: dict) -> None:
    ctx.gw.publish([{"type": kind, "user_id": user, "thread_id": None, "run_id": run,
                     "agent_name": "metrics_check", "data": data}])


# ---------------------------------------------------------------------------
# Checks


def check_histograms_valid(ctx: Ctx) -> str:
    demo_run(ctx, cancel=False)  # something in every histogram
    families, samples, text = scrape(ctx.gw)
    kinds = {f.name: f.type for f in families}
    for name in HISTOGRAMS:
        expect(kinds.get(name) == "histogram", f"{name}: type {kinds.get(name)!r}, want histogram")
    summaries = [n for n, t in kinds.items() if t == "summary"]
    expect(not summaries, f"summaries left in /metrics: {summaries}")
    expect("quantile=" not in text, "a quantile label is left in /metrics")
    checked = 0
    for fam in families:
        if fam.type != "histogram":
            continue
        buckets = [(s.labels.get("le"), s.value) for s in fam.samples if s.name == fam.name + "_bucket"]
        expect(buckets, f"{fam.name}: no _bucket samples")
        les = [float(le) for le, _ in buckets]  # "+Inf" parses as inf
        expect(les == sorted(les) and len(set(les)) == len(les), f"{fam.name}: le not ascending: {les}")
        expect(math.isinf(les[-1]), f"{fam.name}: the last bucket is not +Inf")
        counts = [v for _, v in buckets]
        expect(all(a <= b for a, b in zip(counts, counts[1:])), f"{fam.name}: buckets not cumulative: {counts}")
        count = value(samples, fam.name + "_count")
        total = value(samples, fam.name + "_sum")
        expect(counts[-1] == count, f"{fam.name}: +Inf bucket {counts[-1]} != _count {count}")
        expect(total >= 0, f"{fam.name}: _sum {total}")
        checked += 1
    for name in HISTOGRAMS:
        expect(value(samples, name + "_count") >= 1, f"{name}: nothing observed after a demo run")
    return f"{checked} histograms parsed and valid; {len(families)} families in all"


def check_run_completed(ctx: Ctx) -> str:
    before = figures(ctx.gw)
    last = demo_run(ctx, cancel=False)
    expect(last["type"] == "agent_completed", f"the demo run ended with {short(last)}")
    after = figures(ctx.gw)
    return expect_delta(before, after, {
        "started": 1, "completed": 1,
        "agentwire_run_duration_seconds": 1, "agentwire_run_first_event_seconds": 1,
        "agentwire_tool_duration_seconds": 1,
    })


def check_run_cancelled(ctx: Ctx) -> str:
    before = figures(ctx.gw)
    last = demo_run(ctx, cancel=True)
    expect(last["type"] == "agent_error" and last["data"].get("reason") == "cancelled",
           f"the cancelled demo run ended with {short(last)}")
    after = figures(ctx.gw)
    got = delta(before, after)
    for k in ("started", "cancelled", "agentwire_run_duration_seconds", "agentwire_run_first_event_seconds"):
        expect(got.get(k) == 1, f"{k} should move by 1: changed by {got}")
    for k in ("completed", "error", "run_timeout", "worker_dropped", "in_flight"):
        expect(k not in got, f"{k} should not move: changed by {got}")
    return f"changed by {got}"


def check_run_error(ctx: Ctx) -> str:
    user, run = ctx.user("m-err"), f"r-err-{uuid.uuid4().hex[:8]}"
    before = figures(ctx.gw)
    publish_run_event(ctx, user, run, "agent_started", {})
    publish_run_event(ctx, user, run, "tool_executing", {"tool": "sql", "tool_call_id": "c1"})
    publish_run_event(ctx, user, run, "tool_executing", {"tool": "web", "tool_call_id": "c2"})
    publish_run_event(ctx, user, run, "tool_completed", {"tool": "web", "tool_call_id": "c2"})
    running = figures(ctx.gw)
    expect_delta(before, running, {"started": 1, "in_flight": 1, "agentwire_tool_duration_seconds": 1})
    publish_run_event(ctx, user, run, "agent_error", {"message": "the database is down"})
    after = figures(ctx.gw)
    return expect_delta(before, after, {"started": 1, "error": 1, "agentwire_run_duration_seconds": 1,
                                        "agentwire_tool_duration_seconds": 1})


def check_run_timeout(ctx: Ctx) -> str:
    user, run = ctx.user("m-idle"), f"r-idle-{uuid.uuid4().hex[:8]}"
    before = figures(ctx.gw)
    publish_run_event(ctx, user, run, "agent_started", {})
    d = Deadline(RUN_IDLE_TIMEOUT_MS / 1000 + 8)
    after = figures(ctx.gw)
    while after["run_timeout"] == before["run_timeout"] and not d.expired():
        time.sleep(0.2)
        after = figures(ctx.gw)
    return expect_delta(before, after, {"started": 1, "run_timeout": 1, "timed_out": 1,
                                        "agentwire_run_duration_seconds": 1})


def check_grafana_dashboard(ctx: Ctx) -> str:
    try:
        with open(DASHBOARD, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckFailed(f"{DASHBOARD}: {e}") from None
    panels = dash.get("panels")
    expect(isinstance(panels, list) and panels, "the dashboard has no panels")
    exprs = [t.get("expr", "") for p in panels for t in p.get("targets", [])]
    expect(all(exprs), "a panel target without an expr")
    exprs += [v.get("definition", "") for v in dash.get("templating", {}).get("list", [])]
    used = sorted({m for e in exprs for m in re.findall(r"agentwire_[a-z0-9_]+", e)})
    families, samples, _ = scrape(ctx.gw)
    # Sample names, and every family's name as exposed (a labelled counter has no
    # sample before its first count; the parser drops a counter's `_total`).
    exported = {name for name, _ in samples}
    exported |= {f.name + ("_total" if f.type == "counter" else "") for f in families}
    missing = [m for m in used if m not in exported]
    expect(not missing, f"the dashboard queries metrics /metrics does not have: {missing}")
    return f"{len(panels)} panels, {len(exprs)} queries over {len(used)} metrics, all exported"


CHECKS: list[tuple[Callable[[Ctx], str], float]] = [
    (check_histograms_valid, 20.0),
    (check_run_completed, 20.0),
    (check_run_cancelled, 20.0),
    (check_run_error, 20.0),
    (check_run_timeout, 20.0),
    (check_grafana_dashboard, 10.0),
]


def main() -> None:
    args = suite_args(__doc__)
    log_dir = tempfile.mkdtemp(prefix="agentwire-metrics-")
    diag(f"binary {args.bin}; gateway log in {log_dir}")
    # Gateway.start passes this process's environment on: the short watchdog.
    os.environ["AGENTWIRE_RUN_IDLE_TIMEOUT_MS"] = str(RUN_IDLE_TIMEOUT_MS)
    os.environ.setdefault("AGENTWIRE_INTEROP_RUST_LOG", "info")
    gw = Gateway(args.bin, "metrics", log_dir)

    def on_signal(signum: int, _frame: Any) -> None:
        gw.stop(3.0)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        gw.start()
    except (RuntimeError, OSError) as e:
        gw.stop(3.0)
        setup_failed(e)
    ctx = Ctx(gw)
    passed = failed = 0
    for fn, timeout in CHECKS:
        name = fn.__name__.removeprefix("check_")
        if args.filters and not any(f in name for f in args.filters):
            continue
        ok, detail = run_one(fn, ctx, timeout)
        print(f"PASS {name}: {detail}" if ok else f"FAIL {name}: {detail}", flush=True)
        passed += ok
        failed += not ok
    gw.stop(5.0)
    finish(passed, failed, [gw])


if __name__ == "__main__":
    main()
