"""A soak of a real xnatfs mount under the test server's faults, with figures.

:func:`run_soak` starts a demo server, mounts it, reads every archive file
once over plain HTTP (the server's bytes, checked against the listing's MD5),
then runs the load of :mod:`.soakload` (readers of different files, writers
into resources and into ``uploads/``) while a seeded schedule turns the
server's knobs (:class:`~xnatfs.testing.knobs.Knobs`: 5xx, dropped and cut
bodies, latency, a hang, throttling, expired sessions). Afterwards the
faults stop, ``xnatfs uploads list`` must list every write whose ``close()``
failed, ``xnatfs uploads retry`` sends them, and XNAT must hold every write
owed (done, or kept) with its digest: what it lacks are lost writes. The
figures: operations by kind, faults, wrong bytes, lost writes, latency,
the mount's peak memory, and its descriptors and threads before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .harness import TestServer, env_without_proxies, pids_with_cmdline
from .soakload import Ledger, ReadTarget, Write, reader, result_writer, upload_writer
from .soakreport import Report, proc_figures, settle_figures

ADMIN = ("admin", "admin")
PROJECT = "NEURO_PUB"               # where results and uploads are written
READ_PROJECTS = ("NEURO_PUB", "SAMPLES", "ONC-PROT", "ALICE_LAB")
UPLOAD_ATTEMPTS = 3                 # xnatfs.spool.UPLOAD_ATTEMPTS (sleeps 1 s, 2 s between)
# Each phase of the schedule is one of these; a round has each once.
FAULTS = ("calm", "fail503", "fail500", "drop", "truncate", "latency", "hang", "expire",
          "throttle")
# A server silent for longer than any operation's bound (4 x --timeout + 5 s):
# operations must fail within their bound, and the mount recover after it.
LONG_HANG = "long_hang"


@dataclass
class SoakConfig:
    """One soak run. ``workdir`` holds the server's data, the mount and its cache."""

    seconds: float
    seed: int
    workdir: Path
    readers: int = 64
    writers: int = 16                # half write results into resources, half upload
    timeout: float = 5.0             # the mount's --timeout
    import_timeout: float = 10.0     # the mount's --import-timeout
    cache_size: str = "8M"           # small, so that reads keep reaching the server
    phase: tuple[float, float] = (2.0, 6.0)  # a fault phase lasts this long (s)
    quiet: float = 3.0               # the mount is idle once its fds and threads are
                                     # unchanged this long
    slack: float = 3.0               # scheduling on a busy machine, added to each bound
    data_dir: Path | None = None     # a built demo data set to serve (else built here)
    server_range: bool = False       # the server honours HTTP Range (real XNAT 1.8: no)
    long_hang: bool = False          # a LONG_HANG phase in each round
    shared_cache: bool = False       # reads also go through a shared cache tier (issue 23)

    def bounds(self) -> dict[str, float]:
        """How long each kind of operation may take: the README's bound of a file
        operation (4 x --timeout); a write's close retries three times after its
        first attempt, and an unanswered upload waits --import-timeout."""
        op = 4 * self.timeout + self.slack
        write = op + (UPLOAD_ATTEMPTS + 1) * 4 * self.timeout + 3 + self.import_timeout
        return {"read": op, "pread": op, "stat": op, "listdir": op, "readback": op,
                "result": write + self.slack, "upload": write + self.slack}


@dataclass
class FaultLog:
    phases: Counter[str] = field(default_factory=Counter)
    sessions_expired: int = 0


