"""XNAT's REST API as typed, bounded calls: the only module that speaks HTTP.

Contract for the layers above:

* Methods return frozen dataclasses named as XNAT names things, never an
  ``httpx.Response``. Paths (``uri``) are XNAT's, unencoded, and begin with
  ``/data``; this module percent-encodes them when it sends a request.
* Every remote failure becomes an :class:`~xnatfs.errors.XnatError`. Anything
  else (a bug here or above) propagates unchanged.
* Every call is bounded. Each request has connect and read timeouts; 5xx, 429
  and transport failures (refused, reset, timed out, truncated) are retried
  with exponential backoff and jitter, at most ``max_attempts`` times and all
  within ``deadline`` seconds per operation. Then :class:`ServerError` or
  :class:`Unreachable`. Other 4xx answers are final at once, and an answer
  that makes no sense (HTML for JSON, the wrong range) is a
  :class:`ServerError`. Every request sent is safe to repeat (reads, logout,
  and login, which at worst leaves a spare session), so a retry never does
  something twice. Once an operation has failed that way, the server counts
  as down and operations make a single attempt each, until one is answered
  (a crude circuit breaker: a dead server fails each call within one timeout).
* Login uses XNAT's JSESSION. The password (or alias token secret) goes only
  to ``POST /data/JSESSION``, as Basic credentials, at login and renewal;
  data requests carry only the cookie. A session in the
  :class:`~xnatfs.credentials.SessionCache` is reused if the server still
  knows it. A 401 renews the session once, transparently. XNAT reports its
  idle timeout on every response, and a session idle for nearly that long is
  renewed before use: on sites with guest access an expired cookie gets no
  401, it silently turns the caller into the guest.
  :meth:`XnatClient.aclose` logs out and forgets the cached session if this
  client logged it in; a borrowed one is left to its owner.
* Credentials never reach a log record; only methods, paths and statuses do.
"""

from __future__ import annotations

import base64
import html
import http.cookiejar
import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
)
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
import trio

from . import __version__
from .credentials import Credentials, SessionCache
from .errors import (
    AuthenticationFailed,
    BadRequest,
    Conflict,
    Forbidden,
    HtmlAnswer,
    NotFound,
    ServerError,
    Stale,
    Unanswered,
    Unreachable,
    XnatError,
)

