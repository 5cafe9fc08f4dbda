"""The ceilings one mount keeps towards its server: requests at once, requests
per second, and the pause a 429 or 503 with ``Retry-After`` asks for.

Every request of the client passes :meth:`RequestGate.slot` (in
:meth:`~.connection.XnatConnection._send`), so listings, downloads, uploads
and logins share one budget. XNAT runs in one Tomcat whose worker threads
(200 by default) serve every user: a pipeline fanned out over hundreds of
nodes must not take them all, nor be the reason XNAT answers 429.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..errors import XnatError

# A pause asked for by the server is stretched by up to this fraction, so that
# the mount's waiting requests (and many mounts told the same) do not return
# at the same instant.
PAUSE_JITTER = 0.1


class RequestGate:
    """Concurrency ceiling, token bucket and shared "not before" time of one client.

    Attributes:
        in_flight: requests holding a slot (sent, their answer not yet closed).
        queued: requests waiting for a slot, a token or the end of a pause.
    """

    def __init__(self, max_requests: int, rate: float, burst: int) -> None:
        """``max_requests`` at once (0: no ceiling); ``rate`` requests per second
        on average (0: no ceiling), of which ``burst`` may go at once."""
        self._slots = trio.Semaphore(max_requests) if max_requests > 0 else None
        self._rate = rate
        self._burst = max(1, burst)
        self._tokens = float(self._burst)
        self._refilled: float | None = None
        self._not_before = -math.inf  # trio.current_time() before which nothing is sent
        self._pause_cause: XnatError | None = None
        self.in_flight = 0
        self.queued = 0
        self.pauses = 0

    def pause(self, seconds: float, cause: XnatError) -> float:
        """Send nothing for ``seconds`` (a ``Retry-After``), jittered; returns the
        wait from now until sending resumes."""
        until = trio.current_time() + seconds * (1 + random.uniform(0, PAUSE_JITTER))
        if until > self._not_before:
            self._not_before = until
            self._pause_cause = cause
            self.pauses += 1
        return self.remaining_pause()

    def remaining_pause(self) -> float:
        return max(0.0, self._not_before - trio.current_time())

    @asynccontextmanager
    async def slot(self, give_up_at: float) -> AsyncIterator[Release]:
        """Wait for the pause to end, a token and a free slot; yield a
        :class:`Release` whose owner may keep the slot past the block
        (:meth:`Release.keep`, for an answer read later).

        ``give_up_at`` (``trio.current_time()``) bounds the wait: a pause that
        outlasts it raises the error that caused it at once, rather than
        sleeping to fail anyway.
        """
        self.queued += 1
        try:
            while True:
                await self._wait_pause(give_up_at)
                await self._take_token()
                if self._slots is not None:
                    await self._slots.acquire()
                if self.remaining_pause() <= 0:
                    break
                # A pause began while this request waited for its token or
                # slot (the answer that asked for it freed the slot): wait it out.
                if self._slots is not None:
                    self._slots.release()
        finally:
            self.queued -= 1
        release = Release(self)
        self.in_flight += 1
        try:
            yield release
        finally:
            if not release.kept:
                release()

    async def _wait_pause(self, give_up_at: float) -> None:
        while (wait := self._not_before - trio.current_time()) > 0:
            if self._not_before > give_up_at and self._pause_cause is not None:
                raise self._pause_cause
            await trio.sleep(wait)

    async def _take_token(self) -> None:
        """Take one token, waiting for it if the bucket is empty. Tokens may go
        below zero: each waiter reserves its own and sleeps until it is due,
        so waiters are served in order without polling."""
        if self._rate <= 0:
            return
        now = trio.current_time()
        if self._refilled is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        self._tokens -= 1
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self._rate)

    def _release(self) -> None:
        self.in_flight -= 1
        if self._slots is not None:
            self._slots.release()


class Release:
    """Gives a slot back, once; :meth:`keep` hands that duty to whoever holds
    the answer (a download read across many calls)."""

    def __init__(self, gate: RequestGate) -> None:
        self._gate: RequestGate | None = gate
        self.kept = False

    def keep(self) -> Release:
        self.kept = True
        return self

    def __call__(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._release()


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an
    HTTP-date (RFC 9110 10.2.3); None when absent or unreadable."""
    value = (value or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
