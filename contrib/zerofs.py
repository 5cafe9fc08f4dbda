#!/usr/bin/env python3
"""A do-nothing pyfuse3 filesystem: one read-only file of zeros.

    python contrib/zerofs.py MOUNTPOINT [--size 1G] [--name zeros.bin]

It is the ceiling for any pyfuse3 mount on this machine (scenario S0 of
``contrib/bench.py``): reads cost one memoryview slice of a preallocated zero
buffer, so whatever throughput ``dd bs=1M`` gets from it is what the kernel,
libfuse and pyfuse3 allow, with no backend at all.

The mount gets the kernel tuning xnatfs means to apply (``tune_kernel`` in
``xnatfs/mount.py``): bdi ``read_ahead_kb`` and the FUSE connection's
``max_background``/``congestion_threshold`` are raised through sysfs (root
only; otherwise the kernel defaults stay). The device is found in
/proc/self/mountinfo: ``os.stat`` of the mount point from this process before
``pyfuse3.main()`` runs would wait on itself forever.

The settings are written once the kernel has processed the reply to FUSE
INIT, and read back: that reply sets the bdi readahead to
min(current, negotiated ``max_readahead``), i.e. back to 128 KiB, so a value
written between ``pyfuse3.init()`` and the INIT reply does not stick.
``--tune-before-init`` writes them at that earlier moment instead (what
``xnatfs.mount.run_mount`` does), to show the difference.

Once mounted (and tuned) it prints one JSON line, ``{"ready": MOUNTPOINT,
"tuning": {...}}`` with the values read back from sysfs, on stdout, then
serves until SIGINT/SIGTERM or ``fusermount3 -u``.

Caveats: single file, no xattrs, no writes; the inode's attributes are
cached for an hour, as nothing ever changes.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

from xnatfs.mount import mount_device

# The same values as xnatfs.mount.tune_kernel; bench.py reads both mounts'
# sysfs settings back and warns when they differ.
READ_AHEAD_KB = 16384
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48

FILE_INODE = pyfuse3.ROOT_INODE + 1
MAX_REQUEST = 1 << 20  # the largest FUSE READ the kernel sends (256 pages)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G or 256M)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(match.group(1)) * scale[match.group(2).upper()])


class ZeroFS(pyfuse3.Operations):
    """Root directory with one file, ``name``, of ``size`` zero bytes."""

    def __init__(self, name: str, size: int, init_seen: _InitSeen | None = None) -> None:
        super().__init__()
        self.name = name.encode()
        self.size = size
        self.zeros = memoryview(bytes(MAX_REQUEST))
        self.init_seen = init_seen

    def init(self) -> None:
        if self.init_seen is not None and self.init_seen.event is not None:
            self.init_seen.event.set()

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
            attrs.st_size = 0
        else:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
            attrs.st_size = self.size
        attrs.st_uid = os.getuid()
        attrs.st_gid = os.getgid()
        attrs.st_blksize = 1 << 20
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.attr_timeout = attrs.entry_timeout = 3600
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attributes(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes:
        n = max(0, min(size, self.size - off))
        if n > len(self.zeros):  # never with the kernel's 1 MiB cap, but stay correct
            self.zeros = memoryview(bytes(n))
        return self.zeros[:n]


def tuning_paths(mountpoint: Path) -> dict[str, str] | None:
    device = mount_device(mountpoint)
    if device is None:
        return None
    major, minor = device
    return {
        f"/sys/class/bdi/{major}:{minor}/read_ahead_kb": str(READ_AHEAD_KB),
        f"/sys/fs/fuse/connections/{minor}/max_background": str(MAX_BACKGROUND),
        f"/sys/fs/fuse/connections/{minor}/congestion_threshold": str(CONGESTION_THRESHOLD),
    }


def tune_kernel(mountpoint: Path) -> None:
    """Raise readahead and background limits as xnatfs does (root only)."""
    for path, value in (tuning_paths(mountpoint) or {}).items():
        try:
            Path(path).write_text(value)
        except OSError:
            pass


def read_tuning(mountpoint: Path) -> dict[str, str]:
    """The values in force, by sysfs file name (``n/a (...)`` when unreadable)."""
    paths = tuning_paths(mountpoint)
    if paths is None:
        return {"error": "mount not found in /proc/self/mountinfo"}
    out = {}
    for path in paths:
        try:
            out[Path(path).name] = Path(path).read_text().strip()
        except OSError as exc:
            out[Path(path).name] = f"n/a ({exc.strerror})"
    return out


class _InitSeen:
    """Set by ``ZeroFS.init``, which pyfuse3 calls while handling FUSE INIT."""

    def __init__(self) -> None:
        self.event: trio.Event | None = None


async def serve(mountpoint: Path, tune: str, init_seen: _InitSeen) -> None:
    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        async def announce() -> None:
            assert init_seen.event is not None
            # INIT is answered right after the init() callback returns, by the
            # same worker; a short sleep puts us after the kernel applied it.
            await init_seen.event.wait()
            await trio.sleep(0.05)
            if tune == "after-init":
                tune_kernel(mountpoint)
            print(json.dumps({"ready": str(mountpoint), "tuning": read_tuning(mountpoint)}),
                  flush=True)

        init_seen.event = trio.Event()
        nursery.start_soon(stop_on_signal)
        nursery.start_soon(announce)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"),
                        help="file size (default 1G)")
    parser.add_argument("--name", default="zeros.bin", help="file name (default zeros.bin)")
    tuning = parser.add_mutually_exclusive_group()
    tuning.add_argument("--no-tune", dest="tune", action="store_const", const="none",
                        default="after-init",
                        help="keep the kernel's default readahead and background limits")
    tuning.add_argument("--tune-before-init", dest="tune", action="store_const",
                        const="before-init",
                        help="write the settings before the INIT reply, as xnatfs does")
    args = parser.parse_args(argv)
    mountpoint = args.mountpoint.resolve()
    options = set(pyfuse3.default_options) | {"fsname=zerofs", "subtype=zerofs", "ro",
                                                "noatime"}
    init_seen = _InitSeen()
    operations = ZeroFS(args.name, args.size, init_seen)
    pyfuse3.init(operations, str(mountpoint), options)
    try:
        if args.tune == "before-init":
            tune_kernel(mountpoint)
        trio.run(serve, mountpoint, args.tune, init_seen)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
