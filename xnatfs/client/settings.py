"""The bounds every remote operation of the client keeps (timeouts, retries,
pool size): one place for what :mod:`~xnatfs.mount` and the command line tune."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import trio

# When the operation the client works for must end (trio time), and the task
# that works for it: the mount sets it per FUSE operation
# (:mod:`xnatfs.deadlines`), and ``_send`` starts no attempt past it and waits
# no longer than it allows, so that no layer starts an attempt the operation
# cannot wait for. It binds only the task that set it: trio copies the context
# into the tasks a task starts, and a background task (an upload's retries, a
# series read-ahead) must not inherit the deadline of the call that started
# it. A task that works for an operation (a read's download) sets it itself.
_OPERATION: ContextVar[tuple[float, object] | None] = ContextVar("xnatfs_operation",
                                                                 default=None)


def operation_deadline() -> float:
    """When the operation the current task works for must end (inf: none)."""
    entry = _OPERATION.get()
    if entry is None or entry[1] is not trio.lowlevel.current_task():
        return math.inf
    return entry[0]


@contextlib.contextmanager
def operation_until(deadline: float) -> Iterator[None]:
    """Run the block, in this task, for an operation that must end at ``deadline``."""
    token = _OPERATION.set((deadline, trio.lowlevel.current_task()))
    try:
        yield
    finally:
        _OPERATION.reset(token)


@dataclass(frozen=True)
class ClientSettings:
    """Bounds on every remote operation, and the connection pool.

    Attributes:
        connect_timeout: seconds to establish one connection.
        read_timeout: seconds to wait for any byte of an answer.
        deadline: seconds for a whole operation, every retry and backoff included.
        max_attempts: requests per operation before giving up (also the number
            of times a broken download may be resumed).
        backoff_initial: first delay between attempts; it doubles each time,
            with jitter, up to ``backoff_max``.
        max_connections: size of the HTTP/1.1 connection pool.
        chunk_size: bytes per piece read from local files for uploads, and
            per read of a whole-file answer to a range request. Streams
            (:meth:`XnatClient.open_stream`) hand out bytes as they arrive:
            a first byte is not held back until a chunk is full, nor copied
            into one.
        verify_tls: check the server's certificate (off only for test sites
            with self-signed certificates).
        ca_bundle: a PEM file of the certificates to trust instead of the
            usual ones (a site's own CA, or its self-signed certificate).
        upload_answer_timeout: seconds to wait for the answer to an upload once
            all of it is sent: XNAT answers an import only when it has imported
            the whole archive, minutes for a big one.
        down_attempt_timeout: while the server is found down and a probe
            watches it (:meth:`XnatConnection.watch_server`), each operation's
            one attempt waits this long at most (connect, read, a pool slot).
        probe_interval: seconds between probes of a server found down.
        max_requests: requests at once, of every kind (0: no ceiling); those
            beyond wait (:mod:`.ceilings`).
        max_request_rate: requests per second on average (0: no ceiling)...
        request_burst: ...of which this many may go at once after a quiet spell.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # XNAT builds a whole listing before its first byte
    deadline: float = 60.0
    max_attempts: int = 4
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    max_connections: int = 16
    chunk_size: int = 1 << 20
    verify_tls: bool = True
    ca_bundle: str | None = None
    upload_answer_timeout: float = 900.0
    down_attempt_timeout: float = 1.0
    probe_interval: float = 0.5
    # See the README's "Protecting the server" for why these numbers.
    max_requests: int = 16
    max_request_rate: float = 50.0
    request_burst: int = 100
