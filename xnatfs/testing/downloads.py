"""Sending files out as XNAT does: one file, or many as a streamed zip or tar.

The archive's ``files`` routes and the prearchive's both download through
here, so a file or a zip looks the same whichever part of XNAT serves it:
XNAT's headers and content types, Range only when the knob allows it (real
XNAT 1.8 ignores it), and zips and tars chunked without a Content-Length,
with XNAT's entry layout (``RestFileUtils.buildRelativePath``).
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import sqlite3
import tarfile
import threading
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from .knobs import Knobs, Throttle, send_file_body
from .xnatformat import XnatHTTPError

# Content types XNAT's buildMediaType knows; everything else is octet-stream.
_KNOWN_TYPES = {".txt": "text/plain", ".xml": "text/xml", ".jpg": "image/jpeg",
                ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
                ".pdf": "application/pdf", ".html": "text/html", ".htm": "text/html",
                ".svg": "image/svg+xml", ".tif": "image/tiff", ".tiff": "image/tiff",
                ".bmp": "image/bmp"}


async def send_blob(request: web.Request, blob: Path, name: str, size: int, mtime: float,
                    knobs: Knobs) -> web.StreamResponse:
    """A single-file download with XNAT's headers; Range only when the knob allows it."""
    suffix = Path(name).suffix.lower()
    headers = {
        "Content-Disposition": f'attachment; filename="{name}";',
        "Cache-Control": "must-revalidate",
        "Last-Modified": email.utils.formatdate(mtime, usegmt=True),
    }
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = _KNOWN_TYPES.get(suffix, "application/octet-stream")
    start, count = 0, size
    if knobs.range:
        response.headers["Accept-Ranges"] = "bytes"
        byte_range = _parse_range(request.headers.get("Range"), size)
        if isinstance(byte_range, str):  # "unsatisfiable"
            raise XnatHTTPError(416, "Requested Range Not Satisfiable",
                                {"Content-Range": f"bytes */{size}"})
        if byte_range is not None:
            start, end = byte_range
            count = end - start + 1
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            request["range"] = f"{start}-{end}"
    response.content_length = count
    await response.prepare(request)
    if request.method == "HEAD" or count == 0:
        return response
    with open(blob, "rb") as fobj:
        await send_file_body(request, response, fobj, start, count, knobs)
    request["bytes"] = count
    return response


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """A single ``bytes=a-b`` range; multi-ranges are answered with the whole body."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    spec = header[6:].strip()
    start_s, _, end_s = spec.partition("-")
    try:
        if start_s == "":
            length = int(end_s)
            if length == 0:
                return "unsatisfiable"
            return max(size - length, 0), size - 1
        start = int(start_s)
        end = int(end_s) if end_s else size - 1
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def zip_entry_name(session_label: str, scan: sqlite3.Row | Mapping[str, str] | None,
                   resource_label: str,
                   relpath: str, structure: str = "default") -> str:
    """XNAT's archive layout (``RestFileUtils.buildRelativePath``)."""
    if scan is not None:
        stype = scan["type"] or ""
        if structure == "improved":
            folder = scan["scan_id"] + ("_" + re.sub(r'[/\\:*?"<>|]', "_", stype) if stype else "")
            return f"{session_label}/scans/{folder}/{resource_label}/{relpath}"
        folder = scan_folder_name(scan["scan_id"], stype)
        if structure == "simplified":
            return f"{session_label}/scans/{folder}/{resource_label}/{relpath}"
        return f"{session_label}/scans/{folder}/resources/{resource_label}/files/{relpath}"
    if structure in ("simplified", "improved"):
        return f"{session_label}/resources/{resource_label}/{relpath}"
    return f"{session_label}/resources/{resource_label}/files/{relpath}"


def scan_folder_name(scan_id: str, scan_type: str) -> str:
    """``{ID}-{type.replaceAll("\\W", "_")}``, or plain ``{ID}`` without a type."""
    if not scan_type:
        return scan_id
    return f"{scan_id}-{re.sub(r'[^A-Za-z0-9_]', '_', scan_type)}"


class _QueueWriter:
    """A file-like sink for zipfile/tarfile in a thread, feeding an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop = loop
        self.queue = queue
        self.buffer = bytearray()
        self.closed_by_reader = threading.Event()
        self.position = 0

    def write(self, data: bytes) -> int:
        if self.closed_by_reader.is_set():
            raise BrokenPipeError("client went away")
        self.buffer += data
        self.position += len(data)
        if len(self.buffer) >= 256 * 1024:
            self._push(bytes(self.buffer))
            self.buffer.clear()
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        if self.buffer:
            self._push(bytes(self.buffer))
            self.buffer.clear()

    def _push(self, chunk: bytes | None) -> None:
        asyncio.run_coroutine_threadsafe(self.queue.put(chunk), self.loop).result()


def _write_archive(sink: _QueueWriter, entries: list[tuple[str, Path, float]], fmt: str) -> None:
    if fmt == "zip":
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED,  # type: ignore[call-overload]
                             allowZip64=True) as zf:
            for name, blob, mtime in entries:
                info = zipfile.ZipInfo(name, date_time=time.localtime(mtime)[:6])
                info.compress_type = zipfile.ZIP_DEFLATED
                with open(blob, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
    else:
        mode = "w|gz" if fmt == "tar.gz" else "w|"
        with tarfile.open(fileobj=sink, mode=mode) as tf:  # type: ignore[call-overload]
            for name, blob, mtime in entries:
                entry = tarfile.TarInfo(name)
                entry.size = blob.stat().st_size
                entry.mtime = int(mtime)
                with open(blob, "rb") as src:
                    tf.addfile(entry, src)
    sink.flush()


_ARCHIVE_TYPES = {"zip": "application/zip", "tar.gz": "application/x-gzip",
                  "tar": "application/x-tar"}


async def archive_response(request: web.Request, entries: list[tuple[str, Path, float]],
                           fmt: str, name: str, knobs: Knobs) -> web.StreamResponse:
    """A zip/tar download as XNAT sends it: chunked, no Content-Length."""
    response = web.StreamResponse(headers={
        "Content-Disposition": f'attachment; filename="{name}.{fmt}";'})
    response.content_type = _ARCHIVE_TYPES[fmt]
    response.enable_chunked_encoding()
    await response.prepare(request)
    await stream_archive(request, response, entries, fmt, knobs)
    return response


async def stream_archive(request: web.Request, response: web.StreamResponse,
                         entries: list[tuple[str, Path, float]],
                         fmt: str, knobs: Knobs) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
    sink = _QueueWriter(loop, queue)

    def produce() -> None:
        try:
            _write_archive(sink, entries, fmt)
        finally:
            if not sink.closed_by_reader.is_set():
                sink._push(None)

    worker = loop.run_in_executor(None, produce)
    throttle = Throttle(knobs.bandwidth_mb_s)
    try:
        while (chunk := await queue.get()) is not None:
            await response.write(chunk)
            request["sent"] = request.get("sent", 0) + len(chunk)
            await throttle.consumed(len(chunk))
    finally:
        sink.closed_by_reader.set()
        while not queue.empty():
            queue.get_nowait()
        try:
            await worker
        except BrokenPipeError:
            pass
