"""The client's HTTP transport: httpx's own, except for file downloads.

Why: a download through httpcore passes every piece of the body through h11's
receive buffer and three copies, and reads the socket in pieces of at most a
few hundred KiB, each a new ``bytes`` and a trip through several layers of
Python. On a fast link that costs more CPU than anything else the mount does
on the event loop thread: httpx alone tops out at 0.6–1.3 GB/s of one core on
our 2-core machine, where ``recv_into`` a reused buffer passes 2.5–3.5 GB/s.

So GET requests marked with the ``DOWNLOAD`` extension go over connections
of this transport's own: h11 writes the request and parses the answer's head,
and a body with a ``Content-Length`` is then received straight from the
socket (TLS: from the TLS stream) in pieces of up to 256 KiB. A body sent
chunked, or delimited by the connection's end, is left to h11. Connections
whose body was read to its end are kept for the next download, as httpx
keeps its own. Everything else (listings, uploads, requests through a proxy)
goes to httpx's transport untouched.

Failures are raised as the httpx exceptions httpcore would raise
(``ConnectError``, ``ReadTimeout``, ``RemoteProtocolError``...), so the
client's retries and resumes treat both paths alike.
"""

from __future__ import annotations

import contextlib
import ssl
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import h11
import httpx
import trio

DOWNLOAD = "xnatfs.download"  # request extension: "this GET downloads a file"
# At most this much per read of a body: 1 MiB was no faster (2.9 against 3.1
# GB/s on loopback) and costs more memory in allocator churn.
RECEIVE_BYTES = 256 * 1024
HEAD_RECEIVE_BYTES = 64 * 1024
KEEPALIVE_SECONDS = 15.0  # Tomcat closes idle connections after 20 s
MAX_IDLE_PER_HOST = 8

Origin = tuple[str, str, int]  # scheme, host, port
Connection = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class DownloadTransport(httpx.AsyncBaseTransport):
    """httpx's transport (``inner``) plus a fast path for file downloads."""

    def __init__(self, inner: httpx.AsyncBaseTransport, ssl_context: ssl.SSLContext) -> None:
        self._inner = inner
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[tuple[float, Connection]]] = {}
        # downloads sent, connections opened for them, and idle ones they reused
        self.stats: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if (request.method != "GET" or not request.extensions.get(DOWNLOAD)
                or request.url.scheme not in ("http", "https") or _proxied(request.url)):
            return await self._inner.handle_async_request(request)
        timeouts = request.extensions.get("timeout", {})
        origin = (request.url.scheme, request.url.host, request.url.port
                  or (443 if request.url.scheme == "https" else 80))
        self.stats["downloads"] += 1
        reused = self._take_idle(origin)
        if reused is not None:
            self.stats["reused"] += 1
            try:
                return await self._exchange(request, origin, reused, timeouts)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                pass  # closed by the server while idle: try once on a new connection
        self.stats["connections"] += 1
        connection = await self._connect(origin, timeouts.get("connect"))
        return await self._exchange(request, origin, connection, timeouts)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _, connection in connections:
                await _close(connection)
        await self._inner.aclose()

    # ---------------------------------------------------------- connections
    async def _connect(self, origin: Origin, timeout: float | None) -> Connection:
        scheme, host, port = origin
        with _mapped(httpx.ConnectError, httpx.ConnectTimeout), _deadline(timeout):
            stream: Connection = await trio.open_tcp_stream(host, port)
            if scheme == "https":
                stream = trio.SSLStream(stream, self._ssl_context, server_hostname=host,
                                        https_compatible=True)
                try:
                    await stream.do_handshake()
                except BaseException:
                    await _close(stream)
                    raise
            return stream

    def _take_idle(self, origin: Origin) -> Connection | None:
        connections = self._idle.get(origin, [])
        while connections:
            since, connection = connections.pop()
            # An idle connection with something to read was closed by the server.
            if trio.current_time() - since < KEEPALIVE_SECONDS and not _socket(
                    connection).is_readable():
                return connection
            trio.lowlevel.spawn_system_task(_close, connection)
        return None

    def _give_back(self, origin: Origin, connection: Connection) -> None:
        connections = self._idle.setdefault(origin, [])
        connections.append((trio.current_time(), connection))
        while len(connections) > MAX_IDLE_PER_HOST:
            _, oldest = connections.pop(0)
            trio.lowlevel.spawn_system_task(_close, oldest)

    # ------------------------------------------------------------- exchange
    async def _exchange(self, request: httpx.Request, origin: Origin, connection: Connection,
                        timeouts: dict[str, float | None]) -> httpx.Response:
        """Send ``request`` and read the answer's head; the body is left to stream."""
        try:
            state = h11.Connection(our_role=h11.CLIENT)
            head = state.send(h11.Request(method=b"GET", target=request.url.raw_path,
                                          headers=list(request.headers.raw)))
            head += state.send(h11.EndOfMessage()) or b""
            with _mapped(httpx.WriteError, httpx.WriteTimeout), _deadline(timeouts.get("write")):
                await connection.send_all(head)
            read_timeout = timeouts.get("read")
            while True:
                event = state.next_event()
                if event is h11.NEED_DATA:
                    with _mapped(httpx.ReadError, httpx.ReadTimeout), _deadline(read_timeout):
                        state.receive_data(await connection.receive_some(HEAD_RECEIVE_BYTES))
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError("server disconnected without an answer")
                assert isinstance(event, h11.Response)
                break
        except h11.RemoteProtocolError as exc:
            await _close(connection)
            raise httpx.RemoteProtocolError(str(exc)) from exc
        except BaseException:
            await _close(connection)
            raise
        body = _Body(self, origin, connection, state, event, read_timeout)
        return httpx.Response(event.status_code, headers=event.headers, stream=body,
                              extensions={"http_version": b"HTTP/" + event.http_version,
                                          "reason_phrase": event.reason})


