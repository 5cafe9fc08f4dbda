"""Zip entries read front to back from a stream, as Java's ``ZipInputStream`` does.

XNAT's DICOM-zip importer reads an upload with ``new ZipInputStream(request
body)``: it walks the local file headers as the bytes arrive and never sees the
central directory. So does this reader, with the same limits:

* the walk ends at the first record that is not a local file header (the
  central directory, or trailing junk);
* a stored entry must carry its sizes in its header: "only DEFLATED entries
  can have EXT descriptor" (a data descriptor needs the deflate stream to find
  its end);
* encrypted entries and methods other than stored and deflated are refused;
* every entry's CRC-32 and sizes are checked ("invalid entry CRC").

Names are decoded as UTF-8, as ``ZipInputStream``'s default charset does.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Generator, Iterator
from typing import BinaryIO

LOCAL_HEADER = b"PK\x03\x04"
DATA_DESCRIPTOR = b"PK\x07\x08"
STORED, DEFLATED = 0, 8
FLAG_ENCRYPTED, FLAG_DESCRIPTOR = 0x1, 0x8
ZIP64_EXTRA = 0x0001
ZIP64_MAGIC = 0xFFFFFFFF
READ_SIZE = 1 << 20
_LOCAL = struct.Struct("<4sHHHHHIIIHH")


class ZipStreamError(Exception):
    """The stream is not a zip ``ZipInputStream`` could read to its end."""


class _Input:
    """A stream with a read-back buffer (a deflate stream ends mid-chunk)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pushed = b""

    def read(self, size: int) -> bytes:
        if self._pushed:
            data, self._pushed = self._pushed[:size], self._pushed[size:]
            return data
        return self._stream.read(size)

    def read_exact(self, size: int) -> bytes:
        parts, wanted = [], size
        while wanted:
            data = self.read(wanted)
            if not data:
                break
            parts.append(data)
            wanted -= len(data)
        return b"".join(parts)

    def push_back(self, data: bytes) -> None:
        self._pushed = data + self._pushed


def iter_zip_stream(stream: BinaryIO) -> Iterator[tuple[str, Iterator[bytes]]]:
    """Yield ``(name, chunks)`` per entry, directories included (their names end
    in ``/``). Whatever of ``chunks`` the consumer leaves unread is read (and
    checked) before the next entry.

    Raises:
        ZipStreamError: a damaged, truncated, encrypted or unsupported entry.
    """
    source = _Input(stream)
    while True:
        header = source.read_exact(_LOCAL.size)
        if len(header) < 4 or header[:4] != LOCAL_HEADER:
            return  # the central directory (or the end): ZipInputStream stops here
        if len(header) < _LOCAL.size:
            raise ZipStreamError("truncated local header")
        (_, _, flags, method, _, _, crc, csize, size,
         name_length, extra_length) = _LOCAL.unpack(header)
        raw_name = source.read_exact(name_length)
        extra = source.read_exact(extra_length)
        if len(raw_name) < name_length or len(extra) < extra_length:
            raise ZipStreamError("truncated local header")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ZipStreamError(f"malformed entry name {raw_name!r}") from exc
        if flags & FLAG_ENCRYPTED:
            raise ZipStreamError("encrypted ZIP entry not supported")
        if csize == ZIP64_MAGIC or size == ZIP64_MAGIC:
            size, csize = _zip64_sizes(extra, size, csize)
        if method == STORED:
            if flags & FLAG_DESCRIPTOR:
                raise ZipStreamError("only DEFLATED entries can have EXT descriptor")
            if size != csize:
                raise ZipStreamError(f"invalid entry size (expected {size} but got {csize})")
            chunks = _stored(source, name, size, crc)
        elif method == DEFLATED:
            sizes = None if flags & FLAG_DESCRIPTOR else (crc, csize, size)
            chunks = _deflated(source, name, sizes)
        else:
            raise ZipStreamError(f"invalid compression method {method}")
        try:
            yield name, chunks
            for _ in chunks:  # the rest of an entry the consumer skipped
                pass
        finally:
            chunks.close()


def _zip64_sizes(extra: bytes, size: int, csize: int) -> tuple[int, int]:
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4:position + 4 + length]
        if tag == ZIP64_EXTRA:
            values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if size == ZIP64_MAGIC and values:
                size = values.pop(0)
            if csize == ZIP64_MAGIC and values:
                csize = values.pop(0)
            return size, csize
        position += 4 + length
    raise ZipStreamError("zip64 sizes missing from the local header")


def _stored(source: _Input, name: str, size: int, crc: int) -> Generator[bytes, None, None]:
    left, actual = size, 0
    while left:
        data = source.read(min(left, READ_SIZE))
        if not data:
            raise ZipStreamError(f"unexpected end of entry {name}")
        left -= len(data)
        actual = zlib.crc32(data, actual)
        yield data
    if actual != crc:
        raise ZipStreamError(f"invalid entry CRC (expected 0x{crc:x} but got 0x{actual:x})")


def _deflated(source: _Input, name: str,
              sizes: tuple[int, int, int] | None) -> Generator[bytes, None, None]:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    actual_crc = csize = size = 0
    while not inflater.eof:
        data = source.read(READ_SIZE)
        if not data:
            raise ZipStreamError(f"unexpected end of entry {name}")
        try:
            out = inflater.decompress(data)
        except zlib.error as exc:
            raise ZipStreamError(f"invalid deflate data in {name}: {exc}") from exc
        csize += len(data) - len(inflater.unused_data)
        if out:
            size += len(out)
            actual_crc = zlib.crc32(out, actual_crc)
            yield out
    source.push_back(inflater.unused_data)
    if sizes is None:  # the data descriptor follows the data
        # Eight-byte sizes when either passes 4 GiB, as ZipInputStream decides.
        zip64 = max(csize, size) >= ZIP64_MAGIC
        width = 8 if zip64 else 4
        first = source.read_exact(4)
        if first == DATA_DESCRIPTOR:
            first = source.read_exact(4)
        rest = source.read_exact(2 * width)
        if len(first) < 4 or len(rest) < 2 * width:
            raise ZipStreamError(f"truncated data descriptor of {name}")
        fmt = "<QQ" if zip64 else "<II"
        sizes = (struct.unpack("<I", first)[0], *struct.unpack(fmt, rest))
    crc, want_csize, want_size = sizes
    if (want_csize, want_size) != (csize, size):
        raise ZipStreamError(f"invalid entry size (expected {want_size} but got {size} bytes)")
    if actual_crc != crc:
        raise ZipStreamError(f"invalid entry CRC (expected 0x{crc:x} but got 0x{actual_crc:x})")
