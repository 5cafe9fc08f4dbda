"""Test and benchmark knobs of the test server: shaping, faults, request log.

Real XNAT has none of this; it exists so that tests can make the server slow,
flaky or silent on purpose, and count what the mount asked for. The knobs can
be changed while the server runs through ``/_testserver/knobs`` (loopback
only), so one server can be healthy for set-up and failing for the test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import math
import os
import random
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import web

CHUNK = 256 * 1024


@dataclasses.dataclass
class Knobs:
    """Everything a test may turn. Rates are probabilities per request."""

    latency_ms: float = 0.0          # added before every request is handled
    bandwidth_mb_s: float = 0.0      # cap per connection for large bodies (0 = none)
    range: bool = False              # honour HTTP Range on file downloads (real XNAT: no)
    fail_rate: float = 0.0           # answer 503 instead of handling the request
    fault_status: int = 503          # what fail_rate answers (a 4xx: the server refuses)
    drop_rate: float = 0.0           # abort the connection halfway through a file body
    truncate_rate: float = 0.0       # close cleanly after half of a file body
    stall_rate: float = 0.0          # stop halfway through a file body and from then on
                                     # answer nothing (sets ``hang``): a server gone silent
                                     # mid-download, its connection left open
    hang: bool = False               # accept requests but never answer them
    answer_delay_ms: float = 0.0     # handle the request, then hold its answer back this
                                     # long (XNAT importing a big archive before it answers)
    fault_path: str = ""             # regex: faults apply only to matching paths ("" = all)
    session_timeout_s: float = 900.0  # JSESSION inactivity timeout
    prearchive_settle_s: float = 5.0  # gradual-DICOM RECEIVING -> READY after this idle time
    catalog_conflicts: bool = True   # two uploads into one resource at once: the later
                                     # catalog write fails with 500, as XNAT's does
    # Throttling, as a proxy in front of XNAT does it (nginx limit_req answers 503,
    # or 429 with limit_req_status): the next throttle_requests requests, and every
    # request until the epoch time throttle_until, get throttle_status with
    # Retry-After: throttle_retry_after_s (an HTTP-date if throttle_http_date;
    # no header if negative). fault_path narrows it.
    throttle_status: int = 429
    throttle_requests: int = 0
    throttle_until: float = 0.0
    throttle_retry_after_s: float = 1.0
    throttle_http_date: bool = False

    def update(self, changes: dict[str, Any]) -> None:
        fields = {f.name: f for f in dataclasses.fields(self)}
        for key, value in changes.items():
            if key not in fields:
                raise KeyError(key)
            kind = type(getattr(self, key))
            setattr(self, key, kind(value))

    def fault_applies(self, path: str) -> bool:
        return not self.fault_path or re.search(self.fault_path, path) is not None

    def throttled(self, path: str) -> dict[str, str] | None:
        """The Retry-After headers of a throttled answer to this request, or None
        when it is not throttled (each throttled request uses up one of
        ``throttle_requests``)."""
        if not self.fault_applies(path):
            return None
        if self.throttle_requests > 0:
            self.throttle_requests -= 1
        elif time.time() >= self.throttle_until:
            return None
        seconds = self.throttle_retry_after_s
        if seconds < 0:
            return {}
        if self.throttle_http_date:
            return {"Retry-After": email.utils.formatdate(time.time() + seconds, usegmt=True)}
        return {"Retry-After": str(math.ceil(seconds))}

    def roll(self, rate: float, path: str) -> bool:
        return rate > 0 and self.fault_applies(path) and random.random() < rate


class RequestLog:
    """Append-only JSON-lines log of every request, readable by tests.

    Each line: ``{"t", "method", "path", "query", "status", "route", "bytes", "sent",
    "range"}``. ``route`` is a coarse name (``files.download``, ``scans.list``...)
    set by the handler, so a test can count requests by kind without parsing URLs.
    ``bytes`` is the length of a file body sent whole (0 when it was cut short);
    ``sent`` is the body bytes that went out, also of a download the client
    hung up on and of a streamed zip or tar: what the server actually served.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        self._file.close()


def read_request_log(path: Path | str, since: int = 0) -> list[dict[str, Any]]:
    """Entries of a request log after byte offset ``since`` (see :func:`log_offset`)."""
    with open(path, encoding="utf-8") as f:
        f.seek(since)
        return [json.loads(line) for line in f if line.strip()]


def log_offset(path: Path | str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


class Throttle:
    """Token bucket for one connection's large body, ``bandwidth_mb_s`` MB/s."""

    def __init__(self, mb_s: float) -> None:
        self.rate = mb_s * 1_000_000
        self.start = time.monotonic()
        self.sent = 0

    async def consumed(self, n: int) -> None:
        if self.rate <= 0:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            await asyncio.sleep(ahead)


async def received_body(request: web.Request, knobs: Knobs,
                        chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
    """A raw request body in chunks, received no faster than ``bandwidth_mb_s``
    (the cap applies to uploads as it does to downloads)."""
    throttle = Throttle(knobs.bandwidth_mb_s)
    async for chunk in request.content.iter_chunked(chunk_size):
        yield chunk
        await throttle.consumed(len(chunk))


async def send_file_body(request: web.Request, response: web.StreamResponse,
                         fobj: BinaryIO, offset: int, count: int, knobs: Knobs) -> None:
    """Send ``count`` bytes of an open file, honouring bandwidth caps and body faults.

    Without shaping or faults the kernel's ``sendfile`` does the work, so that the
    server is never what limits a loopback benchmark.
    """
    path = request.path
    cut_at = None
    if knobs.roll(knobs.drop_rate, path):
        cut_at, how = count // 2, "drop"
    elif knobs.roll(knobs.truncate_rate, path):
        cut_at, how = count // 2, "truncate"
    elif knobs.roll(knobs.stall_rate, path):
        cut_at, how = count // 2, "stall"
    if cut_at is None and knobs.bandwidth_mb_s <= 0:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        await response.write(b"")  # flush headers before handing the socket to sendfile
        fobj.seek(offset)
        try:
            await asyncio.get_running_loop().sendfile(transport, fobj, offset, count)
        finally:
            # asyncio leaves the file at offset + bytes sent, also when sendfile failed.
            request["sent"] = request.get("sent", 0) + fobj.tell() - offset
        return
    throttle = Throttle(knobs.bandwidth_mb_s)
    loop = asyncio.get_running_loop()
    remaining = count if cut_at is None else cut_at
    fobj.seek(offset)
    while remaining > 0:
        chunk = await loop.run_in_executor(None, fobj.read, min(CHUNK, remaining))
        if not chunk:
            break
        await response.write(chunk)
        request["sent"] = request.get("sent", 0) + len(chunk)
        remaining -= len(chunk)
        await throttle.consumed(len(chunk))
    if cut_at is not None:
        request["fault"] = how
        transport = request.transport
        if how == "stall":
            knobs.hang = True  # gone silent: new requests are not answered either
            # Hold the connection open, sending nothing, until the client hangs up
            # or the test lifts the hang (bounded: an hour).
            for _ in range(36000):
                if transport is None or transport.is_closing() or not knobs.hang:
                    break
                await asyncio.sleep(0.1)
        if transport is not None:
            if how == "drop":
                transport.abort()
            else:
                transport.close()
        raise ConnectionResetError(f"fault injected: {how}")
