"""The repository README's backend snippets run as printed against the real gateway.

Each snippet is taken from README.md (the first fenced block of its language after its
heading), pointed at the test gateway (its URL replaces http://127.0.0.1:8080, a test
user replaces demo-user) and run with AGENTWIRE_PUBLISH_KEY set, as a reader would; a
WebSocket client of that user must then see the whole run, started to completed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from conftest import PUBLISH_KEY, ROOT

README = (ROOT / "README.md").read_text()


def block(heading: str, lang: str) -> str:
    at = README.index(heading)
    start = README.index(f"```{lang}\n", at) + len(lang) + 4
    return README[start:README.index("\n```", start) + 1]


def adapt(code: str, gateway, user: str) -> str:
    assert "http://127.0.0.1:8080" in code and "demo-user" in code
    return code.replace("http://127.0.0.1:8080", gateway.url).replace("demo-user", user)


def run(cmd: list[str], code_env: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, AGENTWIRE_PUBLISH_KEY=PUBLISH_KEY, **code_env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def whole_run(ws) -> list[dict]:
    evs = []
    while not evs or evs[-1]["type"] not in ("agent_completed", "agent_error"):
        evs += ws.events(1)
    assert evs[0]["type"] == "agent_started", evs
    assert evs[-1]["type"] == "agent_completed", evs
    assert [e["seq"] for e in evs] == list(range(evs[0]["seq"], evs[0]["seq"] + len(evs)))
    assert len({e["run_id"] for e in evs}) == 1
    return evs


def test_python_backend_snippet(gateway, client_factory, tmp_path):
    ws = client_factory("readme-py")
    script = tmp_path / "run.py"
    script.write_text(adapt(block("## From a Python backend", "python"), gateway, "readme-py"))
    out = run([sys.executable, str(script)], {})
    assert out.returncode == 0, out.stderr
    evs = whole_run(ws)
    assert [e["type"] for e in evs] == ["agent_started", "agent_thinking", "tool_executing",
                                        "tool_completed"] + ["text_delta"] * 4 + ["agent_completed"]
    assert "".join(e["data"]["delta"] for e in evs if e["type"] == "text_delta") == "42 users signed up."


def test_node_backend_snippet(gateway, client_factory, tmp_path):
    node = shutil.which("node")
    assert node, "node is needed (Node 20: see README's set-up)"
    ws = client_factory("readme-node")
    script = tmp_path / "publish.mjs"
    script.write_text(adapt(block("## From a Node backend", "js"), gateway, "readme-node"))
    out = run([node, str(script)], {})
    assert out.returncode == 0, out.stderr
    run_id = re.fullmatch(r"published (r-node-\d+)\n", out.stdout).group(1)
    evs = whole_run(ws)
    assert {e["run_id"] for e in evs} == {run_id}
    assert [e["type"] for e in evs] == ["agent_started", "agent_thinking", "tool_executing",
                                        "tool_completed", "text_delta", "agent_completed"]
    # Its idempotency keys make the same script's retry harmless: replay it event by event.
    again = run([node, "--input-type=module", "-e",
                 script.read_text().replace("`r-node-${Date.now()}`", f'"{run_id}"')], {})
    assert again.returncode == 0, again.stderr
    assert ws.quiet(0.5) == [], "a retried request with the same keys is routed once"


def test_curl_snippet(gateway, client_factory):
    assert shutil.which("curl"), "curl is needed"
    ws = client_factory("readme-curl")
    cmd = adapt(block("## From a Node backend", "sh"), gateway, "readme-curl")
    out = run(["bash", "-c", cmd], {})
    assert out.returncode == 0, out.stderr
    assert '"accepted":3' in out.stdout, out.stdout
    evs = whole_run(ws)
    assert [e["data"] for e in evs][1] == {"delta": "Hello from curl."}