def run_soak(config: SoakConfig, say: Any = print) -> Report:
    """Run one soak; the report says what happened (``report.failures`` empty: passed)."""
    work = config.workdir
    data = config.data_dir or work / "data"
    server = TestServer(data, dataset="demo", args=["--prearchive-settle", "1"])
    server.start()
    server.set_knobs(range=config.server_range)
    mount = work / "mnt"
    cache = work / "cache"
    env = dict(env_without_proxies(), XNAT_USER="admin", XNAT_PASS="admin",
               XDG_CACHE_HOME=str(work / "xdg-cache"), XDG_CONFIG_HOME=str(work / "xdg-config"))
    env.pop("XNAT_URL", None)
    report = Report(config.seed, config.seconds, config.readers, config.writers)
    try:
        mount.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "xnatfs.cli", "mount", server.url, str(mount),
                        "--cache-dir", str(cache), "--cache-size", config.cache_size,
                        "--timeout", str(config.timeout),
                        "--import-timeout", str(config.import_timeout),
                        *(["--shared-cache", str(work / "shared")] if config.shared_cache
                          else []),
                        "--log-level", "WARNING", "--log-file", str(work / "mount.log")],
                        env=env, check=True, timeout=60)
        try:
            _soak_mounted(config, server, mount, cache, env, report, say)
        finally:
            subprocess.run(["fusermount3", "-u", str(mount)], check=False, timeout=60)
    finally:
        server.stop()
    report.faults_in_log = _faults_in_log(server.log_path)
    return report