__all__ = [
    "ByteStream",
    "ClientSettings",
    "Experiment",
    "ExperimentDetail",
    "PrearchiveSession",
    "Project",
    "RemoteFile",
    "Resource",
    "Scan",
    "Subject",
    "XnatClient",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_FILE_SIZE = 2**44  # 16 TiB: a listed size beyond it is the server's error, not a file
USER_AGENT = f"xnatfs/{__version__} python-httpx/{httpx.__version__}"  # not a browser: 401, not 302

# Failures of the connection rather than of the request: worth another attempt.
_TRANSPORT_FAILURES = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_ERROR_BODY_LIMIT = 64 * 1024
_IDLE_RENEWAL_FRACTION = 0.9  # renew a session idle for 90% of XNAT's timeout
# After XNAT refuses a login, no other is tried for this long (doubling up to the
# maximum while it keeps refusing): XNAT locks an account after a number of
# failed logins, and a mount whose password changed would send one per call.
LOGIN_HOLD_INITIAL = 60.0
LOGIN_HOLD_MAX = 900.0

_STATUS_PAGE_MESSAGE = re.compile(r"<h3>(.*?)</h3>", re.DOTALL | re.IGNORECASE)
_SESSION_EXPIRATION = re.compile(r'SESSION_EXPIRATION_TIME="?(\d+),(\d+)')
_JSESSIONID_COOKIE = re.compile(r"JSESSIONID=([^;\s]+)")
_SESSION_ID = re.compile(r"^[A-Za-z0-9._-]{8,256}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
# ".../resources/{R}/files/{path}": the first such pair, so a resource may be called "files".
_FILE_URI = re.compile(r"^(?P<owner>.*?)/resources/(?P<resource>[^/]+)/files/(?P<path>.+)$",
                       re.DOTALL)  # a file name may hold a newline; safe_name shows it
_SCAN_OWNER = re.compile(r"/experiments/[^/]+/scans/(?P<scan>[^/]+)$")
_SESSION_OWNER = re.compile(r"/experiments/[^/]+$")
_ASSESSOR_OWNER = re.compile(r"/experiments/[^/]+/assessors/(?P<assessor>[^/]+)/out$")
# RFC 3986 pchar plus "/": everything else in an XNAT path is percent-encoded
# ("[" and "]" too: Tomcat refuses them raw with 400).
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_PATH_SAFE = "/:@!$&'()*+,;=~"


@dataclass(frozen=True)
class ClientSettings:
    """Bounds on every remote operation, and the connection pool.

    Attributes:
        connect_timeout: seconds to establish one connection.
        read_timeout: seconds to wait for any byte of an answer.
        deadline: seconds for a whole operation, every retry and backoff included.
        max_attempts: requests per operation before giving up (also the number
            of times a broken download may be resumed).
        backoff_initial: first delay between attempts; it doubles each time,
            with jitter, up to ``backoff_max``.
        max_connections: size of the HTTP/1.1 connection pool.
        chunk_size: bytes per piece read from local files for uploads, and
            per read of a whole-file answer to a range request. Streams
            (:meth:`XnatClient.open_stream`) hand out bytes as they arrive:
            a first byte is not held back until a chunk is full, nor copied
            into one.
        verify_tls: check the server's certificate (off only for test sites
            with self-signed certificates).
        upload_answer_timeout: seconds to wait for the answer to an upload once
            all of it is sent: XNAT answers an import only when it has imported
            the whole archive, minutes for a big one.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # XNAT builds a whole listing before its first byte
    deadline: float = 60.0
    max_attempts: int = 4
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    max_connections: int = 16
    chunk_size: int = 1 << 20
    verify_tls: bool = True
    upload_answer_timeout: float = 900.0


@dataclass(frozen=True)
class Project:
    id: str
    name: str | None
    secondary_id: str | None
    description: str | None


@dataclass(frozen=True)
class Subject:
    """``insert_date`` is XNAT's server-local ``2023-09-27 17:31:21.352``, kept as given."""

    id: str
    label: str
    project: str
    insert_date: str | None


@dataclass(frozen=True)
class Experiment:
    """An imaging session (or other subject assessor). Dates are XNAT's strings."""

    id: str
    label: str
    project: str
    subject_id: str | None
    xsi_type: str
    date: str | None
    insert_date: str | None


@dataclass(frozen=True)
class Resource:
    """A resource (catalog) of a scan or session; ``id`` is XNAT's numeric id as text."""

    id: str
    label: str
    format: str | None
    content: str | None
    file_count: int | None
    file_size: int | None


@dataclass(frozen=True)
class Scan:
    id: str
    type: str | None
    series_description: str | None
    xsi_type: str
    quality: str | None
    resources: tuple[Resource, ...]


@dataclass(frozen=True)
class Assessor:
    """An image assessor of a session (QC, FreeSurfer...), with its output resources."""

    id: str
    label: str
    xsi_type: str
    resources: tuple[Resource, ...]


@dataclass(frozen=True)
class ExperimentDetail(Experiment):
    """An experiment with its scans, session-level resources and assessors (one
    item request: XNAT nests them all in the session's item)."""

    scans: tuple[Scan, ...]
    resources: tuple[Resource, ...]
    assessors: tuple[Assessor, ...] = ()


@dataclass(frozen=True)
class RemoteFile:
    """One file of a resource, as a file listing describes it.

    Attributes:
        path: path inside the resource (what follows ``/files/``), may contain ``/``.
        size: bytes, as XNAT's catalog records them.
        digest: MD5 hex from the catalog, or None when XNAT has none.
        uri: download path, ``/data/...``, unencoded.
        resource_label, resource_id: the resource holding it.
        scan_id: its scan, or None for a session-level resource.
        assessor_id: its assessor, for an assessor's output resource.
        owner_kind: what holds the resource: ``scan``, ``session``, ``assessor``
            (an output resource), or ``other`` (a reconstruction, an assessor's
            own resource, a subject or project).
    """

    path: str
    size: int
    digest: str | None
    uri: str
    resource_label: str
    resource_id: str
    scan_id: str | None
    owner_kind: str = "session"
    assessor_id: str | None = None


@dataclass(frozen=True)
class PrearchiveSession:
    """A prearchive entry; ``uri`` is ``/data/prearchive/projects/P/TIMESTAMP/FOLDER``."""

    project: str
    timestamp: str
    folder_name: str
    name: str
    subject: str | None
    status: str
    uri: str
    uploaded: str | None
    lastmod: str | None
    scan_date: str | None
    tag: str | None
    autoarchive: str | None


class XnatClient:
    """One user's connection to one XNAT site.

    Use as ``async with XnatClient(credentials) as client:``, which logs in on
    entry (so bad credentials fail at once) and out on exit. All methods may
    run concurrently from many tasks.

    Attributes:
        credentials: site, user and password; read only.
        settings: timeouts, retries and pool size; read only.

    ``_session_id``, ``_last_activity`` and ``_session_timeout`` describe the
    JSESSION; only ``_log_in`` replaces the session, under ``_login_lock``, so
    that a burst of 401s leads to one login.
    """

    def __init__(self, credentials: Credentials, *, settings: ClientSettings | None = None,
                 session_cache: SessionCache | None = None,
                 http: httpx.AsyncClient | None = None) -> None:
        """``session_cache`` shares sessions between processes (mounts, commands):
        a live session found there is used instead of logging in, and this
        client's own login is stored there. A session is logged out at the end
        only by the client that logged it in: one that borrowed it leaves it to
        the others still using it. ``http`` is for tests (a mock transport); by
        default the client owns its pool."""
        self.credentials = credentials
        self.settings = settings or ClientSettings()
        self._base_url = credentials.url.rstrip("/")
        self._session_cache = session_cache
        self._session_reused = False  # the session in use came from the cache
        self._owns_http = http is None
        self._http = http or _new_http_client(self.settings)
        settings = self.settings
        self._upload_timeouts = httpx.Timeout(
            connect=settings.connect_timeout, read=settings.upload_answer_timeout,
            write=settings.read_timeout, pool=settings.deadline)
        self._login_lock = trio.Lock()
        self._login_refused: AuthenticationFailed | None = None  # the last refusal...
        self._login_hold_until = -math.inf                       # ...in force until then
        self._login_hold = LOGIN_HOLD_INITIAL
        self._session_id: str | None = None
        self._last_activity: float | None = None
        self._session_timeout: float | None = None
        self._server_down = False  # the last operation found no working server
        self._counts: Counter[str] = Counter()

    async def __aenter__(self) -> XnatClient:
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
                    await self._forget_cached_session(session_id)
                with trio.move_on_after(self.settings.connect_timeout, shield=True):
                    try:
                        await self._send("DELETE", "/data/JSESSION", kind="session.logout",
                                         use_session=False, headers=_cookie(session_id),
                                         accept={401}, handle=_discard_body)
                    except XnatError as exc:
                        log.warning("could not log out of %s: %s", self._base_url, exc)
        finally:
            if self._owns_http:
                await self._http.aclose()

    def statistics(self) -> dict[str, int]:
        """Requests sent, by kind (``files.stream``, ``session.login``...), and events:
        ``retries``, ``relogins``, ``sessions_reused``, ``range_ignored``, ``stream_resumes``."""
        return dict(self._counts)

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
        cached = await self._cached_session()
        if cached is not None and cached != rejected and await self._session_is_alive(cached):
            self._counts["sessions_reused"] += 1
            self._adopt_session(cached)
            self._session_reused = True
            return
        if self._login_refused is not None and trio.current_time() < self._login_hold_until:
            raise self._login_refused
        try:
            session_id = await self._send(
                "POST", "/data/JSESSION", kind="session.login", use_session=False,
                headers={"Authorization": self._basic_authorization()},
                handle=_session_id_from)
        except AuthenticationFailed as exc:
            self._hold_logins(exc)
            raise
        self._login_refused, self._login_hold = None, LOGIN_HOLD_INITIAL
        self._adopt_session(session_id)
        self._session_reused = False
        await self._store_cached_session(session_id)

    def _hold_logins(self, refusal: AuthenticationFailed) -> None:
        """No login for a while after a refused one (:data:`LOGIN_HOLD_INITIAL`)."""
        self._login_refused = refusal
        self._login_hold_until = trio.current_time() + self._login_hold
        log.warning("%s refused the login of %s (%s): no other attempt for %.0f s, so that "
                    "the account is not locked; until then every operation fails with "
                    "'Permission denied' (password changed? remount with the new one)",
                    self._base_url, self.credentials.user, refusal, self._login_hold)
        self._login_hold = min(self._login_hold * 2, LOGIN_HOLD_MAX)

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

    def _basic_authorization(self) -> str:
        pair = f"{self.credentials.user}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def _note_session_timeout(self, response: httpx.Response) -> None:
        """XNAT sends ``SESSION_EXPIRATION_TIME="<epoch ms>,<timeout ms>"`` on every answer."""
        for header in response.headers.get_list("set-cookie"):
            match = _SESSION_EXPIRATION.search(header)
            if match:
                self._session_timeout = int(match.group(2)) / 1000

    async def _cached_session(self) -> str | None:
        if self._session_cache is None:
            return None
        try:
            return await trio.to_thread.run_sync(
                self._session_cache.get, self._base_url, self.credentials.user)
        except OSError as exc:
            log.warning("cannot read the session cache: %s", exc)
            return None

    async def _store_cached_session(self, session_id: str) -> None:
        if self._session_cache is None:
            return
        try:
            await trio.to_thread.run_sync(
                self._session_cache.put, self._base_url, self.credentials.user, session_id)
        except OSError as exc:
            log.warning("cannot write the session cache: %s", exc)

    async def _forget_cached_session(self, session_id: str) -> None:
        if self._session_cache is None:
            return
        try:
            await trio.to_thread.run_sync(self._session_cache.discard, self._base_url,
                                          session_id)
        except OSError as exc:
            log.warning("cannot update the session cache: %s", exc)

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
                    final: Callable[[XnatError], XnatError | None] | None = None) -> T:
        """Run one operation: attempts, backoff, session renewal, all within the deadline.

        ``handle`` gets every 2xx answer (and those in ``accept``) with its body
        unread, inside the attempt, so a body cut short is retried like any
        transport failure. The response is closed afterwards unless
        ``keep_open``, in which case ``handle``'s caller owns it. Requests made
        with ``use_session=False`` carry their own credentials in ``headers``;
        for them a 401 is final. ``body`` makes a fresh request body for each
        attempt (an upload); ``attempts`` caps the attempts below the setting
        (1 for a body that cannot be produced twice). ``final`` picks out the 5xx
        answers that are a refusal rather than a failure, returning the error
        to raise at once.

        An upload (``body``) has no overall deadline, since a big archive on a
        slow link takes as long as it takes: it is bounded by its progress
        instead, each write of the body by ``read_timeout`` and the wait for
        the answer by ``upload_answer_timeout``. An upload sent whole whose
        answer never came is not sent again (:class:`Unanswered`): XNAT may
        have imported it.
        """
        settings = self.settings
        deadline = settings.deadline if body is None else math.inf
        give_up_at = trio.current_time() + deadline
        failure: XnatError | None = None
        renewed = False
        attempt = 0
        limit = min(settings.max_attempts, attempts or settings.max_attempts)
        if self._server_down:
            limit = 1  # fail fast while the server is down; one answer ends that
        with trio.move_on_after(deadline):
            while True:
                attempt += 1
                request_headers = dict(headers or {})
                session_id = None
                if use_session:
                    session_id = await self._session_for_request()
                    request_headers.update(_cookie(session_id))
                request = self._http.build_request(
                    method, self._url(path), params=params, headers=request_headers,
                    content=body() if body is not None else None,
                    timeout=self._upload_timeouts if body is not None else httpx.USE_CLIENT_DEFAULT)
                self._counts[kind] += 1
                retry_after = None
                try:
                    response = await self._http.send(request, stream=True)
                except _TRANSPORT_FAILURES as exc:
                    failure = self._transport_failure(exc, path, upload=body is not None)
                else:
                    keep = False
                    try:
                        status = response.status_code
                        log.debug("%s %s -> %d", method, path, status)
                        if status < 500 and status != 429 and self._server_down:
                            log.info("%s answers again", self._base_url)
                            self._server_down = False
                        self._note_session_timeout(response)
                        may_renew = use_session and not renewed and (
                            attempts is None or attempts > 1)
                        # Behind some proxies and single sign-on, a lost session is
                        # answered with a redirect to a login page, not a 401.
                        if may_renew and status not in accept and (
                                status == 401 or status in _REDIRECTS):
                            renewed = True
                            attempt -= 1  # a renewal is not a failed attempt
                            assert session_id is not None
                            await self._renew_session(rejected=session_id)
                            continue
                        if use_session:
                            self._last_activity = trio.current_time()
                        if 200 <= status < 300 or status in accept:
                            try:
                                result = await handle(response)
                            except HtmlAnswer:
                                if not may_renew:
                                    raise
                                # ... or with the login page itself.
                                renewed = True
                                attempt -= 1
                                assert session_id is not None
                                await self._renew_session(rejected=session_id)
                                continue
                            keep = keep_open
                            return result
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
                        retry_after = _retry_after_seconds(response)
                    except _TRANSPORT_FAILURES as exc:
                        failure = self._transport_failure(exc, path, upload=body is not None)
                    finally:
                        if not keep:
                            await response.aclose()
                if attempt >= limit:
                    raise self._gave_up(failure)
                delay = self._backoff(attempt, retry_after)
                if trio.current_time() + delay >= give_up_at:
                    raise self._gave_up(failure)
                self._counts["retries"] += 1
                log.warning("%s %s failed (%s); attempt %d of %d in %.2f s", method, path,
                            failure, attempt + 1, limit, delay)
                await trio.sleep(delay)
        raise self._gave_up(Unreachable(f"no answer within {settings.deadline:g} s",
                                        path=path)) from failure

    def _transport_failure(self, exc: Exception, path: str, *, upload: bool) -> Unreachable:
        """A failed request as an error to retry; raises :class:`Unanswered` for an
        upload whose answer timed out: httpcore reads an answer only once the whole
        body is written, so XNAT had all of it and may have acted on it."""
        if upload and isinstance(exc, httpx.ReadTimeout):
            raise self._unanswered(path) from exc
        return _unreachable(exc, path)

    def _unanswered(self, path: str) -> Unanswered:
        return Unanswered(f"the server received all of it but gave no answer within "
                          f"{self.settings.upload_answer_timeout:g} s (it may have acted on it)",
                          path=path)

    def _gave_up(self, failure: XnatError) -> XnatError:
        """An operation failed for want of a (working) server: until the server
        answers again, operations make one attempt each, so that a dead server
        fails every system call within one request timeout."""
        if failure.status == 500:
            return failure  # the application failed at this one thing; the server is up
        if not self._server_down:
            log.warning("%s seems down (%s); failing fast until it answers", self._base_url,
                        failure)
            self._server_down = True
            self._counts["server_down"] += 1
        return failure

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential with "equal jitter": between half and all of the doubled delay."""
        settings = self.settings
        ceiling = min(settings.backoff_max, settings.backoff_initial * 2 ** (attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, settings.backoff_max))
        return delay

    async def _get_json(self, path: str, *, kind: str,
                        params: Mapping[str, str] | None = None) -> Any:
        async def parse(response: httpx.Response) -> Any:
            return _parse_json(await response.aread(), path)

        return await self._send("GET", path, kind=kind, params={"format": "json", **(params or {})},
                                handle=parse)

    async def _get_rows(self, path: str, *, kind: str,
                        params: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """The ``ResultSet.Result`` rows of an XNAT table listing."""
        payload = await self._get_json(path, kind=kind, params=params)
        try:
            rows = payload["ResultSet"]["Result"]
        except (KeyError, TypeError):
            raise ServerError("a listing without ResultSet.Result", path=path) from None
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ServerError("a listing whose rows are not objects", path=path)
        return rows

    # ---------------------------------------------------------------- listings
    async def list_projects(self) -> list[Project]:
        """The projects this user can read."""
        path = "/data/projects"
        rows = await self._get_rows(path, kind="projects.list")
        with _malformed_rows(path):
            return [Project(id=row["ID"], name=_text(row.get("name")),
                            secondary_id=_text(row.get("secondary_ID")),
                            description=_text(row.get("description")))
                    for row in rows]

    async def list_subjects(self, project: str) -> list[Subject]:
        """Subjects of ``project``.

        Raises:
            NotFound: no such project, or one the user may not see.
            Forbidden: a protected project the user may not read.
        """
        path = f"/data/projects/{project}/subjects"
        rows = await self._get_rows(path, kind="subjects.list",
                                    params={"columns": "ID,label,project,insert_date"})
        with _malformed_rows(path):
            return [Subject(id=row["ID"], label=row["label"],
                            project=row.get("project") or project,
                            insert_date=_text(row.get("insert_date")))
                    for row in rows]

    async def list_experiments(self, project: str, subject: str | None = None
                               ) -> list[Experiment]:
        """Experiments of one subject (given by ID or label) in ``project``, or of
        every subject at once when ``subject`` is None (rows carry ``subject_ID``)."""
        path = f"/data/projects/{project}" + (f"/subjects/{subject}" if subject else "")
        path += "/experiments"
        rows = await self._get_rows(path, kind="experiments.list", params={
            "columns": "ID,label,xsiType,date,insert_date,project,subject_ID"})
        with _malformed_rows(path):
            return [Experiment(id=row["ID"], label=row["label"],
                               project=row.get("project") or project,
                               subject_id=_text(row.get("subject_ID")), xsi_type=row["xsiType"],
                               date=_text(row.get("date")),
                               insert_date=_text(row.get("insert_date")))
                    for row in rows]

    async def get_experiment(self, experiment_id: str) -> ExperimentDetail:
        """One experiment (accession ID only) with its scans and all resource labels."""
        path = f"/data/experiments/{experiment_id}"
        payload = await self._get_json(path, kind="experiment.get")
        try:
            item = _current_items(payload["items"])[0]
            fields = item["data_fields"]
            return ExperimentDetail(
                id=str(fields["ID"]), label=str(fields["label"]), project=str(fields["project"]),
                subject_id=_text(fields.get("subject_ID")), xsi_type=item["meta"]["xsi:type"],
                date=_text(fields.get("date")), insert_date=_text(fields.get("insert_date")),
                scans=tuple(_scan(scan) for scan in _child_items(item, "scans/scan")),
                resources=tuple(_resource(r) for r in _child_items(item, "resources/resource")),
                assessors=_assessors(_child_items(item, "assessors/assessor"), path))
        except (KeyError, IndexError, TypeError) as exc:
            raise ServerError(f"an experiment item without {exc}", path=path) from exc

    async def list_scan_files(self, experiment_id: str) -> list[RemoteFile]:
        """Every file of every scan resource of an experiment, in one request."""
        path = f"/data/experiments/{experiment_id}/scans/ALL/files"
        return _remote_files(await self._get_rows(path, kind="files.list"), path)

    async def list_session_files(self, experiment_id: str) -> list[RemoteFile]:
        """Every file of the experiment's own (session-level) resources."""
        path = f"/data/experiments/{experiment_id}/files"
        return _remote_files(await self._get_rows(path, kind="files.list"), path)

    async def list_experiment_files(self, experiment_id: str) -> list[RemoteFile]:
        """Every file of the session's own resources and of its scans' resources,
        in one request: XNAT's ``files?all=true`` (``XNATTemplate.loadCatalogs``),
        which also covers reconstructions and assessors. Reconstructions and the
        assessors' own resources are left out; assessors' output resources stay."""
        path = f"/data/experiments/{experiment_id}/files"
        rows = await self._get_rows(path, kind="files.list", params={"all": "true"})
        files = []
        for row in rows:
            try:
                f = _remote_file(row, path)
            except ServerError as exc:  # an assessor's file in a shape we do not show
                log.debug("skipping a row of %s: %s", path, exc)
                continue
            if f.owner_kind in ("scan", "session", "assessor"):
                files.append(f)
        return files

    async def list_resource_files(self, resource_uri: str) -> list[RemoteFile]:
        """Files of one resource, given as ``/data/.../resources/{id or label}``."""
        path = f"{resource_uri.rstrip('/')}/files"
        return _remote_files(await self._get_rows(path, kind="files.list"), path)

    async def list_prearchive(self, project: str | None = None) -> list[PrearchiveSession]:
        """Prearchive entries of every project the user may edit, or of one project."""
        path = "/data/prearchive/projects" + (f"/{project}" if project else "")
        rows = await self._get_rows(path, kind="prearchive.list")
        with _malformed_rows(path):
            return [PrearchiveSession(
                project=row["project"], timestamp=row["timestamp"],
                folder_name=row["folderName"], name=row.get("name") or row["folderName"],
                subject=_text(row.get("subject")), status=row["status"],
                uri=_data_path(row["url"]), uploaded=_text(row.get("uploaded")),
                lastmod=_text(row.get("lastmod")), scan_date=_text(row.get("scan_date")),
                tag=_text(row.get("tag")), autoarchive=_text(row.get("autoarchive")))
                for row in rows]

    # -------------------------------------------------------------------- data
    @asynccontextmanager
    async def open_stream(self, uri: str, start: int = 0,
                          end: int | None = None) -> AsyncIterator[ByteStream]:
        """A download of bytes ``[start, end)`` of ``uri`` (to the end of the file
        when ``end`` is None), read chunk by chunk::

            async with client.open_stream(uri, start) as stream:
                async for chunk in stream: ...

        The first chunk begins at ``start`` and the last stops at ``end``
        whether or not the server honours Range (if not, the bytes before
        ``start`` are downloaded and dropped, and the connection is closed at
        ``end``). A connection that breaks off is resumed where it stopped, up
        to ``max_attempts`` times; then :class:`Unreachable` (or :class:`Stale`
        if the file changed meanwhile). Each wait for data is bounded by
        ``read_timeout``; the download as a whole is not.

        A download with an ``end`` asks for a range, so its first answer tells
        whether the server honours Range (:attr:`ByteStream.ranged`). Where it
        does not, the caller may set ``end`` to None to read on to the end of
        the file the server sends anyway.
        """
        stream = ByteStream(self, uri, start, end)
        try:
            await stream.open()
            yield stream
        finally:
            await stream.aclose()

    # ----------------------------------------------------------------- uploads
    async def import_archive(self, body: Path | AsyncIterator[bytes], *, name: str,
                             project: str, subject: str | None = None,
                             session: str | None = None,
                             direct_archive: bool = False) -> list[str]:
        """``POST /data/services/import`` with ``import-handler=DICOM-zip``.

        ``body`` is a file (re-read on each attempt, so failures are retried) or
        a live stream of bytes (one attempt: it cannot be sent twice). ``name``
        (``upload.zip``, ``upload.tar.gz``...) tells XNAT zip from tar.
        Returns the URIs XNAT answers (prearchive or archive sessions).
        """
        params = _import_params(project, subject, session, direct_archive)
        params.update({"import-handler": "DICOM-zip", "inbody": "true"})
        content_type = _ARCHIVE_TYPES.get(name.split(".", 1)[-1], "application/octet-stream")
        if isinstance(body, Path):
            source: Path = body
            make_body = lambda: _file_chunks(source, self.settings.chunk_size)  # noqa: E731
            attempts = None
        else:
            stream = body
            make_body = lambda: stream  # noqa: E731
            attempts = 1
        text = await self._send("POST", "/data/services/import", kind="import.archive",
                                params=params, headers={"Content-Type": content_type},
                                body=make_body, attempts=attempts, handle=_body_text)
        return [uri for uri in text.replace("\r\n", "\n").split("\n") if uri.strip()]

    async def import_dicom_file(self, path: Path, *, project: str, subject: str | None = None,
                                session: str | None = None,
                                direct_archive: bool = False) -> str:
        """One DICOM object through ``gradual-DICOM``; returns XNAT's session URI."""
        params = {"import-handler": "gradual-DICOM", "inbody": "true", "PROJECT_ID": project}
        if subject:
            params["SUBJECT_ID"] = subject
        if session:
            params["EXPT_LABEL"] = session
        if direct_archive:
            params["Direct-Archive"] = "true"
        return (await self._send(
            "POST", "/data/services/import", kind="import.dicom", params=params,
            headers={"Content-Type": "application/dicom"},
            body=lambda: _file_chunks(path, self.settings.chunk_size),
            handle=_body_text)).strip()

    async def list_upload_projects(self) -> list[str]:
        """Projects this user may add subjects and sessions to, as XNAT's own upload
        pages ask (``ProjectListResource.PermissionsProjectHandler``): owners and
        members of a project, and data admins everywhere."""
        path = "/data/projects"
        rows = await self._get_rows(path, kind="projects.roles",
                                    params={"permissions": "edit",
                                            "dataType": "xnat:subjectData"})
        with _malformed_rows(path):
            return [str(row.get("id") or row["ID"]) for row in rows]

    # -------------------------------------------------------------- prearchive
    async def list_prearchive_scans(self, session_uri: str) -> list[Scan]:
        rows = await self._get_rows(f"{session_uri}/scans", kind="prearchive.scans")
        with _malformed_rows(session_uri):
            return [Scan(id=str(r["ID"]), type=_text(r.get("series_description")),
                         series_description=_text(r.get("series_description")),
                         xsi_type=str(r.get("xsiType") or ""), quality=None,
                         resources=(Resource("DICOM", "DICOM", "DICOM", None, None, None),))
                    for r in rows]

    async def list_prearchive_files(self, session_uri: str, scan_id: str,
                                    resource: str = "DICOM") -> list[RemoteFile]:
        path = f"{session_uri}/scans/{scan_id}/resources/{resource}/files"
        rows = await self._get_rows(path, kind="prearchive.files")
        with _malformed_rows(path):
            return [RemoteFile(path=_data_path(r["URI"]).split("/files/", 1)[1],
                               size=_file_size(r["Size"], r["URI"]),
                               digest=_text(r.get("digest")),
                               uri=_data_path(r["URI"]), resource_label=resource,
                               resource_id=resource, scan_id=scan_id, owner_kind="scan")
                    for r in rows]

    async def archive_prearchive(self, session_uri: str, *, project: str | None = None,
                                 subject: str | None = None,
                                 session: str | None = None) -> str:
        """``POST /data/services/archive``; returns the archived session's URI."""
        form = {"src": session_uri}
        for key, value in (("project", project), ("subject", subject), ("session", session)):
            if value:
                form[key] = value
        encoded = urlencode(form).encode()
        text = await self._send(
            "POST", "/data/services/archive", kind="prearchive.archive",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            body=lambda: _one_chunk(encoded), handle=_body_text, final=_archive_refusal)
        return text.strip()

    async def move_prearchive(self, session_uri: str, project: str) -> str:
        """``POST {session}?action=move&newProject=P`` (XNAT answers 301 with the new URI)."""
        text = await self._send("POST", session_uri, kind="prearchive.move",
                                params={"action": "move", "newProject": project},
                                accept={301}, handle=_body_text)
        return _data_path(text.strip())

    async def delete_prearchive(self, session_uri: str) -> None:
        await self._send("DELETE", session_uri, kind="prearchive.delete", handle=_discard_body)


class ByteStream:
    """An open download, iterated with ``async for``; see :meth:`XnatClient.open_stream`.

    Iteration raises :class:`Unreachable` when resuming fails ``max_attempts``
    times, and :class:`Stale` when a resumed download finds the file changed.

    Attributes:
        uri: the file.
        position: offset in the file of the next byte to be yielded.
        end: offset at which the download stops, or None for the end of the file.
        size: the file's full size when the server said, else None.
        version: the first answer's ``Last-Modified`` (XNAT sends no ETag), if any;
            a resumed download whose answer differs is of another file.
        ranged: after a request with a Range header, whether the server
            honoured it (206) or sent the whole file (200); None before.
        received: bytes received so far, those resent before ``position`` by a
            server ignoring Range too (how a reader far ahead sees it move).
    """

    def __init__(self, client: XnatClient, uri: str, start: int, end: int | None) -> None:
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range [{start}, {end})")
        self.uri = uri
        self.position = start
        self.end = end
        self.size: int | None = None
        self.version: str | None = None
        self.ranged: bool | None = None
        self.received = 0
        self._client = client
        self._response: httpx.Response | None = None
        self._chunks: AsyncGenerator[bytes, None] | None = None
        self._skip = 0  # bytes before `position` a server ignoring Range sends again
        self._body_end: int | None = None  # file offset where the current answer ends
        self._resumes = 0
        self._finished = False

    def __aiter__(self) -> ByteStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._finished:
            if self._chunks is None:
                await self.open()
                continue
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                wanted_until = self._wanted_until()
                if wanted_until is None or self.position >= wanted_until:
                    break
                failure: Exception = Unreachable(
                    f"body ended at byte {self.position} of {wanted_until}", path=self.uri)
            except _TRANSPORT_FAILURES as exc:
                failure = exc
            else:
                chunk = self._trim(chunk)
                if chunk:
                    self.position += len(chunk)
                    return chunk
                continue
            await self._resume_after(failure)
        await self.aclose()  # done: give the connection back (or drop it, if cut short)
        raise StopAsyncIteration

    async def open(self) -> None:
        """(Re)start the download at :attr:`position`.

        Raises:
            Stale: the file's size changed since the download began, so what
                was already yielded and what would follow belong to different
                versions of the file.
        """
        await self._close_response()
        if self.end is not None and self.position >= self.end:
            self._finished = True
            return
        client = self._client
        headers = {"Accept-Encoding": "identity"}
        if self.position > 0 or self.end is not None:
            last_byte = "" if self.end is None else str(self.end - 1)
            headers["Range"] = f"bytes={self.position}-{last_byte}"
        response = await client._send("GET", self.uri, kind="files.stream", headers=headers,
                                      accept={416}, keep_open=True, handle=_as_is)
        self._response = response
        status = response.status_code
        if status == 416:  # position is at or past the end
            await self._close_response()
            if self.size is not None and self.position < self.size:
                raise Stale(f"file shrank below byte {self.position}", path=self.uri)
            self._finished = True
            return
        if status == 206:
            first, last, size = _content_range(response, self.uri)
            if first != self.position:
                await self._close_response()
                raise ServerError(f"asked for bytes from {self.position}, got from {first}",
                                  path=self.uri)
            self._skip = 0
            self._body_end = last + 1
            self.ranged = True
        else:
            if "Range" in headers:
                client._counts["range_ignored"] += 1
                self.ranged = False
            size = _content_length(response)
            self._skip = self.position
            self._body_end = size
        if size is not None:
            if self.size is not None and size != self.size:
                await self._close_response()
                raise Stale(f"size changed from {self.size} to {size} during the download",
                            path=self.uri)
            self.size = size
        version = response.headers.get("Last-Modified")
        if version is not None:
            if self.version is not None and version != self.version:
                await self._close_response()
                raise Stale(f"replaced during the download (Last-Modified {self.version}, "
                            f"now {version})", path=self.uri)
            self.version = version
        self._chunks = _body_chunks(response)

    async def aclose(self) -> None:
        self._finished = True
        await self._close_response()

    def _wanted_until(self) -> int | None:
        """Where a complete download stops: ``end``, or the end of the file if sooner."""
        if self.end is None:
            return self.size
        return self.end if self.size is None else min(self.end, self.size)

    def _trim(self, chunk: bytes) -> bytes:
        """Drop what lies before :attr:`position` (resent by a server ignoring Range)
        or at and after :attr:`end`."""
        self.received += len(chunk)
        if self._skip:
            dropped = min(self._skip, len(chunk))
            self._skip -= dropped
            chunk = chunk[dropped:]
        if self.end is not None and self.position + len(chunk) >= self.end:
            chunk = chunk[:self.end - self.position]
            # An answer that ends here is read to its end, which lets its
            # connection be reused; one that goes on is cut off.
            if self._body_end is None or self._body_end > self.end:
                self._finished = True
        return chunk

    async def _resume_after(self, failure: Exception) -> None:
        await self._close_response()
        self._resumes += 1
        settings = self._client.settings
        if self._resumes >= settings.max_attempts:
            if isinstance(failure, XnatError):
                raise failure
            raise _unreachable(failure, self.uri) from failure
        self._client._counts["stream_resumes"] += 1
        log.warning("download of %s broke off at byte %d (%s); resuming", self.uri,
                    self.position, failure)

    async def _close_response(self) -> None:
        response, chunks = self._response, self._chunks
        self._response = self._chunks = None
        if chunks is not None:
            await chunks.aclose()
        if response is not None:
            await response.aclose()


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
        verify=settings.verify_tls)


