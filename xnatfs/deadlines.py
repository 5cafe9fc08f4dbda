"""How long a file operation may take, and cancelling them all at unmount.

Every request the mount answers runs under a deadline, so that no system call
outlives it, even with the server down; ``fs.py`` sets one per request, and a
read sets its own (it waits while its file's bytes keep arriving). An
unmount cancels whatever still waits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from .client.settings import operation_until

__all__ = ["Deadlines", "operation_until"]


class Deadlines:
    """The bounds of the mount's operations, and the requests being answered."""

    def __init__(self, *, op_timeout: float = 120.0, upload_timeout: float = 3600.0,
                 quiet_timeout: float = 30.0) -> None:
        self.op_timeout = op_timeout          # any operation
        self.upload_timeout = upload_timeout  # operations that wait for an upload
        # A read past op_timeout waits on only while its file's bytes arrive: it
        # fails once none came for this long (one request timeout).
        self.quiet_timeout = quiet_timeout
        self.unmounting = False
        self._running: set[trio.CancelScope] = set()

    @contextlib.contextmanager
    def cancelled_at_unmount(self, scope: trio.CancelScope) -> Iterator[None]:
        """The scope of a request being answered, for :meth:`cancel_all`."""
        self._running.add(scope)
        try:
            yield
        finally:
            self._running.discard(scope)

    def cancel_all(self) -> None:
        """Unmounting: answer every request still waiting (for a server that does
        not answer, say) with an error now. The unmount waits for them, and the
        process with it; an upload a close waits for goes on, and is waited for."""
        self.unmounting = True
        for scope in self._running:
            scope.cancel()
