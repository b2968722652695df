"""Shared by the red-team tools (tools/redteam/*.py, run as scripts from any directory:
their own folder is first on sys.path): HS256 tokens and a process's resident memory."""

import base64
import hashlib
import hmac
import json


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hs256(claims: dict, secret: str) -> str:
    """A JWT signed with HS256 and `secret`."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


def rss_kib(pid: int) -> int:
    """VmRSS of process `pid` in KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
