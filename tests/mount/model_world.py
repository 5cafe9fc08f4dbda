"""The reference model behind tests/mount/test_model.py: what XNAT holds, and
what a mount of it may answer, step by step.

Three pieces, each with one job:

* :class:`Xnat`, the truth: the server's REST API (and its knobs), asked with
  faults paused, so that a check never fails for the fault it checks;
* :class:`Versions`, what one path (a file, a document, a field) may show: its
  current value, and older ones until the metadata lifetime after they changed
  has passed (``None``: absent);
* :class:`Judge`, the invariants every operation is held to: a result is one
  of the model's values, an error has an errno the moment allows, and no
  operation outlives its bound. It keeps the figures (operations by kind,
  faults, latencies) the test prints.
"""

from __future__ import annotations

import errno
import hashlib
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from xnatfs.testing.harness import TestServer

T = TypeVar("T")

ADMIN = ("admin", "admin")
CALM_KNOBS = {"fail_rate": 0.0, "drop_rate": 0.0, "truncate_rate": 0.0, "hang": False,
              "fault_path": ""}
# Errors a read, listing or write may end with while the server misbehaves (or
# while a path's value is changing): "Input/output error", "Connection timed
# out", "Stale file handle" (a body that failed its digest).
FAULT_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.ESTALE}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Xnat:
    """The server as the model's source of truth, over HTTP as admin."""

    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.knobs: dict[str, Any] = dict(CALM_KNOBS)  # what the rules set now

    def set_faults(self, **knobs: Any) -> None:
        self.knobs.update(knobs)
        self.server.set_knobs(**knobs)

    def calm(self) -> None:
        self.knobs = dict(CALM_KNOBS)
        self.server.set_knobs(**CALM_KNOBS)

    @contextmanager
    def paused(self) -> Iterator[httpx.Client]:
        """A client to the server with the faults off meanwhile (rules run one
        at a time, so nothing of the mount's runs while they are off)."""
        faulty = self.knobs != CALM_KNOBS
        if faulty:
            self.server.set_knobs(**CALM_KNOBS)
        try:
            with httpx.Client(base_url=self.server.url, auth=ADMIN, timeout=30,
                              trust_env=False) as client:
                yield client
        finally:
            if faulty:
                self.server.set_knobs(**self.knobs)

    def listing(self, resource_uri: str) -> dict[str, tuple[str, int]]:
        """A resource's files: path → (MD5, size); {} when there is no resource."""
        with self.paused() as c:
            answer = c.get(f"{resource_uri}/files", params={"format": "json"})
        if answer.status_code == 404:
            return {}
        answer.raise_for_status()
        return {r["URI"].split("/files/", 1)[1]: (r["digest"], int(r["Size"]))
                for r in answer.json()["ResultSet"]["Result"]}

    def files(self, resource_uri: str) -> dict[str, bytes]:
        """A resource's files, downloaded: path → bytes."""
        with self.paused() as c:
            return {path: c.get(f"{resource_uri}/files/{quote(path)}").content
                    for path in self.listing(resource_uri)}

    def resource_labels(self, owner_uri: str) -> set[str]:
        with self.paused() as c:
            answer = c.get(f"{owner_uri}/resources", params={"format": "json"})
        answer.raise_for_status()
        return {r["label"] for r in answer.json()["ResultSet"]["Result"]}

    def put_file(self, resource_uri: str, path: str, data: bytes) -> None:
        with self.paused() as c:
            c.put(f"{resource_uri}/files/{quote(path)}", params={"overwrite": "true"},
                  content=data).raise_for_status()

    def delete_file(self, resource_uri: str, path: str) -> None:
        with self.paused() as c:
            c.delete(f"{resource_uri}/files/{quote(path)}").raise_for_status()

    def put_resource(self, resource_uri: str) -> None:
        with self.paused() as c:
            c.put(resource_uri).raise_for_status()

    def put_fields(self, object_uri: str, fields: dict[str, str]) -> None:
        with self.paused() as c:
            c.put(object_uri, params=fields).raise_for_status()

    def document(self, accession_id: str) -> bytes:
        with self.paused() as c:
            answer = c.get(f"/data/experiments/{accession_id}", params={"format": "xml"})
        answer.raise_for_status()
        return answer.content

    def subject_field(self, project: str, label: str, name: str) -> str:
        with self.paused() as c:
            answer = c.get(f"/data/projects/{project}/subjects",
                           params={"format": "json", "columns": f"label,{name}"})
        answer.raise_for_status()
        [row] = [r for r in answer.json()["ResultSet"]["Result"] if r["label"] == label]
        return str(row.get(name) or "")

    def prearchive_names(self, project: str) -> dict[str, str]:
        """The project's prearchive sessions: name (the patient ID) → URI."""
        with self.paused() as c:
            answer = c.get(f"/data/prearchive/projects/{project}", params={"format": "json"})
        answer.raise_for_status()
        return {r["name"]: "/data" + r["url"] for r in answer.json()["ResultSet"]["Result"]}

    def prearchive_files(self, uri: str) -> dict[str, bytes]:
        """Every file of a prearchive session: (scan ID, name) joined by '/' → bytes."""
        out = {}
        with self.paused() as c:
            for scan in c.get(f"{uri}/scans", params={"format": "json"}).json()[
                    "ResultSet"]["Result"]:
                files = c.get(f"{uri}/scans/{scan['ID']}/resources/DICOM/files",
                              params={"format": "json"}).json()["ResultSet"]["Result"]
                for f in files:
                    out[f"{scan['ID']}/{f['Name']}"] = c.get(f["URI"]).content
        return out