def _body_chunks(response: httpx.Response,
                 chunk_size: int | None = None) -> AsyncGenerator[bytes, None]:
    """The body in chunks, typed as the async generator httpx really returns, so that
    it can be closed when abandoned rather than left to the garbage collector."""
    return cast("AsyncGenerator[bytes, None]", response.aiter_bytes(chunk_size))


_ARCHIVE_TYPES = {"zip": "application/zip", "tar": "application/x-tar",
                  "tar.gz": "application/x-gzip", "tgz": "application/x-gzip"}


def _import_params(project: str, subject: str | None, session: str | None,
                   direct_archive: bool) -> dict[str, str]:
    params = {"project": project, "overwrite": "append"}
    if subject:
        params["subject"] = subject
    if session:
        params["session"] = session
    if direct_archive:
        params["Direct-Archive"] = "true"
    else:
        params["dest"] = f"/prearchive/projects/{project}"
    return params


async def _file_chunks(path: Path, chunk_size: int) -> AsyncIterator[bytes]:
    """A file as request-body chunks, read in a worker thread."""
    handle = await trio.to_thread.run_sync(open, path, "rb")
    try:
        while chunk := await trio.to_thread.run_sync(handle.read, chunk_size):
            yield chunk
    finally:
        await trio.to_thread.run_sync(handle.close)


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _body_text(response: httpx.Response) -> str:
    return (await response.aread()).decode("utf-8", "replace")


