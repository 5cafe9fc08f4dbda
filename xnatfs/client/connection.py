"""The connection to one XNAT site: the only module of the client that speaks HTTP.

It logs in (XNAT's JSESSION: reuse, renewal, the hold after a refused
login, the cache shared with other processes) and sends every request
through one primitive, :meth:`XnatConnection._send`, which owns retries,
backoff, the deadline and the mapping of answers to
:class:`~xnatfs.errors.XnatError`. The other modules of the package build on
:class:`XnatConnection` and reach the server only through ``_send`` and the
readers defined here (:func:`body_text`, :class:`OpenAnswer`...), so none of
them touches httpx.
"""

from __future__ import annotations

import base64
import http.cookiejar
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
)
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast
from urllib.parse import quote

import httpx
import trio

from .. import __version__
from ..credentials import Credentials, SessionCache
from ..errors import (
    AuthenticationFailed,
    HtmlAnswer,
    ServerError,
    Unanswered,
    Unreachable,
    XnatError,
)
from .answers import error_class, parse_json, status_page_message, table_rows
from .ceilings import Release, RequestGate, retry_after_seconds
from .logins import LoginHold, SharedSessions
from .sessionfile import SessionFile
from .settings import ClientSettings, operation_deadline
from .tls import tls_failure, verification

log = logging.getLogger("xnatfs.client")  # one logger for the package, as before the split

T = TypeVar("T")

USER_AGENT = f"xnatfs/{__version__} python-httpx/{httpx.__version__}"  # not a browser: 401, not 302

# Failures of the connection rather than of the request: worth another attempt.
TRANSPORT_FAILURES = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_ERROR_BODY_LIMIT = 64 * 1024
_IDLE_RENEWAL_FRACTION = 0.9  # renew a session idle for 90% of XNAT's timeout

