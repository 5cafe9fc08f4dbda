"""The soak's load on a mounted xnatfs: readers and writers, every operation
timed, bounded by a watchdog and checked against what the server holds.

Shared by ``tests/mount/test_soak.py`` (a short seeded run) and
``contrib/soak.py`` (a long one) through :mod:`.soak`, which sets up the
server and the mount and turns the faults. Operations run in threads, as a
user's programs do: one thread per reader or writer, each with its own seeded
random choices (the interleaving, and so the exact figures, still depend on
the machine).
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import os
import random
import sys
import threading
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from .imaging import synthetic_study, write_dicom_archive

CHUNK = 1 << 20


class Ledger:
    """Every operation's latency and outcome, which are in flight (for the
    watchdog), and every wrong byte seen."""

    def __init__(self, bounds: dict[str, float]) -> None:
        self.bounds = bounds
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, Counter[str]] = defaultdict(Counter)
        self.in_flight: dict[int, tuple[str, str, float]] = {}
        self.tokens = itertools.count()
        self.wrong_bytes = 0
        self.wrong: list[str] = []      # what was wrong, first ones kept
        self.stuck: list[str] = []      # operations the watchdog found past their bound
        self.stop = threading.Event()   # the load ends (time is up, or something is stuck)
        self.done = threading.Event()   # every reader and writer has returned
        self.finished = threading.Event()  # the load is over: the watchdog may go

    def op(self, kind: str, what: str) -> Op:
        return Op(self, kind, what)

    def record_wrong(self, count: int, message: str) -> None:
        with self.lock:
            self.wrong_bytes += count
            if len(self.wrong) < 20:
                self.wrong.append(message)

    def watch(self, interval: float = 0.25) -> None:
        """The watchdog (run in a thread until :attr:`stop`): an operation past
        its kind's bound fails the run, and is printed at once."""
        reported: set[int] = set()
        while not self.finished.wait(interval):
            now = time.monotonic()
            with self.lock:
                late = [(token, kind, what, now - start)
                        for token, (kind, what, start) in self.in_flight.items()
                        if now - start > self.bounds[kind] and token not in reported]
            for token, kind, what, age in late:
                reported.add(token)
                message = (f"STUCK: {kind} {what} has run {age:.1f} s, past its bound of "
                           f"{self.bounds[kind]:.1f} s")
                print(message, file=sys.stderr, flush=True)
                with self.lock:
                    self.stuck.append(message)
                self.stop.set()


class Op:
    """One timed operation (a context manager); an ``OSError`` inside is the
    operation's outcome (faults make some fail), recorded and not raised."""

    def __init__(self, ledger: Ledger, kind: str, what: str) -> None:
        self.ledger, self.kind, self.what = ledger, kind, what
        self.error: str | None = None

    def __enter__(self) -> Op:
        self.token = next(self.ledger.tokens)
        self.start = time.monotonic()
        with self.ledger.lock:
            self.ledger.in_flight[self.token] = (self.kind, self.what, self.start)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        seconds = time.monotonic() - self.start
        if isinstance(exc, OSError):
            self.error = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        with self.ledger.lock:
            del self.ledger.in_flight[self.token]
            self.ledger.latencies[self.kind].append(seconds)
            self.ledger.errors[self.kind][self.error or "ok"] += 1
        return isinstance(exc, OSError)


def compare(ledger: Ledger, what: str, got: bytes, expected: bytes, offset: int) -> None:
    """Count the bytes of ``got`` (read at ``offset``) that differ from the server's."""
    want = expected[offset:offset + len(got)]
    wrong = sum(a != b for a, b in zip(got, want)) + max(0, len(got) - len(want))
    if wrong:
        ledger.record_wrong(wrong, f"{what}: {wrong} wrong bytes of {len(got)} read at {offset}")


def read_whole(ledger: Ledger, path: Path, expected: bytes, op: Op) -> None:
    """Read a file to its end, checking each chunk as it arrives (bytes handed to
    a program before an error are still bytes it may use)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while chunk := os.read(fd, CHUNK):
            compare(ledger, str(path), chunk, expected, offset)
            offset += len(chunk)
        if offset != len(expected):
            ledger.record_wrong(abs(len(expected) - offset), f"{path}: read {offset} bytes of "
                                f"{len(expected)}")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # next read asks the mount again
    finally:
        os.close(fd)


@dataclass
class ReadTarget:
    """A file of the archive and the server's bytes of it."""

    path: Path
    data: bytes


