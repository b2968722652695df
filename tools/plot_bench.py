#!/usr/bin/env python3
"""Plots emit-to-receive latency (p50, p99) against offered rate for agentwire and each
comparison peer, from the step records of `loadgen ramp` runs, into a PNG.

    # from records already made (a `loadgen compare ... ramp --json F` file, `loadgen
    # ramp --json F` files, or logs holding their `JSON {...}` lines):
    target/peers-venv/bin/python tools/plot_bench.py cmp-ramp.json -o docs/bench-latency-vs-rate.png

    # or let it run the sweep (loadgen compare ... ramp) first:
    target/peers-venv/bin/python tools/plot_bench.py --sweep --servers agentwire,tokio,node,bun,python,floor \\
        --sweep-args "--users 1000 --start-rate 1000 --factor 1.5 --step-s 3 --bound 1s --max-steps 9 --pin-gateway 0 --pin-load 1" \\
        --save-json target/sweep.json -o docs/bench-latency-vs-rate.png

matplotlib is pinned in tools/peers/requirements-plot.txt; `bash tools/peers/setup.sh
--plot` installs it into target/peers-venv. Several runs of one server (`compare --repeat N`) are drawn as their median over the
steps every run reached, each run's own p99 faint beside it; steps that lost events are
marked x.
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ORDER = ["agentwire", "tokio", "node", "bun", "python", "floor"]
COLORS = {"agentwire": "#d62728", "tokio": "#1f77b4", "node": "#2ca02c", "bun": "#ff7f0e",
          "python": "#9467bd", "floor": "#7f7f7f"}
LABELS = {
    "agentwire": "agentwire (mio, one reactor thread)",
    "tokio": "tokio + tokio-tungstenite",
    "node": "Node 20 + ws",
    "bun": "Bun.serve (uWebSockets)",
    "python": "Python asyncio + websockets",
    "floor": "kernel floor (one writev per connection per request)",
}


def records_from_file(path: Path):
    """Every loadgen record in a file: a JSON document, or lines starting with 'JSON '."""
    text = path.read_text()
    docs = []
    try:
        docs.append(json.loads(text))
    except ValueError:
        for line in text.splitlines():
            if line.startswith("JSON "):
                docs.append(json.loads(line[5:]))
    out = []
    for d in docs:
        if d.get("compare"):
            out.extend(r["record"] for r in d.get("runs", []) if r.get("record"))
        else:
            out.append(d)
    return out


def server_of(record):
    ran = record.get("ran") or {}
    return ran.get("server") or "agentwire"


def collect(records):
    """server -> list of runs, each {rate: (p50_ms, p99_ms, lost)} (a retried step: its
    last try); and the ramp bound (us)."""
    runs = defaultdict(list)
    bound = None
    for r in records:
        if r.get("scenario") != "ramp":
            continue
        bound = bound or r.get("bound_us")
        steps = {}
        for st in r.get("steps", []):
            lat = st.get("latency_us") or {}
            if "p50" in lat and "p99" in lat:
                steps[st["rate_offered"]] = (lat["p50"] / 1000.0, lat["p99"] / 1000.0, st.get("lost", 0))
        if steps:
            runs[server_of(r)].append(steps)
    return runs, bound


def medians(server_runs):
    """[(rate, p50, p99, lost)] over the rates every run reached (medians of the runs)."""
    common = set.intersection(*(set(r) for r in server_runs))
    out = []
    for rate in sorted(common):
        vals = [r[rate] for r in server_runs]
        out.append((rate, statistics.median(v[0] for v in vals),
                    statistics.median(v[1] for v in vals), max(v[2] for v in vals)))
    return out


def plot(runs, bound_us, out: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(11, 5.8), dpi=120)
    servers = sorted(runs, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))
    for s in servers:
        color = COLORS.get(s, None)
        n = len(runs[s])
        for one in runs[s]:
            # Every run's own p99 curve, faint: where it went past the bound.
            xs = sorted(one)
            ax.plot(xs, [one[x][1] for x in xs], "-", color=color, lw=0.8, alpha=0.3)
        rows = medians(runs[s])
        x = [r[0] for r in rows]
        what = f"median of {n} runs" if n > 1 else "1 run"
        ax.plot(x, [r[2] for r in rows], "-o", color=color, ms=4, lw=2,
                label=f"{LABELS.get(s, s)}: p99 ({what})")
        ax.plot(x, [r[1] for r in rows], "--", color=color, alpha=0.8,
                label=f"{LABELS.get(s, s)}: p50")
        lossy = [(x, one[x][1]) for one in runs[s] for x in one if one[x][2] > 0]
        if lossy:
            ax.plot([p[0] for p in lossy], [p[1] for p in lossy], "x", color=color, ms=10, mew=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if bound_us:
        ax.axhline(bound_us / 1000.0, color="grey", lw=0.8, ls=":")
        ax.text(ax.get_xlim()[1], bound_us / 1000.0, f"ramp bound {bound_us / 1000.0:g} ms ",
                va="bottom", ha="right", fontsize=8, color="grey")
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if str(int(v))[0] in "25" else ""))
    ax.yaxis.set_major_formatter(plain)
    ax.set_xlabel("offered rate (events/s; each event to 3 connections)")
    ax.set_ylabel("emit-to-receive latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.text(0.99, 0.01, "bold: median over the steps every run reached; faint: each run's p99; "
             "x: a step that lost events", ha="right", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"plot_bench: wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", type=Path, help="compare/ramp JSON files or logs")
    ap.add_argument("-o", "--output", type=Path, default=Path("docs/bench-latency-vs-rate.png"))
    ap.add_argument("--title", default=None, help="plot title (\\n for a line break)")
    ap.add_argument("--sweep", action="store_true", help="run `loadgen compare ... ramp` first")
    ap.add_argument("--loadgen", default="target/release/loadgen")
    ap.add_argument("--servers", default="agentwire,tokio,node,bun,python,floor")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--sweep-args",
        default="--users 1000 --start-rate 1000 --factor 1.5 --step-s 3 --bound 1s "
        "--max-steps 9 --pin-gateway 0 --pin-load 1",
        help="options of the ramp scenario for --sweep",
    )
    ap.add_argument("--save-json", type=Path, default=Path("target/plot-bench-sweep.json"))
    args = ap.parse_args()

    inputs = list(args.inputs)
    if args.sweep:
        args.save_json.parent.mkdir(parents=True, exist_ok=True)
        cmd = [args.loadgen, "compare", "--servers", args.servers, "--repeat", str(args.repeat),
               "--json", str(args.save_json), "ramp", *shlex.split(args.sweep_args)]
        print("plot_bench: " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
        rc = subprocess.run(cmd).returncode
        if rc not in (0, 1):
            sys.exit(f"plot_bench: loadgen compare failed (exit {rc})")
        inputs.append(args.save_json)
    if not inputs:
        sys.exit("plot_bench: give ramp/compare JSON files, or --sweep")
    records = [r for p in inputs for r in records_from_file(p)]
    runs, bound = collect(records)
    if not runs:
        sys.exit("plot_bench: no ramp steps in the inputs")
    title = args.title or "Latency vs offered rate (loadgen ramp; server on CPU 0, load on CPU 1)"
    plot(runs, bound, args.output, title.replace("\\n", "\n"))


if __name__ == "__main__":
    main()