_SESSION_EXPIRATION = re.compile(r'SESSION_EXPIRATION_TIME="?(\d+),(\d+)')
_JSESSIONID_COOKIE = re.compile(r"JSESSIONID=([^;\s]+)")
_SESSION_ID = re.compile(r"^[A-Za-z0-9._-]{8,256}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_PAUSING = frozenset({429, 503})  # answers whose Retry-After pauses the whole client
_RELEASE = "xnatfs.release"  # the response extension that carries its slot's Release
# RFC 3986 pchar plus "/": everything else in an XNAT path is percent-encoded
# ("[" and "]" too: Tomcat refuses them raw with 400).
_PATH_SAFE = "/:@!$&'()*+,;=~"


class XnatConnection:
    """A logged-in connection to one XNAT site, and the request primitive the
    calls of :class:`~xnatfs.client.XnatClient` share.

    Attributes:
        credentials: site, user and password; read only.
        settings: timeouts, retries and pool size; read only.

    ``_session_id``, ``_last_activity`` and ``_session_timeout`` describe the
    JSESSION; only ``_log_in`` replaces the session, under ``_login_lock``, so
    that a burst of 401s leads to one login.
    """

    def __init__(self, credentials: Credentials, *, settings: ClientSettings | None = None,
                 session_cache: SessionCache | None = None,
                 session_file: Path | None = None,
                 http: httpx.AsyncClient | None = None) -> None:
        """``session_cache`` shares sessions between processes (mounts, commands):
        a live session found there is used instead of logging in, and this
        client's own login is stored there. A session is logged out at the end
        only by the client that logged it in: one that borrowed it leaves it to
        the others still using it. ``session_file`` shares one session between
        the nodes of a cluster instead (:mod:`.sessionfile`); it is never
        logged out, other nodes may be using it. ``http`` is for tests (a mock transport); by
        default the client owns its pool."""
        self.credentials = credentials
        self.settings = settings or ClientSettings()
        self._base_url = credentials.url.rstrip("/")
        self._shared_sessions = SharedSessions(session_cache, self._base_url, credentials.user)
        self._session_reused = False  # the session in use came from the cache
        self._session_file = (SessionFile(session_file, self._base_url, credentials.user)
                              if session_file is not None else None)
        self._owns_http = http is None
        self._http = http or _new_http_client(self.settings)
        settings = self.settings
        self._upload_timeouts = httpx.Timeout(
            connect=settings.connect_timeout, read=settings.upload_answer_timeout,
            write=settings.read_timeout, pool=settings.deadline)
        self._down_timeouts = httpx.Timeout(min(settings.down_attempt_timeout,
                                                settings.read_timeout))
        self._login_lock = trio.Lock()
        self._gate = RequestGate(settings.max_requests, settings.max_request_rate,
                                 settings.request_burst)
        self._login_hold = LoginHold(self._base_url, credentials.user)
        self._session_id: str | None = None
        self._last_activity: float | None = None
        self._session_timeout: float | None = None
        self._server_down = False  # the last operation found no working server
        self._watched = False  # a watch_server task probes while it is down
        self._went_down = trio.Event()  # set when the server is found down
        self._counts: Counter[str] = Counter()
        self._answers: Counter[int] = Counter()  # answers by HTTP status (the status file)
        self.bytes_received = 0  # of files' bodies (ByteStream adds to it)
        self.session_since: float | None = None  # wall-clock time the session in use was adopted

    async def __aenter__(self) -> Self:
        try:
            await self.connect()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # ----------------------------------------------------------------- session
    async def connect(self) -> None:
        """Make sure there is a live session: reuse a cached one or log in.

        Raises:
            AuthenticationFailed: the credentials were refused.
        """
        await self._session_for_request()

    async def aclose(self) -> None:
        """Log out (``DELETE /data/JSESSION``), forget the cached session, close the pool.

        Logging out is best effort, bounded by ``connect_timeout`` and shielded
        from cancellation so that an unmount does not leave sessions behind.
        """
        session_id, self._session_id = self._session_id, None
        try:
            if session_id is not None and not self._session_reused:
                with trio.CancelScope(shield=True):
                    await self._shared_sessions.discard(session_id)
                with trio.move_on_after(self.settings.connect_timeout, shield=True):
                    try:
                        await self._send("DELETE", "/data/JSESSION", kind="session.logout",
                                         use_session=False, headers=_cookie(session_id),
                                         accept={401}, handle=discard_body)
                    except XnatError as exc:
                        log.warning("could not log out of %s: %s", self._base_url, exc)
        finally:
            if self._owns_http:
                await self._http.aclose()

    def statistics(self) -> dict[str, int]:
        """Requests sent, by kind (``files.stream``, ``session.login``...), and events:
        ``retries``, ``relogins``, ``sessions_reused``, ``range_ignored``, ``stream_resumes``,
        ``paused`` (a Retry-After honoured), ``pause_refusals`` (an operation failed
        because the pause outlasted its deadline)."""
        return dict(self._counts)

    def gate_state(self) -> dict[str, int]:
        """Requests now holding a slot (``in_flight``) and waiting for one
        (``queued``, a pause or the rate ceiling included)."""
        return {"in_flight": self._gate.in_flight, "queued": self._gate.queued}

    def answers(self) -> dict[int, int]:
        """Answers received, by HTTP status (every attempt, retried ones too)."""
        return dict(self._answers)

    async def _session_for_request(self) -> str:
        session_id = self._session_id
        if session_id is not None and not self._idle_too_long():
            return session_id
        async with self._login_lock:
            if self._session_id is None or self._idle_too_long():
                await self._log_in(rejected=self._session_id)
            assert self._session_id is not None
            return self._session_id

    async def _renew_session(self, rejected: str) -> None:
        """After a 401: log in again, unless another task already did."""
        async with self._login_lock:
            if self._session_id == rejected:
                self._counts["relogins"] += 1
                log.info("session on %s expired; logging in again", self._base_url)
                await self._log_in(rejected=rejected)

    def _idle_too_long(self) -> bool:
        if self._session_timeout is None or self._last_activity is None:
            return False
        idle = trio.current_time() - self._last_activity
        return idle > self._session_timeout * _IDLE_RENEWAL_FRACTION

    async def _log_in(self, rejected: str | None) -> None:
        if self._session_file is not None:
            await self._log_in_through_file(rejected)
            return
        cached = await self._shared_sessions.get()
        if cached is not None and cached != rejected and await self._session_is_alive(cached):
            self._counts["sessions_reused"] += 1
            self._adopt_session(cached)
            self._session_reused = True
            return
        session_id = await self._post_login()
        self._adopt_session(session_id)
        self._session_reused = False
        await self._shared_sessions.put(session_id)

    async def _log_in_through_file(self, rejected: str | None) -> None:
        """The cluster's shared session: the file's if XNAT knows it, else the
        one this node logs in and publishes (holding the claim), else the one
        another node publishes meanwhile, else (that node silent) our own."""
        assert self._session_file is not None
        shared = self._session_file
        published = await shared.read()
        if published is not None and published != rejected:
            if await self._session_is_alive(published):
                self._adopt_shared(published)
                return
            rejected = published
        if await shared.claim():
            fresh = await shared.read()
            if fresh is not None and fresh != rejected:  # published since we read it
                await shared.release()
                self._adopt_shared(fresh)
                return
            try:
                session_id = await self._post_login()
            except BaseException:
                with trio.CancelScope(shield=True):  # or the others wait out CLAIM_STALE
                    await shared.release()
                raise
            await shared.publish(session_id)
            self._adopt_session(session_id)
            self._session_reused = True  # published: other nodes use it, never logged out
            return
        published = await shared.wait_for_new(rejected)
        if published is not None:
            self._adopt_shared(published)
            return
        self._adopt_session(await self._post_login())
        self._session_reused = False

    def _adopt_shared(self, session_id: str) -> None:
        self._counts["sessions_reused"] += 1
        self._adopt_session(session_id)
        self._session_reused = True  # other nodes use it: never logged out here

    async def _post_login(self) -> str:
        """``POST /data/JSESSION`` with the credentials: a new session."""
        self._login_hold.check()
        try:
            session_id = await self._send(
                "POST", "/data/JSESSION", kind="session.login", use_session=False,
                headers={"Authorization": self._basic_authorization()},
                handle=_session_id_from)
        except AuthenticationFailed as exc:
            self._login_hold.refused(exc)
            raise
        self._login_hold.accepted()
        return session_id

    async def _session_is_alive(self, session_id: str) -> bool:
        """Whether XNAT still knows ``session_id`` (a guest session does not count)."""
        async def same_session(response: httpx.Response) -> bool:
            body = (await response.aread()).decode("utf-8", "replace").strip()
            return response.status_code == 200 and body == session_id

        return await self._send("GET", "/data/JSESSION", kind="session.check",
                                use_session=False, headers=_cookie(session_id), accept={401},
                                handle=same_session)

    def _adopt_session(self, session_id: str) -> None:
        self._session_id = session_id
        self._last_activity = trio.current_time()
        self.session_since = time.time()

    def _basic_authorization(self) -> str:
        pair = f"{self.credentials.user}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def _note_session_timeout(self, response: httpx.Response) -> None:
        """XNAT sends ``SESSION_EXPIRATION_TIME="<epoch ms>,<timeout ms>"`` on every answer."""
        for header in response.headers.get_list("set-cookie"):
            match = _SESSION_EXPIRATION.search(header)
            if match:
                self._session_timeout = int(match.group(2)) / 1000

    # ---------------------------------------------------------------- requests
    def _url(self, path: str) -> str:
        """The URL of an XNAT path, whose IDs come from the server: a ``.`` or
        ``..`` among them would send the session cookie outside the API."""
        if any(part in (".", "..") for part in path.split("/")):
            raise ServerError("a name from the server would lead outside the API", path=path)
        # A lone surrogate (JSON allows "\ud800") has no UTF-8 form but its own.
        return self._base_url + quote(path.encode("utf-8", "surrogatepass"), safe=_PATH_SAFE)

    async def _send(self, method: str, path: str, *, kind: str,
                    handle: Callable[[httpx.Response], Awaitable[T]],
                    params: Mapping[str, str] | None = None,
                    headers: Mapping[str, str] | None = None,
                    accept: Collection[int] = (), use_session: bool = True,
                    keep_open: bool = False,
                    body: Callable[[], AsyncIterator[bytes]] | None = None,
                    attempts: int | None = None,
                    final: Callable[[XnatError], XnatError | None] | None = None,
                    give_up_by: float | None = None) -> T:
        """Run one operation: attempts, backoff, session renewal, all within the deadline.

        ``handle`` gets every 2xx answer (and those in ``accept``) with its body
        unread, inside the attempt, so a body cut short is retried like any
        transport failure. The response is closed afterwards unless
        ``keep_open``, in which case ``handle``'s caller owns it. Requests made
        with ``use_session=False`` carry their own credentials in ``headers``;
        for them a 401 is final. ``body`` makes a fresh request body for each
        attempt (an upload), closed when the attempt ends; ``attempts`` caps the attempts below the setting
        (1 for a body that cannot be produced twice). ``final`` picks out the 5xx
        answers that are a refusal rather than a failure, returning the error
        to raise at once.

        An upload (``body``) has no overall deadline, since a big archive on a
        slow link takes as long as it takes: it is bounded by its progress
        instead, each write of the body by ``read_timeout`` and the wait for
        the answer by ``upload_answer_timeout``. An upload sent whole whose
        answer never came is not sent again (:class:`Unanswered`): XNAT may
        have imported it.

        Nor does any other request outlast the operation it is made for
        (:func:`~.settings.operation_deadline`, or ``give_up_by`` when given):
        it waits only as long as that allows, and is not sent once it has
        passed. Running out of the operation's time does not count the server
        as down (it may only be slow).
        """
        settings = self.settings
        deadline = settings.deadline if body is None else math.inf
        cut_short = False
        if body is None:
            until = min(operation_deadline(),
                        math.inf if give_up_by is None else give_up_by)
            left = until - trio.current_time()
            if left <= 0:
                raise Unreachable("no time left for a request within the operation's bound",
                                  path=path)
            if left < deadline:
                deadline, cut_short = left, True
        limit = min(settings.max_attempts, attempts or settings.max_attempts)
        timeouts = self._upload_timeouts if body is not None else httpx.USE_CLIENT_DEFAULT
        began_down = self._server_down
        if began_down:
            limit = 1  # fail fast while the server is down; one answer ends that
            if self._watched and body is None:
                # See watch_server; the wait for a slot (hung requests may hold
                # them all) counts in the one second too.
                timeouts = self._down_timeouts
                deadline = min(deadline, settings.down_attempt_timeout)
        give_up_at = trio.current_time() + deadline
        failure: XnatError | None = None
        renewed = False
        attempt = 0
        with trio.move_on_after(deadline):
            while True:
                attempt += 1
                request_headers = dict(headers or {})
                session_id = None
                if use_session:
                    session_id = await self._session_for_request()
                    request_headers.update(_cookie(session_id))
                pause: float | None = None
                renew = False
                async with self._gate.slot(give_up_at) as release, \
                        _attempt_body(body) as content:
                    request = self._http.build_request(
                        method, self._url(path), params=params, headers=request_headers,
                        content=content, timeout=timeouts)
                    self._counts[kind] += 1
                    try:
                        response = await self._http.send(request, stream=True)
                    except TRANSPORT_FAILURES as exc:
                        self._counts["transport_failures"] += 1
                        failure = self._transport_failure(exc, path, upload=body is not None)
                    else:
                        keep = False
                        try:
                            status = response.status_code
                            self._answers[status] += 1
                            log.debug("%s %s -> %d", method, path, status)
                            if status < 500 and status != 429 and self._server_down:
                                self._answers_again()
                            self._note_session_timeout(response)
                            may_renew = use_session and not renewed and (
                                attempts is None or attempts > 1)
                            # Behind some proxies and single sign-on, a lost session is
                            # answered with a redirect to a login page, not a 401.
                            if may_renew and status not in accept and (
                                    status == 401 or status in _REDIRECTS):
                                renew = True
                            else:
                                if use_session:
                                    self._last_activity = trio.current_time()
                                if 200 <= status < 300 or status in accept:
                                    response.extensions[_RELEASE] = release
                                    try:
                                        result = await handle(response)
                                    except HtmlAnswer:
                                        if not may_renew:
                                            raise
                                        renew = True  # ... or with the login page itself.
                                    else:
                                        if keep_open:
                                            release.keep()
                                            keep = True
                                        return result
                                else:
                                    error = await _error_from_response(response, path)
                                    if status != 429 and status < 500:
                                        raise error
                                    if body is not None and status == 504:
                                        # A proxy gave up waiting for XNAT, which had it all.
                                        raise self._unanswered(path) from error
                                    refusal = final(error) if final is not None else None
                                    if refusal is not None:
                                        raise refusal
                                    failure = error
                                    retry_after = retry_after_seconds(
                                        response.headers.get("retry-after"))
                                    if retry_after is not None and status in _PAUSING:
                                        pause = self._gate.pause(retry_after, error)
                        except TRANSPORT_FAILURES as exc:
                            failure = self._transport_failure(exc, path,
                                                              upload=body is not None)
                        finally:
                            if not keep:
                                await response.aclose()
                if renew:  # outside the slot: the login needs one
                    renewed = True
                    attempt -= 1  # a renewal is not a failed attempt
                    assert session_id is not None
                    await self._renew_session(rejected=session_id)
                    continue
                assert failure is not None
                if attempt >= limit:
                    raise self._gave_up(failure, began_down)
                if pause is not None:
                    # Every request of the client waits for the pause (RequestGate);
                    # this one just goes back to the queue.
                    delay = pause
                    if trio.current_time() + delay >= give_up_at:
                        self._counts["pause_refusals"] += 1
                        raise failure
                    self._counts["paused"] += 1
                    self._counts["retries"] += 1
                    log.warning("%s %s: the server asks for a pause of %.1f s (%s); "
                                "all requests wait", method, path, delay, failure)
                    continue
                delay = self._backoff(attempt)
                if trio.current_time() + delay >= give_up_at:
                    raise self._gave_up(failure, began_down)
                self._counts["retries"] += 1
                log.warning("%s %s failed (%s); attempt %d of %d in %.2f s", method, path,
                            failure, attempt + 1, limit, delay)
                await trio.sleep(delay)
        raise self._gave_up(Unreachable(f"no answer within {deadline:.3g} s",
                                        path=path), began_down or cut_short) from failure

    def _transport_failure(self, exc: Exception, path: str, *, upload: bool) -> Unreachable:
        """A failed request as an error to retry; raises :class:`Unanswered` for an
        upload whose answer timed out: httpcore reads an answer only once the whole
        body is written, so XNAT had all of it and may have acted on it."""
        if upload and isinstance(exc, httpx.ReadTimeout):
            raise self._unanswered(path) from exc
        refused = tls_failure(exc, path, ca_bundle=self.settings.ca_bundle)
        if refused is not None:  # not transient: no retry, and the server is not down
            raise refused from exc
        return unreachable(exc, path)

    def _unanswered(self, path: str) -> Unanswered:
        return Unanswered(f"the server received all of it but gave no answer within "
                          f"{self.settings.upload_answer_timeout:g} s (it may have acted on it)",
                          path=path)

    def _gave_up(self, failure: XnatError, began_down: bool = False) -> XnatError:
        """An operation failed for want of a (working) server: until the server
        answers again, operations make one attempt each, so that a dead server
        fails every system call within one request timeout (within
        ``down_attempt_timeout`` while :meth:`watch_server` runs). One that
        ``began_down`` tells nothing new, and must not undo the server's being
        seen back since it began (its one attempt was a short one)."""
        if failure.status in (500, 429):
            return failure  # the application failed or throttled this; the server is up
        if not self._server_down and not began_down:
            log.warning("%s seems down (%s); failing fast until it answers", self._base_url,
                        failure)
            self._server_down = True
            self._counts["server_down"] += 1
            self._went_down.set()
        return failure

    def _answers_again(self) -> None:
        log.info("%s answers again", self._base_url)
        self._server_down = False
        self._went_down = trio.Event()

    async def watch_server(self) -> None:
        """Probe a server found down until it answers; run for as long as the
        client is used (the mount runs it in its nursery).

        While it runs, an operation on a server found down makes its one attempt
        within ``down_attempt_timeout`` instead of a whole request timeout: a
        refused connection fails at once, a hung server within that second, and
        a server back up answers the next operation, as before. A server that
        only answers slower than that is seen back by this probe, which waits a
        whole request timeout (``GET /data/JSESSION``, no credentials: any
        answer but a 5xx or 429 will do), every ``probe_interval`` seconds."""
        self._watched = True
        try:
            while True:
                await self._went_down.wait()
                while self._server_down:
                    await self._probe()
                    if self._server_down:
                        await trio.sleep(self.settings.probe_interval)
        finally:
            self._watched = False

    async def _probe(self) -> None:
        self._counts["server.probe"] += 1
        request = self._http.build_request("GET", self._url("/data/JSESSION"))
        with trio.move_on_after(self.settings.deadline):
            try:
                response = await self._http.send(request)
            except TRANSPORT_FAILURES:
                self._counts["transport_failures"] += 1
                return
            self._answers[response.status_code] += 1
            if response.status_code < 500 and response.status_code != 429 and self._server_down:
                self._answers_again()

    def _backoff(self, attempt: int) -> float:
        """Exponential with "equal jitter": between half and all of the doubled delay.
        (A ``Retry-After`` on a 429 or 503 is a pause of the whole client instead.)"""
        settings = self.settings
        ceiling = min(settings.backoff_max, settings.backoff_initial * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    async def _get_json(self, path: str, *, kind: str,
                        params: Mapping[str, str] | None = None) -> Any:
        async def parse(response: httpx.Response) -> Any:
            return parse_json(await response.aread(), path)

        return await self._send("GET", path, kind=kind, params={"format": "json", **(params or {})},
                                handle=parse)

    async def _get_rows(self, path: str, *, kind: str,
                        params: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """The ``ResultSet.Result`` rows of an XNAT table listing."""
        return table_rows(await self._get_json(path, kind=kind, params=params), path)


# ------------------------------------------------------------------- helpers
# httpcore receives at most 64 KiB per socket read, and every read costs a trip
# through trio and h11: downloads then top out near 0.8 GB/s of one core. With
# 256 KiB the same loop passes ~1.3 GB/s (1 MiB: ~1.6 GB/s, but the mount's peak
# RSS grew by ~40 MB from allocator churn; measured on loopback, the benchmark's
# S1 and S8). Small answers are unaffected (a read returns what has arrived).
SOCKET_READ_BYTES = 256 * 1024


def _raise_socket_read_size() -> None:
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:  # a future httpcore: keep its default
        return
    if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", SOCKET_READ_BYTES) < SOCKET_READ_BYTES:
        AsyncHTTP11Connection.READ_NUM_BYTES = SOCKET_READ_BYTES


def _new_http_client(settings: ClientSettings) -> httpx.AsyncClient:
    _raise_socket_read_size()
    # The JSESSIONID is managed by hand; a jar that accepts nothing keeps
    # httpx from storing or replaying cookies behind our back.
    no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                              write=settings.read_timeout, pool=settings.deadline),
        # Tomcat closes idle connections after 20 s; drop ours before that.
        limits=httpx.Limits(max_connections=settings.max_connections,
                            max_keepalive_connections=settings.max_connections,
                            keepalive_expiry=15.0),
        headers={"User-Agent": USER_AGENT}, cookies=no_cookies, follow_redirects=False,
        verify=verification(settings))


@asynccontextmanager
async def _attempt_body(body: Callable[[], AsyncIterator[bytes]] | None
                        ) -> AsyncGenerator[AsyncIterator[bytes] | None, None]:
    """One attempt's request body, closed when the attempt ends, however it ended.

    httpcore sends a body with ``async for`` and leaves it where it stopped
    on a WriteTimeout (the server read no more), and the timeout's traceback
    (through the frames that held the request) keeps that suspended
    generator in a reference cycle once the operation gives up. Its file, a
    local copy of an upload, then stayed open until the garbage collector's
    next full pass: after the copy was sent and deleted, if need be (the
    soak's "(deleted)" descriptors)."""
    content = body() if body is not None else None
    try:
        yield content
    finally:
        close = getattr(content, "aclose", None)
        if close is not None:
            with trio.CancelScope(shield=True):  # a cancelled attempt closes it too
                await close()


def _body_chunks(response: httpx.Response,
                 chunk_size: int | None = None) -> AsyncGenerator[bytes, None]:
    """The body in chunks, typed as the async generator httpx really returns, so that
    it can be closed when abandoned rather than left to the garbage collector."""
    return cast("AsyncGenerator[bytes, None]", response.aiter_bytes(chunk_size))


async def body_text(response: httpx.Response) -> str:
    return (await response.aread()).decode("utf-8", "replace")


async def created(response: httpx.Response) -> bool:
    """Whether a PUT made its object (XNAT's 201) rather than finding it (200)."""
    await response.aread()
    return response.status_code == 201


async def document_bytes(response: httpx.Response) -> bytes:
    """An XML document's bytes, as sent. An HTML page is not one: a login page
    (a session lost behind single sign-on), which renews the session once."""
    content = await response.aread()
    if response.headers.get("content-type", "").startswith("text/html"):
        raise HtmlAnswer("XNAT answered HTML where XML was expected", path=response.url.path)
    return content


def _cookie(session_id: str) -> dict[str, str]:
    return {"Cookie": f"JSESSIONID={session_id}"}


async def open_answer(response: httpx.Response) -> OpenAnswer:
    """The ``handle`` of a request whose body is read later (``keep_open``)."""
    return OpenAnswer(response)


async def discard_body(response: httpx.Response) -> None:
    await response.aread()


async def _session_id_from(response: httpx.Response) -> str:
    """The new session of a ``POST /data/JSESSION``: its cookie, else its body."""
    body = (await response.aread()).decode("utf-8", "replace").strip()
    for header in response.headers.get_list("set-cookie"):
        match = _JSESSIONID_COOKIE.match(header)
        if match and _SESSION_ID.match(match.group(1)):
            return match.group(1)
    if _SESSION_ID.match(body):
        return body
    raise AuthenticationFailed("the login answer holds no session id (a login page?)",
                               status=response.status_code, path="/data/JSESSION")


def unreachable(exc: Exception, path: str) -> Unreachable:
    error = Unreachable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                        path=path)
    error.__cause__ = exc
    return error


