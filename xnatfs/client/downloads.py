"""Downloads: :class:`ByteStream`, one file's bytes read chunk by chunk and
resumed where a connection broke off, and ``open_stream``, which opens one.

A stream outlives the request that opened it (the block cache reads it across
many calls), so it holds the answer open as a
:class:`~.connection.OpenAnswer`; the connection module keeps the httpx side.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..errors import ServerError, Stale, Unreachable, XnatError
from .connection import TRANSPORT_FAILURES, OpenAnswer, XnatConnection, open_answer, unreachable

log = logging.getLogger("xnatfs.client")  # one logger for the package, as before the split


class DownloadCalls(XnatConnection):
    """``open_stream`` for :class:`~xnatfs.client.XnatClient`."""

    @asynccontextmanager
    async def open_stream(self, uri: str, start: int = 0, end: int | None = None, *,
                          give_up_by: float | None = None) -> AsyncIterator[ByteStream]:
        """A download of bytes ``[start, end)`` of ``uri`` (to the end of the file
        when ``end`` is None), read chunk by chunk::

            async with client.open_stream(uri, start) as stream:
                async for chunk in stream: ...

        The first chunk begins at ``start`` and the last stops at ``end``
        whether or not the server honours Range (if not, the bytes before
        ``start`` are downloaded and dropped, and the connection is closed at
        ``end``). A connection that breaks off is resumed where it stopped, up
        to ``max_attempts`` times; then :class:`Unreachable` (or :class:`Stale`
        if the file changed meanwhile). Each wait for data is bounded by
        ``read_timeout``; the download as a whole is not, but a resume gives up
        ``deadline`` after the download last moved. ``give_up_by`` (trio time):
        the first request gives up then at the latest (the deadline of the
        operation it is made for, when another task makes it).

        A download with an ``end`` asks for a range, so its first answer tells
        whether the server honours Range (:attr:`ByteStream.ranged`). Where it
        does not, the caller may set ``end`` to None to read on to the end of
        the file the server sends anyway.
        """
        stream = ByteStream(self, uri, start, end)
        stream.first_by = give_up_by
        try:
            await stream.open()
            yield stream
        finally:
            await stream.aclose()


class ByteStream:
    """An open download, iterated with ``async for``; see :meth:`XnatClient.open_stream`.

    Iteration raises :class:`Unreachable` when resuming fails ``max_attempts``
    times, and :class:`Stale` when a resumed download finds the file changed.

    Attributes:
        uri: the file.
        position: offset in the file of the next byte to be yielded.
        end: offset at which the download stops, or None for the end of the file.
        size: the file's full size when the server said, else None.
        version: the first answer's ``Last-Modified`` (XNAT sends no ETag), if any;
            a resumed download whose answer differs is of another file.
        ranged: after a request with a Range header, whether the server
            honoured it (206) or sent the whole file (200); None before.
        received: bytes received so far, those resent before ``position`` by a
            server ignoring Range too (how a reader far ahead sees it move).
        moved_at: trio time it last moved (an answer opened, bytes came), or None.
    """

    def __init__(self, client: XnatConnection, uri: str, start: int, end: int | None) -> None:
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range [{start}, {end})")
        self.uri = uri
        self.position = start
        self.end = end
        self.size: int | None = None
        self.version: str | None = None
        self.ranged: bool | None = None
        self.received = 0
        self._client = client
        self._answer: OpenAnswer | None = None
        self._chunks: AsyncGenerator[bytes, None] | None = None
        self._skip = 0  # bytes before `position` a server ignoring Range sends again
        self._body_end: int | None = None  # file offset where the current answer ends
        self._resumes = 0
        self._finished = False
        # When the download last moved (an answer opened, bytes came): a resume
        # gives up a request deadline after it, whatever operation started it.
        self.moved_at: float | None = None
        self.first_by: float | None = None  # when the first request gives up, if sooner

    def __aiter__(self) -> ByteStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._finished:
            if self._chunks is None:
                await self.open()
                continue
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                wanted_until = self._wanted_until()
                if wanted_until is None or self.position >= wanted_until:
                    break
                failure: Exception = Unreachable(
                    f"body ended at byte {self.position} of {wanted_until}", path=self.uri)
            except TRANSPORT_FAILURES as exc:
                failure = exc
            else:
                self.moved_at = trio.current_time()
                chunk = self._trim(chunk)
                if chunk:
                    self.position += len(chunk)
                    return chunk
                continue
            await self._resume_after(failure)
        await self.aclose()  # done: give the connection back (or drop it, if cut short)
        raise StopAsyncIteration

    async def open(self) -> None:
        """(Re)start the download at :attr:`position`.

        Raises:
            Stale: the file's size changed since the download began, so what
                was already yielded and what would follow belong to different
                versions of the file.
        """
        await self._close_answer()
        if self.end is not None and self.position >= self.end:
            self._finished = True
            return
        client = self._client
        headers = {"Accept-Encoding": "identity"}
        if self.position > 0 or self.end is not None:
            last_byte = "" if self.end is None else str(self.end - 1)
            headers["Range"] = f"bytes={self.position}-{last_byte}"
        # The first request is bounded by the operation that opened the download;
        # a resume, by when the download last moved (the reader that started it
        # may be long gone, others read on), never by a fresh deadline of its own.
        give_up_by = (self.first_by if self.moved_at is None
                      else self.moved_at + client.settings.deadline)
        answer = await client._send("GET", self.uri, kind="files.stream", headers=headers,
                                    accept={416}, keep_open=True, handle=open_answer,
                                    give_up_by=give_up_by)
        self.moved_at = trio.current_time()
        self._answer = answer
        status = answer.status
        if status == 416:  # position is at or past the end
            await self._close_answer()
            if self.size is not None and self.position < self.size:
                raise Stale(f"file shrank below byte {self.position}", path=self.uri)
            self._finished = True
            return
        if status == 206:
            first, last, size = answer.content_range(self.uri)
            if first != self.position:
                await self._close_answer()
                raise ServerError(f"asked for bytes from {self.position}, got from {first}",
                                  path=self.uri)
            self._skip = 0
            self._body_end = last + 1
            self.ranged = True
        else:
            if "Range" in headers:
                client._counts["range_ignored"] += 1
                self.ranged = False
            size = answer.content_length()
            self._skip = self.position
            self._body_end = size
        if size is not None:
            if self.size is not None and size != self.size:
                await self._close_answer()
                raise Stale(f"size changed from {self.size} to {size} during the download",
                            path=self.uri)
            self.size = size
        version = answer.header("Last-Modified")
        if version is not None:
            if self.version is not None and version != self.version:
                await self._close_answer()
                raise Stale(f"replaced during the download (Last-Modified {self.version}, "
                            f"now {version})", path=self.uri)
            self.version = version
        self._chunks = answer.chunks()

    async def aclose(self) -> None:
        self._finished = True
        await self._close_answer()

    def _wanted_until(self) -> int | None:
        """Where a complete download stops: ``end``, or the end of the file if sooner."""
        if self.end is None:
            return self.size
        return self.end if self.size is None else min(self.end, self.size)

    def _trim(self, chunk: bytes) -> bytes:
        """Drop what lies before :attr:`position` (resent by a server ignoring Range)
        or at and after :attr:`end`."""
        self.received += len(chunk)
        self._client.bytes_received += len(chunk)
        if self._skip:
            dropped = min(self._skip, len(chunk))
            self._skip -= dropped
            chunk = chunk[dropped:]
        if self.end is not None and self.position + len(chunk) >= self.end:
            chunk = chunk[:self.end - self.position]
            # An answer that ends here is read to its end, which lets its
            # connection be reused; one that goes on is cut off.
            if self._body_end is None or self._body_end > self.end:
                self._finished = True
        return chunk

    async def _resume_after(self, failure: Exception) -> None:
        await self._close_answer()
        self._resumes += 1
        settings = self._client.settings
        if self._resumes >= settings.max_attempts:
            if isinstance(failure, XnatError):
                raise failure
            raise unreachable(failure, self.uri) from failure
        self._client._counts["stream_resumes"] += 1
        log.warning("download of %s broke off at byte %d (%s); resuming", self.uri,
                    self.position, failure)

    async def _close_answer(self) -> None:
        answer, chunks = self._answer, self._chunks
        self._answer = self._chunks = None
        if chunks is not None:
            await chunks.aclose()
        if answer is not None:
            await answer.aclose()
