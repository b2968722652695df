#!/usr/bin/env bash
# Dependency audit: cargo-audit (pinned, installed on first use) against the offline
# advisory database copy beside the checkout. Fails on any vulnerability advisory that
# affects a crate in Cargo.lock; exceptions need a written reason in .cargo/audit.toml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DB=${AGENTWIRE_ADVISORY_DB:-../shared/advisory-db}
VERSION=0.22.2
if [ ! -d "$DB" ]; then
    echo "audit: advisory database $DB not found" >&2
    exit 1
fi
if ! cargo audit --version 2>/dev/null | grep -q "$VERSION"; then
    echo "audit: installing cargo-audit $VERSION (takes a few minutes)"
    cargo install --locked --quiet cargo-audit --version "$VERSION"
fi
cargo audit --db "$DB" --no-fetch
