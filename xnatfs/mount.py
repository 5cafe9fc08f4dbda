"""Wire client, tree, block cache, the areas and Operations together, and run the FUSE loop.

Everything lives in one trio nursery: background downloads are its tasks,
SIGINT/SIGTERM end the loop, and leaving the nursery unmounts, closes the
XNAT session and the disk cache.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from . import areas
from .blockcache import DEFAULT_BLOCK_SIZE, BlockCache, prepare_shared
from .client import ClientSettings, XnatClient
from .credentials import Credentials, SessionCache
from .deadlines import Deadlines
from .fs import Operations
from .imports import UploadManager
from .results import ResultWrites
from .tree import Tree

log = logging.getLogger(__name__)


# The rate ceiling's bucket holds this many seconds' worth of requests: a walk
# of a folder (``find -ls``: some 60 listings in a second) goes at full speed.
BURST_SECONDS = 2.0


@dataclass(frozen=True)
class MountConfig:
    """Everything a mount needs; built by the CLI from options and profiles."""

    credentials: Credentials
    mountpoint: Path
    cache_dir: Path
    cache_size: int = 10 * 1024**3
    metadata_ttl: float = 60.0
    read_only: bool = False
    verify_tls: bool = True
    ca_bundle: str | None = None      # a PEM file to trust instead of the usual CAs
    range_mode: str = "auto"          # auto: the first download tells; on/off: trust the user
    direct_archive: bool = False      # uploads go straight to the archive
    write_behind: bool = False        # close() of loose DICOM and resource files does not wait
    allow_overwrite: bool = False     # files XNAT has may be replaced
    allow_delete: bool = False        # files and resources XNAT has may be deleted
    prearchive_ttl: float = 5.0       # seconds the prearchive listing is trusted
    request_timeout: float = 30.0     # an unanswered request fails after this
    op_timeout: float | None = None   # any file operation fails after this; None: 4 requests' worth
    import_timeout: float = 900.0     # wait for XNAT's answer to a whole upload (it imports first)
    debug_fuse: bool = False
    allow_other: bool = False         # every local user may read (not upload)
    allow_root: bool = False          # root may read too (a Docker daemon, say)
    snapshot: Path | None = None      # serve this snapshot's tree, read-only (xnatfs.snapshot)
    snapshot_check_first: int = 64 * 1024**2  # its files up to this size: checked before served
    max_requests: int = ClientSettings.max_requests          # requests at once (0: no ceiling)
    max_request_rate: float = ClientSettings.max_request_rate  # per second (0: no ceiling)
    session_file: Path | None = None  # one JSESSION shared by the nodes of a cluster
    shared_cache: Path | None = None  # the shared block tier of a cluster (--shared-cache)
    shared_cache_max: int | None = None  # trim it to this many bytes (any mount may)

    @property
    def operation_timeout(self) -> float:
        return self.op_timeout or 4 * self.request_timeout

    def client_settings(self) -> ClientSettings:
        """The client gives an operation up (and, the server unanswering, counts
        it as down, failing fast from then on) before the file operation waiting
        for it runs out of time, or it would never give up at all."""
        return ClientSettings(
            read_timeout=self.request_timeout,
            deadline=min(max(2 * self.request_timeout, 60.0), 0.9 * self.operation_timeout),
            verify_tls=self.verify_tls, ca_bundle=self.ca_bundle,
            upload_answer_timeout=self.import_timeout,
            max_requests=self.max_requests, max_request_rate=self.max_request_rate,
            request_burst=max(1, math.ceil(BURST_SECONDS * self.max_request_rate)))

    def __repr__(self) -> str:  # credentials have their own password-free repr
        return (f"MountConfig(url={self.credentials.url!r}, mountpoint={self.mountpoint!r}, "
                f"cache_dir={self.cache_dir!r})")


def fuse_options(config: MountConfig) -> set[str]:
    """Private to the mounting user unless shared on purpose; read-only when asked.

    ``default_permissions`` (pyfuse3's default, kept) has the kernel check the
    modes the mount reports, all owned by the mounting user: users it is shared
    with may read, but only its owner (and root) may upload, archive or delete.
    """
    options = set(pyfuse3.default_options)
    site = config.credentials.url.split("://", 1)[-1].replace(",", "%2C")
    # auto_unmount: if this process dies (a crash, kill -9, the OOM killer),
    # fusermount3 unmounts, instead of leaving a mount point that answers
    # "Transport endpoint is not connected" until someone runs fusermount3 -u.
    options |= {f"fsname=xnatfs:{site}", "subtype=xnatfs", "noatime", "auto_unmount"}
    if config.allow_other:
        options.add("allow_other")
    elif config.allow_root:
        options.add("allow_root")  # libfuse: allow_other for the kernel, then refuses others
    if config.read_only or config.snapshot is not None:
        options.add("ro")
    if config.debug_fuse:
        options.add("debug")
    return options


FUSE_CONF = Path("/etc/fuse.conf")


def sharing_refusal(allow_other: bool, allow_root: bool, *, euid: int | None = None,
                    fuse_conf: Path = FUSE_CONF, named: str | None = None) -> str | None:
    """Why ``fusermount3`` would refuse to share this mount, or None.

    ``named``: how the user asked for sharing, when not by the command-line option.

    Only root may mount with ``allow_other``/``allow_root`` unless the
    administrator put ``user_allow_other`` in ``/etc/fuse.conf``. fusermount3
    says so on the stderr of a background process nobody reads, so the CLI
    checks first and tells the user.
    """
    if not (allow_other or allow_root):
        return None
    if (os.geteuid() if euid is None else euid) == 0:
        return None
    try:
        lines = fuse_conf.read_text().splitlines()
    except OSError:
        lines = []
    if any(line.strip() == "user_allow_other" for line in lines):
        return None
    option = named or ("--allow-other" if allow_other else "--allow-root")
    return (f"{option} needs a line 'user_allow_other' in {fuse_conf} (ask the "
            f"administrator), or a mount by root")


def mount_device(mountpoint: Path) -> tuple[int, int] | None:
    """The (major, minor) of our mount, from /proc/self/mountinfo.

    ``os.stat`` on the mount point would ask our own FUSE loop, which is not
    serving yet when this runs: the process would wait on itself forever.
    """
    fields = _mountinfo_line(mountpoint)
    if fields is None:
        return None
    major, _, minor = fields[2].partition(":")
    return int(major), int(minor)


def mounted_type(mountpoint: Path) -> str | None:
    """The type of the filesystem mounted on ``mountpoint`` (``fuse.xnatfs``...), if any."""
    fields = _mountinfo_line(mountpoint)
    if fields is None or "-" not in fields[6:]:
        return None
    rest = fields[fields.index("-", 6) + 1:]
    return rest[0] if rest else None


def _mountinfo_line(mountpoint: Path) -> list[str] | None:
    """The fields of the newest mount on ``mountpoint`` in /proc/self/mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    # mountinfo writes a space in a path as \040 (and tab, newline, backslash likewise).
    escaped = str(mountpoint).translate({ord(c): f"\\{ord(c):03o}" for c in " \t\n\\"})
    for line in reversed(lines):  # the newest mount on a path wins
        fields = line.split()
        if len(fields) > 4 and fields[4] == escaped:
            return fields
    return None


class MountRefused(OSError):
    """FUSE would not mount (a busy or forbidden mount point, a refused option)."""


FUSECTL = Path("/sys/fs/fuse/connections")


def _ensure_fusectl() -> None:
    """``max_background`` lives in fusectl, which minimal systems do not mount (root only)."""
    if os.geteuid() != 0 or not FUSECTL.is_dir() or any(FUSECTL.iterdir()):
        return
    try:
        result = subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)],
                                capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:  # no mount(8), or it hung
        log.debug("could not mount fusectl: %s", exc)
        return
    if result.returncode != 0:
        log.debug("could not mount fusectl: %s", result.stderr.strip())