def _cookie(session_id: str) -> dict[str, str]:
    return {"Cookie": f"JSESSIONID={session_id}"}


async def _as_is(response: httpx.Response) -> httpx.Response:
    return response


async def _discard_body(response: httpx.Response) -> None:
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


def _unreachable(exc: Exception, path: str) -> Unreachable:
    error = Unreachable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                        path=path)
    error.__cause__ = exc
    return error


def _archive_refusal(error: XnatError) -> XnatError | None:
    """XNAT answers a session it will not archive (its label or UID is taken by
    another study, the subject differs...) with 500 "FAILED: why": final, and
    a conflict, not a server in trouble."""
    if error.status == 500 and error.message.startswith("FAILED"):
        return Conflict(error.message, status=error.status, path=error.path)
    return None


async def _error_from_response(response: httpx.Response, path: str) -> XnatError:
    """The XnatError for a non-2xx answer, with the message of XNAT's status page."""
    body = bytearray()
    async with aclosing(_body_chunks(response)) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) >= _ERROR_BODY_LIMIT:
                break
    status = response.status_code
    message = _status_page_message(body.decode("utf-8", "replace")) or response.reason_phrase
    return _error_class(status)(message or f"HTTP {status}", status=status, path=path)


def _status_page_message(text: str) -> str | None:
    """``<h3>message</h3>`` of Restlet's status page, or a short plain-text body."""
    match = _STATUS_PAGE_MESSAGE.search(text)
    if match:
        return html.unescape(match.group(1)).strip() or None
    text = text.strip()
    if text and "<" not in text and len(text) <= 500:
        return text
    return None


