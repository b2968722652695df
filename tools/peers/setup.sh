#!/usr/bin/env bash
# Installs and builds the comparison peers (pinned), idempotent:
# - tools/peers/tokio: `cargo build --release --locked` (its own Cargo.lock), binary
#   target/release/peer-tokio (built in the repository's target/ so the crates it shares
#   with agentwire, aws-lc among them, are compiled once);
# - tools/peers/node: `npm ci` (package-lock.json) into tools/peers/node/node_modules;
# - tools/peers/bun: `npm ci` of the Bun binary package (@oven/bun-linux-x64, or the
#   -baseline build from tools/peers/bun/baseline when /proc/cpuinfo has no avx2), linked
#   as target/peer-bun (the binary comes from npm, nothing else is downloaded);
# - tools/peers/python: target/peers-venv with tools/peers/requirements.txt;
# - with --plot also matplotlib (tools/peers/requirements-plot.txt) for tools/plot_bench.py.
#
#   bash tools/peers/setup.sh [--plot] [--only tokio|node|bun|python]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
plot=0
only=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --plot) plot=1 ;;
        --only) only=$2; shift ;;
        *) echo "usage: $0 [--plot] [--only tokio|node|bun|python]" >&2; exit 2 ;;
    esac
    shift
done
want() { [[ -z "$only" || "$only" == "$1" ]]; }

if want tokio; then
    t0=$SECONDS
    (cd tools/peers/tokio && CARGO_TARGET_DIR="$PWD/../../../target" cargo build --release --locked --quiet)
    echo "peers setup: tokio built: target/release/peer-tokio ($((SECONDS - t0)) s)"
fi

if want node; then
    t0=$SECONDS
    command -v node >/dev/null || { echo "peers setup: node not found (Node 20 needed)" >&2; exit 1; }
    lock=tools/peers/node/package-lock.json
    stamp=tools/peers/node/node_modules/.setup-stamp
    if [[ ! -f $stamp || $lock -nt $stamp ]]; then
        (cd tools/peers/node && npm ci --no-audit --no-fund --loglevel=error)
        touch "$stamp"
    fi
    echo "peers setup: node ready: tools/peers/node (node $(node --version), $((SECONDS - t0)) s)"
fi

if want bun; then
    t0=$SECONDS
    command -v npm >/dev/null || { echo "peers setup: npm not found (Node 20 needed)" >&2; exit 1; }
    if grep -qw avx2 /proc/cpuinfo; then
        dir=tools/peers/bun pkg=bun-linux-x64
    else
        dir=tools/peers/bun/baseline pkg=bun-linux-x64-baseline
    fi
    stamp=$dir/node_modules/.setup-stamp
    if [[ ! -f $stamp || $dir/package-lock.json -nt $stamp ]]; then
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
        touch "$stamp"
    fi
    mkdir -p target
    ln -sfn "$PWD/$dir/node_modules/@oven/$pkg/bin/bun" target/peer-bun
    echo "peers setup: bun ready: target/peer-bun (@oven/$pkg $(target/peer-bun --version), $((SECONDS - t0)) s)"
fi

if want python; then
    t0=$SECONDS
    venv=target/peers-venv
    if [[ ! -x $venv/bin/python ]]; then
        python3 -m venv "$venv"
    fi
    reqs=(-r tools/peers/requirements.txt)
    if ((plot)); then reqs+=(-r tools/peers/requirements-plot.txt); fi
    stamp="$venv/.setup-stamp-$plot"
    if [[ ! -f $stamp || tools/peers/requirements.txt -nt $stamp || tools/requirements-test.txt -nt $stamp || tools/peers/requirements-plot.txt -nt $stamp ]]; then
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${reqs[@]}"
        touch "$stamp"
    fi
    echo "peers setup: python ready: $venv ($("$venv/bin/python" --version), $((SECONDS - t0)) s)"
fi
