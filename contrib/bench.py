#!/usr/bin/env python3
"""The xnatfs benchmark (issue 5): every scenario, each against its baseline.

    python contrib/bench.py [--quick] [--profile loopback|wan] [--json PATH] [--strict]

Builds the ``bench`` data set if needed (once, ~20 s and 1.5 GB, in
``~/.cache/xnatfs/bench-server`` or ``--data DIR``), starts ``xnatfs
testserver`` on it, mounts it for real (``python -m xnatfs.cli mount``) and
runs the scenarios below one at a time, each with the server's HTTP Range
support off (as real XNAT 1.8) and on. It prints a table (every figure is
the median of ``--runs`` runs, default 3, 1 with ``--quick``) and writes all
runs as JSON (default ``bench-results/<timestamp>-<profile>.json``).

====  =============================================  ==========================  ==========
id    xnatfs figure                                  baseline                    target
====  =============================================  ==========================  ==========
S0    sequential read of a file of zeros from        -                           (ceiling)
      contrib/zerofs.py (a do-nothing pyfuse3 fs),
      also with its tuning applied as xnatfs does;
      the better of the two is the ceiling
S1    cold sequential read (dd bs=1M) of the 1 GiB+  min(curl download, S0)      >= 0.8
      NIfTI, loopback
S2    the same, wan                                  curl download               on >= 3,
                                                                                 off >= 0.9
S3    time to the first 4 KiB of a cold file: the    curl time to first byte     <= 1.5
      NIfTI as the first read of a fresh mount, and  of the same file
      a DICOM file of another session after it
S4    cold ``cp -r`` of one DICOM scan (224 files)   xnatpy scan.download_dir    <= 1.0
                                                     (and curl zip + unzip)      (aim 0.5)
S5    ``find -ls`` over the bench project            xnatpy walk of the same     <= 0.5, and
                                                     hierarchy                   <= 1/project
                                                                                 +1/subject
                                                                                 +2/session
                                                                                 requests
S6    re-read after remount (disk cache warm, page   S0                          >= 0.8, and
      cache dropped)                                                             0 data reqs
S7    ``cp`` of a 1 GiB DICOM zip into uploads/      curl POST of the zip to     <= 1.2
                                                     /data/services/import
S8    peak RSS of the mount process during S1, S4,   -                           <= 250 MB
      S5, S7
S9    ``mkdir`` of a new session resource, ``cp -r``  xnatpy                      <= 1.0
      of a 300-file FreeSurfer-like tree (39 MB)     ``create_resource`` +       (aim 0.5)
      into its ``files/``, then ``fsync`` of the     ``upload_dir`` (one tar.gz  with
      resource folder: a ``--write-behind`` mount;   PUT, ``extract=true``)      --write-
      the same on a default mount beside it (close                               behind;
      waits per file); every run verified by                                     default:
      XNAT's listing (sizes, MD5s), requests counted                             none
S10   four mounts, each with its own ``--cache-dir``  -                           <= 0.3
      and all with one ``--shared-cache`` tier, read
      scan 3 (``cp -r``) and then the NIfTI (``dd``)
      at once, one process per mount: bytes XNAT
      served / bytes the mounts read
      ... the wall time of the same                   four xnatpy processes at    (none)
                                                     once, each
                                                     ``download_dir`` of the
                                                     scan + the NIfTI's
                                                     ``download``
====  =============================================  ==========================  ==========

Profiles. ``wan`` adds 20 ms to every request and caps each connection at
25 MB/s, through the server's knobs; ``loopback`` shapes nothing. S1 is
always measured unshaped and S2 always shaped (they are the two legs of the
same read); the profile shapes S3, S4, S5, S7, S9 and S10 (the issue states
their targets for wan, so with ``--profile loopback`` those ratios are for
information). S0 and S6 make no network requests. Before each S6 run the
same cached blocks are read cold straight from disk (4 threads): S6 cannot
beat that, and the output says when the disk alone keeps it below target.

S9 (issue 21, results back into XNAT) writes a FreeSurfer-like output tree
(``mri/``, ``surf/``, ``label/``, ``stats/``, ``scripts/``, ``touch/``: mostly
files of a few KB to a few hundred KB, nine of 1-5 MB; made from a seeded RNG,
so every run writes the same bytes) into a new resource of one session. Each
run of each variant gets a resource of its own, made inside the timed span
(``mkdir`` on the mount, ``create_resource`` for xnatpy); the mount's time
runs until the ``fsync`` of the resource folder returns, i.e. until XNAT has
every file. After every run the resource's listing is fetched over HTTP and
must show every file with its size and MD5; a run that fails this check is
``n/a (verification failed: ...)``, never a time. The resource is deleted
afterwards (and any ``S9_*`` resource a crashed run left behind, first).
Baselines: xnatpy's ``resource.upload_dir`` with its default method
(``tgz_file``: the whole folder as one gzipped tar, level 9, in a spooled
temporary file, sent as ``upload.tar.gz`` in one PUT with ``extract=true``;
it does not check what XNAT stored), and, beside the default mount, its
``method="per_file"`` (one PUT per file, nothing else).

Cold runs use a fresh mount with an empty block cache, and the page cache is
dropped before each one (``echo 3 > /proc/sys/vm/drop_caches``) where the
machine allows it; the output says when it does not. Request counts come
from the server's request log, RSS from ``/proc/PID/status`` (VmHWM) of the
mount process, CPU from ``/proc/PID/stat`` of the mount and server processes
and from the rusage of the client commands, so the output can name the
bottleneck (the bundled server, curl, xnatfs, the shaping).

S10 (issue 23, many nodes and one XNAT) stands for four cluster nodes: four
mounts on this machine, each with a fresh local cache and all sharing one
fresh ``--shared-cache`` folder, mounted before the clock starts (as xnatpy
logs in before it). Four workers start together, each ``cp -r`` of the scan
then ``dd`` of the NIfTI through its own mount; the run ends when the last
one does. XNAT's bytes are the ``sent`` bytes of the server's request log
(file bodies and zips that went out, downloads cut short included); the
mounts' bytes are what the workers copied and read, checked equal across
them. The notes say how many file downloads each file cost, which bytes
XNAT sent more than once (the spans of each file's downloads that overlap),
what the tier holds afterwards, and what each mount's status file says it
got from XNAT, the tier and its local cache. Baseline: four xnatpy processes
logged in beforehand, then at once each ``scan.download_dir`` (one zip) and
the NIfTI's ``download`` (MD5 checked).

``--quick`` (the smoke test in ``tests/test_bench_smoke.py``): one run of
each figure, S1 reads the whole NIfTI (S6 re-reads it from the cache: a
file read only in part, never checked against its MD5, is fetched again
after a remount), S2 reads 64 MiB, S5 walks one subject (and skips
the xnatpy walk that HEADs every file), S7 uploads a ~34 MB zip, S9 writes
40 of the tree's files (~3 MB) and skips the xnatpy ``per_file`` baseline,
S10 reads the scan only (no NIfTI), with Range off only;
about four minutes, including the data set build when it is missing.

Reading the output: each row gives the xnatfs median, the baseline median,
their ratio and the issue's target (``ok``/``MISS``); rows marked ``[...]``
are extra views of a scenario (another baseline, another file). The notes
under the table give the requests per run by route, the CPU use of each
process (``-> CPU-bound: ...`` names the bottleneck, e.g. the bundled server
or curl), and "at the wan cap" when a single connection ran at the shaping
limit. The header names the xnatfs commit measured, and warns when the
kernel tuning of the xnatfs mount differs from zerofs's.

A scenario that fails is reported as ``n/a (reason)``, never a crash; the
exit status is non-zero only with ``--strict`` (any n/a figure), when XNAT
did not hold what an S9 run wrote (``VERIFICATION FAILED``, at the end of the
output: a wrong result, not a slow one), or when the benchmark itself cannot
start (no FUSE, no server).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from xnatfs.testing.harness import (  # noqa: E402
    TestServer,
    env_without_proxies,
    pids_with_cmdline,
)
from diskcache.core import MODE_BINARY  # noqa: E402

from xnatfs.directdisk import BlockValue, DirectDisk  # noqa: E402
from xnatfs.mount import mount_device  # noqa: E402

MiB = 1 << 20
MB = 1_000_000
USER = PASSWORD = "admin"
SHAPING = {"loopback": {"latency_ms": 0.0, "bandwidth_mb_s": 0.0},
           "wan": {"latency_ms": 20.0, "bandwidth_mb_s": 25.0}}
RANGES = ("off", "on")
DEFAULT_DATA = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xnatfs" / \
    "bench-server"

# What the bench data set holds (xnatfs/testing/datasets.py, preset "bench").
PROJECT = "BENCH"
SUBJECTS = ("BENCH001", "BENCH002", "BENCH003", "BENCH004")
SESSIONS_PER_SUBJECT = 2
SUBJECT, SESSION = "BENCH001", "BENCH001_MR1"
OTHER_SUBJECT, OTHER_SESSION = "BENCH002", "BENCH002_MR1"  # S3's second file
NIFTI_SCAN, NIFTI_RESOURCE, NIFTI_NAME = "4", "NIFTI", "fmri_rest_mb8_4.nii"
DICOM_SCAN = "3"  # T2w: one DICOM resource, 224 slices of 256x256
DATA_ROUTES = ("files.download", "files.archive")  # requests that carry file bytes
SESSION_ROUTES = ("auth", "jsession", "services.auth", "control")  # not archive requests
DOCUMENT_NAMES = ("/project.xml", "/subject.xml", "/session.xml", "/scan.xml", "/assessor.xml")
CPU_BOUND = 85.0  # % of one core above which a process is called the bottleneck
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scope:
    runs: int
    s1_bytes: int | None     # bytes of the NIfTI read in S1/S6 (None: all of it)
    s2_bytes: int | None     # the same for S2
    s5_subjects: tuple[str, ...]
    upload_series: int       # S7 zip: series of 512x512 CT slices
    upload_slices: int
    head_walk_runs: int      # runs of the (slow) xnatpy walk that HEADs every file
    s9_files: int | None     # files of the S9 tree written (None: all 300)
    s9_per_file: bool        # also the xnatpy per_file baseline (one PUT per file)
    s10_nifti: bool          # S10 reads the NIfTI too, not only the DICOM scan


FULL = Scope(runs=3, s1_bytes=None, s2_bytes=None, s5_subjects=SUBJECTS,
             upload_series=4, upload_slices=512, head_walk_runs=1, s9_files=None,
             s9_per_file=True, s10_nifti=True)
# --quick skips the xnatpy walk that HEADs every file (~900 requests per subject).
# S1 reads all of the NIfTI even then: S6 re-reads what S1 read after a remount,
# and blocks of a file never checked whole are not trusted across one.
QUICK = Scope(runs=1, s1_bytes=None, s2_bytes=64 * MiB, s5_subjects=(SUBJECT,),
              upload_series=1, upload_slices=64, head_walk_runs=0, s9_files=40,
              s9_per_file=False, s10_nifti=False)


# ---------------------------------------------------------------- results
@dataclass
class Run:
    """One measurement: ``value`` in the figure's unit, or ``error``."""

    value: float | None = None
    seconds: float | None = None
    error: str | None = None
    requests: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)     # % of one core
    rss_mb: dict[str, float] = field(default_factory=dict)  # mount process
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}, [])}