def _error_class(status: int) -> type[XnatError]:
    if status == 401:
        return AuthenticationFailed
    if status == 403:
        return Forbidden
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if 400 <= status < 500 and status != 429:
        return BadRequest
    return ServerError  # 5xx and 429 after retries, or a status we do not handle (3xx)


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _parse_json(body: bytes, path: str) -> Any:
    if body.lstrip()[:1] == b"<":
        raise HtmlAnswer("XNAT answered HTML where JSON was expected", path=path)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ServerError(f"malformed JSON: {exc}", path=path) from exc


def _content_range(response: httpx.Response, uri: str) -> tuple[int, int, int | None]:
    """(first, last, total or None) of a 206 answer's Content-Range."""
    match = _CONTENT_RANGE.match(response.headers.get("content-range", "").strip())
    if match is None:
        raise ServerError("a partial answer without a usable Content-Range", status=206,
                          path=uri)
    total = match.group(3)
    return int(match.group(1)), int(match.group(2)), None if total == "*" else int(total)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


@contextmanager
def _malformed_rows(path: str) -> Iterator[None]:
    """A listing row without a column we need, or with a value of the wrong kind
    (a size that is not a number, a row that is not an object), is the server's
    fault, not a bug here: EIO with the reason in the log, no traceback."""
    try:
        yield
    except KeyError as exc:
        raise ServerError(f"a listing row without {exc}", path=path) from exc
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ServerError(f"a malformed listing row: {exc}", path=path) from exc