def _soak_mounted(config: SoakConfig, server: TestServer, mount: Path, cache: Path,
                  env: dict[str, str], report: Report, say: Any) -> None:
    [pid] = pids_with_cmdline("--foreground", str(mount.resolve()))
    began = time.monotonic()

    def step(text: str) -> None:
        say(f"soak: {time.monotonic() - began:5.1f} s  {text}")

    targets = _read_targets(server, mount)
    step(f"{len(targets)} files to read, {sum(len(t.data) for t in targets)} bytes; "
         f"seed {config.seed}, {config.seconds:.0f} s")
    folders = _result_folders(mount, config.writers // 2)
    writes: list[Write] = []
    # Before: the mount once it has listed what the load uses. Descriptors the
    # load may leave open without leaking are bounded (soakreport.FDS_BOUNDED).
    report.start = settle_figures(pid, None, quiet=config.quiet)
    step(f"settled: {report.start['fds']} fds, {report.start['threads']} threads")
    faults = FaultLog()
    started = time.monotonic()
    ledger = _load(config, server, mount, targets, folders, writes, faults)
    report.load_seconds = time.monotonic() - started
    step("load done")
    report.stuck = list(ledger.stuck)
    if ledger.stuck and not ledger.done.is_set():
        report.failures.append("operations still running after their bound: "
                               + "; ".join(ledger.stuck))
        _abort_connection(mount)
        return
    server.set_knobs(**CALM)
    report.fill_ops(ledger, config.slack)
    report.fault_phases = dict(faults.phases)
    report.sessions_expired = faults.sessions_expired
    _check_writes(server, mount, cache, env, writes, report, step)
    report.status = json.loads((mount / ".xnatfs-status.json").read_bytes())
    step("writes checked")
    report.end = settle_figures(pid, report.start)
    step(f"settled: {report.end['fds']} fds, {report.end['threads']} threads")
    report.peak_rss_kb = proc_figures(pid)["peak_rss_kb"]  # VmHWM: the high-water mark
    report.judge(config)


def _load(config: SoakConfig, server: TestServer, mount: Path, targets: list[ReadTarget],
          folders: list[Path], writes: list[Write], faults: FaultLog) -> Ledger:
    """Run the readers and writers while the faults are turned, until time is
    up or the watchdog stops them; the ledger of what they did."""
    ledger = Ledger(config.bounds())
    seed = str(config.seed)
    threads = []
    order = random.Random(seed).sample(targets, len(targets))
    for i in range(config.readers):
        mine = order[i::config.readers] or [order[i % len(order)]]
        threads.append(threading.Thread(
            target=reader, args=(ledger, mine, random.Random(f"{seed}-r{i}")),
            name=f"reader-{i}", daemon=True))
    for i, folder in enumerate(folders):
        threads.append(threading.Thread(
            target=result_writer,
            args=(ledger, f"{i:02d}", folder, random.Random(f"{seed}-w{i}"), writes),
            name=f"result-writer-{i}", daemon=True))
    scratch = Path(tempfile.mkdtemp(prefix="soak-zips-", dir=config.workdir))
    uploads = mount / "uploads" / PROJECT
    for i in range(config.writers - len(folders)):
        threads.append(threading.Thread(
            target=upload_writer, args=(ledger, f"{i:02d}", uploads, scratch / str(i),
                                        random.Random(f"{seed}-u{i}"), writes),
            name=f"upload-writer-{i}", daemon=True))
    watchdog = threading.Thread(target=ledger.watch, name="watchdog", daemon=True)
    watchdog.start()
    for thread in threads:
        thread.start()
    _fault_schedule(config, server, ledger, faults)
    ledger.stop.set()
    deadline = time.monotonic() + max(config.bounds().values())
    for thread in threads:
        thread.join(timeout=max(0.1, deadline - time.monotonic()))
    if not any(t.is_alive() for t in threads):
        ledger.done.set()
    ledger.finished.set()
    watchdog.join()
    return ledger


CALM = {"latency_ms": 0.0, "fail_rate": 0.0, "fault_status": 503, "drop_rate": 0.0,
        "truncate_rate": 0.0, "hang": False, "throttle_requests": 0}


def _fault_schedule(config: SoakConfig, server: TestServer, ledger: Ledger,
                    faults: FaultLog) -> None:
    """Turn the server's knobs, phase after phase, until time is up (or the
    watchdog stops the load). The schedule is a function of the seed."""
    rng = random.Random(f"{config.seed}-faults")
    end = time.monotonic() + config.seconds
    plan: list[str] = []
    while not ledger.stop.is_set() and time.monotonic() < end:
        if not plan:  # every kind once per round, in a seeded order
            kinds = FAULTS + ((LONG_HANG,) if config.long_hang else ())
            plan = rng.sample(kinds, len(kinds))
        kind = plan.pop()
        length = rng.uniform(*config.phase)
        changes: dict[str, Any] = dict(CALM)
        if kind == "fail503":
            changes["fail_rate"] = rng.uniform(0.05, 0.3)
        elif kind == "fail500":
            changes.update(fail_rate=rng.uniform(0.05, 0.2), fault_status=500)
        elif kind == "drop":
            changes["drop_rate"] = rng.uniform(0.1, 0.5)
        elif kind == "truncate":
            changes["truncate_rate"] = rng.uniform(0.1, 0.5)
        elif kind == "latency":
            changes["latency_ms"] = rng.uniform(50, 500)
        elif kind == "hang":  # a server that stops answering for a while, then recovers
            changes["hang"] = True
            length = min(length, config.timeout * 1.5)
        elif kind == LONG_HANG:
            changes["hang"] = True
            length = 4 * config.timeout + 5
        elif kind == "throttle":
            changes.update(throttle_requests=rng.randint(5, 40), throttle_retry_after_s=1.0)
        server.set_knobs(**changes)
        if kind == "expire":
            faults.sessions_expired += server.expire_sessions()
        faults.phases[kind] += 1
        ledger.stop.wait(max(0.0, min(length, end - time.monotonic())))
    server.set_knobs(**CALM)


def _read_targets(server: TestServer, mount: Path) -> list[ReadTarget]:
    """Every file below a ``files/`` folder of the archive, with the server's
    bytes of it (fetched over HTTP, checked against the listing's MD5)."""
    targets = []
    with httpx.Client(base_url=server.url, auth=ADMIN, timeout=60) as http:
        for project in READ_PROJECTS:
            for folder, _dirs, names in os.walk(mount / project):
                if "/files" not in folder[len(str(mount)):]:
                    continue
                for name in names:
                    path = Path(folder, name)
                    uri = os.getxattr(path, "user.xnat.uri").decode()
                    digest = os.getxattr(path, "user.xnat.digest").decode()
                    answer = http.get(uri)
                    answer.raise_for_status()
                    if hashlib.md5(answer.content).hexdigest() != digest:
                        raise RuntimeError(f"the server's bytes of {uri} do not match its "
                                           "listing: the soak cannot check reads")
                    targets.append(ReadTarget(path, answer.content))
    return sorted(targets, key=lambda t: str(t.path))


def _result_folders(mount: Path, count: int) -> list[Path]:
    """``files/`` of a new resource per result writer, in the project's sessions
    (made before the faults start: a writer's resource exists, as a pipeline's does)."""
    sessions = sorted(p for subject in (mount / PROJECT).iterdir() if subject.is_dir()
                      and subject.name != "resources"
                      for p in subject.iterdir() if (p / "scans").is_dir())
    folders = []
    for i in range(count):
        folder = sessions[i % len(sessions)] / "resources" / f"SOAK_W{i:02d}" / "files"
        folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder)
    return folders


