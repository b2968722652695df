"""The gateway's inbound webhook (PROTOCOL.md section 6b), worker side.

With ``inbound_url`` set, the gateway POSTs every ``user_message`` and ``cancel`` of a
client to the worker as JSON ``{"type","user_id","thread_id","run_id","text","ref",
"connection_id","node_id","ts"}`` with ``Authorization: Bearer <inbound_key>``.
:func:`parse_inbound` checks the key (in constant time) and the body, in any web
framework or in ``http.server``: answer 2xx when it returns (the client then gets its
``ack``), 401 on :class:`InboundAuthError`, 400 on :class:`InboundBodyError`.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from .errors import InboundAuthError, InboundBodyError

#: The two message types the gateway forwards.
INBOUND_TYPES = ("user_message", "cancel")
MAX_INBOUND_BYTES = 1 << 20


@dataclass(frozen=True)
class InboundMessage:
    """One user's message or cancel. ``type`` is ``"user_message"`` (start the run
    ``run_id`` the gateway acked, answering ``text``) or ``"cancel"`` (stop
    ``run_id``). Absent or null optional fields are None; ``ts`` is milliseconds since
    the Unix epoch."""

    type: str
    user_id: str
    thread_id: Optional[str]
    run_id: str
    text: Optional[str]
    ref: Optional[str]
    connection_id: Optional[str]
    node_id: Optional[str]
    ts: Optional[int]


def _header(headers: Any, name: str) -> Optional[str]:
    """A header from a mapping (any case), or a list of (name, value) pairs; bytes or
    str."""
    items = headers.items() if hasattr(headers, "items") else headers
    for k, v in items:
        if isinstance(k, bytes):
            k = k.decode("latin-1")
        if k.lower() == name:
            return v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return None


def check_key(headers: Any, key: str) -> None:
    """Raise InboundAuthError unless ``Authorization: Bearer <key>`` is present
    (compared in constant time)."""
    if not isinstance(key, str) or not key:
        raise ValueError("the inbound key must be a non-empty string")
    auth = _header(headers, "authorization")
    if auth is None:
        raise InboundAuthError("missing Authorization header")
    scheme, _, given = auth.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise InboundAuthError("Authorization is not a Bearer credential")
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise InboundAuthError("wrong inbound key")


def _opt_str(doc: Mapping[str, Any], name: str) -> Optional[str]:
    v = doc.get(name)
    if v is None or (v == "" and name in ("thread_id", "ref")):
        return None
    if not isinstance(v, str):
        raise InboundBodyError(f"{name} must be a string or null")
    return v


def parse_inbound(body: Union[bytes, bytearray, str], headers: Any, key: str) -> InboundMessage:
    """Check a webhook request and return its :class:`InboundMessage`.

    ``headers``: a mapping (any key case; ``dict``, ``http.server``'s
    ``self.headers``, Starlette's ``request.headers``) or a list of (name, value)
    pairs, str or bytes. ``key``: the gateway's ``inbound_key`` (default: its publish
    key). Raises :class:`InboundAuthError` (answer 401) before looking at the body,
    then :class:`InboundBodyError` (answer 400) for a body that is not a JSON object
    with a known ``type``, string ``user_id`` and ``run_id``.
    """
    check_key(headers, key)
    if isinstance(body, str):
        body = body.encode()
    if len(body) > MAX_INBOUND_BYTES:
        raise InboundBodyError(f"body over {MAX_INBOUND_BYTES} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InboundBodyError(f"body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InboundBodyError("body must be a JSON object")
    kind = doc.get("type")
    if kind not in INBOUND_TYPES:
        raise InboundBodyError(f"type must be one of {INBOUND_TYPES}, not {kind!r:.40}")
    for name in ("user_id", "run_id"):
        v = doc.get(name)
        if not isinstance(v, str) or not v:
            raise InboundBodyError(f"{name} must be a non-empty string")
    ts = doc.get("ts")
    if isinstance(ts, str) and ts.isdigit():
        ts = int(ts)
    if ts is not None and (not isinstance(ts, int) or isinstance(ts, bool)):
        raise InboundBodyError("ts must be an integer (milliseconds) or null")
    return InboundMessage(
        type=kind,
        user_id=doc["user_id"],
        thread_id=_opt_str(doc, "thread_id"),
        run_id=doc["run_id"],
        text=_opt_str(doc, "text"),
        ref=_opt_str(doc, "ref"),
        connection_id=_opt_str(doc, "connection_id"),
        node_id=_opt_str(doc, "node_id"),
        ts=ts,
    )
