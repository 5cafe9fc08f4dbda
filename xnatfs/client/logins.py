"""What the connection remembers about logins between requests, apart from
the session itself: the hold after a refused login, and the sessions shared
with other processes. Neither sends anything; :mod:`.connection` logs in."""

from __future__ import annotations

import logging
import math

import trio

from ..credentials import SessionCache
from ..errors import AuthenticationFailed

log = logging.getLogger("xnatfs.client")  # one logger for the package, as before the split

# After XNAT refuses a login, no other is tried for this long (doubling up to the
# maximum while it keeps refusing): XNAT locks an account after a number of
# failed logins, and a mount whose password changed would send one per call.
LOGIN_HOLD_INITIAL = 60.0
LOGIN_HOLD_MAX = 900.0


class LoginHold:
    """No login for a while after a refused one (:data:`LOGIN_HOLD_INITIAL`)."""

    def __init__(self, site: str, user: str) -> None:
        self._site = site
        self._user = user
        self._refusal: AuthenticationFailed | None = None  # the last refusal...
        self._until = -math.inf                            # ...in force until then
        self._length = LOGIN_HOLD_INITIAL

    def check(self) -> None:
        """Raise the last refusal again while its hold lasts."""
        if self._refusal is not None and trio.current_time() < self._until:
            raise self._refusal

    def refused(self, refusal: AuthenticationFailed) -> None:
        self._refusal = refusal
        self._until = trio.current_time() + self._length
        log.warning("%s refused the login of %s (%s): no other attempt for %.0f s, so that "
                    "the account is not locked; until then every operation fails with "
                    "'Permission denied' (password changed? remount with the new one)",
                    self._site, self._user, refusal, self._length)
        self._length = min(self._length * 2, LOGIN_HOLD_MAX)

    def accepted(self) -> None:
        self._refusal, self._length = None, LOGIN_HOLD_INITIAL


class SharedSessions:
    """One site's and user's entry in the :class:`~xnatfs.credentials.SessionCache`
    (if any), read and written in a worker thread. A cache file that cannot be
    read or written costs a login at worst, never an operation: it is logged."""

    def __init__(self, cache: SessionCache | None, site: str, user: str) -> None:
        self._cache = cache
        self._site = site
        self._user = user

    async def get(self) -> str | None:
        if self._cache is None:
            return None
        try:
            return await trio.to_thread.run_sync(self._cache.get, self._site, self._user)
        except OSError as exc:
            log.warning("cannot read the session cache: %s", exc)
            return None

    async def put(self, session_id: str) -> None:
        if self._cache is None:
            return
        try:
            await trio.to_thread.run_sync(self._cache.put, self._site, self._user, session_id)
        except OSError as exc:
            log.warning("cannot write the session cache: %s", exc)

    async def discard(self, session_id: str) -> None:
        if self._cache is None:
            return
        try:
            await trio.to_thread.run_sync(self._cache.discard, self._site, session_id)
        except OSError as exc:
            log.warning("cannot update the session cache: %s", exc)