async def _error_from_response(response: httpx.Response, path: str) -> XnatError:
    """The XnatError for a non-2xx answer, with the message of XNAT's status page."""
    body = bytearray()
    async with aclosing(_body_chunks(response)) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) >= _ERROR_BODY_LIMIT:
                break
    status = response.status_code
    message = status_page_message(body.decode("utf-8", "replace")) or response.reason_phrase
    return error_class(status)(message or f"HTTP {status}", status=status, path=path)


class OpenAnswer:
    """An answer whose body its owner reads later, a chunk at a time (a
    download, across many calls). It wraps the httpx response so that only
    this module touches httpx; reading it may raise :data:`TRANSPORT_FAILURES`."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        # The request's slot under the client's ceiling, held until closed.
        self._release: Release | None = response.extensions.get(_RELEASE)

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    def content_range(self, uri: str) -> tuple[int, int, int | None]:
        """(first, last, total or None) of a 206 answer's Content-Range."""
        match = _CONTENT_RANGE.match(self._response.headers.get("content-range", "").strip())
        if match is None:
            raise ServerError("a partial answer without a usable Content-Range", status=206,
                              path=uri)
        total = match.group(3)
        return int(match.group(1)), int(match.group(2)), None if total == "*" else int(total)

    def content_length(self) -> int | None:
        value = self._response.headers.get("content-length", "")
        return int(value) if value.isdigit() else None

    def chunks(self) -> AsyncGenerator[bytes, None]:
        return _body_chunks(self._response)

    async def aclose(self) -> None:
        release, self._release = self._release, None
        try:
            await self._response.aclose()
        finally:
            if release is not None:
                release()
