"""The XNAT 1.8-compatible test server: app assembly, middleware and dispatch.

``xnatfs testserver --data DIR --port N`` runs it. Requests pass through one
middleware (request log, latency, faults, authentication, error pages) and
are then dispatched on their path the way XNAT's Restlet router matches
prefixes: ``/data/archive/X`` is ``/data/X``, and ``/REST`` is ``/data``.
Each family of endpoints answers from its own module: :mod:`.archive`,
:mod:`.services` (import and prearchive), :mod:`.logins`, :mod:`.siteinfo`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from . import logins, siteinfo
from .archive import ArchiveRoutes
from .auth import Caller, SessionRegistry, authenticate, session_cookies, unauthorized
from .knobs import Knobs, RequestLog
from .services import ServiceRoutes
from .store import Store, StoreError
from .xnatformat import XnatHTTPError, error_response, json_response, text_response

log = logging.getLogger("xnatfs.testserver")


@dataclass
class ServerContext:
    store: Store
    knobs: Knobs
    sessions: SessionRegistry
    request_log: RequestLog | None
    archive: ArchiveRoutes
    services: ServiceRoutes | None = None  # import, prearchive and archiving


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def normalise_data_path(segments: list[str]) -> list[str] | None:
    """Segments after ``/data`` (or ``/REST``), with the ``archive`` alias removed."""
    if not segments or segments[0] not in ("data", "REST"):
        return None
    rest = segments[1:]
    if rest and rest[0] == "archive" and (len(rest) == 1 or rest[1] in (
            "projects", "subjects", "experiments")):
        rest = rest[1:]
    return rest


CTX = web.AppKey("ctx", ServerContext)

# Paths that answer without a logged-in user.
_OPEN_PATHS = re.compile(r"^/(|app/.*|data/services/auth/?|data/JSESSION/?|_testserver/.*)$")


def build_app(ctx: ServerContext) -> web.Application:
    app = web.Application(middlewares=[_make_middleware(ctx)], client_max_size=0)
    app[CTX] = ctx

    async def add_session_cookies(request: web.Request, response: web.StreamResponse) -> None:
        # Runs just before headers go out, streamed responses included; handlers
        # may have logged the caller in or out (services/auth, DELETE JSESSION).
        session_cookies(response, request.get("caller"), ctx.knobs)

    app.on_response_prepare.append(add_session_cookies)
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


def _make_middleware(ctx: ServerContext):  # noqa: ANN202 - aiohttp middleware
    @web.middleware
    async def middleware(request: web.Request, handler):  # noqa: ANN001, ANN202
        started = time.monotonic()
        knobs = ctx.knobs
        path = request.path
        status = 500
        response: web.StreamResponse | None = None
        try:
            if not path.startswith("/_testserver/"):
                if knobs.hang and knobs.fault_applies(path):
                    request["route"] = "hang"
                    await asyncio.Event().wait()
                if knobs.latency_ms > 0:
                    await asyncio.sleep(knobs.latency_ms / 1000)
                retry_after = knobs.throttled(path)
                if retry_after is not None:
                    request["fault"] = "throttled"
                    raise XnatHTTPError(knobs.throttle_status, "Too many requests (throttled "
                                        "by the test server)", retry_after)
                if knobs.roll(knobs.fail_rate, path):
                    status = knobs.fault_status
                    request["fault"] = "5xx" if status >= 500 else str(status)
                    raise XnatHTTPError(status, "Service temporarily unavailable (fault "
                                        "injected)" if status >= 500 else "Refused (fault "
                                        "injected)")
            caller = authenticate(request, ctx.store, ctx.sessions)
            request["caller"] = caller
            if caller is None and not _OPEN_PATHS.match(path):
                raise unauthorized(request)
            response = await handler(request)
            if knobs.answer_delay_ms > 0 and knobs.fault_applies(path):
                await asyncio.sleep(knobs.answer_delay_ms / 1000)
        except XnatHTTPError as exc:
            response = error_response(exc.status, exc.message, exc.headers)
        except StoreError as exc:
            response = error_response(exc.status, exc.message)
        except web.HTTPException as exc:
            response = exc
        except asyncio.CancelledError:
            # aiohttp does not cancel handlers whose client leaves; this is shutdown.
            _log_request(ctx, request, started, CLIENT_CLOSED_REQUEST)
            raise
        except Exception as exc:
            if not _client_disconnected(request, exc):
                log.exception("unhandled error for %s %s", request.method, request.path_qs)
                response = error_response(500, "Internal Server Error")
            else:
                log.debug("client went away during %s %s: %r", request.method,
                          request.path_qs, exc)
                _log_request(ctx, request, started, CLIENT_CLOSED_REQUEST)
                return _nobody_listening(request)
        status = response.status
        _log_request(ctx, request, started, status)
        return response

    return middleware


# nginx's "client closed request": the client hung up before its answer was sent.
CLIENT_CLOSED_REQUEST = 499


def _client_disconnected(request: web.Request, exc: Exception) -> bool:
    """Whether ``exc`` says the client hung up (mid-body or mid-answer), not a bug.

    aiohttp fails reads of an abandoned body with ``ConnectionResetError`` and
    writes to a closed connection with ``ClientConnectionResetError`` (one too);
    a broken pipe or an aborted ``sendfile`` are ``ConnectionError``s as well.
    ``loop.sendfile`` on a transport that is already closing says so with a
    ``RuntimeError``.
    """
    if isinstance(exc, ConnectionError):
        return True
    transport = request.transport
    return isinstance(exc, RuntimeError) and (transport is None or transport.is_closing())


def _nobody_listening(request: web.Request) -> web.StreamResponse:
    """What to hand aiohttp for a client that is gone: it cannot be sent, and
    aiohttp drops it quietly (where an exception would be logged as an error)."""
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.abort()  # e.g. sendfile hit a reset before the transport noticed
    return web.Response(status=CLIENT_CLOSED_REQUEST, reason="Client Closed Request")


def _log_request(ctx: ServerContext, request: web.Request, started: float, status: int) -> None:
    if ctx.request_log is None or request.path.startswith("/_testserver/"):
        return  # the log is what clients asked XNAT for, not the tests' own steering
    ctx.request_log.write({
        "t": round(time.time(), 4), "method": request.method, "path": request.path,
        "query": request.query_string, "status": status,
        "route": request.get("route", "other"), "bytes": request.get("bytes", 0),
        "sent": request.get("sent", 0),
        "range": request.get("range"), "fault": request.get("fault"),
        "ms": round((time.monotonic() - started) * 1000, 2),
    })


async def _dispatch(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    segments = _split(request.path)
    caller: Caller | None = request.get("caller")
    if not segments:
        return siteinfo.home_page(caller)
    head = segments[0]
    if head == "app":
        return siteinfo.home_page(caller)
    if head == "_testserver":
        return await _control(ctx, request, segments[1:])
    if head == "xapi":
        return siteinfo.xapi(request, caller, segments[1:])
    data = normalise_data_path(segments)
    if data is None:
        raise XnatHTTPError(404, "The requested resource was not found.")
    if not data:
        raise XnatHTTPError(404, "The requested resource was not found.")
    first = data[0]
    if first == "JSESSION":
        return logins.jsession(request, ctx.sessions, caller)
    if first == "services" and len(data) >= 2 and data[1] == "auth":
        return await logins.services_auth(request, ctx.store, ctx.sessions)
    if first == "auth":
        request["route"] = "auth"
        assert caller is not None
        return text_response(f"User '{caller.login}' is logged in")
    if first == "version":
        raise XnatHTTPError(404, "The requested resource was not found.")
    if first == "services" and len(data) >= 3 and data[1] == "tokens":
        assert caller is not None
        return logins.tokens(request, ctx.store, caller, data[2:])
    if first in ("services", "prearchive") and ctx.services is not None:
        assert caller is not None
        return await ctx.services.handle(request, caller, data)
    if first in ("projects", "subjects", "experiments"):
        assert caller is not None
        return await ctx.archive.handle(request, caller, data)
    if first == "search" and len(data) >= 2 and data[1] == "elements":
        return siteinfo.search_elements(request, data[2:])
    if first == "user" and len(data) == 1:
        raise XnatHTTPError(404, "The requested resource was not found.")
    raise XnatHTTPError(404, "The requested resource was not found.")


# ------------------------------------------------------------- test control
async def _control(ctx: ServerContext, request: web.Request, rest: list[str]) -> web.Response:
    """Loopback-only knobs for tests: change knobs, expire sessions."""
    request["route"] = "control"
    peer = request.remote or ""
    if not (peer.startswith("127.") or peer == "::1"):
        raise XnatHTTPError(403, "Forbidden")
    if rest == ["knobs"]:
        if request.method == "POST":
            try:
                ctx.knobs.update(await request.json())
            except (KeyError, ValueError, TypeError) as exc:
                raise XnatHTTPError(400, f"bad knob: {exc}") from None
        return json_response(ctx.knobs.__dict__)
    if rest == ["sync"] and request.method == "POST":
        # A download's log line is written just after its last byte went out; let
        # handlers that are finishing run first, so a test reading the log next
        # sees every request it has had an answer to.
        for _ in range(10):
            await asyncio.sleep(0)
        return json_response({})
    if rest == ["expire-sessions"] and request.method == "POST":
        return json_response({"expired": ctx.sessions.expire_all()})
    raise XnatHTTPError(404, "The requested resource was not found.")


# ------------------------------------------------------------------- running
def make_context(data_dir: Path, knobs: Knobs, *, request_log: Path | None = None) -> ServerContext:
    store = Store(data_dir)
    log_path = request_log if request_log is not None else data_dir / "requests.log"
    ctx = ServerContext(store=store, knobs=knobs, sessions=SessionRegistry(knobs),
                        request_log=RequestLog(log_path), archive=ArchiveRoutes(store, knobs))
    ctx.services = ServiceRoutes(store, knobs)
    return ctx


async def serve(ctx: ServerContext, host: str, port: int,
                ready: asyncio.Event | None = None,
                tls: ssl.SSLContext | None = None) -> None:
    """Serve until cancelled; ``tls``: over HTTPS with that context's certificate."""
    app = build_app(ctx)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=512, ssl_context=tls)
    await site.start()
    server = site._server  # aiohttp exposes the bound sockets only here
    if port == 0 and server is not None and server.sockets:  # type: ignore[attr-defined]
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    scheme = "https" if tls is not None else "http"
    log.info("XNAT test server listening on %s://%s:%d", scheme, host, port)
    print(json.dumps({"listening": f"{scheme}://{host}:{port}"}), flush=True)
    if ready is not None:
        ready.set()
    try:
        if ctx.services is not None:
            await ctx.services.background()
        else:
            await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        ctx.store.close()
        if ctx.request_log is not None:
            ctx.request_log.close()