def reader(ledger: Ledger, targets: list[ReadTarget], rng: random.Random) -> None:
    """Whole reads, partial reads, stats and listings of this reader's own files."""
    while not ledger.stop.is_set():
        target = rng.choice(targets)
        kind = rng.choices(("read", "pread", "stat", "listdir"), weights=(4, 3, 2, 1))[0]
        with ledger.op(kind, str(target.path)) as op:
            if kind == "read":
                read_whole(ledger, target.path, target.data, op)
            elif kind == "pread":
                offset = rng.randrange(max(1, len(target.data)))
                length = rng.randint(1, 256 * 1024)
                fd = os.open(target.path, os.O_RDONLY)
                try:
                    got = os.pread(fd, length, offset)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                compare(ledger, str(target.path), got, target.data, offset)
                short = min(length, len(target.data) - offset) - len(got)
                if short > 0:
                    ledger.record_wrong(short, f"{target.path}: short read of {len(got)} "
                                        f"bytes at {offset} (asked {length})")
            elif kind == "stat":
                size = os.stat(target.path).st_size
                if size != len(target.data):
                    ledger.record_wrong(0, f"{target.path}: stat size {size}, server "
                                        f"{len(target.data)}")
            elif target.path.name not in os.listdir(target.path.parent):
                ledger.record_wrong(0, f"{target.path}: missing from its folder's listing")


@dataclass
class Write:
    """A file a writer wrote: where, what, and what ``close()`` said."""

    kind: str                        # "result" (into a resource) or "upload"
    path: Path
    md5: str                         # of the bytes written (that close may have sent)
    members: list[str] = field(default_factory=list)  # an upload's member digests
    stage: str = "open"              # where it failed: open, write, close; "done"
    error: str | None = None

    @property
    def owed(self) -> bool:
        """XNAT must end up with it: close returned 0 (done), or failed once the
        whole file was written (the spool must keep it for a retry)."""
        return self.stage in ("done", "close")


def write_file(ledger: Ledger, kind: str, path: Path, data: bytes, out: list[Write],
               members: list[str] | None = None) -> Write | None:
    """Create, write and close one file as ``cp`` does; the record of it."""
    record = Write(kind, path, hashlib.md5(data).hexdigest(), members or [])
    with ledger.op(kind, str(path)) as op:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            record.stage = "write"
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[:CHUNK]):]
            record.stage = "close"
        finally:
            os.close(fd)  # an error here leaves stage "close" (or "write" if writing failed)
        record.stage = "done"
    record.error = op.error
    if record.stage == "open":
        return None  # nothing was created: nothing is owed
    out.append(record)
    return record


def result_writer(ledger: Ledger, number: str, folder: Path, rng: random.Random,
                  out: list[Write]) -> None:
    """Files written into a resource (``files/``), each read back once closed."""
    for n in itertools.count():
        if ledger.stop.is_set():
            return
        size = rng.choice((rng.randint(0, 4096), rng.randint(4096, 256 * 1024),
                           rng.randint(256 * 1024, 3 * 1024 * 1024)))
        data = rng.randbytes(size)
        record = write_file(ledger, "result", folder / f"w{number}-{n:05d}.bin", data, out)
        if record is not None and record.stage == "done":
            with ledger.op("readback", str(record.path)) as op:
                read_whole(ledger, record.path, data, op)


def upload_writer(ledger: Ledger, number: str, folder: Path, scratch: Path,
                  rng: random.Random, out: list[Write]) -> None:
    """DICOM zips dropped into ``uploads/<PROJECT>/``, one study each."""
    scratch.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        if ledger.stop.is_set():
            return
        name = f"soak-{number}-{n:04d}"
        local = scratch / f"{name}.zip"
        series = synthetic_study(f"SOAK^{number}N{n}", f"SOAK{number}N{n:04d}",
                                 slices=rng.randint(1, 3), rows=16, cols=16,
                                 seed=rng.randrange(1 << 30))
        write_dicom_archive(local, series)
        data = local.read_bytes()
        local.unlink()
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [hashlib.md5(zf.read(m)).hexdigest() for m in zf.namelist()]
        write_file(ledger, "upload", folder / f"{name}.zip", data, out, members)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
