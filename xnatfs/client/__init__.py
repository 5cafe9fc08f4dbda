"""XNAT's REST API as typed, bounded calls: the only part of xnatfs that speaks HTTP.

Contract for the layers above:

* Methods return frozen dataclasses named as XNAT names things, never an
  ``httpx.Response``. Paths (``uri``) are XNAT's, unencoded, and begin with
  ``/data``; the client percent-encodes them when it sends a request.
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
  (a circuit breaker: a dead server fails each call within one timeout; while
  :meth:`XnatClient.watch_server` runs, as in the mount, within
  ``down_attempt_timeout``, and a probe sees a slow server back).
* TLS failures no retry mends (an untrusted certificate, one for another
  host, a port without TLS) are :class:`~xnatfs.errors.TlsFailure` at once,
  and do not count as a server down.
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

How the package is laid out, one concern a module:

* :mod:`.connection`: :class:`~.connection.XnatConnection`, the login and its
  JSESSION, and ``_send``, the one request primitive (retries, backoff,
  deadlines, errors). The only module that imports httpx. It keeps the
  hold after a refused login and the shared session cache in :mod:`.logins`,
  what answers mean in :mod:`.answers`, its bounds in :mod:`.settings`, the
  certificates it trusts and the TLS failures not worth a retry in :mod:`.tls`.
* :mod:`.items`: the dataclasses the calls return, and the parsing of XNAT's
  rows and items into them (no requests).
* :mod:`.listings`, :mod:`.downloads`, :mod:`.services`, :mod:`.writes`,
  :mod:`.tables`, :mod:`.fieldwrites`, :mod:`.metadata`: the calls, by concern
  (browsing the archive; reading files; uploads and the prearchive; writing
  into resources; a project's subjects, sessions and scans with their
  metadata, as records for tables; fields of subjects and sessions; objects'
  XML documents and the projects they are in).

Composition: each concern is a class of calls built on
:class:`~.connection.XnatConnection` (a mixin that adds methods, never
state), and :class:`XnatClient` is all of them at once. Callers keep one
object with every method under its name and signature, with no forwarding
layer to keep in step with them; mypy checks each concern against the one
connection it uses; a call is found in the module of its concern. The
concerns share the connection's state, so the boundary is a rule: they reach
the server only through ``_send``, ``_get_json`` and ``_get_rows``, with the
readers :mod:`.connection` exports, and never import httpx.
"""

from __future__ import annotations

from .connection import SOCKET_READ_BYTES, USER_AGENT, XnatConnection
from .downloads import ByteStream, DownloadCalls
from .services import ImportCalls
from .tables import ScanRecord, SessionRecord, SubjectRecord, TableCalls
from .writes import ResourceWriteCalls
from .fieldwrites import FieldWriteCalls
from .items import (
    MAX_FILE_SIZE,
    Assessor,
    Experiment,
    ExperimentDetail,
    PrearchiveSession,
    Project,
    RemoteFile,
    Resource,
    Scan,
    Subject,
)
from .listings import ListingCalls
from .metadata import MetadataCalls
from .logins import LOGIN_HOLD_INITIAL, LOGIN_HOLD_MAX
from .settings import ClientSettings

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
    "ScanRecord",
    "SessionRecord",
    "Subject",
    "SubjectRecord",
    "XnatClient",
]


class XnatClient(ListingCalls, DownloadCalls, ImportCalls, ResourceWriteCalls, TableCalls,
                 FieldWriteCalls, MetadataCalls):
    """One user's connection to one XNAT site.

    Use as ``async with XnatClient(credentials) as client:``, which logs in on
    entry (so bad credentials fail at once) and out on exit. All methods may
    run concurrently from many tasks.

    Attributes:
        credentials: site, user and password; read only.
        settings: timeouts, retries and pool size; read only.
    """