def _check_writes(server: TestServer, mount: Path, cache: Path, env: dict[str, str],
                  writes: list[Write], report: Report, say: Any) -> None:
    """Every owed write kept (if its close failed) and, after a retry, in XNAT."""
    command = [sys.executable, "-m", "xnatfs.cli", "uploads"]
    listed = subprocess.run([*command, "list", "--cache-dir", str(cache)], env=env,
                            capture_output=True, text=True, timeout=120)
    kept = listed.stdout
    report.kept_listed = len([line for line in kept.splitlines() if line.strip()])
    for write in writes:
        if write.stage == "close" and f"/{write.path.name}" not in kept:
            report.not_kept.append(f"{write.kind} {write.path} (close: {write.error})")
    if report.kept_listed:
        retried = subprocess.run([*command, "retry", "--cache-dir", str(cache)], env=env,
                                 capture_output=True, text=True, timeout=600)
        report.retry_output = (retried.stdout + retried.stderr)[-4000:]
        report.retry_status = retried.returncode
    held = _held_in_xnat(server, mount, writes)
    for write in writes:
        report.writes[f"{write.kind} {write.stage}"] += 1
        if write.owed and not held(write):
            report.lost.append(f"{write.kind} {write.path} (close: {write.error or 'ok'})")
    say(f"{len(writes)} writes, {report.kept_listed} kept, {len(report.lost)} lost")


def _held_in_xnat(server: TestServer, mount: Path, writes: list[Write]) -> Any:
    """What XNAT holds: each result resource's listing (name and MD5), and every
    digest of the prearchive and archive (an upload's members)."""
    listed: dict[Path, dict[str, str]] = {}
    with httpx.Client(base_url=server.url, auth=ADMIN, timeout=60) as http:
        for folder in {w.path.parent for w in writes if w.kind == "result"}:
            uri = os.getxattr(folder.parent, "user.xnat.uri").decode()
            rows = http.get(f"{uri}/files", params={"format": "json"}).json()
            listed[folder] = {r["Name"]: r["digest"] for r in rows["ResultSet"]["Result"]}
    db = sqlite3.connect(f"file:{server.data_dir / 'xnat.sqlite'}?mode=ro", uri=True)
    try:
        digests = {row[0] for row in db.execute(
            "SELECT digest FROM prearc_files UNION SELECT digest FROM files")}
    finally:
        db.close()

    def held(write: Write) -> bool:
        if write.kind == "result":
            return listed.get(write.path.parent, {}).get(write.path.name) == write.md5
        return all(member in digests for member in write.members)

    return held


def _faults_in_log(log_path: Path) -> dict[str, int]:
    """Faults the server injected, by kind, from its request log (hung requests
    are logged when the server stops)."""
    counts: Counter[str] = Counter()
    if log_path.exists():
        with open(log_path, encoding="utf-8") as f:
            for line in f:
                entry = json.loads(line)
                if entry.get("fault"):
                    counts[entry["fault"]] += 1
                elif entry.get("route") == "hang":
                    counts["hang"] += 1
    return dict(counts)


def _abort_connection(mount: Path) -> None:
    """Release operations stuck in the mount (the README's advice for a hang)."""
    device = os.stat(mount).st_dev
    abort = Path(f"/sys/fs/fuse/connections/{os.minor(device)}/abort")
    try:
        abort.write_text("1\n")
    except OSError:
        pass
