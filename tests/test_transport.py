"""DownloadTransport: file downloads over the client's own connections.

Against the test server, downloads come back byte for byte and share one
kept-alive connection; against a scripted socket server, the cases the test
server never produces: an idle connection the server closed, a chunked body,
a body cut short, a server that stops answering.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from xnatfs.client import ClientSettings, XnatClient
from xnatfs.credentials import Credentials, SessionCache
from xnatfs.testing.harness import TestServer
from xnatfs.transport import DOWNLOAD, DownloadTransport


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    with TestServer(tmp_path_factory.mktemp("transport") / "data", dataset="demo") as srv:
        yield srv


def transport_of(client: XnatClient) -> DownloadTransport:
    transport = client._http._transport
    assert isinstance(transport, DownloadTransport)
    return transport


async def test_downloads_are_exact_and_share_one_connection(server: TestServer,
                                                            tmp_path: Path) -> None:
    credentials = Credentials(server.url, "admin", "admin")
    async with XnatClient(credentials, session_cache=SessionCache(tmp_path / "s.json")) as client:
        (experiment, *_) = await client.list_experiments("NEURO_PUB", "NP001")
        files = (await client.list_scan_files(experiment.id))[:5]
        received = []
        for remote in files:
            async with client.open_stream(remote.uri) as stream:
                received.append(b"".join([chunk async for chunk in stream]))
        stats = transport_of(client).stats
        assert stats["downloads"] == len(files)
        assert stats["connections"] == 1 and stats["reused"] == len(files) - 1
    async with httpx.AsyncClient(auth=("admin", "admin")) as plain:
        for remote, data in zip(files, received, strict=True):
            expected = (await plain.get(server.url + remote.uri)).content
            assert data == expected and len(data) == remote.size


async def test_a_download_cut_short_keeps_no_connection(server: TestServer,
                                                        tmp_path: Path) -> None:
    credentials = Credentials(server.url, "admin", "admin")
    async with XnatClient(credentials, session_cache=SessionCache(tmp_path / "s.json")) as client:
        (experiment, *_) = await client.list_experiments("NEURO_PUB", "NP001")
        first, second = (await client.list_scan_files(experiment.id))[:2]
        async with client.open_stream(first.uri, 0, 100) as stream:  # Range off: cut at 100
            assert len(b"".join([chunk async for chunk in stream])) == 100
        async with client.open_stream(second.uri) as stream:
            assert len(b"".join([chunk async for chunk in stream])) == second.size
        assert transport_of(client).stats["connections"] == 2


# ------------------------------------------------------- a scripted server
Reply = Callable[[socket.socket], bool]  # writes one answer; True: keep the connection


class ScriptedServer:
    """Answers each request it reads with the next reply of its script; over
    TLS when given a server context."""

    def __init__(self, replies: list[Reply], tls: ssl.SSLContext | None = None) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()
                return
        with conn:
            while self.replies:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        return
                    head += data
                if not self.replies.pop(0)(conn):
                    return

    def close(self) -> None:
        self.listener.close()


def body(data: bytes, *, keep: bool = True) -> Reply:
    def reply(conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        return keep
    return reply


def chunked(*pieces: bytes) -> Reply:
    def reply(conn: socket.socket) -> bool:
        out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        for piece in pieces:
            out += b"%x\r\n%s\r\n" % (len(piece), piece)
        conn.sendall(out + b"0\r\n\r\n")
        return True
    return reply


def short(data: bytes, promised: int) -> Reply:
    def reply(conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (promised, data))
        return False
    return reply


def stall(conn: socket.socket) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    threading.Event().wait(5)
    return False


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(replies: list[Reply], tls: ssl.SSLContext | None = None) -> ScriptedServer:
        servers.append(ScriptedServer(replies, tls))
        return servers[-1]

    yield start
    for srv in servers:
        srv.close()


def new_client(context: ssl.SSLContext | None = None
               ) -> tuple[httpx.AsyncClient, DownloadTransport]:
    context = context or httpx.create_ssl_context()
    transport = DownloadTransport(httpx.AsyncHTTPTransport(verify=context), context)
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(2.0)), transport


async def download(client: httpx.AsyncClient, url: str) -> bytes:
    async with client.stream("GET", url + "/file", extensions={DOWNLOAD: True}) as response:
        return b"".join([chunk async for chunk in response.aiter_raw()])


async def test_an_idle_connection_the_server_closed_is_replaced(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted([body(b"first", keep=False), body(b"second")])
    client, transport = new_client()
    async with client:
        assert await download(client, srv.url) == b"first"
        await trio.sleep(0.05)  # the server's close reaches us
        assert await download(client, srv.url) == b"second"
    assert srv.connections == 2 and transport.stats["connections"] == 2


async def test_a_chunked_body_is_framed_by_h11(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted([chunked(b"abc", b"defgh"), body(b"next")])
    client, transport = new_client()
    async with client:
        assert await download(client, srv.url) == b"abcdefgh"
        assert await download(client, srv.url) == b"next"
    assert transport.stats["connections"] == 2  # a chunked answer's connection is not kept


async def test_a_body_cut_short_is_a_protocol_error(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted([short(b"12345", 10)])
    client, _ = new_client()
    async with client:
        with pytest.raises(httpx.RemoteProtocolError):
            await download(client, srv.url)


async def test_a_silent_server_times_out(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted([stall])
    client, _ = new_client()
    async with client:
        with trio.fail_after(4), pytest.raises(httpx.ReadTimeout):
            await download(client, srv.url)


async def test_nothing_listening_is_a_connect_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    client, _ = new_client()
    async with client:
        with pytest.raises(httpx.ConnectError):
            await download(client, f"http://127.0.0.1:{port}")


async def test_other_requests_go_to_httpx(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted([body(b"listing")])
    client, transport = new_client()
    async with client:
        assert (await client.get(srv.url + "/data/projects")).content == b"listing"
    assert transport.stats["downloads"] == 0


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting the server's test CA)."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = httpx.create_ssl_context()
    ca.configure_trust(client)
    return server, client


async def test_downloads_over_tls_share_one_connection(scripted, tls) -> None:  # type: ignore[no-untyped-def]
    server_context, client_context = tls
    big = bytes(range(256)) * 20_000  # several reads of the TLS stream
    srv = scripted([body(big), body(b"second")], tls=server_context)
    client, transport = new_client(client_context)
    async with client:
        assert await download(client, srv.url) == big
        assert await download(client, srv.url) == b"second"
    assert srv.connections == 1 and transport.stats["reused"] == 1


async def test_an_untrusted_certificate_is_refused(scripted, tls) -> None:  # type: ignore[no-untyped-def]
    server_context, _ = tls
    srv = scripted([body(b"secret")], tls=server_context)
    client, _ = new_client(httpx.create_ssl_context())  # the system's CAs only
    async with client:
        with pytest.raises(httpx.ConnectError):
            await download(client, srv.url)