def _text(value: Any) -> str | None:
    """XNAT's cell or field as text; its empty string means null."""
    if value is None or value == "":
        return None
    return str(value)


def _count(value: Any) -> int | None:
    return None if value is None or value == "" else int(value)


def _data_path(path: str) -> str:
    """Some XNAT listings give paths without the ``/data`` prefix; add it."""
    return path if path.startswith("/data/") else "/data" + path


def _current_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item for item in items if not item.get("meta", {}).get("isHistory", False)]


def _child_items(item: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    for child in item.get("children", []):
        if child.get("field") == field:
            return _current_items(child.get("items", []))
    return []


def _scan(item: Mapping[str, Any]) -> Scan:
    fields = item["data_fields"]
    return Scan(id=str(fields["ID"]), type=_text(fields.get("type")),
                series_description=_text(fields.get("series_description")),
                xsi_type=item["meta"]["xsi:type"], quality=_text(fields.get("quality")),
                resources=tuple(_resource(r) for r in _child_items(item, "file")))


def _assessors(items: list[dict[str, Any]], path: str) -> tuple[Assessor, ...]:
    """The assessors a session item names; one in a shape we do not know is left
    out (with a log line), not the session with it."""
    out = []
    for item in items:
        try:
            fields = item["data_fields"]
            out.append(Assessor(
                id=str(fields["ID"]), label=str(fields.get("label") or fields["ID"]),
                xsi_type=item["meta"]["xsi:type"],
                resources=tuple(_resource(r) for r in _child_items(item, "out/file"))))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            log.warning("%s: an assessor without %s; not shown", path, exc)
    return tuple(out)


def _resource(item: Mapping[str, Any]) -> Resource:
    fields = item["data_fields"]
    return Resource(id=str(fields["xnat_abstractresource_id"]), label=str(fields["label"]),
                    format=_text(fields.get("format")), content=_text(fields.get("content")),
                    file_count=_count(fields.get("file_count")),
                    file_size=_count(fields.get("file_size")))


def _remote_files(rows: list[dict[str, Any]], listing: str) -> list[RemoteFile]:
    with _malformed_rows(listing):
        return [_remote_file(row, listing) for row in rows]


def _relative_path(path: str, uri: str, listing: str) -> str:
    """A file's path in its resource, without empty components: a leading ``/``
    would make a folder named like the resource's ``files/`` itself."""
    parts = [part for part in path.split("/") if part]
    if not parts:
        raise ServerError(f"a file without a name: {uri}", path=listing)
    return "/".join(parts)


def _file_size(value: Any, uri: str) -> int:
    """A listed size, which must be one a file can have (ValueError if not): the
    block cache sizes its bookkeeping by it."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = -1
    if not 0 <= size <= MAX_FILE_SIZE:
        raise ValueError(f"unexpected size {value!r} of {uri}")
    return size


def _remote_file(row: Mapping[str, Any], listing: str) -> RemoteFile:
    """A file listing row. Its URI names the scan, resource and path; multi-resource
    listings build it from SQL and leave out ``/data``."""
    uri = row.get("URI") or ""
    match = _FILE_URI.match(uri)
    if match is None:
        raise ServerError(f"unexpected file URI {uri!r}", path=listing)
    owner = match.group("owner")
    scan = _SCAN_OWNER.search(owner)
    assessor = _ASSESSOR_OWNER.search(owner)
    owner_kind = ("scan" if scan else "session" if _SESSION_OWNER.search(owner)
                  else "assessor" if assessor else "other")
    try:
        size = _file_size(row.get("Size") or 0, uri)
    except ValueError as exc:
        raise ServerError(str(exc), path=listing) from None
    return RemoteFile(path=_relative_path(match.group("path"), uri, listing), size=size,
                      digest=_text(row.get("digest")),
                      uri=_data_path(uri),
                      resource_label=row.get("collection") or match.group("resource"),
                      resource_id=row.get("cat_ID") or match.group("resource"),
                      scan_id=scan.group("scan") if scan else None, owner_kind=owner_kind,
                      assessor_id=assessor.group("assessor") if assessor else None)