class Versions:
    """What one path may show: values (``None``: absent) and the time (monotonic)
    until which each may still be served; the last one is current."""

    def __init__(self, value: Any) -> None:
        self.items: list[list[Any]] = [[value, math.inf]]

    @property
    def current(self) -> Any:
        return self.items[-1][0]

    def change(self, value: Any, stale_until: float) -> None:
        """XNAT now holds ``value``; the others stay acceptable until ``stale_until``."""
        if value == self.current and len(self.items) == 1:
            return
        for item in self.items:
            item[1] = min(item[1], stale_until)
        self.items.append([value, math.inf])

    def acceptable(self, started: float) -> list[Any]:
        """The values an operation started at ``started`` may return."""
        self.items = [i for i in self.items if i[1] >= started - 60 or i is self.items[-1]]
        return [value for value, until in self.items if until >= started]

    def settled(self, started: float) -> bool:
        return len(self.acceptable(started)) == 1


SEEN: list[str] = []  # every violation raised in this process, the first ones first


class Violation(AssertionError):
    """An invariant broken: a wrong byte, a lost write, an operation over its bound.
    Each is written to stderr when raised: shrinking replays a failure under other
    fault rolls, and may end in "Flaky" or a timeout that no longer shows it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        SEEN.append(message)
        print(f"model test: violation: {message}", file=sys.stderr, flush=True)


@dataclass
class Figures:
    """What a run did and saw: the soak's figures."""

    ops: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    wrong_bytes: int = 0
    lost_writes: int = 0

    def summary(self) -> str:
        def pct(values: list[float], q: float) -> float:
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

        every = [t for ts in self.latencies.values() for t in ts]
        lines = [f"operations {sum(self.ops.values())} ({dict(sorted(self.ops.items()))}), "
                 f"failed {sum(self.failed.values())} ({dict(sorted(self.failed.items()))})",
                 f"faults injected {dict(sorted(self.faults.items()))}",
                 f"wrong bytes {self.wrong_bytes}, lost writes {self.lost_writes}",
                 f"latency max {max(every, default=0):.2f} s, p99 {pct(every, 0.99):.2f} s"]
        for kind, ts in sorted(self.latencies.items()):
            lines.append(f"  {kind:14} n={len(ts):4} max {max(ts):.2f} s  p99 {pct(ts, 0.99):.2f} s")
        return "\n".join(lines)


class Judge:
    """Runs one operation on the mount and holds it to its bound; what it
    returned is checked by the caller against the model."""

    def __init__(self, bounds: dict[str, float]) -> None:
        self.bounds = bounds          # seconds each kind of operation may take
        # Added to every bound but those of the kinds in ``no_extra`` while the name lookups a call starts with may wait for a
        # failing server too (each is a kernel request with a bound of its own).
        self.extra = 0.0
        self.no_extra: set[str] = set()
        self.figures = Figures()
        self._lock = threading.Lock()

    def run(self, kind: str, operation: Callable[[], T]) -> tuple[float, T | OSError]:
        """``(start, result or the OSError it raised)``; a Violation if it took too long."""
        started = time.monotonic()
        try:
            result: T | OSError = operation()
        except OSError as exc:
            result = exc
        took = time.monotonic() - started
        with self._lock:
            self.figures.ops[kind] += 1
            if isinstance(result, OSError):
                self.figures.failed[f"{kind}:{errno.errorcode.get(result.errno or 0, '?')}"] += 1
            self.figures.latencies.setdefault(kind, []).append(took)
        bound = self.bounds[kind] + (0.0 if kind in self.no_extra else self.extra)
        if took > bound:
            raise Violation(f"{kind} took {took:.2f} s, over its bound of {bound:.2f} s "
                            f"(result: {result!r})")
        return started, result

    def wrong(self, message: str) -> Violation:
        with self._lock:
            self.figures.wrong_bytes += 1
        return Violation(message)

    def lost(self, message: str) -> Violation:
        with self._lock:
            self.figures.lost_writes += 1
        return Violation(message)
