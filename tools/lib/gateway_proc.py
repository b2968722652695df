"""A gateway process started by a measuring tool: a free port for it, wait until it
answers /health, stop it.

Shared by the Python tools that start `agentwire serve` themselves
(tools/tls_cost.py, tools/idle_hold.py, tools/redteam/*.py). They are run as scripts,
so each puts this folder on sys.path before `from gateway_proc import ...`.
Standard library only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the gateway's --listen)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, context=None, seconds: float = 10.0) -> bool:
    """Poll `{base}/health` (e.g. http://127.0.0.1:PORT) every 50 ms until it answers;
    False if it has not answered within `seconds`. `context`: an ssl.SSLContext for https."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1, context=context).read()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def stop(proc: subprocess.Popen, seconds: float = 10.0, pid: int | None = None) -> None:
    """SIGTERM the gateway (`pid`, when it is not `proc` itself but its child, e.g. under
    /usr/bin/time), wait up to `seconds` for `proc` to end, then SIGKILL `proc`."""
    if pid is None:
        proc.terminate()
    else:
        os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