def tune_kernel(mountpoint: Path) -> None:
    """Raise readahead and background-request limits through sysfs (root only).

    pyfuse3 offers no hook for these at INIT, and the defaults (128 KiB
    readahead, 12 background requests) cap a remote mount's throughput.
    """
    device = mount_device(mountpoint)
    if device is None:
        log.debug("mount of %s not found in mountinfo; kernel defaults kept", mountpoint)
        return
    major, minor = device
    _ensure_fusectl()
    settings = {
        Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb"): "16384",
        Path(f"/sys/fs/fuse/connections/{minor}/max_background"): "64",
        Path(f"/sys/fs/fuse/connections/{minor}/congestion_threshold"): "48",
    }
    for path, value in settings.items():
        try:
            path.write_text(value)
        except OSError as exc:
            log.debug("could not set %s: %s", path, exc)


async def run_mount(config: MountConfig, on_ready: Callable[[], None] | None = None) -> None:
    """Mount, call ``on_ready`` once the mount answers, serve until unmounted or signalled."""
    settings = config.client_settings()
    started = time.time()  # for the status file: before the login it counts
    config.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config.cache_dir.chmod(0o700)  # cached data is as private as the mount
    if config.shared_cache is not None:
        await prepare_shared(config.shared_cache, DEFAULT_BLOCK_SIZE)
    client = XnatClient(config.credentials, settings=settings, session_cache=SessionCache(),
                        session_file=config.session_file)
    await client.connect()
    snapshot = None
    if config.snapshot is not None:
        from .snapshot import load

        snapshot = await trio.to_thread.run_sync(load, config.snapshot)
    refused: MountRefused | None = None
    try:
        async with trio.open_nursery() as nursery:
            tree = Tree(client, metadata_ttl=config.metadata_ttl)
            blocks = BlockCache(client, config.cache_dir / "blocks", size_limit=config.cache_size,
                                nursery=nursery, range_mode=config.range_mode,
                                shared_dir=config.shared_cache,
                                shared_max=config.shared_cache_max)
            deadlines = Deadlines(op_timeout=config.operation_timeout,
                                  upload_timeout=max(3600.0, 2 * config.import_timeout),
                                  quiet_timeout=config.request_timeout)
            operations = Operations(tree, deadlines, nursery=nursery)
            uploads = results = None
            if snapshot is not None:  # listings from the file, nothing written
                operations.areas = areas.install_snapshot(
                    tree, operations, snapshot, blocks=blocks, deadlines=deadlines,
                    nursery=nursery, cache_dir=config.cache_dir,
                    check_first=config.snapshot_check_first,
                    failures=operations.failures, started=started)
            else:
                uploads = UploadManager(client, config.cache_dir / "uploads", nursery,
                                        site=config.credentials.url,  # normalised
                                        direct_archive=config.direct_archive,
                                        write_behind=config.write_behind)
                results = None if config.read_only else ResultWrites(
                    client, config.cache_dir / "uploads", nursery,
                    site=config.credentials.url, write_behind=config.write_behind)
                operations.areas = areas.install(
                    tree, operations, blocks=blocks, uploads=uploads, deadlines=deadlines,
                    nursery=nursery, prearchive_ttl=config.prearchive_ttl, results=results,
                    allow_overwrite=config.allow_overwrite, allow_delete=config.allow_delete,
                    failures=operations.failures, started=started)
            try:
                pyfuse3.init(operations, str(config.mountpoint), fuse_options(config))
            except RuntimeError as exc:
                # pyfuse3's only word for it (libfuse printed why on stderr). Raised
                # here, it would leave the nursery wrapped in an ExceptionGroup.
                refused = MountRefused(errno.EPERM, f"FUSE refused the mount ({exc})")
                blocks.close()
                nursery.cancel_scope.cancel()
            else:
                try:
                    nursery.start_soon(_tune_after_init, operations, config.mountpoint)
                    nursery.start_soon(_terminate_on_signal, operations)
                    nursery.start_soon(client.watch_server)
                    if on_ready is not None:
                        on_ready()
                    log.info("mounted %s on %s", config.credentials.url, config.mountpoint)
                    await pyfuse3.main()
                    if uploads is not None:
                        await uploads.finish_background_uploads()
                    if results is not None:
                        await results.finish_background_uploads()
                    # Digest checks mark blocks trusted by the next mount; the
                    # shared tier gets what was downloaded (bounded).
                    await blocks.settle()
                finally:
                    pyfuse3.close(unmount=True)
                    blocks.close()
                    nursery.cancel_scope.cancel()
        if refused is not None:
            raise refused
    finally:
        await client.aclose()
        if refused is None:
            log.info("unmounted %s", config.mountpoint)


async def _tune_after_init(operations: Operations, mountpoint: Path) -> None:
    """Tune once the INIT reply is out: processing it resets ``read_ahead_kb``."""
    await operations.initialized.wait()
    await trio.to_thread.run_sync(tune_kernel, mountpoint)


async def _terminate_on_signal(operations: Operations) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            operations.cancel_requests()
            return
