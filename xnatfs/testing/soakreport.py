"""The soak's figures: what :func:`~xnatfs.testing.soak.run_soak` measured,
judged against its invariants, and printed as the README carries them."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .soakload import Ledger, percentile

if TYPE_CHECKING:
    from .soak import SoakConfig


def proc_figures(pid: int) -> dict[str, int]:
    """Descriptors, threads and memory of a process, from ``/proc``."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()[0] if value.split() else ""
    return {"fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
            "threads": int(status["Threads"]), "rss_kb": int(status["VmRSS"]),
            "peak_rss_kb": int(status["VmHWM"])}


def fd_kinds(pid: int) -> dict[str, int]:
    """What a process's descriptors are (sockets, pipes, files by their last two
    path parts), to say what a leak is made of."""
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/"):
            target = "/".join(Path(target).parts[-2:])
        kinds[target.split(":[")[0] if ":[" in target else target] += 1
    return dict(kinds)


# Descriptors that may outlive the load without leaking, and how many more of
# them than before it: idle pooled connections (closed when the pool is next
# used after their 15 s expiry; at most --max-requests, 16), and the block
# index's SQLite connections (diskcache opens one per worker thread, and
# only Python's garbage collector closes those of threads that have ended).
FDS_BOUNDED = {"socket": 16, "blocks/cache.db": 32, "blocks/cache.db-wal": 32}


def leaks(start: dict[str, Any], end: dict[str, Any]) -> list[str]:
    """Threads and descriptors the mount has after the load and did not before
    it (beyond :data:`FDS_BOUNDED`)."""
    found = []
    if end["threads"] > start["threads"]:
        found.append(f"threads: {start['threads']} before the load, {end['threads']} after")
    before, after = start["fd_kinds"], end["fd_kinds"]
    for kind in sorted(after):
        if after[kind] > before.get(kind, 0) + FDS_BOUNDED.get(kind, 0):
            found.append(f"descriptors of {kind}: {before.get(kind, 0)} before the load, "
                         f"{after[kind]} after")
    return found