class _Body(httpx.AsyncByteStream):
    """An answer's body, straight from the socket when its length is known."""

    def __init__(self, transport: DownloadTransport, origin: Origin, connection: Connection,
                 state: h11.Connection, response: h11.Response,
                 read_timeout: float | None) -> None:
        self._transport = transport
        self._origin = origin
        self._connection: Connection | None = connection
        self._state = state
        self._read_timeout = read_timeout
        headers = {name.lower(): value for name, value in response.headers}
        length = headers.get(b"content-length")
        self._remaining = (int(length) if length is not None and b"transfer-encoding" not in
                           headers else None)
        if response.status_code in (204, 304):
            self._remaining = 0  # no body, whatever the headers say
        self._keep_alive = (response.http_version == b"1.1"
                            and b"close" not in headers.get(b"connection", b"").lower())

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._connection is None:
            raise httpx.StreamClosed()
        if self._remaining is None:
            async for chunk in self._framed_by_h11():
                yield chunk
            return
        early, _ = self._state.trailing_data  # body bytes that came with the head
        if early:
            early = early[:self._remaining]
            self._remaining -= len(early)
            yield early
        if self._remaining == 0:
            await self._finished()
            return
        connection = self._connection
        sock = connection.socket if isinstance(connection, trio.SocketStream) else None
        buffer = bytearray(min(RECEIVE_BYTES, self._remaining)) if sock is not None else None
        while self._remaining > 0:
            want = min(RECEIVE_BYTES, self._remaining)
            with _mapped(httpx.ReadError, httpx.ReadTimeout), _deadline(self._read_timeout):
                if sock is not None and buffer is not None:
                    view = memoryview(buffer)
                    received = await sock.recv_into(view[:want])
                    chunk = bytes(view[:received])
                    view.release()
                else:
                    chunk = bytes(await connection.receive_some(want))
            if not chunk:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body: "
                    f"{self._remaining} bytes missing")
            self._remaining -= len(chunk)
            yield chunk
        await self._finished()

    async def _framed_by_h11(self) -> AsyncIterator[bytes]:
        """A chunked body, or one that ends with the connection: h11 frames it."""
        assert self._connection is not None
        self._keep_alive = False
        try:
            while True:
                event = self._state.next_event()
                if event is h11.NEED_DATA:
                    with _mapped(httpx.ReadError, httpx.ReadTimeout), \
                            _deadline(self._read_timeout):
                        self._state.receive_data(
                            await self._connection.receive_some(RECEIVE_BYTES))
                elif isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc

    async def _finished(self) -> None:
        """The body was read to its end: the connection can carry the next download."""
        connection, self._connection = self._connection, None
        if connection is not None and self._keep_alive:
            self._transport._give_back(self._origin, connection)
        elif connection is not None:
            await _close(connection)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:  # cut short: what is left of the body is unread
            await _close(connection)


# ------------------------------------------------------------------ helpers
def _proxied(url: httpx.URL) -> bool:
    """Whether httpx would send this request through a proxy from the environment
    (it mounts its own transport for those, but a caller may have turned that off)."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get(url.scheme) or proxies.get("all")) and not \
        urllib.request.proxy_bypass(url.host)


def _socket(connection: Connection) -> trio.socket.SocketType:
    stream = connection
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket


async def _close(connection: Connection) -> None:
    with contextlib.suppress(Exception), trio.CancelScope(shield=True):
        if isinstance(connection, trio.SSLStream):
            await trio.aclose_forcefully(connection)
        else:
            await connection.aclose()


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    if seconds is None:
        yield
    else:
        with trio.fail_after(seconds):
            yield


@contextlib.contextmanager
def _mapped(failure: type[httpx.TransportError],
            timeout: type[httpx.TimeoutException]) -> Iterator[None]:
    """Raise what httpcore would: ``timeout`` for a wait that ran out, ``failure``
    for a socket or TLS error."""
    try:
        yield
    except trio.TooSlowError as exc:
        raise timeout(str(exc) or "timed out") from exc
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
            ssl.SSLError) as exc:
        raise failure(str(exc) or type(exc).__name__) from exc
