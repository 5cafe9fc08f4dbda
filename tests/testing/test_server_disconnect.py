"""Clients that hang up halfway: the test server logs a client disconnect (499,
nginx's "client closed request"), not an error, and keeps nothing half-received.

The requests go over raw sockets, so that a test decides exactly how much of a
request it sends and how much of an answer it reads before closing.
"""

from __future__ import annotations

import socket
import time
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from xnatfs.testing.imaging import synthetic_study, write_dicom_archive
from xnatfs.testing.harness import TestServer

ADMIN = ("admin", "admin")
IMPORT = "/data/services/import?import-handler=DICOM-zip&project=NEURO_PUB"
TRACEBACK_MARKERS = ("Traceback", "Error handling request", "unhandled error")


@pytest.fixture
def fresh_server(started_fresh_server: TestServer) -> TestServer:
    """conftest's ``fresh_server``, started while the test before ran (none of
    this module's tests looks for its data under ``tmp_path``)."""
    return started_fresh_server


@pytest.fixture
def admin(fresh_server: TestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fresh_server.url, auth=ADMIN, timeout=60) as c:
        yield c


def raw_request(server: TestServer, method: str, target: str, headers: dict[str, str]) -> socket.socket:
    """A connected socket that has sent a request's head (no body yet)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    auth = b64encode(":".join(ADMIN).encode()).decode()
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Basic {auth}",
             *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def hang_up(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: a reset, as a killed client or a dropped link gives."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def logged(server: TestServer, mark: int, route: str, timeout: float = 10.0) -> dict[str, Any]:
    """The one log entry of ``route`` since ``mark``, once the server has written it."""
    deadline = time.monotonic() + timeout
    while True:
        entries = [e for e in server.requests_since(mark) if e["route"] == route]
        if entries or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(entries) == 1, entries
    return entries[0]


def server_errors(server: TestServer) -> list[str]:
    text = server.stderr_path.read_text() if server.stderr_path.exists() else ""
    return [line for line in text.splitlines() if any(m in line for m in TRACEBACK_MARKERS)]


def prearchive_sessions(admin: httpx.Client) -> list[dict[str, str]]:
    r = admin.get("/data/prearchive/projects?format=json")
    assert r.status_code == 200, r.text
    return r.json()["ResultSet"]["Result"]


@pytest.mark.parametrize("content_type", ["application/zip", "multipart/form-data; boundary=XX"])
def test_upload_abandoned_mid_body_is_a_client_disconnect(
        fresh_server: TestServer, admin: httpx.Client, content_type: str) -> None:
    server = fresh_server
    mark = server.log_mark()
    sock = raw_request(server, "POST", IMPORT, {"Content-Type": content_type,
                                                "Content-Length": str(200 << 20)})
    head = (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="s.zip"\r\n'
            b"Content-Type: application/zip\r\n\r\n" if content_type.startswith("multipart")
            else b"")
    sock.sendall(head + b"PK\x03\x04" + bytes(3 << 20))
    time.sleep(0.3)  # the server has started spooling the body
    hang_up(sock)

    entry = logged(server, mark, "services.import")
    assert entry["status"] == 499, entry
    assert entry["path"] == "/data/services/import"
    assert server_errors(server) == [], server.stderr_path.read_text()
    # Still answering, nothing half-imported, no spooled body left behind.
    assert admin.get("/data/projects?format=json").status_code == 200
    assert prearchive_sessions(admin) == []
    assert list((server.data_dir / "tmp").glob("upload-*")) == []


def test_upload_abandoned_during_headers_of_body_is_quiet(
        fresh_server: TestServer, admin: httpx.Client) -> None:
    """No body byte at all: the read of the body is what notices the hang-up."""
    server = fresh_server
    mark = server.log_mark()
    sock = raw_request(server, "POST", IMPORT, {"Content-Type": "application/zip",
                                                "Content-Length": "1000"})
    time.sleep(0.3)
    hang_up(sock)
    assert logged(server, mark, "services.import")["status"] == 499
    assert server_errors(server) == []
    assert prearchive_sessions(admin) == []


def test_download_abandoned_mid_response_is_a_client_disconnect(
        fresh_server: TestServer, admin: httpx.Client, tmp_path: Path) -> None:
    server = fresh_server
    archive = tmp_path / "study.zip"
    write_dicom_archive(archive, synthetic_study("Gone^Away", "GONE001", slices=8, rows=256,
                                                 cols=256, seed=7))  # about 1 MB
    r = admin.post(IMPORT, content=archive.read_bytes(),
                   headers={"Content-Type": "application/zip"})
    assert r.status_code == 200, r.text
    uri = r.text.strip()
    server.set_knobs(bandwidth_mb_s=0.5)  # a slow answer (256 KiB chunks) to walk away from
    try:
        mark = server.log_mark()
        sock = raw_request(server, "GET", uri + "?format=zip", {})
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        time.sleep(0.2)
        hang_up(sock)
        entry = logged(server, mark, "prearchive.zip")
    finally:
        server.set_knobs(bandwidth_mb_s=0.0)
    assert entry["status"] == 499, entry
    assert server_errors(server) == []
    assert admin.get(uri + "?format=json").status_code == 200


def test_log_counts_the_bytes_actually_sent(fresh_server: TestServer,
                                            admin: httpx.Client) -> None:
    """``sent`` in the request log is what went out: all of a whole download or a
    zip, part of one the client walked away from (sendfile, unshaped), where
    ``bytes`` says 0. The benchmark's S10 counts what XNAT served with it."""
    server = fresh_server
    project = "/data/projects/SENT"
    assert admin.put(project).status_code in (200, 201)
    url = f"{project}/resources/BIG/files/big.bin"
    size = 32 << 20  # more than the socket buffers hold, so sendfile blocks on the reader
    assert admin.put(url, content=bytes(size)).status_code == 200

    mark = server.log_mark()
    assert len(admin.get(url).content) == size
    whole = logged(server, mark, "files.download")
    assert (whole["status"], whole["bytes"], whole["sent"]) == (200, size, size)

    mark = server.log_mark()
    sock = raw_request(server, "GET", url, {})
    got = 0
    while got < (1 << 20):
        got += len(sock.recv(65536))
    hang_up(sock)
    cut = logged(server, mark, "files.download")
    assert cut["status"] == 499 and cut["bytes"] == 0, cut
    assert got - 1024 <= cut["sent"] < size, (got, cut)

    mark = server.log_mark()
    zipped = admin.get(f"{project}/resources/BIG/files", params={"format": "zip"})
    assert zipped.status_code == 200
    entry = logged(server, mark, "files.archive")
    assert entry["sent"] == len(zipped.content) > 0, entry  # deflated zeros: small