def settle_figures(pid: int, start: dict[str, Any] | None, *, quiet: float = 11.0,
                   wait: float = 30.0) -> dict[str, Any]:
    """The process's figures once the load is gone: idle worker threads and
    connections are let go after a few seconds. With ``start``, wait (at most
    ``wait``) for descriptors and threads to come back to it; without, until
    they have not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + wait
    last, since = proc_figures(pid), time.monotonic()
    while time.monotonic() < deadline:
        if start is not None and not leaks(start, {**last, "fd_kinds": fd_kinds(pid)}):
            break
        if start is None and time.monotonic() - since >= quiet:
            break
        time.sleep(0.5)
        now = proc_figures(pid)
        if (now["fds"], now["threads"]) != (last["fds"], last["threads"]):
            since = time.monotonic()
        last = now
    return {**last, "fd_kinds": fd_kinds(pid)}


@dataclass
class Report:
    seed: int
    seconds: float
    readers: int
    writers: int
    load_seconds: float = 0.0
    ops: dict[str, dict[str, Any]] = field(default_factory=dict)
    fault_phases: dict[str, int] = field(default_factory=dict)
    faults_in_log: dict[str, int] = field(default_factory=dict)
    sessions_expired: int = 0
    wrong_bytes: int = 0
    wrong: list[str] = field(default_factory=list)
    writes: Counter[str] = field(default_factory=Counter)
    kept_listed: int = 0
    not_kept: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    retry_output: str = ""
    retry_status: int = 0
    stuck: list[str] = field(default_factory=list)
    start: dict[str, Any] = field(default_factory=dict)
    end: dict[str, Any] = field(default_factory=dict)
    peak_rss_kb: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def fill_ops(self, ledger: Ledger, slack: float) -> None:
        """Figures by kind; ``over`` counts the operations that took longer than
        their bound without the slack given a busy machine (not a failure)."""
        for kind, latencies in sorted(ledger.latencies.items()):
            documented = ledger.bounds[kind] - slack
            self.ops[kind] = {"count": len(latencies), "outcomes": dict(ledger.errors[kind]),
                              "p99_s": percentile(latencies, 0.99), "max_s": max(latencies),
                              "bound_s": ledger.bounds[kind],
                              "over": sum(t > documented for t in latencies)}
        self.wrong_bytes = ledger.wrong_bytes
        self.wrong = list(ledger.wrong)

    def judge(self, config: SoakConfig, rss_limit_mb: int = 400) -> None:
        """The invariants; each one broken is a line of :attr:`failures`."""
        if self.wrong:
            self.failures.append(f"{self.wrong_bytes} wrong bytes: " + "; ".join(self.wrong[:5]))
        if self.stuck:
            self.failures.append("; ".join(self.stuck))
        if self.not_kept:
            self.failures.append(f"{len(self.not_kept)} failed writes not kept: "
                                 + "; ".join(self.not_kept[:5]))
        if self.lost:
            self.failures.append(f"{len(self.lost)} lost writes: " + "; ".join(self.lost[:5]))
        self.failures.extend(leaks(self.start, self.end))
        if self.peak_rss_kb > rss_limit_mb * 1024:
            self.failures.append(f"peak RSS {self.peak_rss_kb // 1024} MB > {rss_limit_mb} MB")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "status"} | {
            "mount_requests": self.status.get("requests", {})}

    def text(self) -> str:
        """The figures, for people and for the README."""
        lines = [f"seed {self.seed}, load {self.load_seconds:.0f} s, {self.readers} readers "
                 f"of different files, {self.writers} writers",
                 f"{'operation':10} {'count':>7} {'failed':>7} {'p99 s':>7} {'max s':>7} "
                 f"{'bound s':>7} {'over':>4}  failures by errno"]
        for kind, op in self.ops.items():
            failed = {k: v for k, v in op["outcomes"].items() if k != "ok"}
            lines.append(f"{kind:10} {op['count']:7} {sum(failed.values()):7} "
                         f"{op['p99_s']:7.2f} {op['max_s']:7.2f} {op['bound_s']:7.0f} {op['over']:4}  "
                         + " ".join(f"{k} {v}" for k, v in sorted(failed.items())))
        total = sum(op["count"] for op in self.ops.values())
        lines.append(f"{'all':10} {total:7}")
        lines.append("fault phases: " + ", ".join(f"{k} {v}" for k, v in
                                                  sorted(self.fault_phases.items())))
        lines.append("faults injected (server log): " + ", ".join(
            f"{k} {v}" for k, v in sorted(self.faults_in_log.items()))
            + f"; sessions expired {self.sessions_expired}")
        requests = self.status.get("requests", {})
        lines.append(f"mount: requests {requests.get('total')}, retries "
                     f"{requests.get('retries')}, no answer {requests.get('no_answer')}, "
                     f"server seemed down {requests.get('times_server_seemed_down')}, "
                     f"relogins {self.status.get('session', {}).get('relogins')}")
        shared, moved = self.status.get("shared_cache", {}), self.status.get("bytes", {})
        if shared.get("enabled"):
            lines.append(f"shared cache: {moved.get('from_shared_cache')} bytes read from it "
                         f"({moved.get('from_xnat')} from XNAT), "
                         f"{shared.get('entries_published')} blocks published, "
                         f"{shared.get('entries_found_bad')} found bad, "
                         f"{shared.get('failed_or_hung_calls')} calls failed or hung")
        lines.append("writes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.writes.items()))
                     + f"; kept and listed {self.kept_listed}, retried (exit "
                     f"{self.retry_status})")
        lines.append(f"wrong bytes {self.wrong_bytes}, lost writes {len(self.lost)}, "
                     f"failed writes not kept {len(self.not_kept)}, stuck operations "
                     f"{len(self.stuck)}")
        lines.append(f"mount process: peak RSS {self.peak_rss_kb / 1024:.0f} MB; fds "
                     f"{self.start.get('fds')} before, {self.end.get('fds')} after; threads "
                     f"{self.start.get('threads')} before, {self.end.get('threads')} after")
        lines.append("PASSED" if not self.failures else "FAILED:\n  " + "\n  ".join(
            self.failures))
        return "\n".join(lines)
