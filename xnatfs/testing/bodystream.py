"""A request body read by a worker thread while it is still arriving.

XNAT's DICOM-zip importer wraps the servlet's input stream in a
``ZipInputStream`` and files each object as soon as it has been read: the
import runs while the client is still sending. A server that first spooled the
whole body and only then imported it would make a client that sends at a
steady pace (a filesystem streaming a ``cp``) look slower than one that
bursts the body out (curl), so the test server reads it the same way.

The import runs in a thread of its own (not the shared executor, whose few
threads several imports waiting for their bodies could exhaust), reading a
:class:`BodyPipe` that the event loop fills. The pipe holds a bounded number
of bytes: the event loop stops reading the socket while the import is behind,
as a blocking servlet read would.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import BinaryIO, TypeVar

from aiohttp import web

from .knobs import Knobs, received_body

T = TypeVar("T")
PIPE_BYTES = 8 << 20


class BodyBrokeOff(ConnectionError):
    """The client stopped sending before the body was complete."""


class BodyPipe:
    """Bytes from the event loop to one reading thread, as a file-like ``read``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = PIPE_BYTES) -> None:
        self._loop = loop
        self._limit = limit
        self._lock = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._ended = False
        self._error: BaseException | None = None
        self._reader_gone = False
        self._room = asyncio.Event()  # set (from the reader) when there is room again
        self._room.set()

    # ------------------------------------------------ event-loop side
    async def feed(self, chunk: bytes) -> bool:
        """Queue ``chunk``, waiting while the pipe is full; False once the reader
        has stopped (finished early or failed): the rest of the body is not wanted."""
        while True:
            with self._lock:
                if self._reader_gone:
                    return False
                if self._queued < self._limit:
                    self._chunks.append(chunk)
                    self._queued += len(chunk)
                    self._lock.notify_all()
                    return True
                self._room.clear()
            await self._room.wait()

    def end(self, error: BaseException | None = None) -> None:
        """No more bytes: the body is complete, or (``error``) it broke off."""
        with self._lock:
            self._ended = True
            self._error = error
            self._lock.notify_all()

    # ---------------------------------------------------- reader side
    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (the next chunk as it came when ``size`` < 0); b"" at the end."""
        with self._lock:
            while not self._chunks and not self._ended:
                self._lock.wait()
            if not self._chunks:
                if self._error is not None:
                    raise self._error
                return b""
            chunk = self._chunks.popleft()
            if 0 <= size < len(chunk):
                chunk, rest = chunk[:size], chunk[size:]
                self._chunks.appendleft(rest)
            self._queued -= len(chunk)
        self._wake_feeder()
        return chunk

    def peek(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer at the end) without consuming them."""
        with self._lock:
            while self._queued < size and not self._ended:
                self._lock.wait()
            if len(self._chunks) > 1 and len(self._chunks[0]) < size:
                merged = b"".join(self._chunks)
                self._chunks.clear()
                self._chunks.append(merged)
            return self._chunks[0][:size] if self._chunks else b""

    def close_reader(self) -> None:
        """The reader is done with the body (whether or not it read all of it)."""
        with self._lock:
            self._reader_gone = True
        self._wake_feeder()

    def _wake_feeder(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._room.set)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


async def read_in_thread(request: web.Request, knobs: Knobs,
                         work: Callable[[BinaryIO], T]) -> T:
    """Run ``work(body)`` in its own thread, ``body`` being the request body as
    it arrives (with the server's bandwidth cap). What ``work`` leaves unread
    is read and dropped, so the connection stays usable for the answer."""
    loop = asyncio.get_running_loop()
    pipe = BodyPipe(loop)
    finished: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if finished.done():
            return
        if error is not None:
            finished.set_exception(error)
        else:
            finished.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work(pipe)  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the event loop, raised there
            error = exc
        finally:
            pipe.close_reader()
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name="import-body", daemon=True).start()
    wanted = True
    try:
        try:
            async for chunk in received_body(request, knobs):
                if wanted:
                    wanted = await pipe.feed(chunk)
        except BaseException:
            pipe.end(BodyBrokeOff("the request body broke off"))
            raise
        pipe.end()
        return await finished
    finally:
        finished.cancel()  # the client left: nobody wants the outcome
