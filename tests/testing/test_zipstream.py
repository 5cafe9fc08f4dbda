"""Reading zips front to back, with the limits of Java's ZipInputStream (XNAT's importer)."""

from __future__ import annotations

import io
import zipfile
import zlib

import pytest

from xnatfs.testing.zipstream import ZipStreamError, iter_zip_stream


class NonSeekable(io.RawIOBase):
    """A stream that hands out small pieces and cannot seek, like a request body."""

    def __init__(self, data: bytes, piece: int = 1000) -> None:
        self._data, self._position, self._piece = data, 0, piece

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self._piece if size < 0 else min(size, self._piece)
        data = self._data[self._position:self._position + size]
        self._position += len(data)
        return data


def entries(data: bytes) -> dict[str, bytes]:
    return {name: b"".join(chunks) for name, chunks in iter_zip_stream(NonSeekable(data))}


def written(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED, *,
            streamed: bool = False, force_zip64: bool = False) -> bytes:
    """A zip; ``streamed``: written to a non-seekable sink, so entries carry data descriptors."""
    sink = io.BytesIO()
    target = NonSeekableSink(sink) if streamed else sink
    with zipfile.ZipFile(target, "w", compression) as archive:  # type: ignore[arg-type]
        for name, data in files.items():
            with archive.open(name, "w", force_zip64=force_zip64) as entry:
                entry.write(data)
    return sink.getvalue()


class NonSeekableSink(io.RawIOBase):
    def __init__(self, sink: io.BytesIO) -> None:
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return self._sink.write(data)

    def tell(self) -> int:
        raise OSError("not seekable")

    def seekable(self) -> bool:
        return False


FILES = {"a/1.dcm": b"x" * 300_000 + bytes(range(256)) * 50, "a/2.dcm": b"", "b/": b"",
         "c.txt": b"hello"}


@pytest.mark.parametrize(("compression", "streamed", "force_zip64"), [
    (zipfile.ZIP_STORED, False, False), (zipfile.ZIP_DEFLATED, False, False),
    (zipfile.ZIP_DEFLATED, True, False), (zipfile.ZIP_STORED, False, True),
])
def test_entries_come_out_whole_in_order(compression: int, streamed: bool,
                                         force_zip64: bool) -> None:
    data = written(FILES, compression, streamed=streamed, force_zip64=force_zip64)
    assert entries(data) == FILES
    assert [name for name, _ in iter_zip_stream(io.BytesIO(data))] == list(FILES)


def test_skipped_entries_are_still_read_past() -> None:
    data = written(FILES)
    names = [name for name, _chunks in iter_zip_stream(NonSeekable(data))]  # data unread
    assert names == list(FILES)


def test_small_entry_with_a_zip64_data_descriptor_is_refused() -> None:
    # Java 8 and 11 (XNAT 1.8) read 8-byte descriptor sizes only past 4 GiB.
    data = written({"a.dcm": b"abc" * 1000}, streamed=True, force_zip64=True)
    with pytest.raises(ZipStreamError, match="invalid entry size"):
        entries(data)


def test_stored_entry_with_data_descriptor_is_refused() -> None:
    # zipfile writes stored entries to a non-seekable sink with a data descriptor,
    # which ZipInputStream cannot read ("only DEFLATED entries can have EXT descriptor").
    data = written({"a.dcm": b"abc"}, zipfile.ZIP_STORED, streamed=True)
    with pytest.raises(ZipStreamError, match="only DEFLATED"):
        entries(data)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_damaged_entry_fails_its_crc(compression: int) -> None:
    payload = bytes(range(256)) * 40
    data = bytearray(written({"a.dcm": payload}, compression))
    if compression == zipfile.ZIP_STORED:
        data[data.index(payload) + 100] ^= 0xFF
        with pytest.raises(ZipStreamError, match="CRC"):
            entries(bytes(data))
    else:
        data[40] ^= 0xFF  # inside the deflate stream
        with pytest.raises((ZipStreamError, zlib.error)):
            entries(bytes(data))


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_truncated_zip_fails(compression: int) -> None:
    data = written({"a.dcm": bytes(range(256)) * 4000}, compression)
    for cut in (10, 40, len(data) // 2):
        with pytest.raises(ZipStreamError, match="unexpected end|truncated"):
            entries(data[:cut])


def test_walk_ends_at_the_first_record_that_is_not_a_local_header() -> None:
    assert entries(b"not a zip") == {}
    assert entries(b"") == {}
    assert entries(written({})) == {}


def test_encrypted_and_unknown_methods_are_refused() -> None:
    data = bytearray(written({"a.dcm": b"abc"}, zipfile.ZIP_STORED))
    encrypted = bytearray(data)
    encrypted[6] |= 0x1
    with pytest.raises(ZipStreamError, match="encrypted"):
        entries(bytes(encrypted))
    data[8] = 12  # bzip2
    with pytest.raises(ZipStreamError, match="compression method"):
        entries(bytes(data))