def md5_throughput(nbytes: int = 512 * MB) -> float:
    """MB/s of hashlib's MD5 on this machine (the digest check of a whole file)."""
    import hashlib
    block = os.urandom(4 * MB)
    digest = hashlib.md5()
    started = time.perf_counter()
    for _ in range(nbytes // len(block)):
        digest.update(block)
    return nbytes / MB / (time.perf_counter() - started)


def disk_write_throughput(directory: Path, nbytes: int = 512 * MB) -> float:
    """MB/s of writing 4 MiB files as the block cache does (``DirectDisk``, with
    O_DIRECT where the file system allows it), synced at the end."""
    target = Path(tempfile.mkdtemp(dir=directory, prefix="disk-ceiling-"))
    disk = DirectDisk(str(target))
    block = BlockValue(os.urandom(4 * MB))
    try:
        started = time.perf_counter()
        for _ in range(nbytes // (4 * MB)):
            disk.store(block, True)
        os.sync()
        return nbytes / MB / (time.perf_counter() - started)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def cold_read_throughput(files: list[Path], readers: int = 4) -> float:
    """MB/s of reading ``files`` whole with ``readers`` threads as the block cache
    does (``DirectDisk``; the caller drops the page cache first): what the disk
    under the block cache can deliver."""
    from concurrent.futures import ThreadPoolExecutor

    if not files:
        return 0.0
    root = files[0].parents[2]  # diskcache keeps values in <cache>/ab/cd/<name>.val
    disk = DirectDisk(str(root))

    def read(path: Path) -> int:
        return len(disk.fetch(MODE_BINARY, str(path.relative_to(root)), None, False))

    started = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        total = sum(pool.map(read, files))
    return total / MB / (time.perf_counter() - started)


def median(runs: list[Run]) -> float | None:
    values = [r.value for r in runs if r.value is not None]
    return statistics.median(values) if values else None


def first_error(runs: list[Run]) -> str:
    errors = [r.error for r in runs if r.error]
    return errors[0] if errors else "no run"


@dataclass
class Measure:
    """A baseline or xnatfs measurement: a name and its runs."""

    name: str
    unit: str
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def value(self) -> float | None:
        return median(self.runs)

    def shown(self) -> float | str:
        value = self.value
        return value if value is not None else f"n/a ({first_error(self.runs)})"


@dataclass
class Figure:
    """One row of the table: an xnatfs measurement, its baseline, ratio and target."""

    id: str
    range: str | None
    title: str
    measure: Measure
    shaping: str | None = None
    baseline: Measure | None = None
    baseline_value: float | None = None  # when the baseline is derived (min(curl, S0))
    baseline_label: str = ""
    higher_is_better: bool = True
    target: tuple[str, float] | None = None
    target_note: str = ""
    checks: dict[str, Any] = field(default_factory=dict)  # extra pass/fail conditions
    variant: str = ""
    mode: str = ""  # which xnatfs set-up when a scenario has several (S9: mount options)
    notes: list[str] = field(default_factory=list)

    @property
    def base(self) -> float | None:
        if self.baseline_value is not None:
            return self.baseline_value
        return self.baseline.value if self.baseline is not None else None

    @property
    def ratio(self) -> float | None:
        value, base = self.measure.value, self.base
        if value is None or base is None or base == 0:
            return None
        return value / base

    @property
    def meets(self) -> bool | None:
        if self.measure.value is None or (self.target is None and not self.checks):
            return None
        ok = True
        if self.target is not None:
            op, threshold = self.target
            # Without a baseline (S8) the target is on the value itself.
            has_baseline = self.baseline is not None or self.baseline_value is not None
            subject = self.ratio if has_baseline else self.measure.value
            if subject is None:
                return None
            ok = subject >= threshold if op == ">=" else subject <= threshold
        for check in self.checks.values():
            if isinstance(check, dict) and check.get("ok") is False:
                ok = False
        return ok

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "range": self.range, "variant": self.variant or None,
            "mode": self.mode or None, "title": self.title, "shaping": self.shaping,
            "value": self.measure.shown(), "unit": self.measure.unit,
            "runs": [r.as_json() for r in self.measure.runs],
        }
        if self.baseline is not None or self.baseline_value is not None:
            out["baseline"] = {"name": self.baseline_label or (self.baseline.name
                                                              if self.baseline else ""),
                               "value": self.base,
                               "unit": self.baseline.unit if self.baseline else
                               self.measure.unit}
        out["ratio"] = self.ratio
        out["target"] = f"{self.target[0]} {self.target[1]:g}" if self.target else None
        out["meets"] = self.meets
        if self.checks:
            out["checks"] = self.checks
        out["notes"] = self.notes + self.measure.notes
        return out


class BenchError(Exception):
    """A run failed; the message becomes the figure's n/a reason."""


# ------------------------------------------------------------- processes
@dataclass
class Done:
    seconds: float
    returncode: int
    stdout: bytes
    stderr: str
    cpu_percent: float  # of one core, user + system


STALL_SECONDS = 60.0  # a reader that moves no byte for this long is stuck


def io_bytes(pid: int) -> int | None:
    """Bytes a process has read and written so far (``/proc/PID/io``)."""
    try:
        fields = dict(line.split(": ") for line in
                      Path(f"/proc/{pid}/io").read_text().splitlines())
        return int(fields["rchar"]) + int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def run_cmd(cmd: list[str], *, timeout: float, stdout: Any = subprocess.DEVNULL,
            on_timeout: Callable[[], None] | None = None, env: dict[str, str] | None = None,
            stall: float | None = None) -> Done:
    """Run ``cmd``, timing it to its exit and collecting its rusage.

    On timeout, or when ``stall`` is given and the command has moved no byte
    for that many seconds (a mount that hangs or spins), ``on_timeout`` runs
    first (e.g. kill the FUSE daemon, the only way to free a process waiting on
    a FUSE request), then the command is killed.
    """
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        target = out if stdout is subprocess.PIPE else stdout
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=target, stderr=err, env=env)
        result: dict[str, Any] = {}

        def reap() -> None:
            result["wait"] = os.wait4(proc.pid, 0)
            result["end"] = time.perf_counter()

        reaper = threading.Thread(target=reap, daemon=True)
        reaper.start()
        deadline = started + timeout
        moved, moved_at = io_bytes(proc.pid), time.perf_counter()
        failure = ""
        while reaper.is_alive():
            reaper.join(min(1.0, max(deadline - time.perf_counter(), 0.01)))
            if not reaper.is_alive():
                break
            now = time.perf_counter()
            if now >= deadline:
                failure = f"{Path(cmd[0]).name} timed out after {timeout:.0f} s"
                break
            if stall is not None:
                current = io_bytes(proc.pid)
                if current != moved:
                    moved, moved_at = current, now
                elif now - moved_at >= stall:
                    failure = (f"{Path(cmd[0]).name} stalled: no I/O for {stall:.0f} s "
                               f"after {(moved or 0) / MB:.0f} MB")
                    break
        if failure:
            if on_timeout is not None:
                on_timeout()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            reaper.join(30)
            proc.returncode = -9
            raise BenchError(failure)
        _, status, usage = result["wait"]
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = result["end"] - started
        err.seek(0)
        out.seek(0)
        return Done(seconds, proc.returncode, out.read() if stdout is subprocess.PIPE else b"",
                    err.read().decode(errors="replace").strip(),
                    100.0 * (usage.ru_utime + usage.ru_stime) / max(seconds, 1e-9))


