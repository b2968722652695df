#!/usr/bin/env python3
"""Summarize kosoku (Autobahn|Testsuite) reports and compare them with expected.json.

Used by tools/autobahn.sh; see docs/CONFORMANCE.md.

    compare.py [--update] EXPECTED PROFILE=REPORT_DIR...

Each REPORT_DIR holds kosoku's Autobahn-format `index.json` for one gateway profile
(`{agent: {case_id: {"behavior", "behaviorClose", "remoteCloseCode", ...}}}`). The run's
summary (summary.json, or summary-tls.json for expected-tls.json) is, per case id: the profile it ran under, `behavior`, `behaviorClose` and the
close code the gateway sent (`remoteCloseCode`). It is written next to the reports as
summary.json, and compared field by field with EXPECTED:

- a case whose behavior is not OK, NON-STRICT or INFORMATIONAL, or whose close
  behavior is not OK or INFORMATIONAL (FAILED, UNIMPLEMENTED, ERROR, WRONG CODE,
  UNCLEAN, FAILED BY CLIENT, ...) fails the run, whatever EXPECTED says;
- a case missing from the run or from EXPECTED, or any field that differs, fails the
  run with a diff line.

The tally (cases per behavior and per close behavior) is printed either way. With
--update, EXPECTED is rewritten from the run, but only when every case is allowed.
Exit 0 when the run matches, 1 otherwise, 2 for bad input.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ALLOWED_BEHAVIOR = ("OK", "NON-STRICT", "INFORMATIONAL")
ALLOWED_CLOSE = ("OK", "INFORMATIONAL")
FIELDS = ("profile", "behavior", "behaviorClose", "remoteCloseCode")
HEADER = (
    "Expected Autobahn|Testsuite results of the conformance echo route, case id -> "
    "profile it runs under, behavior, close behavior, close code the gateway sent. "
    "Written by `bash tools/autobahn.sh --update`; see docs/CONFORMANCE.md."
)


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case_id.split("."))


def load_run(specs: list[str]) -> dict[str, dict]:
    run: dict[str, dict] = {}
    for spec in specs:
        profile, sep, directory = spec.partition("=")
        if not sep:
            raise SystemExit(f"compare.py: expected PROFILE=REPORT_DIR, got {spec!r}")
        index_path = Path(directory) / "index.json"
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            print(f"autobahn: no usable report for profile {profile}: {index_path}: {e}")
            raise SystemExit(1) from e
        for agent_cases in index.values():
            for case_id, r in agent_cases.items():
                if case_id in run:
                    print(f"autobahn: case {case_id} ran in two profiles "
                          f"({run[case_id]['profile']}, {profile})")
                    raise SystemExit(1)
                run[case_id] = {
                    "profile": profile,
                    "behavior": r.get("behavior"),
                    "behaviorClose": r.get("behaviorClose"),
                    "remoteCloseCode": r.get("remoteCloseCode"),
                }
    return dict(sorted(run.items(), key=lambda kv: case_key(kv[0])))


def tally(run: dict[str, dict]) -> str:
    behavior = Counter(r["behavior"] for r in run.values())
    close = Counter(r["behaviorClose"] for r in run.values())
    order = ["OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED", "ERROR"]
    names = order + sorted(k for k in behavior if k not in order)
    parts = [f"{n} {behavior.get(n, 0)}" for n in names if n in order or behavior.get(n)]
    close_parts = [f"{k} {v}" for k, v in sorted(close.items())]
    per_profile = Counter(r["profile"] for r in run.values())
    profiles = ", ".join(f"{p} {n}" for p, n in sorted(per_profile.items()))
    return (f"autobahn tally: {len(run)} cases ({profiles})\n"
            f"  behavior: {', '.join(parts)}\n"
            f"  close:    {', '.join(close_parts)}")


def not_allowed(run: dict[str, dict]) -> list[str]:
    bad = []
    for case_id, r in run.items():
        if r["behavior"] not in ALLOWED_BEHAVIOR or r["behaviorClose"] not in ALLOWED_CLOSE:
            bad.append(f"  {case_id} ({r['profile']}): behavior {r['behavior']}, "
                       f"close {r['behaviorClose']}, code {r['remoteCloseCode']}")
    return bad


def diff(expected: dict[str, dict], run: dict[str, dict]) -> list[str]:
    lines = []
    for case_id in sorted(set(expected) | set(run), key=case_key):
        want, got = expected.get(case_id), run.get(case_id)
        if want is None:
            lines.append(f"  + {case_id}: not in the expected file; got {json.dumps(got)}")
        elif got is None:
            lines.append(f"  - {case_id}: expected {json.dumps(want)}; did not run")
        else:
            for field in FIELDS:
                if want.get(field) != got.get(field):
                    lines.append(f"  ~ {case_id} {field}: expected {want.get(field)!r}, "
                                 f"got {got.get(field)!r}")
    return lines


def main(argv: list[str]) -> int:
    update = "--update" in argv
    args = [a for a in argv if a != "--update"]
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    expected_path, specs = Path(args[0]), args[1:]
    run = load_run(specs)
    if not run:
        print("autobahn: the reports hold no case")
        return 1
    # expected.json -> summary.json, expected-tls.json -> summary-tls.json.
    suffix = expected_path.stem.removeprefix("expected")
    summary_path = Path(specs[0].partition("=")[2]).parent / f"summary{suffix}.json"
    summary_path.write_text(json.dumps(run, indent=1) + "\n")
    print(tally(run))
    print(f"autobahn: per-case summary in {summary_path}")

    bad = not_allowed(run)
    if bad:
        print(f"autobahn: {len(bad)} case(s) not OK / NON-STRICT / INFORMATIONAL "
              f"(close OK / INFORMATIONAL):")
        print("\n".join(bad))
    if update:
        if bad:
            print(f"autobahn: --update refused: {expected_path} only holds allowed results")
            return 1
        # One case per line, so a change of behavior reads as a one-line diff.
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in run.items())
        text = f'{{\n "_about": {json.dumps(HEADER)},\n "cases": {{\n{rows}\n }}\n}}\n'
        expected_path.write_text(text)
        print(f"autobahn: wrote {len(run)} cases to {expected_path}")
        return 0

    try:
        expected = json.loads(expected_path.read_text())["cases"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"autobahn: cannot read {expected_path}: {e}")
        return 1
    lines = diff(expected, run)
    if lines:
        print(f"autobahn: {len(lines)} difference(s) from {expected_path} "
              f"(+ new case, - missing case, ~ changed field):")
        print("\n".join(lines))
    failed_ids = {line.split()[0] for line in bad}
    failed_ids |= {line.split()[1].rstrip(":") for line in lines}
    if bad or lines:
        print("autobahn: FAILED")
    else:
        print(f"autobahn: all {len(run)} cases match {expected_path}")
    cases = set(run) | set(expected)
    print(f"autobahn: {len(cases) - len(failed_ids)} passed, {len(failed_ids)} failed")
    return 1 if failed_ids else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
