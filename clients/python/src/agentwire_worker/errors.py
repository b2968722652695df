"""The exceptions of agentwire_worker.

Every error the package raises on purpose derives from :class:`AgentwireError`.
Bad arguments (an event type outside ``^[a-z][a-z0-9_]{0,63}$``, an empty user id,
data that is not JSON-serializable) raise the built-in ``ValueError`` / ``TypeError``
at the call, before anything is queued.
"""

from __future__ import annotations

from typing import Any


class AgentwireError(Exception):
    """Base class of the package's own errors."""


class PublishError(AgentwireError):
    """Events could not be published: the gateway refused them (4xx) or could not be
    reached within the retries (connection errors, timeouts, 503).

    Attributes:
        status: the HTTP status of the last answer, or None when no answer came.
        code: the gateway's ``error`` code (``bad_event``, ``invalid_key``,
            ``too_many_runs``, ``payload_too_large``, ...), or None.
        message: the gateway's ``message`` or a description of the transport error.
        index: the ``index`` the gateway named in the refused request, if any.
        run_id, user_id: the run whose events failed, when known.
        events: how many events this failure covers (for this run).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        index: int | None = None,
        run_id: str | None = None,
        user_id: str | None = None,
        events: int = 0,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.index = index
        self.run_id = run_id
        self.user_id = user_id
        self.events = events
        self.body = body

    def for_run(self, user_id: str, run_id: str, events: int) -> "PublishError":
        """A copy naming one run (the same class)."""
        err = type(self)(
            self.message,
            status=self.status,
            code=self.code,
            index=self.index,
            run_id=run_id,
            user_id=user_id,
            events=events,
            body=self.body,
        )
        err.__cause__ = self.__cause__
        return err

    def __str__(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(str(self.status))
        if self.code:
            parts.append(self.code)
        head = " ".join(parts)
        where = f" (run {self.run_id!r})" if self.run_id else ""
        return f"{head}: {self.message}{where}" if head else f"{self.message}{where}"


class TooManyRunsError(PublishError):
    """429 ``too_many_runs``: the gateway refused to start the run (its user already has
    ``max_active_runs_per_user`` runs in progress, or the gateway ``max_active_runs``).
    Never retried: it is a 4xx."""


class RunEndedError(AgentwireError, RuntimeError):
    """An event was emitted on a run that already sent ``agent_completed`` or
    ``agent_error``."""


class QueueFullError(PublishError):
    """The publisher's queue stayed full (``max_queue`` events waiting) for
    ``timeout_s``: the gateway is not taking events as fast as they are emitted."""


class PublisherClosedError(AgentwireError, RuntimeError):
    """The publisher was closed; nothing more can be emitted."""


class InboundError(AgentwireError, ValueError):
    """A webhook request (PROTOCOL.md section 6b) was refused by :func:`parse_inbound`."""


class InboundAuthError(InboundError):
    """Missing or wrong ``Authorization: Bearer <key>``: answer 401."""


class InboundBodyError(InboundError):
    """The body is not a JSON object with the expected fields: answer 400."""
