"""An upload's body on disk: spooled from the request, and unpacked for ``extract=true``.

Uploads can be gigabytes, so a body that is to be stored (a file PUT, an
import that cannot be read as it arrives) is written to a temporary file in
chunks first, under the same bandwidth cap as downloads.
"""

from __future__ import annotations

import asyncio
import tarfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from aiohttp import BodyPartReader, web

from .knobs import Knobs, Throttle, received_body
from .xnatformat import XnatHTTPError


@dataclass
class SpooledBody:
    """A request body in a temporary file; ``name`` is its multipart file name, or "upload"."""

    path: Path
    size: int
    name: str
    content_type: str

    def cleanup(self) -> None:
        self.path.unlink(missing_ok=True)


async def spool_body(request: web.Request, tmp_dir: Path, knobs: Knobs) -> SpooledBody:
    """Write the request body (raw or the first multipart file) to a temp file.

    Uploads can be gigabytes, so the body is streamed to disk in chunks and the
    bandwidth cap applies as it does to downloads.
    """
    target = tmp_dir / f"upload-{uuid.uuid4().hex}"
    throttle = Throttle(knobs.bandwidth_mb_s)
    ctype = request.content_type or ""
    name = "upload"
    size = 0
    loop = asyncio.get_running_loop()
    try:
        with open(target, "wb") as out:
            if ctype.startswith("multipart/"):
                reader = await request.multipart()
                async for part in reader:
                    if not isinstance(part, BodyPartReader) or part.filename is None:
                        continue  # a plain form field (or a nested multipart)
                    name = part.filename
                    ctype = part.headers.get("Content-Type", "application/octet-stream")
                    while chunk := await part.read_chunk(1 << 20):
                        await loop.run_in_executor(None, out.write, chunk)
                        size += len(chunk)
                        await throttle.consumed(len(chunk))
                    break
            else:
                async for chunk in received_body(request, knobs):
                    await loop.run_in_executor(None, out.write, chunk)
                    size += len(chunk)
    except BaseException:
        # A client that hangs up mid-body leaves a partial spool; nothing will use it.
        target.unlink(missing_ok=True)
        raise
    return SpooledBody(target, size, name, ctype)


def extract_members(archive: Path, name: str, tmp_dir: Path) -> list[tuple[str, Path]]:
    """Unpack a zip or tar for ``extract=true``; entries keep their inner paths."""
    out: list[tuple[str, Path]] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or not safe_relpath(info.filename):
                    continue
                dest = tmp_dir / f"extract-{uuid.uuid4().hex}"
                with zf.open(info) as src, open(dest, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                out.append((info.filename, dest))
        return out
    try:
        with tarfile.open(archive) as tf:
            for member in tf:
                if not member.isfile() or not safe_relpath(member.name):
                    continue
                dest = tmp_dir / f"extract-{uuid.uuid4().hex}"
                data = tf.extractfile(member)
                assert data is not None  # a regular file
                with data, open(dest, "wb") as dst:
                    while chunk := data.read(1 << 20):
                        dst.write(chunk)
                out.append((member.name, dest))
    except tarfile.TarError:
        raise XnatHTTPError(400, f"Unable to extract {name}: not a zip or tar archive.") from None
    return out


def safe_relpath(relpath: str) -> bool:
    """Whether an upload's path stays inside its resource (no ``..``, no empty part)."""
    parts = relpath.split("/")
    return all(p not in ("", ".", "..") and "\x00" not in p for p in parts)