def cpu_ticks(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def proc_status(pid: int | None) -> dict[str, float]:
    """VmHWM and VmRSS of ``pid`` in MB (10^6 bytes), as the kernel counts them."""
    out: dict[str, float] = {}
    if pid is None:
        return out
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = round(int(value.split()[0]) * 1024 / MB, 1)
    except (OSError, ValueError):
        pass
    return out


class CpuWatch:
    """CPU use of some processes over a stretch of wall time, in % of one core."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.start = time.perf_counter()
        self.ticks = {name: cpu_ticks(pid) for name, pid in pids.items()}

    def stop(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.start, 1e-9)
        out = {}
        for name, pid in self.pids.items():
            before, after = self.ticks[name], cpu_ticks(pid)
            if before is not None and after is not None:
                out[name] = round(100.0 * (after - before) / TICK / wall, 1)
        return out


def is_mounted(mountpoint: Path) -> bool:
    return mount_device(mountpoint) is not None


def kernel_tuning(mountpoint: Path) -> dict[str, str]:
    """What the kernel uses for this mount: readahead and background limits."""
    device = mount_device(mountpoint)
    if device is None:
        return {}
    major, minor = device
    out = {}
    for name, path in (("read_ahead_kb", f"/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
                       ("max_background", f"/sys/fs/fuse/connections/{minor}/max_background"),
                       ("congestion_threshold",
                        f"/sys/fs/fuse/connections/{minor}/congestion_threshold")):
        try:
            out[name] = Path(path).read_text().strip()
        except OSError:
            out[name] = "n/a (fusectl not mounted)" if "connections" in path else "n/a"
    return out


def unmount(mountpoint: Path, pid: int | None) -> None:
    """Unmount and wait for the daemon to exit (killing it, by pid, if it will not)."""
    for args in (["-u"], ["-u"], ["-uz"]):
        if not is_mounted(mountpoint):
            break
        subprocess.run(["fusermount3", *args, str(mountpoint)], check=False, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if is_mounted(mountpoint):
            time.sleep(0.5)
    if pid is None:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        if _is_zombie(pid):
            return
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        time.sleep(1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def git_state() -> dict[str, Any]:
    """The commit measured, and xnatfs files changed since (numbers are for those)."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                                text=True, check=False, timeout=30)
        return result.stdout.strip() if result.returncode == 0 else ""
    status = git("status", "--porcelain", "--", "xnatfs")
    changed = [line.split(maxsplit=1)[-1] for line in status.splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "uncommitted_xnatfs_changes": changed}


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


# ----------------------------------------------------------------- mounts
class XnatfsMount:
    """``python -m xnatfs.cli mount`` of the bench server, as the tests mount it."""

    def __init__(self, bench: Bench, name: str, cache_dir: Path,
                 options: tuple[str, ...] = ()) -> None:
        self.bench = bench
        self.path = bench.workdir / "mnt" / name
        self.cache_dir = cache_dir
        self.options = options  # extra mount options (S9: --write-behind)
        self.pid: int | None = None
        self.mount_seconds = 0.0
        self.log_file = bench.workdir / "logs" / f"mount-{name}.log"

    def __enter__(self) -> XnatfsMount:
        self.path.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.path):
            unmount(self.path, None)
        cmd = [sys.executable, "-m", "xnatfs.cli", "mount", self.bench.server.url,
               str(self.path), "--cache-dir", str(self.cache_dir), "--range", "auto",
               "--log-level", "INFO", "--log-file", str(self.log_file), *self.options]
        started = time.perf_counter()
        result = subprocess.run(cmd, env=self.bench.mount_env, capture_output=True, text=True,
                                timeout=120, check=False)
        self.mount_seconds = time.perf_counter() - started
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip()[-300:]
            raise BenchError(f"mount failed: {message}{self.diagnose(cmd)}")
        pids = pids_with_cmdline("xnatfs.cli", "mount", str(self.path), "--foreground")
        self.pid = max(pids) if pids else None
        return self

    def __exit__(self, *exc: object) -> None:
        unmount(self.path, self.pid)

    def diagnose(self, cmd: list[str]) -> str:
        """A background mount died without a word (its stderr goes nowhere): run the
        same mount in the foreground for a moment to catch the traceback."""
        err_path = self.log_file.with_suffix(".stderr")
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([*cmd, "--foreground"], env=self.bench.mount_env,
                                    stdout=subprocess.DEVNULL, stderr=err)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                unmount(self.path, proc.pid)
                return " (a foreground retry mounted fine)"
        lines = [line for line in err_path.read_text(errors="replace").splitlines()
                 if line.strip()]
        return f" (foreground retry: {lines[-1].strip()[:300]})" if lines else ""

    def kill(self) -> None:
        """Free anything stuck on the mount: the kernel fails its requests once the daemon dies."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def rss(self) -> dict[str, float]:
        return proc_status(self.pid)


class ZeroMount:
    """contrib/zerofs.py mounted in a subprocess."""

    def __init__(self, bench: Bench, size: int, tune: str = "") -> None:
        self.path = bench.workdir / "mnt" / "zerofs"
        self.size = size
        self.tune = tune  # "" (after INIT), "--tune-before-init" or "--no-tune"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tuning: dict[str, str] = {}

    def __enter__(self) -> ZeroMount:
        self.path.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "contrib" / "zerofs.py"), str(self.path),
             "--size", str(self.size), *([self.tune] if self.tune else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise BenchError(f"zerofs did not start: {err.strip()[-300:]}")
        self.tuning = json.loads(line).get("tuning", {})
        return self

    def __exit__(self, *exc: object) -> None:
        unmount(self.path, None)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()


# ------------------------------------------------------------------ bench
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scope = QUICK if args.quick else FULL
        if args.runs:
            self.scope = Scope(**{**self.scope.__dict__, "runs": args.runs})
        self.profile = args.profile
        self.ranges = [r for r in RANGES if r in args.range.split(",")]
        self.only = set(args.scenarios.upper().split(",")) if args.scenarios else None
        self.workdir = Path(args.workdir).resolve() if args.workdir else \
            Path(tempfile.mkdtemp(prefix="xnatfs-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(args.data).expanduser().resolve()
        self.server: TestServer = None  # type: ignore[assignment]
        self.mount_env: dict[str, str] = {}
        self.figures: list[Figure] = []
        self.baselines: dict[str, Measure] = {}
        self.meta: dict[str, Any] = {}
        self.drop_status: str | None = None  # None: untried; "" ok; else why not
        self.paths: dict[str, str] = {}
        self.s1_caches: dict[str, Path] = {}
        self.rss_peaks: dict[str, list[tuple[str, float]]] = {r: [] for r in RANGES}
        self._mount_counter = 0
        self.log_lines: list[str] = []

    # ------------------------------------------------------------ helpers
    def say(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {text}", file=sys.stderr, flush=True)

    def wanted(self, scenario: str) -> bool:
        return self.only is None or scenario in self.only

    def drop_caches(self) -> bool:
        """Drop the page cache (root only); remember why not when it fails."""
        if self.drop_status not in (None, ""):
            return False
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError as exc:
            self.drop_status = f"no ({exc.strerror or exc})"
            self.say(f"cannot drop the page cache: {exc}; cold runs are page-cache warm")
            return False
        self.drop_status = ""
        return True

    def shape(self, shaping: str, range_on: bool = False) -> None:
        self.server.set_knobs(**SHAPING[shaping], range=range_on)

    def mark(self) -> int:
        return self.server.log_mark()

    def requests(self, mark: int, settle: float = 0.3) -> dict[str, int]:
        time.sleep(settle)  # a cancelled stream is logged when its handler ends
        return count_routes(self.server.requests_since(mark))

    def new_mount(self, tag: str, cache_dir: Path | None = None,
                  options: tuple[str, ...] = ()) -> XnatfsMount:
        self._mount_counter += 1
        name = f"{self._mount_counter:03d}-{tag}"
        cache = cache_dir or self.workdir / "caches" / name
        return XnatfsMount(self, name, cache, options)

    def nifti_path(self, mount: XnatfsMount) -> Path:
        return mount.path / self.paths["nifti"]

    def url(self, path: str) -> str:
        return self.server.url + path

    @property
    def nifti_uri(self) -> str:
        return (f"/data/projects/{PROJECT}/subjects/{SUBJECT}/experiments/{SESSION}/scans/"
                f"{NIFTI_SCAN}/resources/{NIFTI_RESOURCE}/files/{NIFTI_NAME}")

    @property
    def scan_zip_uri(self) -> str:
        return (f"/data/projects/{PROJECT}/subjects/{SUBJECT}/experiments/{SESSION}/scans/"
                f"{DICOM_SCAN}/files?format=zip")

    def curl(self, *args: str) -> list[str]:
        return ["curl", "-s", "--noproxy", "*", "-u", f"{USER}:{PASSWORD}", *args]

    def guarded(self, measure: Measure, fn: Callable[[], Run]) -> None:
        """Run one measurement; any failure becomes an n/a run, never a crash.

        After a run that stalled or timed out, the measure's other runs are
        skipped: a hung mount would cost the same wait each time."""
        stuck = [r.error for r in measure.runs if r.error and ("stalled" in r.error or
                                                               "timed out" in r.error)]
        if stuck:
            measure.runs.append(Run(error=f"skipped after an earlier run: {stuck[0]}"))
            return
        try:
            run = fn()
        except BenchError as exc:
            run = Run(error=str(exc))
        except Exception as exc:  # noqa: BLE001 - report, do not crash
            run = Run(error=f"{type(exc).__name__}: {exc}")
            self.log_lines.append(traceback.format_exc())
        measure.runs.append(run)
        shown = f"{run.value:.3f} {measure.unit}" if run.value is not None else \
            f"n/a ({run.error})"
        self.say(f"  {measure.name}: {shown}")

    def add(self, figure: Figure) -> Figure:
        figure.notes.extend(bottleneck_notes(figure))
        self.figures.append(figure)
        return figure

    # ------------------------------------------------------------- set-up
    def prepare(self) -> None:
        for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                    "ALL_PROXY"):
            os.environ.pop(key, None)
        os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
        ensure_dataset(self.data_dir, self.say)
        if self.wanted("S7"):  # 1 GB for a full run: only when it is used
            self.upload_zip = ensure_upload_zip(self.data_dir.parent, self.scope.upload_series,
                                                self.scope.upload_slices, self.say)
        home = self.workdir / "home"
        self.mount_env = dict(env_without_proxies(), XNAT_USER=USER, XNAT_PASS=PASSWORD,
                              XDG_CACHE_HOME=str(home / "cache"),
                              XDG_CONFIG_HOME=str(home / "config"))
        self.mount_env.pop("XNAT_URL", None)
        log = self.workdir / "requests.log"
        self.server = TestServer(self.data_dir, dataset="bench",
                                 args=["--request-log", str(log)])
        self.server.log_path = log
        self.server.stderr_path = self.workdir / "logs" / "server.log"
        self.server.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self.say(f"starting xnatfs testserver on {self.data_dir}")
        self.server.start()
        self.shape("loopback")
        self.discover()

    def discover(self) -> None:
        """Mount once to learn the mounted names (scan folders are ``ID-type``)."""
        with self.new_mount("discover") as mount:
            self.meta["mount_seconds"] = round(mount.mount_seconds, 3)
            scans = mount.path / PROJECT / SUBJECT / SESSION / "scans"
            names = {p.name.split("-", 1)[0]: p.name for p in scans.iterdir()}
            for key, scan_id in (("nifti_scan", NIFTI_SCAN), ("dicom_scan", DICOM_SCAN)):
                if scan_id not in names:
                    raise BenchError(f"scan {scan_id} not in {scans} (is {self.data_dir} "
                                     f"the bench data set?)")
                self.paths[key] = f"{PROJECT}/{SUBJECT}/{SESSION}/scans/{names[scan_id]}"
            self.paths["nifti"] = (f"{self.paths['nifti_scan']}/resources/{NIFTI_RESOURCE}/"
                                   f"files/{NIFTI_NAME}")
            self.nifti_size = os.stat(mount.path / self.paths["nifti"]).st_size
            self.paths["uploads"] = f"uploads/{PROJECT}"
            # S3's second file: the first DICOM file of scan 2 of another session.
            other = mount.path / PROJECT / OTHER_SUBJECT / OTHER_SESSION / "scans"
            scan = next(p.name for p in other.iterdir() if p.name.split("-", 1)[0] == "2")
            files = other / scan / "resources" / "DICOM" / "files"
            name = sorted(p.name for p in files.iterdir())[0]
            self.paths["s3_other"] = str((files / name).relative_to(mount.path))
            self.s3_other_uri = (f"/data/projects/{PROJECT}/subjects/{OTHER_SUBJECT}/experiments/"
                                 f"{OTHER_SESSION}/scans/2/resources/DICOM/files/{name}")
            # Read once the mount has answered requests, i.e. after FUSE INIT.
            self.meta["kernel_tuning_xnatfs"] = kernel_tuning(mount.path)
        self.say(f"bench paths: {self.paths}")

    def read_bytes(self, limit: int | None) -> int:
        return self.nifti_size if limit is None else min(limit, self.nifti_size)

    # ---------------------------------------------------------- scenarios
    def run_all(self) -> None:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("S0", self.s0), ("S1", self.s1), ("S6", self.s6), ("S2", self.s2),
            ("S3", self.s3), ("S4", self.s4), ("S5", self.s5), ("S7", self.s7),
            ("S8", self.s8), ("S9", self.s9), ("S10", self.s10)]
        for scenario, step in steps:
            if not self.wanted(scenario):
                continue
            self.say(f"{scenario} ...")
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - report, do not crash
                self.log_lines.append(traceback.format_exc())
                self.say(f"{scenario} failed: {exc}")
                self.add(Figure(scenario, None, "scenario failed",
                                Measure("xnatfs", "", [Run(error=f"{type(exc).__name__}: "
                                                                 f"{exc}")])))

    # S0 ----------------------------------------------------------------
    def s0(self) -> None:
        size = self.read_bytes(self.scope.s1_bytes)
        measure = Measure("zerofs dd", "MB/s")
        early = Measure("zerofs dd, tuned before INIT", "MB/s")
        for _ in range(self.scope.runs):
            self.guarded(measure, lambda: self._zero_read(size))
            self.guarded(early, lambda: self._zero_read(size, "--tune-before-init"))
        # The ceiling is the better of the two: the kernel's readahead for a plain
        # FUSE mount swings several-fold from one mount to the next on this VM.
        self.s0_measure = max((measure, early), key=lambda m: m.value or 0.0)
        self.add(Figure("S0", None, f"seq read {fmt_bytes(size)} from zerofs (pyfuse3 ceiling)",
                        measure))
        self.add(Figure("S0", None, f"seq read {fmt_bytes(size)} from zerofs tuned as xnatfs "
                                    "does (before INIT)", early, variant="as xnatfs tunes",
                        notes=[f"readahead in force: "
                               f"{self.meta.get('kernel_tuning_zerofs_early', {})}"]))

    def _zero_read(self, size: int, tune: str = "") -> Run:
        with ZeroMount(self, size, tune) as zero:
            key = "kernel_tuning_zerofs" + ("_early" if tune else "")
            self.meta[key] = zero.tuning
            self.drop_caches()
            pid = zero.proc.pid if zero.proc else None
            watch = CpuWatch({"zerofs": pid})
            done = run_cmd(["dd", f"if={zero.path / 'zeros.bin'}", "of=/dev/null", "bs=1M"],
                           timeout=600, on_timeout=zero.kill, stall=STALL_SECONDS)
            cpu = watch.stop()
            if done.returncode != 0:
                raise BenchError(f"dd failed: {done.stderr[-200:]}")
            cpu["dd"] = round(done.cpu_percent, 1)
            return Run(value=size / MB / done.seconds, seconds=done.seconds, cpu=cpu,
                       extra={"bytes": size})

    # S1 / S2 / S6 ------------------------------------------------------
    def curl_download(self, nbytes: int) -> Run:
        """curl of the NIfTI; only its first ``nbytes`` when that is less than all of it
        (``curl | head -c``: the pipe costs CPU, so loopback baselines read it all)."""
        self.drop_caches()
        watch = CpuWatch({"server": self.server.process.pid if self.server.process else None})
        if nbytes >= self.nifti_size:
            done = run_cmd(self.curl("-o", "/dev/null", "-w", "%{size_download}",
                                     self.url(self.nifti_uri)),
                           timeout=1800, stdout=subprocess.PIPE)
            got = int(float(done.stdout or b"0"))
        else:  # the first nbytes only: XNAT ignores Range, so stop reading instead
            done = curl_head_bytes(self.curl(self.url(self.nifti_uri)), nbytes, timeout=1800)
            got = nbytes if done.returncode == 0 else 0
        cpu = watch.stop()
        cpu["curl"] = round(done.cpu_percent, 1)
        if got < nbytes:
            raise BenchError(f"curl got {got} of {nbytes} bytes: {done.stderr[-200:]}")
        return Run(value=nbytes / MB / done.seconds, seconds=done.seconds, cpu=cpu,
                   extra={"bytes": nbytes})

    def xnatfs_read(self, nbytes: int, rng: str, tag: str, *, keep_cache_as: str | None = None,
                    cache_dir: Path | None = None, rss_scenario: str | None = None) -> Run:
        """dd of the NIfTI through a fresh mount (a fresh cache unless ``cache_dir``)."""
        mount = self.new_mount(tag, cache_dir)
        with mount:
            path = self.nifti_path(mount)
            self.drop_caches()
            mark = self.mark()
            watch = CpuWatch({"server": self.server.process.pid, "mount": mount.pid})
            cmd = ["dd", f"if={path}", "of=/dev/null", "bs=1M"]
            if nbytes < self.nifti_size:
                cmd.append(f"count={nbytes // MiB}")
            done = run_cmd(cmd, timeout=1800, on_timeout=mount.kill, stall=STALL_SECONDS)
            cpu = watch.stop()
            cpu["dd"] = round(done.cpu_percent, 1)
            rss = mount.rss()
            tuning = kernel_tuning(mount.path)
        requests = self.requests(mark)
        if rss_scenario and "VmHWM" in rss:
            self.rss_peaks[rng].append((rss_scenario, rss["VmHWM"]))
        if keep_cache_as is not None:
            old = self.s1_caches.get(keep_cache_as)
            if old is not None and old != mount.cache_dir:
                shutil.rmtree(old, ignore_errors=True)
            self.s1_caches[keep_cache_as] = mount.cache_dir
        elif cache_dir is None:
            shutil.rmtree(mount.cache_dir, ignore_errors=True)
        if done.returncode != 0:
            raise BenchError(f"dd failed: {failure(done, mount.path)}")
        return Run(value=nbytes / MB / done.seconds, seconds=done.seconds, requests=requests,
                   cpu=cpu, rss_mb=rss, extra={"bytes": nbytes,
                                               "read_ahead_kb": tuning.get("read_ahead_kb")})

    def s1(self) -> None:
        nbytes = self.read_bytes(self.scope.s1_bytes)
        self.shape("loopback")
        curl = Measure("curl download (loopback)", "MB/s")
        for _ in range(self.scope.runs):
            self.guarded(curl, lambda: self.curl_download(self.nifti_size))
        self.baselines["S1 curl"] = curl
        s0 = getattr(self, "s0_measure", None)
        candidates = [m.value for m in (curl, s0) if m is not None and m.value is not None]
        label = "min(curl, S0)" if s0 is not None else "curl (S0 not run)"
        for rng in self.ranges:
            self.shape("loopback", rng == "on")
            measure = Measure(f"xnatfs dd, Range {rng}", "MB/s")
            for _ in range(self.scope.runs):
                self.guarded(measure, lambda rng=rng: self.xnatfs_read(
                    nbytes, rng, f"s1-{rng}", keep_cache_as=rng, rss_scenario="S1"))
            fig = Figure("S1", rng, f"cold seq read {fmt_bytes(nbytes)} NIfTI", measure,
                         shaping="loopback", baseline=curl,
                         baseline_value=min(candidates) if candidates else None,
                         baseline_label=label, target=(">=", 0.8))
            fig.notes.append(f"baseline parts: curl {fmt_value(curl.value)} MB/s, "
                             f"S0 {fmt_value(s0.value if s0 else None)} MB/s")
            fig.notes.append(self.machine_ceilings())
            self.add(fig)

    def machine_ceilings(self) -> str:
        """What a cold read must also do that curl -o /dev/null does not: the MD5
        digest check (one core, it cannot be split) and writing every block to the
        disk cache. Either can cap S1 below curl on a small machine."""
        if "ceilings" not in self.meta:
            self.meta["ceilings"] = {"md5_mb_s": round(md5_throughput(), 1),
                                     "cache_disk_write_mb_s":
                                         round(disk_write_throughput(self.workdir), 1)}
        c = self.meta["ceilings"]
        return (f"xnatfs-side ceilings on this machine: MD5 {c['md5_mb_s']} MB/s (one core), "
                f"cache disk writes {c['cache_disk_write_mb_s']} MB/s (as the block cache writes them, synced)")

    def s2(self) -> None:
        nbytes = self.read_bytes(self.scope.s2_bytes)
        self.shape("wan")
        curl = Measure("curl download (wan)", "MB/s")
        for _ in range(self.scope.runs):
            self.guarded(curl, lambda: self.curl_download(nbytes))
        self.baselines["S2 curl"] = curl
        for rng in self.ranges:
            self.shape("wan", rng == "on")
            measure = Measure(f"xnatfs dd, Range {rng}", "MB/s")
            for _ in range(self.scope.runs):
                self.guarded(measure, lambda rng=rng: self.xnatfs_read(nbytes, rng,
                                                                       f"s2-{rng}"))
            self.add(Figure("S2", rng, f"cold seq read {fmt_bytes(nbytes)} NIfTI", measure,
                            shaping="wan", baseline=curl, baseline_label="curl",
                            target=(">=", 3.0 if rng == "on" else 0.9)))
        self.shape("loopback")

    def s6(self) -> None:
        nbytes = self.read_bytes(self.scope.s1_bytes)
        s0 = getattr(self, "s0_measure", None)
        self.shape(self.profile)
        for rng in self.ranges:
            self.shape(self.profile, rng == "on")
            measure = Measure(f"xnatfs warm-cache dd, Range {rng}", "MB/s")
            # The same cache read straight from disk, run for run: with the page
            # cache dropped, the disk may be slower than S0.
            disk = Measure("cold read of the cached block files (4 readers)", "MB/s")
            cache = self.s1_caches.get(rng)
            for _ in range(self.scope.runs):
                if cache is None:
                    measure.runs.append(Run(error="no S1 cache to re-read"))
                    continue
                self.guarded(disk, lambda cache=cache: self.cache_disk_read(cache))
                self.guarded(measure, lambda rng=rng, cache=cache: self.xnatfs_read(
                    nbytes, rng, f"s6-{rng}", cache_dir=cache))
            data = [sum(n for k, n in r.requests.items() if k.split()[0] in DATA_ROUTES)
                    for r in measure.runs if r.value is not None]
            check = {"max": 0, "seen": max(data) if data else None,
                     "ok": (max(data) == 0) if data else None}
            fig = self.add(Figure("S6", rng, f"re-read {fmt_bytes(nbytes)} after remount "
                                             "(disk cache warm)", measure, shaping=self.profile,
                                  baseline=s0, baseline_label="S0", target=(">=", 0.8),
                                  checks={"data_requests": check}))
            if disk.value and s0 is not None and s0.value:
                note = (f"disk ceiling: the cached blocks read cold straight from disk at "
                        f"{fmt_value(disk.value)} MB/s (4 readers), {disk.value / s0.value:.2f} "
                        f"of S0")
                if measure.value:
                    note += f"; xnatfs read {measure.value / disk.value:.2f} of that"
                if disk.value < 0.8 * s0.value:
                    note += " -> this disk alone keeps S6 below its target here"
                fig.notes.append(note)
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
        self.s1_caches.clear()
        self.shape("loopback")

    def cache_disk_read(self, cache: Path) -> Run:
        files = sorted(cache.rglob("*.val"))
        if not files:
            raise BenchError(f"no cached blocks under {cache}")
        if not self.drop_caches():
            raise BenchError("cannot drop the page cache: no cold disk read")
        return Run(value=cold_read_throughput(files))

    # S3 ----------------------------------------------------------------
    def curl_ttfb(self, uri: str) -> Run:
        self.drop_caches()
        done = curl_head_bytes(self.curl("-w", "%{stderr}TTFB %{time_starttransfer}\n",
                                         self.url(uri)), 4096, timeout=120)
        match = re.search(r"TTFB ([\d.]+)", done.stderr)
        if not match:
            raise BenchError(f"curl printed no time: {done.stderr[-200:]}")
        seconds = float(match.group(1))
        return Run(value=seconds * 1000, seconds=seconds)

    def xnatfs_first_bytes(self, rng: str) -> tuple[Run, Run, Run]:
        """Times to the first 4 KiB on a fresh mount: (the NIfTI, its path already
        stat'ed; the same including the path lookup; then a second cold file, a
        DICOM file of another session, once the mount has served the first)."""
        mount = self.new_mount(f"s3-{rng}")
        with mount:
            path = self.nifti_path(mount)
            other = mount.path / self.paths["s3_other"]
            self.drop_caches()  # before the stat: it also drops the kernel's dentries
            mark = self.mark()
            t0 = time.perf_counter()
            in_thread(lambda: os.stat(path), 120, mount.kill)
            t1 = time.perf_counter()
            got = in_thread(lambda: first_bytes(path, 4096), 120, mount.kill)
            t2 = time.perf_counter()
            in_thread(lambda: os.stat(other), 120, mount.kill)
            t3 = time.perf_counter()
            got_other = in_thread(lambda: first_bytes(other, 4096), 120, mount.kill)
            t4 = time.perf_counter()
        requests = self.requests(mark)
        shutil.rmtree(mount.cache_dir, ignore_errors=True)
        if got != 4096 or got_other != 4096:
            raise BenchError(f"read returned {got}/{got_other} bytes, not 4096")
        return (Run(value=(t2 - t1) * 1000, seconds=t2 - t1, requests=requests),
                Run(value=(t2 - t0) * 1000, seconds=t2 - t0,
                    extra={"lookup_ms": round((t1 - t0) * 1000, 2)}),
                Run(value=(t4 - t3) * 1000, seconds=t4 - t3))

    def s3(self) -> None:
        self.shape(self.profile)
        curl = Measure("curl time to first byte", "ms")
        curl_other = Measure("curl time to first byte, DICOM file", "ms")
        for _ in range(self.scope.runs):
            self.guarded(curl, lambda: self.curl_ttfb(self.nifti_uri))
            self.guarded(curl_other, lambda: self.curl_ttfb(self.s3_other_uri))
        self.baselines["S3 curl"] = curl
        self.baselines["S3 curl DICOM"] = curl_other
        for rng in self.ranges:
            self.shape(self.profile, rng == "on")
            first = Measure(f"xnatfs open+read 4 KiB, Range {rng}", "ms")
            lookup = Measure(f"xnatfs stat+open+read 4 KiB, Range {rng}", "ms")
            second = Measure(f"xnatfs open+read 4 KiB of a second file, Range {rng}", "ms")
            for _ in range(self.scope.runs):
                try:
                    a, b, c = self.xnatfs_first_bytes(rng)
                except Exception as exc:  # noqa: BLE001 - report, do not crash
                    a = b = c = Run(error=str(exc))
                for measure, run in ((first, a), (lookup, b), (second, c)):
                    measure.runs.append(run)
                self.say(f"  {first.name}: {fmt_value(a.value)} ms (with lookup "
                         f"{fmt_value(b.value)} ms; second file {fmt_value(c.value)} ms)"
                         if a.value is not None else f"  {first.name}: n/a ({a.error})")
            self.add(Figure("S3", rng, "first 4 KiB of the cold NIfTI, first read of a fresh "
                                       "mount (path stat'ed first)", first,
                            shaping=self.profile, baseline=curl, baseline_label="curl TTFB",
                            higher_is_better=False, target=("<=", 1.5)))
            self.add(Figure("S3", rng, "the same, path lookup included", lookup,
                            shaping=self.profile, baseline=curl, baseline_label="curl TTFB",
                            higher_is_better=False, variant="with lookup"))
            self.add(Figure("S3", rng, "first 4 KiB of a cold DICOM file once the mount has "
                                       "read another file", second, shaping=self.profile,
                            baseline=curl_other, baseline_label="curl TTFB (same DICOM)",
                            higher_is_better=False, target=("<=", 1.5), variant="second file"))
        self.shape("loopback")

    # S4 ----------------------------------------------------------------
    def xnatpy_session(self) -> Any:
        import xnat

        return xnat.connect(self.server.url, user=USER, password=PASSWORD,
                            extension_types=False, loglevel="ERROR")

    def xnatpy_scan_download(self) -> Run:
        out = self.workdir / "out" / "xnatpy"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        session = self.xnatpy_session()
        try:
            self.drop_caches()
            mark = self.mark()
            watch = CpuWatch({"server": self.server.process.pid, "xnatpy": os.getpid()})
            started = time.perf_counter()
            scan = session.projects[PROJECT].subjects[SUBJECT].experiments[SESSION] \
                .scans[DICOM_SCAN]
            scan.download_dir(str(out), verbose=False)
            seconds = time.perf_counter() - started
            cpu = watch.stop()
        finally:
            session.disconnect()
        files = sum(1 for p in out.rglob("*") if p.is_file())
        shutil.rmtree(out, ignore_errors=True)
        return Run(value=seconds, seconds=seconds, requests=self.requests(mark, 0.1), cpu=cpu,
                   extra={"files": files})

    def curl_scan_zip(self) -> Run:
        out = self.workdir / "out" / "curlzip"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        self.drop_caches()
        watch = CpuWatch({"server": self.server.process.pid})
        zip_path = out / "scan.zip"
        fetch = run_cmd(self.curl("-f", "-o", str(zip_path), self.url(self.scan_zip_uri)),
                        timeout=600)
        if fetch.returncode != 0:
            raise BenchError(f"curl failed ({fetch.returncode}): {fetch.stderr[-200:]}")
        unzip = run_cmd(["unzip", "-q", str(zip_path), "-d", str(out / "x")], timeout=600)
        cpu = watch.stop()
        cpu["curl"] = round(fetch.cpu_percent, 1)
        if unzip.returncode != 0:
            raise BenchError(f"unzip failed: {unzip.stderr[-200:]}")
        files = sum(1 for p in (out / "x").rglob("*") if p.is_file())
        shutil.rmtree(out, ignore_errors=True)
        seconds = fetch.seconds + unzip.seconds
        return Run(value=seconds, seconds=seconds, cpu=cpu,
                   extra={"files": files, "curl_s": round(fetch.seconds, 3),
                          "unzip_s": round(unzip.seconds, 3)})

    def xnatfs_cp_scan(self, rng: str) -> Run:
        out = self.workdir / "out" / "cp"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        mount = self.new_mount(f"s4-{rng}")
        with mount:
            self.drop_caches()
            mark = self.mark()
            watch = CpuWatch({"server": self.server.process.pid, "mount": mount.pid})
            done = run_cmd(["cp", "-r", str(mount.path / self.paths["dicom_scan"]), str(out)],
                           timeout=1200, on_timeout=mount.kill, stall=STALL_SECONDS)
            cpu = watch.stop()
            cpu["cp"] = round(done.cpu_percent, 1)
            rss = mount.rss()
        requests = self.requests(mark)
        shutil.rmtree(mount.cache_dir, ignore_errors=True)
        files = sum(1 for p in out.rglob("*") if p.is_file())
        shutil.rmtree(out, ignore_errors=True)
        if "VmHWM" in rss:
            self.rss_peaks[rng].append(("S4", rss["VmHWM"]))
        if done.returncode != 0:
            raise BenchError(f"cp failed: {failure(done, mount.path)}")
        return Run(value=done.seconds, seconds=done.seconds, requests=requests, cpu=cpu,
                   rss_mb=rss, extra={"files": files})

    def s4(self) -> None:
        self.shape(self.profile)
        xnatpy = Measure("xnatpy scan.download_dir", "s")
        curlzip = Measure("curl zip + unzip", "s")
        for _ in range(self.scope.runs):
            self.guarded(xnatpy, self.xnatpy_scan_download)
            self.guarded(curlzip, self.curl_scan_zip)
        self.baselines["S4 xnatpy"] = xnatpy
        self.baselines["S4 curl zip"] = curlzip
        for rng in self.ranges:
            self.shape(self.profile, rng == "on")
            measure = Measure(f"xnatfs cp -r, Range {rng}", "s")
            for _ in range(self.scope.runs):
                self.guarded(measure, lambda rng=rng: self.xnatfs_cp_scan(rng))
            title = f"cold cp -r of scan {DICOM_SCAN} ({scan_files(measure, xnatpy)} files)"
            self.add(Figure("S4", rng, title, measure, shaping=self.profile, baseline=xnatpy,
                            baseline_label="xnatpy download_dir", higher_is_better=False,
                            target=("<=", 1.0), target_note="aim <= 0.5"))
            self.add(Figure("S4", rng, title, measure, shaping=self.profile, baseline=curlzip,
                            baseline_label="curl zip + unzip", higher_is_better=False,
                            target=("<=", 1.0), variant="vs curl zip"))
        self.shape("loopback")

    # S5 ----------------------------------------------------------------
    def xnatpy_walk(self, sizes: str) -> Run:
        session = self.xnatpy_session()
        try:
            session.clearcache()
            self.drop_caches()
            mark = self.mark()
            watch = CpuWatch({"server": self.server.process.pid, "xnatpy": os.getpid()})
            started = time.perf_counter()
            entries = 0
            total = 0
            project = session.projects[PROJECT]
            for label in self.scope.s5_subjects:
                subject = project.subjects[label]
                for experiment in subject.experiments.values():
                    resources = [r for scan in experiment.scans.values()
                                 for r in scan.resources.values()]
                    resources += list(experiment.resources.values())
                    for resource in resources:
                        for f in resource.files.values():
                            size = f.size if sizes == "head" else f.file_size
                            total += int(size)
                            entries += 1
            seconds = time.perf_counter() - started
            cpu = watch.stop()
        finally:
            session.disconnect()
        return Run(value=seconds, seconds=seconds, requests=self.requests(mark, 0.1), cpu=cpu,
                   extra={"files": entries, "bytes": total})

    def xnatfs_find(self, rng: str) -> Run:
        mount = self.new_mount(f"s5-{rng}")
        root = mount.path / PROJECT
        if self.scope.s5_subjects != SUBJECTS:
            root = root / self.scope.s5_subjects[0]
        with mount:
            self.drop_caches()
            mark = self.mark()
            watch = CpuWatch({"server": self.server.process.pid, "mount": mount.pid})
            done = run_cmd(["find", str(root), "-ls"], timeout=600, stdout=subprocess.PIPE,
                           on_timeout=mount.kill)
            cpu = watch.stop()
            cpu["find"] = round(done.cpu_percent, 1)
            rss = mount.rss()
        requests = self.requests(mark)
        shutil.rmtree(mount.cache_dir, ignore_errors=True)
        if "VmHWM" in rss:
            self.rss_peaks[rng].append(("S5", rss["VmHWM"]))
        if done.returncode != 0:
            raise BenchError(f"find failed: {failure(done, mount.path)}")
        lines = done.stdout.decode(errors="replace").splitlines()
        files = sum(1 for line in lines if line.split()[2:3] and line.split()[2].startswith("-"))
        # Each object's XML document costs one request when stat'ed (README, Metadata).
        documents = sum(1 for line in lines if line.endswith(DOCUMENT_NAMES))
        return Run(value=done.seconds, seconds=done.seconds, requests=requests, cpu=cpu,
                   rss_mb=rss, extra={"entries": len(lines), "files": files,
                                      "documents": documents})

    def s5(self) -> None:
        self.shape(self.profile)
        walk = Measure("xnatpy walk, sizes from listings", "s")
        for _ in range(self.scope.runs):
            self.guarded(walk, lambda: self.xnatpy_walk("listing"))
        head = Measure("xnatpy walk, f.size (HEAD per file)", "s")
        for _ in range(self.scope.head_walk_runs):
            self.guarded(head, lambda: self.xnatpy_walk("head"))
        self.baselines["S5 xnatpy"] = walk
        if head.runs:
            self.baselines["S5 xnatpy HEAD"] = head
        subjects = len(self.scope.s5_subjects)
        sessions = subjects * SESSIONS_PER_SUBJECT
        # README ("How it reads"): at most 4 for the project (subjects, experiments,
        # its own resources and their files), 2 per subject (its resources and
        # their files), 2 per session (item, files); and (README, "Metadata",
        # "Tables and demographics") one per XML document stat'ed, 3 for the
        # project's tables when the walk includes them.
        tables = 3 if subjects == len(SUBJECTS) else 0
        listings = 4 + 2 * subjects + 2 * sessions + tables
        scope = PROJECT if subjects == len(SUBJECTS) else f"{PROJECT}/{self.scope.s5_subjects[0]}"
        for rng in self.ranges:
            self.shape(self.profile, rng == "on")
            measure = Measure(f"xnatfs find -ls, Range {rng}", "s")
            for _ in range(self.scope.runs):
                self.guarded(measure, lambda rng=rng: self.xnatfs_find(rng))
            counts = [sum(n for k, n in r.requests.items() if k.split()[0] not in SESSION_ROUTES)
                      for r in measure.runs if r.value is not None]
            documents = max((int(r.extra.get("documents", 0)) for r in measure.runs
                             if r.value is not None), default=0)
            budget = listings + documents
            check = {"max": budget, "seen": max(counts) if counts else None,
                     "ok": (max(counts) <= budget) if counts else None,
                     "budget": f"4 project + 2 x {subjects} subjects + 2 x {sessions} sessions"
                               f" + {tables} tables + {documents} XML documents"}
            title = f"find -ls over {scope}"
            self.add(Figure("S5", rng, title, measure, shaping=self.profile, baseline=walk,
                            baseline_label="xnatpy walk (listing sizes)",
                            higher_is_better=False, target=("<=", 0.5),
                            checks={"requests": check}))
            if head.runs:
                self.add(Figure("S5", rng, title, measure, shaping=self.profile, baseline=head,
                                baseline_label="xnatpy walk (f.size: HEAD/file)",
                                higher_is_better=False, target=("<=", 0.5),
                                variant="vs xnatpy HEAD"))
        self.shape("loopback")

    # S7 ----------------------------------------------------------------
    def clear_prearchive(self) -> None:
        """Delete what the uploads put into the BENCH prearchive (ours only)."""
        import base64
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
        listing = urllib.request.Request(
            self.url(f"/data/prearchive/projects/{PROJECT}?format=json"), headers=headers)
        with opener.open(listing, timeout=60) as response:
            rows = json.loads(response.read())["ResultSet"]["Result"]
        for row in rows:
            if not str(row.get("name", "")).startswith(UPLOAD_PATIENT):
                continue
            query = urllib.parse.urlencode({"src": row["url"]})
            request = urllib.request.Request(
                self.url(f"/data/services/prearchive/delete?{query}"), method="POST", data=b"",
                headers=headers)
            with contextlib.suppress(OSError), opener.open(request, timeout=120):
                pass

    def curl_upload(self) -> Run:
        self.clear_prearchive()
        self.drop_caches()
        mark = self.mark()
        watch = CpuWatch({"server": self.server.process.pid})
        query = urllib.parse.urlencode({"import-handler": "DICOM-zip", "project": PROJECT})
        done = run_cmd(self.curl("-f", "-X", "POST", "-T", str(self.upload_zip), "-H",
                                 "Content-Type: application/zip",
                                 self.url(f"/data/services/import?{query}")),
                       timeout=3600, stdout=subprocess.PIPE)
        cpu = watch.stop()
        cpu["curl"] = round(done.cpu_percent, 1)
        requests = self.requests(mark, 0.1)
        self.clear_prearchive()
        if done.returncode != 0:
            raise BenchError(f"curl POST failed ({done.returncode}): {done.stderr[-200:]}")
        return Run(value=done.seconds, seconds=done.seconds, requests=requests, cpu=cpu,
                   extra={"bytes": self.upload_zip.stat().st_size,
                          "answer": done.stdout.decode(errors="replace").strip()[:200]})

    def xnatfs_upload(self, rng: str) -> Run:
        mount = self.new_mount(f"s7-{rng}")
        self.clear_prearchive()
        with mount:
            target = mount.path / self.paths["uploads"]
            self.drop_caches()
            mark = self.mark()
            watch = CpuWatch({"server": self.server.process.pid, "mount": mount.pid})
            # close() waits for the import, which moves no byte: allow it longer.
            done = run_cmd(["cp", str(self.upload_zip), str(target) + "/"], timeout=3600,
                           on_timeout=mount.kill, stall=3 * STALL_SECONDS)
            cpu = watch.stop()
            cpu["cp"] = round(done.cpu_percent, 1)
            rss = mount.rss()
            if done.returncode == 0:  # best effort: do not leave it for the next run
                with contextlib.suppress(OSError):
                    (target / self.upload_zip.name).unlink()
        requests = self.requests(mark)
        shutil.rmtree(mount.cache_dir, ignore_errors=True)
        self.clear_prearchive()
        if "VmHWM" in rss:
            self.rss_peaks[rng].append(("S7", rss["VmHWM"]))
        if done.returncode != 0:
            raise BenchError(f"cp failed: {failure(done, mount.path)}")
        if not any(k.startswith("services.import") for k in requests):
            raise BenchError("cp succeeded but nothing reached /data/services/import")
        return Run(value=done.seconds, seconds=done.seconds, requests=requests, cpu=cpu,
                   rss_mb=rss)

    def s7(self) -> None:
        self.shape(self.profile)
        size = self.upload_zip.stat().st_size
        curl = Measure("curl POST import", "s")
        for _ in range(self.scope.runs):
            self.guarded(curl, self.curl_upload)
        self.baselines["S7 curl"] = curl
        for rng in self.ranges:
            self.shape(self.profile, rng == "on")
            measure = Measure(f"xnatfs cp to uploads/, Range {rng}", "s")
            for _ in range(self.scope.runs):
                self.guarded(measure, lambda rng=rng: self.xnatfs_upload(rng))
            self.add(Figure("S7", rng, f"cp of a {fmt_bytes(size)} DICOM zip into uploads/",
                            measure, shaping=self.profile, baseline=curl,
                            baseline_label="curl POST /data/services/import",
                            higher_is_better=False, target=("<=", 1.2)))
        self.shape("loopback")

    # S8 ----------------------------------------------------------------
    def s8(self) -> None:
        for rng in self.ranges:
            peaks = self.rss_peaks[rng]
            measure = Measure(f"peak VmHWM, Range {rng}", "MB")
            if peaks:
                worst = max(peaks, key=lambda p: p[1])
                measure.runs.append(Run(value=worst[1], extra={"scenario": worst[0]}))
                by_scenario: dict[str, float] = {}
                for name, value in peaks:
                    by_scenario[name] = max(by_scenario.get(name, 0.0), value)
                note = ", ".join(f"{k} {v:.0f}" for k, v in sorted(by_scenario.items()))
                measure.notes.append(f"peak by scenario (MB): {note}")
                missing = {"S1", "S4", "S5", "S7"} - set(by_scenario)
                if missing:
                    measure.notes.append(f"not measured: {', '.join(sorted(missing))}")
            else:
                measure.runs.append(Run(error="no mount RSS sampled (S1/S4/S5/S7 not run)"))
            self.add(Figure("S8", rng, "peak RSS of the mount process in S1, S4, S5, S7",
                            measure, target=("<=", 250.0)))

    # S9 ----------------------------------------------------------------
    @property
    def s9_session_uri(self) -> str:
        return f"/data/projects/{PROJECT}/subjects/{SUBJECT}/experiments/{SESSION}"

    def http(self, method: str, path: str, timeout: float = 120) -> bytes:
        """One request as admin straight to the server (not through a mount)."""
        import base64
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(self.url(path), method=method,
                                         headers={"Authorization": f"Basic {token}"})
        with opener.open(request, timeout=timeout) as response:
            return response.read()

    def s9_label(self, tag: str) -> str:
        """A resource label no run has used: ``S9_<tag>_<time>_<n>``."""
        self.s9_count += 1
        return f"{S9_LABEL_PREFIX}{tag}_{self.s9_stamp}_{self.s9_count:02d}"

    def s9_delete(self, label: str) -> None:
        """Delete a resource S9 made, with its files (the data set is reused)."""
        try:
            self.http("DELETE", f"{self.s9_session_uri}/resources/{label}")
        except OSError as exc:
            self.say(f"  could not delete the S9 resource {label}: {exc}")

    def s9_clear_leftovers(self) -> None:
        rows = json.loads(self.http("GET", f"{self.s9_session_uri}/resources?format=json"))
        for row in rows["ResultSet"]["Result"]:
            label = str(row.get("label") or "")
            if label.startswith(S9_LABEL_PREFIX):
                self.say(f"  deleting {label}, left behind by an earlier S9 run")
                self.s9_delete(label)

    def s9_verify(self, label: str) -> dict[str, int]:
        """XNAT's listing of the resource must show every file of the tree with its
        size and MD5, and nothing else; otherwise the run fails (no time)."""
        manifest = self.s9_manifest
        path = f"{self.s9_session_uri}/resources/{label}/files?format=json"
        try:
            rows = json.loads(self.http("GET", path))["ResultSet"]["Result"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self.s9_failed(label, f"no listing of the resource ({exc})") from None
        listed: dict[str, tuple[int, str]] = {}
        for row in rows:
            uri = urllib.parse.unquote(str(row.get("URI") or ""))
            _, found, rel = uri.partition(f"/resources/{label}/files/")
            if not found:
                _, _, rel = uri.partition("/files/")
            listed[rel] = (int(row.get("Size") or -1), str(row.get("digest") or "").lower())
        missing = sorted(set(manifest) - set(listed))
        extra = sorted(set(listed) - set(manifest))
        sizes = sorted(p for p in manifest if p in listed and listed[p][0] != manifest[p][0])
        digests = sorted(p for p in manifest if p in listed and p not in sizes
                         and listed[p][1] != manifest[p][1])
        problems = [f"{what}: {len(found)} (first {found[0]})" for what, found in (
            ("missing", missing), ("not written by the run", extra),
            ("wrong size", sizes), ("wrong or no MD5", digests)) if found]
        if problems:
            raise self.s9_failed(label, f"{len(listed)} of {len(manifest)} files listed; "
                                        + "; ".join(problems))
        return {"files": len(listed), "bytes": sum(size for size, _ in listed.values())}

    def s9_failed(self, label: str, message: str) -> BenchError:
        self.say(f"  S9 VERIFICATION FAILED for resource {label}: {message}")
        return BenchError(f"verification failed: {message}")

    def xnatpy_upload_tree(self, method: str) -> Run:
        """xnatpy: a new resource of the session, then ``upload_dir`` of the tree."""
        label = self.s9_label("xnatpy" if method == "tgz_file" else "xnatpy_per_file")
        session = self.xnatpy_session()
        try:
            self.drop_caches()
            mark = self.mark()
            watch = CpuWatch({"server": self.server.process.pid, "xnatpy": os.getpid()})
            started = time.perf_counter()
            experiment = session.projects[PROJECT].subjects[SUBJECT].experiments[SESSION]
            resource = experiment.create_resource(label)
            # update_func: no progress bar on the bench's stderr.
            resource.upload_dir(str(self.s9_tree), method=method,
                                update_func=lambda *_: None)
            seconds = time.perf_counter() - started
            cpu = watch.stop()
            requests = self.requests(mark, 0.1)
            checked = self.s9_verify(label)
        finally:
            with contextlib.suppress(Exception):
                session.disconnect()
            self.s9_delete(label)
        return Run(value=seconds, seconds=seconds, requests=requests, cpu=cpu,
                   extra={**checked, "requests_total": archive_requests(requests),
                          "label": label, "verified": True})

    def xnatfs_write_tree(self, mode: str) -> Run:
        """mkdir of a new resource on a fresh mount, ``cp -r`` of the tree into its
        ``files/``, ``fsync`` of the resource folder: timed until that returns."""
        options = ("--write-behind",) if mode == "write-behind" else ()
        label = self.s9_label("wb" if options else "default")
        mount = self.new_mount(f"s9-{mode}", options=options)
        where = f" (mount log {mount.log_file})"
        try:
            with mount:
                folder = mount.path / PROJECT / SUBJECT / SESSION / "resources" / label
                self.drop_caches()
                mark = self.mark()
                watch = CpuWatch({"server": self.server.process.pid, "mount": mount.pid})
                t0 = time.perf_counter()
                try:
                    in_thread(lambda: os.mkdir(folder), 120, mount.kill)
                except BenchError as exc:
                    raise BenchError(f"mkdir of the resource failed: {exc}{where}") from None
                t1 = time.perf_counter()
                done = run_cmd(["cp", "-r", str(self.s9_tree / S9_SUBJECT),
                                f"{folder / 'files'}/"],
                               timeout=1800, on_timeout=mount.kill, stall=3 * STALL_SECONDS)
                t2 = time.perf_counter()
                if done.returncode != 0:
                    raise BenchError(f"cp failed: {failure(done, mount.path)}{where}")
                try:
                    in_thread(lambda: fsync_folder(folder), 900, mount.kill)
                except BenchError as exc:
                    raise BenchError(f"fsync of the resource folder failed: {exc}{where}") \
                        from None
                t3 = time.perf_counter()
                cpu = watch.stop()
                cpu["cp"] = round(done.cpu_percent, 1)
                rss = mount.rss()
                unmounting = time.perf_counter()
            unmount_s = time.perf_counter() - unmounting
            requests = self.requests(mark)
            checked = self.s9_verify(label)
        finally:
            self.s9_delete(label)
            shutil.rmtree(mount.cache_dir, ignore_errors=True)
        return Run(value=t3 - t0, seconds=t3 - t0, requests=requests, cpu=cpu, rss_mb=rss,
                   extra={**checked, "requests_total": archive_requests(requests),
                          "mkdir_s": round(t1 - t0, 3), "cp_s": round(t2 - t1, 3),
                          "fsync_s": round(t3 - t2, 3), "unmount_s": round(unmount_s, 3),
                          "label": label, "verified": True})

    def s9(self) -> None:
        self.s9_stamp, self.s9_count = time.strftime("%H%M%S"), 0
        self.s9_tree = self.workdir / "s9-tree"
        shutil.rmtree(self.s9_tree, ignore_errors=True)
        self.s9_manifest = write_s9_tree(self.s9_tree, self.scope.s9_files)
        files = len(self.s9_manifest)
        nbytes = sum(size for size, _ in self.s9_manifest.values())
        self.say(f"  tree: {files} files, {nbytes / MB:.1f} MB")
        self.s9_clear_leftovers()
        xnatpy = Measure("xnatpy create_resource + upload_dir (tgz_file)", "s")
        per_file = Measure("xnatpy create_resource + upload_dir(method='per_file')", "s")
        behind = Measure("xnatfs mkdir + cp -r + fsync, --write-behind", "s")
        default = Measure("xnatfs mkdir + cp -r + fsync, default mount", "s")
        self.shape(self.profile)
        try:
            for _ in range(self.scope.runs):  # alternated: the machine's noise hits all
                self.guarded(xnatpy, lambda: self.xnatpy_upload_tree("tgz_file"))
                if self.scope.s9_per_file:
                    self.guarded(per_file, lambda: self.xnatpy_upload_tree("per_file"))
                self.guarded(behind, lambda: self.xnatfs_write_tree("write-behind"))
                self.guarded(default, lambda: self.xnatfs_write_tree("default"))
        finally:
            shutil.rmtree(self.s9_tree, ignore_errors=True)
            self.shape("loopback")
        self.baselines["S9 xnatpy"] = xnatpy
        if per_file.runs:
            self.baselines["S9 xnatpy per_file"] = per_file
        title = (f"mkdir + cp -r of a {files}-file FreeSurfer-like tree ({nbytes / MB:.0f} MB) "
                 f"into a new resource, to the folder's fsync")
        for measure, mode, target, baseline in (
                (behind, "--write-behind", ("<=", 1.0), xnatpy),
                (default, "default mount", None, per_file)):
            fig = self.add(Figure("S9", None, title, measure, shaping=self.profile,
                                  baseline=xnatpy, baseline_label="xnatpy upload_dir (tar.gz)",
                                  higher_is_better=False, target=target,
                                  target_note="aim <= 0.5" if target else "", mode=mode))
            fig.notes.extend(s9_notes(measure, files)
                             + s9_notes(baseline, files, by_route=True))
            if per_file.runs:
                self.add(Figure("S9", None, title, measure, shaping=self.profile,
                                baseline=per_file, baseline_label="xnatpy upload_dir per_file",
                                higher_is_better=False, mode=mode,
                                variant="vs xnatpy per_file"))

    # S10 ---------------------------------------------------------------
    def s10_out(self, tag: str) -> Path:
        out = self.workdir / "out" / tag
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return out

    def xnatpy_s10(self) -> Run:
        """Four xnatpy processes at once, each logged in before the clock starts (as
        S4's baseline), then each downloads the scan (``download_dir``: one zip) and
        the NIfTI (``FileData.download``, MD5 checked): what four jobs do without a mount."""
        outs = [self.s10_out(f"s10-xnatpy-{i}") for i in range(S10_MOUNTS)]
        env = dict(self.mount_env, PYTHONPATH=str(REPO))
        args = [self.server.url, PROJECT, SUBJECT, SESSION, DICOM_SCAN, NIFTI_SCAN,
                NIFTI_RESOURCE, NIFTI_NAME, "1" if self.scope.s10_nifti else "0"]
        errs = [open(self.workdir / "logs" / f"s10-xnatpy-{i}.err", "wb")  # noqa: SIM115
                for i in range(S10_MOUNTS)]
        procs = [subprocess.Popen([sys.executable, "-c", S10_XNATPY_WORKER, str(out), *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                  env=env) for out, err in zip(outs, errs)]

        def kill_all() -> None:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

        try:
            for proc in procs:
                assert proc.stdout is not None
                line = in_thread(proc.stdout.readline, 120, kill_all)
                if line.strip() != b"ready":
                    raise BenchError(f"an xnatpy worker did not log in: {line[:200]!r}")
            self.drop_caches()
            mark = self.mark()
            watch = CpuWatch({"server": self.server.process.pid})
            children = os.times()
            started = time.monotonic()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                proc.stdin.close()
            ends = []
            for proc in procs:
                assert proc.stdout is not None
                out_text = in_thread(proc.stdout.read, 1800, kill_all)
                proc.wait(60)
                if proc.returncode != 0:
                    raise BenchError(f"an xnatpy worker failed ({proc.returncode}); see "
                                     f"logs/s10-xnatpy-*.err")
                ends.append(json.loads(out_text.decode().strip().splitlines()[-1]))
            wall = max(e["end"] for e in ends) - started
            cpu = watch.stop()
            after = os.times()
            cpu["xnatpy x4"] = round(100.0 * (after.children_user + after.children_system
                                              - children.children_user
                                              - children.children_system) / wall, 1)
        finally:
            kill_all()
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            for err in errs:
                err.close()
        entries = self.server_entries(mark)
        got = [folder_bytes(out) for out in outs]
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
        if len(set(got)) != 1:
            raise BenchError(f"the xnatpy workers got different data: {got}")
        return Run(value=wall, seconds=wall, requests=count_routes(entries), cpu=cpu,
                   extra={"files": got[0][0] - (1 if self.scope.s10_nifti else 0),
                          "bytes_read": sum(n for _, n in got),
                          "bytes_served": served_bytes(entries),
                          "scan_s": [round(e["scan_s"], 3) for e in ends]})

    def server_entries(self, mark: int) -> list[dict[str, Any]]:
        """The request log since ``mark`` (the mounts are gone by then, so every
        download, finished or cut short, has its line), without the bench's knobs."""
        return [e for e in self.server.requests_since(mark) if e.get("route") != "control"]

    def xnatfs_s10(self, rng: str) -> Run:
        """Four fresh mounts, each with its own local cache and all with one new
        shared tier; four workers started together, each ``cp -r`` of the scan then
        ``dd`` of the NIfTI through its own mount."""
        self.s10_count += 1
        shared = self.workdir / "caches" / f"s10-shared-{rng}-{self.s10_count}"
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir(parents=True)
        mounts = [self.new_mount(f"s10-{rng}-{i}", options=("--shared-cache", str(shared)))
                  for i in range(S10_MOUNTS)]
        outs = [self.s10_out(f"s10-cp-{i}") for i in range(S10_MOUNTS)]
        nbytes = self.nifti_size if self.scope.s10_nifti else 0

        def kill_all() -> None:
            for mount in mounts:
                mount.kill()

        def worker(mount: XnatfsMount, out: Path) -> tuple[float, float, float]:
            cp = run_cmd(["cp", "-r", str(mount.path / self.paths["dicom_scan"]), str(out)],
                         timeout=1200, on_timeout=kill_all, stall=STALL_SECONDS)
            if cp.returncode != 0:
                raise BenchError(f"cp failed: {failure(cp, mount.path)}")
            dd_s = 0.0
            if nbytes:
                dd = run_cmd(["dd", f"if={self.nifti_path(mount)}", "of=/dev/null", "bs=1M"],
                             timeout=1800, on_timeout=kill_all, stall=STALL_SECONDS)
                if dd.returncode != 0:
                    raise BenchError(f"dd failed: {failure(dd, mount.path)}")
                dd_s = dd.seconds
            return cp.seconds, dd_s, time.monotonic()

        from concurrent.futures import ThreadPoolExecutor

        try:
            with contextlib.ExitStack() as stack:
                for mount in mounts:
                    stack.enter_context(mount)
                self.drop_caches()
                mark = self.mark()
                watch = CpuWatch({"server": self.server.process.pid,
                                  **{f"mount{i}": m.pid for i, m in enumerate(mounts)}})
                started = time.monotonic()
                with ThreadPoolExecutor(S10_MOUNTS) as pool:
                    futures = [pool.submit(worker, m, o) for m, o in zip(mounts, outs)]
                    times = [f.result() for f in futures if f.exception() is None]
                    errors = [str(f.exception()) for f in futures if f.exception() is not None]
                if errors:  # the one that stalled first, not the others it took down
                    errors.sort(key=lambda e: not ("stalled" in e or "timed out" in e))
                    raise BenchError(errors[0] + (f" (and {len(errors) - 1} more workers)"
                                                  if len(errors) > 1 else ""))
                wall = max(end for _, _, end in times) - started
                cpu = watch.stop()
                status = [mount_status(m.path) for m in mounts]
                rss = [m.rss().get("VmHWM", 0.0) for m in mounts]
            entries = self.server_entries(mark)
            got = [folder_bytes(out) for out in outs]
            tier = folder_bytes(shared)
        finally:
            for path in (shared, *outs, *(m.cache_dir for m in mounts)):
                shutil.rmtree(path, ignore_errors=True)
        if len(set(got)) != 1:
            raise BenchError(f"the mounts gave different data: {got} (files, bytes)")
        read = sum(n for _, n in got) + S10_MOUNTS * nbytes
        served = served_bytes(entries)
        # The CPU use goes with the wall time (wall_run), not twice into the notes.
        return Run(value=served / read, seconds=wall, requests=count_routes(entries),
                   rss_mb={"VmHWM max": max(rss)},
                   extra={"wall_s": round(wall, 3), "files": got[0][0], "cpu": cpu,
                          "bytes_read": read, "bytes_served": served,
                          "cp_s": [round(c, 3) for c, _, _ in times],
                          "dd_s": [round(d, 3) for _, d, _ in times],
                          "tier_files": tier[0], "tier_bytes": tier[1],
                          "downloads": download_overlap(entries),
                          "mount_bytes": status})

    def s10(self) -> None:
        self.s10_count = 0
        what = f"scan {DICOM_SCAN}" + (" + the NIfTI" if self.scope.s10_nifti else "")
        xnatpy = Measure(f"{S10_MOUNTS} xnatpy processes at once ({what})", "s")
        # --quick: Range off only (real XNAT 1.8), to keep the smoke test short.
        ranges = self.ranges[:1] if self.args.quick else self.ranges
        ratios = {rng: Measure(f"xnatfs, Range {rng}", "") for rng in ranges}
        walls = {rng: Measure(f"xnatfs, Range {rng}", "s") for rng in ranges}
        try:
            for _ in range(self.scope.runs):  # alternated: the machine's noise hits all
                self.shape(self.profile)
                self.guarded(xnatpy, self.xnatpy_s10)
                for rng in ranges:
                    self.shape(self.profile, rng == "on")
                    self.guarded(ratios[rng], lambda rng=rng: self.xnatfs_s10(rng))
                    walls[rng].runs.append(wall_run(ratios[rng].runs[-1]))
        finally:
            self.shape("loopback")
        self.baselines["S10 xnatpy x4"] = xnatpy
        files = scan_files(xnatpy, *ratios.values())  # xnatpy's: the DICOM files only
        title = (f"{S10_MOUNTS} mounts, one shared tier, read scan {DICOM_SCAN} ({files} "
                 f"files)" + (" and the NIfTI" if self.scope.s10_nifti else "") + " at once")
        for rng in ranges:
            fig = self.add(Figure("S10", rng, f"{title}: bytes XNAT served / bytes read",
                                  ratios[rng], shaping=self.profile, higher_is_better=False,
                                  target=("<=", 0.3)))
            fig.notes.extend(s10_notes(ratios[rng], xnatpy))
            self.add(Figure("S10", rng, f"{title}: wall time", walls[rng],
                            shaping=self.profile, baseline=xnatpy,
                            baseline_label=f"{S10_MOUNTS} xnatpy at once",
                            higher_is_better=False))

    # ------------------------------------------------------------- output
    def results(self) -> dict[str, Any]:
        scenarios: dict[str, list[dict[str, Any]]] = {}
        for fig in self.figures:
            scenarios.setdefault(fig.id, []).append(fig.as_json())
        return {
            "meta": self.meta,
            "scenarios": scenarios,
            "baselines": {name: {"value": m.shown(), "unit": m.unit,
                                 "runs": [r.as_json() for r in m.runs]}
                          for name, m in self.baselines.items()},
        }

    def close(self) -> None:
        mounts = self.workdir / "mnt"
        if mounts.exists():
            for mp in mounts.iterdir():
                if is_mounted(mp):
                    pids = pids_with_cmdline("xnatfs.cli", "mount", str(mp), "--foreground")
                    unmount(mp, max(pids) if pids else None)
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.clear_prearchive()
            self.server.stop()
        if not self.args.keep:
            shutil.rmtree(self.workdir / "caches", ignore_errors=True)
            shutil.rmtree(self.workdir / "out", ignore_errors=True)
            if self.args.workdir is None and not self.failed():
                # A clean run's temporary directory holds nothing worth keeping.
                shutil.rmtree(self.workdir, ignore_errors=True)
            elif self.args.workdir is None:
                self.say(f"something failed: mount and server logs kept in {self.workdir}/logs")

    def failed(self) -> bool:
        measures = [m for f in self.figures for m in (f.measure, f.baseline) if m is not None]
        measures += self.baselines.values()
        return "error" in self.meta or any(r.error for m in measures for r in m.runs)


def failure(done: Done, mountpoint: Path) -> str:
    """The first line a failed command printed, with the mount point written MOUNT."""
    line = done.stderr.splitlines()[0] if done.stderr else f"exit status {done.returncode}"
    return line.replace(str(mountpoint), "MOUNT")


def archive_requests(requests: dict[str, int]) -> int:
    """Requests of a run but for logins and logouts (``SESSION_ROUTES``)."""
    return sum(n for k, n in requests.items() if k.split()[0] not in SESSION_ROUTES)


def count_routes(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Requests by route (``files.download``...), method and Range, as the table lists them."""
    counts: Counter[str] = Counter()
    for entry in entries:
        route = entry.get("route", "other")
        if route == "control":
            continue
        method = entry.get("method", "GET")
        key = route if method == "GET" else f"{route} {method}"
        if entry.get("range"):
            key += " (range)"
        counts[key] += 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------- S10
S10_MOUNTS = 4

# One of S10's xnatpy baseline processes: log in, say "ready", wait for "go" on
# stdin, download, print when it finished (CLOCK_MONOTONIC, shared by all processes).
S10_XNATPY_WORKER = """
import json, os, sys, time
import xnat
out, url, project, subject, session, dicom_scan, nifti_scan, resource, name, nifti = \\
    sys.argv[1:11]
conn = xnat.connect(url, user=os.environ["XNAT_USER"], password=os.environ["XNAT_PASS"],
                    extension_types=False, loglevel="ERROR")
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
experiment = conn.projects[project].subjects[subject].experiments[session]
experiment.scans[dicom_scan].download_dir(out, verbose=False)
scan_s = time.monotonic() - started
if nifti == "1":
    experiment.scans[nifti_scan].resources[resource].files[name].download(
        os.path.join(out, name), verbose=False)
print(json.dumps({"scan_s": scan_s, "end": time.monotonic()}), flush=True)
conn.disconnect()
"""


def folder_bytes(root: Path) -> tuple[int, int]:
    """Files and bytes below ``root``."""
    sizes = [p.stat().st_size for p in root.rglob("*") if p.is_file()]
    return len(sizes), sum(sizes)


def mount_status(mountpoint: Path) -> dict[str, Any]:
    """The ``bytes`` section of a mount's status file (from XNAT, from each cache tier)."""
    try:
        return dict(json.loads((mountpoint / ".xnatfs-status.json").read_text())["bytes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {"error": str(exc)}


def served_bytes(entries: list[dict[str, Any]]) -> int:
    """Body bytes the server sent (``sent``: also of downloads cut short)."""
    return sum(int(e.get("sent", e.get("bytes", 0)) or 0) for e in entries)


def download_overlap(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Which file bytes the server sent more than once (several mounts fetching the
    same file or block): per file, the union of the byte spans sent against their sum."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for e in entries:
        if e.get("route") != "files.download" or e.get("method") != "GET":
            continue
        sent = int(e.get("sent", e.get("bytes", 0)) or 0)
        start = int(str(e["range"]).split("-")[0]) if e.get("range") else 0
        spans.setdefault(e["path"], []).append((start, start + sent))
    distinct = again = 0
    twice: list[tuple[str, int, int]] = []
    for path, parts in spans.items():
        union, end = 0, 0
        for a, b in sorted(parts):
            if b > end:
                union += b - max(a, end)
                end = b
        total = sum(b - a for a, b in parts)
        distinct += union
        if total > union:
            again += total - union
            twice.append((path.rsplit("/", 1)[-1], len(parts), total - union))
    twice.sort(key=lambda t: -t[2])
    return {"files": len(spans), "requests": sum(len(p) for p in spans.values()),
            "distinct_bytes": distinct, "bytes_sent_again": again,
            "files_sent_again": len(twice),
            "most_sent_again": [{"file": n, "requests": r, "bytes_again": b}
                                for n, r, b in twice[:5]]}


def wall_run(run: Run) -> Run:
    """S10's wall time, from the same run as its byte ratio."""
    if run.value is None:
        return Run(error=run.error)
    return Run(value=run.extra["wall_s"], seconds=run.extra["wall_s"], cpu=run.extra["cpu"])


def s10_notes(measure: Measure, xnatpy: Measure) -> list[str]:
    """What XNAT sent, what was sent more than once, per file, and what each tier gave."""
    runs = [r for r in measure.runs if r.value is not None]
    notes = []
    for r in runs:
        x, dl = r.extra, r.extra["downloads"]
        notes.append(
            f"{measure.name}: XNAT sent {x['bytes_served'] / MB:.1f} MB for "
            f"{x['bytes_read'] / MB:.1f} MB read; {dl['requests']} file downloads for "
            f"{dl['files']} files ({dl['requests'] / max(dl['files'], 1):.2f} per file); "
            f"sent more than once: {dl['bytes_sent_again'] / MB:.1f} MB of "
            f"{dl['files_sent_again']} files; tier {x['tier_files']} files, "
            f"{x['tier_bytes'] / MB:.1f} MB; wall {x['wall_s']:.1f} s (cp -r "
            f"{max(x['cp_s']):.1f} s, dd {max(x['dd_s']):.1f} s, slowest of "
            f"{S10_MOUNTS})")
        tiers: Counter[str] = Counter()
        for status in x["mount_bytes"]:
            tiers.update({k: v for k, v in status.items() if isinstance(v, int)})
        if tiers:
            notes.append(f"{measure.name}: the mounts' status files (sum of "
                         f"{S10_MOUNTS}): " + ", ".join(f"{k} {v / MB:.1f} MB"
                                                        for k, v in sorted(tiers.items())))
    for r in xnatpy.runs:
        if r.value is not None:
            notes.append(f"{xnatpy.name}: XNAT sent {r.extra['bytes_served'] / MB:.1f} MB "
                         f"in {sum(r.requests.values())} requests; {r.value:.1f} s")
    return notes


def s9_notes(measure: Measure, files: int, *, by_route: bool = False) -> list[str]:
    """How many requests a write of the S9 tree took (by route: for a baseline,
    whose requests the table does not list), and where its time went."""
    runs = [r for r in measure.runs if r.value is not None]
    if not runs:
        return []
    total = statistics.median(r.extra.get("requests_total", 0) for r in runs)
    routes = sorted({k for r in runs for k in r.requests})
    parts = ", ".join(f"{k} {statistics.median(r.requests.get(k, 0) for r in runs):g}"
                      for k in routes)
    notes = [f"{measure.name}: {files} files in {total:g} requests (median; logins and "
             f"logouts not counted)" + (f": {parts}" if by_route else "")]
    if len(runs) > 1:  # a write may settle into a fast or a slow pattern: show each run
        notes.append(f"{measure.name}: runs " + ", ".join(
            f"{r.value:.3g} s in {r.extra.get('requests_total', '?')} requests" for r in runs))
    if "cp_s" in runs[0].extra:
        def step(key: str) -> str:
            return f"{key[:-2]} {statistics.median(r.extra[key] for r in runs):.3g} s"
        notes.append(f"{measure.name}: {step('mkdir_s')} + {step('cp_s')} + "
                     f"{step('fsync_s')}; then {step('unmount_s')} (not timed)")
    return notes


def scan_files(*measures: Measure) -> int | str:
    for m in measures:
        for r in m.runs:
            if r.extra.get("files"):
                return int(r.extra["files"])
    return "?"


def first_bytes(path: Path, size: int) -> int:
    """open + one read of ``size`` bytes; how many came back."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return len(os.read(fd, size))
    finally:
        os.close(fd)


def in_thread(fn: Callable[[], Any], timeout: float, on_timeout: Callable[[], None]) -> Any:
    """Call ``fn`` in a thread; past ``timeout`` kill the mount (which frees the thread)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        on_timeout()
        thread.join(30)
        raise BenchError(f"no answer within {timeout:.0f} s")
    if "error" in box:
        raise BenchError(f"{type(box['error']).__name__}: {box['error']}")
    return box.get("value")


def curl_head_bytes(cmd: list[str], nbytes: int, timeout: float) -> Done:
    """``curl URL | head -c N``: time until N bytes arrived, then curl is cut off."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        curl = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        head = subprocess.Popen(["head", "-c", str(nbytes)], stdin=curl.stdout,
                                stdout=subprocess.DEVNULL)
        assert curl.stdout is not None
        curl.stdout.close()
        try:
            head.wait(timeout)
        except subprocess.TimeoutExpired:
            head.kill()
            curl.kill()
            head.wait()
            curl.wait()
            raise BenchError(f"curl timed out after {timeout:.0f} s") from None
        seconds = time.perf_counter() - started
        _, status, usage = os.wait4(curl.pid, 0)
        curl.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    # curl ends with 23 (write error) when head has had enough: that is success here.
    ok = head.returncode == 0 and curl.returncode in (0, 23, -13)
    return Done(seconds, 0 if ok else (curl.returncode or head.returncode or 1), b"", stderr,
                100.0 * (usage.ru_utime + usage.ru_stime) / max(seconds, 1e-9))


# --------------------------------------------------------------- bottlenecks
def bottleneck_notes(fig: Figure) -> list[str]:
    """Name what limited a figure: the server, curl, xnatfs, the shaping, the CPUs."""
    notes: list[str] = []
    for measure in (fig.measure, fig.baseline):
        if measure is None or fig.variant:
            continue
        label = measure.name
        runs = [r for r in measure.runs if r.value is not None]
        if not runs:
            continue
        cpu: dict[str, float] = {}
        for key in {k for r in runs for k in r.cpu}:
            cpu[key] = statistics.median(r.cpu[key] for r in runs if key in r.cpu)
        if not cpu:
            continue
        parts = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(cpu.items()))
        note = f"{label} CPU (% of a core): {parts}"
        bound = [k for k, v in cpu.items() if v >= CPU_BOUND]
        if bound:
            names = {"server": "the bundled server", "mount": "the xnatfs process",
                     "xnatpy": "xnatpy (in the bench process)"}
            note += " -> CPU-bound: " + ", ".join(names.get(k, k) for k in bound)
        if sum(cpu.values()) >= 170:
            note += " (both cores busy)"
        notes.append(note)
        if fig.shaping == "wan" and measure.unit == "MB/s":
            mb_s = measure.value or 0
            cap = SHAPING["wan"]["bandwidth_mb_s"]
            if mb_s >= 0.85 * cap and mb_s <= 1.1 * cap:
                notes.append(f"{label}: at the wan cap of {cap:g} MB/s per connection")
    return notes


# ---------------------------------------------------------------- data sets
def locked(path: Path) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def manager() -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    return manager()


def ensure_dataset(data: Path, say: Callable[[str], None]) -> None:
    """Build the bench data set into ``data`` once (built aside, then renamed)."""
    with locked(data.parent / f".{data.name}.lock"):
        if (data / "xnat.sqlite").exists():
            return
        partial = data.parent / f"{data.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        say(f"building the bench data set in {data} (once: ~20 s, 1.5 GB)")
        started = time.monotonic()
        server = TestServer(partial, dataset="bench")
        server.stderr_path = data.parent / f"{data.name}-build.log"
        server.start(timeout=1800)
        server.stop()
        partial.rename(data)
        say(f"built in {time.monotonic() - started:.0f} s")


UPLOAD_PATIENT = "BENCHUP"


def ensure_upload_zip(directory: Path, series: int, slices: int,
                      say: Callable[[str], None]) -> Path:
    """A DICOM zip (stored, not deflated) of ``series`` x ``slices`` 512x512 CT slices."""
    path = directory / f"bench-upload-{series}x{slices}.zip"
    with locked(directory / f".{path.name}.lock"):
        if path.exists():
            return path
        from xnatfs.testing.imaging import DicomSeries, make_uid

        say(f"writing the S7 upload zip {path}")
        partial = path.with_suffix(".partial")
        study = make_uid("xnatfs-bench", "upload", series, slices)
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for number in range(1, series + 1):
                dicom = DicomSeries(patient_name="Bench^Upload",
                                    patient_id=f"{UPLOAD_PATIENT}{series}x{slices}",
                                    study_uid=study, series_number=number,
                                    series_description=f"bench upload {number}", modality="CT",
                                    slices=slices, rows=512, cols=512, seed=number)
                for name, data in dicom.files():
                    archive.writestr(f"{dicom.patient_id}/{number}/{name}", data)
        partial.rename(path)
    return path


S9_SUBJECT = "bert"     # the tree's top folder, as FreeSurfer names a subject's
S9_SEED = 9
S9_LABEL_PREFIX = "S9_"  # every resource S9 makes (deleted after each run)
KB = 1000
HEMIS = ("lh", "rh")


def s9_tree_spec() -> list[tuple[str, int, int, str]]:
    """The files of a FreeSurfer-like subject folder: (path, smallest, largest
    size, kind). ``binary``: incompressible (.mgz and .annot are gzip'ed or
    packed); ``floats``: half the bytes random (surfaces, curvatures; gzip
    halves them); ``text``: numbers in lines (labels, stats, logs)."""
    spec: list[tuple[str, int, int, str]] = []

    def add(path: str, lo: int, hi: int, kind: str) -> None:
        spec.append((path, lo, hi, kind))

    for name in ("orig/001", "rawavg", "orig", "nu", "T1", "brainmask", "norm", "brain"):
        add(f"mri/{name}.mgz", 1 * MB, 5 * MB, "binary")
    for name in ("aseg.presurf", "aseg.auto", "aseg.auto_noCCseg", "aseg", "aparc+aseg",
                 "aparc.a2009s+aseg", "aparc.DKTatlas+aseg", "wmparc", "wm", "wm.seg",
                 "wm.asegedit", "filled", "ribbon", "lh.ribbon", "rh.ribbon",
                 "brain.finalsurfs", "ctrl_pts", "segment"):
        add(f"mri/{name}.mgz", 60 * KB, 400 * KB, "binary")
    for name in ("talairach.xfm", "talairach.auto.xfm", "talairach.lta", "talairach_avi.log",
                 "talairach.xfm.lta", "talsrcimg_to_711-2C_as_mni_average_305_t4_vox2vox.txt"):
        add(f"mri/transforms/{name}", 1 * KB, 8 * KB, "text")
    add("mri/transforms/talairach.m3z", 1 * MB, 3 * MB, "binary")
    for h in HEMIS:
        for name in ("orig", "orig.nofix", "smoothwm", "smoothwm.nofix", "white",
                     "white.preaparc", "pial", "inflated", "inflated.nofix", "qsphere.nofix",
                     "sphere", "sphere.reg"):
            add(f"surf/{h}.{name}", 150 * KB, 600 * KB, "floats")
        for name in ("curv", "curv.pial", "area", "area.pial", "area.mid", "thickness", "sulc",
                     "volume", "jacobian_white", "inflated.H", "inflated.K", "white.H",
                     "white.K", "defect_labels", "defect_borders", "defect_chull",
                     "w-g.pct.mgh", "avg_curv"):
            add(f"surf/{h}.{name}", 30 * KB, 150 * KB, "floats")
        for name in ("aparc", "aparc.a2009s", "aparc.DKTatlas", "BA_exvivo", "BA_exvivo.thresh"):
            add(f"label/{h}.{name}.annot", 50 * KB, 250 * KB, "binary")
        for area in ("BA1", "BA2", "BA3a", "BA3b", "BA4a", "BA4p", "BA6", "BA44", "BA45", "V1",
                     "V2", "MT", "entorhinal", "perirhinal"):
            for thresh in ("", ".thresh"):
                add(f"label/{h}.{area}_exvivo{thresh}.label", 4 * KB, 120 * KB, "text")
        add(f"label/{h}.cortex.label", 200 * KB, 400 * KB, "text")
        for measure in ("thickness", "area", "volume", "curv"):
            for fwhm in (0, 10, 20):
                add(f"surf/{h}.{measure}.fwhm{fwhm}.fsaverage.mgh", 30 * KB, 150 * KB,
                    "floats")
        for name in ("aparc", "aparc.a2009s", "aparc.DKTatlas", "aparc.pial", "BA_exvivo",
                     "BA_exvivo.thresh", "w-g.pct", "curv"):
            add(f"stats/{h}.{name}.stats", 2 * KB, 40 * KB, "text")
    for name in ("aparc.annot", "aparc.annot.a2009s", "aparc.annot.DKTatlas40", "BA_exvivo",
                 "BA_exvivo.thresh"):
        add(f"label/{name}.ctab", 1 * KB, 8 * KB, "text")
    for name in ("aseg.stats", "wmparc.stats", "brainvol.stats"):
        add(f"stats/{name}", 2 * KB, 30 * KB, "text")
    for name in ("recon-all.log", "recon-all-status.log", "recon-all.done", "recon-all.env",
                 "recon-all.cmd", "build-stamp.txt", "recon-config.yaml", "ponscc.cut.log",
                 "lastcall.build-stamp.txt", "patchdirs.txt", "unknown-args.txt"):
        add(f"scripts/{name}", 100, 300 * KB, "text")
    for step in ("motioncor", "talairach", "nu", "normalization", "skull_strip", "em_register",
                 "ca_normalize", "ca_register", "ca_label", "normalization2", "mask", "fill",
                 "segstats", "wmparc", "relabelhypos", "aparc2aseg", "apas2aseg", "ca_label2",
                 "conform", "inorm1", "inorm2", "skull.lta", "wmsegment", "fill2", "asegmerge",
                 "cc_seg", "ca_register_inv", "rusage.mri_ca_register",
                 "rusage.mri_em_register", "rusage.mri_ca_label", "balabels", "lhrh.qcache"):
        # FreeSurfer's touch files are empty; not these: the mount keeps an empty
        # file local and never sends it (XNAT refuses an empty PUT), so
        # verification would fail on every run.
        add(f"touch/{step}.touch", 40, 200, "text")
    for h in HEMIS:
        for step in ("tessellate", "smooth1", "inflate1", "qsphere", "fix", "white_surface",
                     "smooth2", "inflate2", "curvHK", "curvstats", "sphere", "surfreg",
                     "jacobian_white", "avgcurv", "cortparc", "pial_surface", "surfvolume",
                     "cortical_ribbon", "parcstats", "cortparc2", "parcstats2", "cortparc3",
                     "parcstats3", "pctsurfcon"):
            add(f"touch/{h}.{step}.touch", 40, 200, "text")
    return spec


def s9_file_bytes(rng: random.Random, size: int, kind: str) -> bytes:
    if kind == "binary":
        return rng.randbytes(size)
    if kind == "floats":
        out = bytearray(size)
        out[0::2] = rng.randbytes((size + 1) // 2)
        return bytes(out)
    lines, total, i = [], 0, 0
    while total < size:
        line = (f"{i} {rng.uniform(-90, 90):.3f} {rng.uniform(-120, 90):.3f} "
                f"{rng.uniform(-70, 90):.3f} {rng.random():.6f}\n")
        lines.append(line)
        total += len(line)
        i += 1
    return "".join(lines).encode()[:size]


def write_s9_tree(root: Path, files: int | None) -> dict[str, tuple[int, str]]:
    """Write the S9 tree below ``root/bert`` (all of it, or ``files`` of its files
    with the same share of 1-5 MB ones), the same bytes every time; its manifest:
    path in the resource (``bert/...``) -> (size, MD5)."""
    import hashlib
    import math

    rng = random.Random(S9_SEED)
    plan = [(path, int(math.exp(rng.uniform(math.log(lo), math.log(hi)))), kind)
            for path, lo, hi, kind in s9_tree_spec()]
    if files is not None and files < len(plan):
        picker = random.Random(S9_SEED + 1)
        big = [p for p in plan if p[1] >= MB]
        small = [p for p in plan if p[1] < MB]
        nbig = max(1, round(files * len(big) / len(plan)))
        plan = sorted(picker.sample(big, nbig) + picker.sample(small, files - nbig))
    manifest = {}
    for path, size, kind in plan:
        data = s9_file_bytes(random.Random(f"{S9_SEED}:{path}"), size, kind)
        target = root / S9_SUBJECT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        manifest[f"{S9_SUBJECT}/{path}"] = (size, hashlib.md5(data).hexdigest())
    (root / S9_SUBJECT / "tmp").mkdir(exist_ok=True)  # an empty folder, as FreeSurfer leaves
    return manifest


def fsync_folder(path: Path) -> None:
    """``fsync`` of a folder (``sync FOLDER`` does the same)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ output
def fmt_bytes(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / MiB:.0f} MiB"


def fmt_value(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 10 \
        else f"{value:.1f}"
    return f"{text} {unit}".strip()


def table(results: dict[str, Any]) -> str:
    rows = [("id", "range", "figure", "xnatfs", "baseline", "ratio", "target", "ok")]
    notes: list[str] = []
    for scenario in sorted(results["scenarios"]):
        for fig in results["scenarios"][scenario]:
            value = fig["value"]
            unit = fig["unit"]
            shown = fmt_value(value, unit) if not isinstance(value, str) else "n/a"
            base = fig.get("baseline")
            base_text = (f"{fmt_value(base['value'], base['unit'])} {base['name']}"
                         if base else "-")
            ratio = fig.get("ratio")
            ok = {True: "ok", False: "MISS", None: "-"}[fig.get("meets")]
            title = fig["title"] + (f" [{fig['variant']}]" if fig.get("variant") else "")
            if fig.get("shaping"):
                title += f" ({fig['shaping']})"
            if fig.get("mode"):
                title = f"{fig['mode']}: {title}"
            rows.append((fig["id"], fig["range"] or "-", title, shown, base_text,
                         f"{ratio:.2f}" if ratio is not None else "-",
                         fig.get("target") or "-", ok))
            tag = f"{fig['id']} {fig['range'] or ''}".strip()
            if fig.get("mode"):
                tag += f" {fig['mode']}"
            if fig.get("variant"):
                tag += f" [{fig['variant']}]"
            if isinstance(value, str):
                notes.append(f"{tag}: {value}")
            for name, check in (fig.get("checks") or {}).items():
                notes.append(f"{tag}: {name} {check.get('seen')} (max {check.get('max')})"
                             + (f" — budget {check['budget']}" if check.get("budget") else ""))
            if not fig.get("variant"):
                reqs = merged_requests(fig["runs"])
                if reqs:
                    notes.append(f"{tag}: requests per run (median) {reqs}")
                notes.extend(f"{tag}: {n}" for n in fig.get("notes", []))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n\nnotes:\n" + "\n".join(f"  {n}" for n in notes)


def merged_requests(runs: list[dict[str, Any]]) -> str:
    ok = [r.get("requests", {}) for r in runs if "value" in r]
    keys = sorted({k for r in ok for k in r})
    if not keys:
        return ""
    return ", ".join(f"{k} {statistics.median(r.get(k, 0) for r in ok):g}" for k in keys)


def verification_failures(results: dict[str, Any]) -> list[str]:
    """Runs whose writes XNAT did not hold as written (S9), xnatfs's or a baseline's."""
    found = []
    for figures in results["scenarios"].values():
        for fig in figures:
            if fig.get("variant"):
                continue  # the same runs as the figure without one
            name = f"{fig['id']} {fig.get('mode') or fig.get('range') or ''}".strip()
            found += [f"{name}: {r['error']}" for r in fig["runs"]
                      if str(r.get("error", "")).startswith("verification failed")]
    for name, baseline in results["baselines"].items():
        found += [f"{name}: {r['error']}" for r in baseline["runs"]
                  if str(r.get("error", "")).startswith("verification failed")]
    return found


def header(bench: Bench) -> str:
    meta = bench.meta
    tuning_x = meta.get("kernel_tuning_xnatfs", {})
    tuning_z = meta.get("kernel_tuning_zerofs", {})
    lines = [
        f"xnatfs benchmark: profile {meta['profile']} ({'quick' if meta['quick'] else 'full'}, "
        f"{meta['runs']} run(s) per figure, median shown)",
        f"  shaping: S1 loopback, S2 wan, S3/S4/S5/S7/S9/S10 {meta['profile']}; "
        f"wan = {SHAPING['wan']['latency_ms']:g} ms/request + "
        f"{SHAPING['wan']['bandwidth_mb_s']:g} MB/s per connection (server knobs)",
        f"  page cache dropped before cold runs: {meta.get('drop_caches')}",
        f"  kernel tuning xnatfs {tuning_x or '?'}; zerofs {tuning_z or '?'}",
        f"  machine: {meta.get('cpus')} CPUs, {meta.get('kernel')}; data {meta.get('data')}",
        f"  xnatfs at {meta.get('git', {}).get('commit')}"
        + (f" with uncommitted changes to {', '.join(meta['git']['uncommitted_xnatfs_changes'])}"
           if meta.get("git", {}).get("uncommitted_xnatfs_changes") else ""),
    ]
    if any(str(v).startswith("n/a") for v in tuning_x.values()):
        lines.append("  note: /sys/fs/fuse/connections (fusectl) is not mounted, so "
                     "max_background stays at the kernel default of 12 for every mount")
    if tuning_x and tuning_z and tuning_x.get("read_ahead_kb") != tuning_z.get("read_ahead_kb"):
        lines.append(f"  WARNING: xnatfs's tuning did not stick: read_ahead_kb "
                     f"{tuning_x.get('read_ahead_kb')} on the xnatfs mount, "
                     f"{tuning_z.get('read_ahead_kb')} on zerofs (a value written before the "
                     f"FUSE INIT reply is reset by it; see S0 [as xnatfs tunes])")
    if meta.get("git_at_end"):
        lines.append(f"  WARNING: xnatfs changed while it was measured (at the end: "
                     f"{meta['git_at_end']}); earlier and later figures may differ in code")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark xnatfs against curl and xnatpy (issue 5).",
        epilog="Results: a table on stdout, all runs as JSON (--json).")
    parser.add_argument("--quick", action="store_true",
                        help="1 run each, smaller reads (smoke test, < 2 minutes)")
    parser.add_argument("--profile", choices=tuple(SHAPING), default="wan",
                        help="shaping of S3, S4, S5, S7, S9, S10 (default wan; S1 is always "
                             "loopback and S2 always wan)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, quick 1)")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help=f"bench data set directory (default {DEFAULT_DATA})")
    parser.add_argument("--json", help="result file (default bench-results/<time>-<profile>.json)")
    parser.add_argument("--range", default="off,on",
                        help="server Range modes to run: off,on (default both)")
    parser.add_argument("--scenarios",
                        help="only these, e.g. S0,S1,S6, S9 or S10 (S8 needs S1/S4/S5/S7)")
    parser.add_argument("--workdir", help="mount points, caches, logs (default a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when any figure is n/a (a scenario failed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not fuse_available():
        print("bench: FUSE is not available (/dev/fuse, fusermount3)", file=sys.stderr)
        return 2
    for tool in ("curl", "unzip", "dd"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    bench = Bench(args)
    started = dt.datetime.now()
    bench.meta.update({
        "issue": 5, "profile": args.profile, "quick": args.quick, "runs": bench.scope.runs,
        "started": started.isoformat(timespec="seconds"), "ranges": bench.ranges,
        "shaping": SHAPING, "cpus": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "data": str(bench.data_dir),
        "workdir": str(bench.workdir), "git": git_state(),
    })
    git_at_start = bench.meta["git"]
    json_path = Path(args.json) if args.json else \
        REPO / "bench-results" / f"{started:%Y%m%d-%H%M%S}-{args.profile}.json"
    interrupted = False
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        bench.prepare()
        bench.meta["server"] = bench.server.url
        bench.run_all()
    except KeyboardInterrupt:
        interrupted = True
        bench.say("interrupted; cleaning up")
    except Exception as exc:  # noqa: BLE001 - the set-up failed: say why, still write JSON
        bench.log_lines.append(traceback.format_exc())
        bench.say(f"benchmark set-up failed: {exc}")
        bench.meta["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        bench.close()
        signal.signal(signal.SIGTERM, previous)
    bench.meta["drop_caches"] = "yes" if bench.drop_status == "" else (
        bench.drop_status or "not attempted")
    bench.meta["seconds"] = round((dt.datetime.now() - started).total_seconds(), 1)
    if git_state() != git_at_start:  # someone changed xnatfs while it was measured
        bench.meta["git_at_end"] = git_state()
    results = bench.results()
    if bench.log_lines:
        results["tracebacks"] = bench.log_lines
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(header(bench))
    print()
    print(table(results))
    print(f"\nresults: {json_path} ({bench.meta['seconds']:.0f} s)")
    unverified = verification_failures(results)
    for failed in unverified:
        print(f"VERIFICATION FAILED: {failed}")
    if interrupted:
        return 130
    if "error" in bench.meta or unverified:
        return 1
    if args.strict and any(isinstance(f["value"], str)
                           for figs in results["scenarios"].values() for f in figs):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
