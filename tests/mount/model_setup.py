"""The set-up of tests/mount/test_model.py: the mount's options and the bounds
they give, the places in the demo data set each kind of rule works on, and
the server and mount every example shares (:func:`opened_world`)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from xnatfs.testing.harness import TestServer, free_port

from .conftest import Mount, make_env, mount_xnatfs, unmount_and_wait
from .model_world import Judge, Xnat

TIMEOUT = 1.0                     # --timeout: an unanswered request fails after this
TTL = 1.0                         # --metadata-ttl
IMPORT_TIMEOUT = 3.0              # --import-timeout
SLACK = 1.5                       # scheduling on a loaded 2-core machine, FUSE queueing
OP_BOUND = 4 * TIMEOUT + SLACK    # README, --timeout: any operation within 4 timeouts
# A close (or rename into place, or cp into uploads/) waits for XNAT: the
# spool's 3 attempts (1 s and 2 s apart), each a PUT of up to 4 requests
# (backoff 0.5, 1, 2 s; its answer within --import-timeout) and a listing
# within the client's deadline (3.6 s here).
UPLOAD_BOUND = 3 * (4 * IMPORT_TIMEOUT + 3.5 + 3.6) + 3 + SLACK
STALE_GRACE = 0.5                 # a value fetched just before a change lives TTL after it
# The documented bound is per request the kernel sends, and a system call may
# send more than one that waits for XNAT: the LOOKUP of each name whose entry
# has expired (a listing), then the operation itself. While 503s hit listings
# too, a call gets one more request's bound (LOOKUP_BOUND); seen: mkdir 6.2 s,
# a read 5.7-6.1 s with --timeout 1 (README, Proof under faults). With
# faults on downloads only, a read is held to the single bound.
LOOKUP_BOUND = 4 * TIMEOUT
BOUNDS = {kind: OP_BOUND for kind in (
    "read", "pread", "stat", "listdir", "xattr", "document", "table", "refused", "hang",
    "mkdir", "rmdir", "unlink")} | {kind: UPLOAD_BOUND for kind in ("write", "rename", "upload")}
DOWNLOADS = r"/files/."          # fault_path: file bodies (and file PUTs), not listings


PROJECT = "NEURO_PUB"
READ_SESSION = "NEURO_PUB/NP001/NP001_MR1"          # read only: NOTES and scans' DICOM
READ_URI = "/data/projects/NEURO_PUB/subjects/NP001/experiments/NP001_MR1"
LIVE = "NEURO_PUB/NP001/NP001_MR2/resources/LIVE/files"   # changed behind the mount's back
LIVE_URI = "/data/projects/NEURO_PUB/subjects/NP001/experiments/NP001_MR2/resources/LIVE"
WRITE_SESSION = "NEURO_PUB/NP002/NP002_MR1"         # results written through the mount
WRITE_URI = "/data/projects/NEURO_PUB/subjects/NP002/experiments/NP002_MR1"
META_SUBJECT = "NP 003"                              # its group, its session's document
META_SESSION = f"NEURO_PUB/{META_SUBJECT}/{META_SUBJECT}_MR1"
META_SUBJECT_URI = "/data/projects/NEURO_PUB/subjects/NP 003"
META_SESSION_URI = f"{META_SUBJECT_URI}/experiments/NP 003_MR1"
INDEX = st.integers(0, 1 << 16)     # picks from a list of the model's (see MountModel.pick)
RESOURCE = st.integers(0, 2)        # which of an example's three resource labels


@dataclass
class World:
    """What every example shares: the server, the mount, the files that never change."""

    server: TestServer
    mount: Mount
    xnat: Xnat
    judge: Judge
    static: dict[str, bytes]          # mount path → bytes, read-only archive files
    document_id: str                  # the accession ID of META_SESSION
    examples: int = 0
    changed_at: float = 0.0           # monotonic time of the last change behind the mount


def content(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


@contextmanager
def opened_world(data_dir: Path, home: Path) -> Iterator[World]:
    """A demo server on ``data_dir`` (a copy of the built demo data set) on a
    port of its own (a restart keeps it), with a LIVE resource to change behind
    the mount's back, and one mount of it kept in ``home``."""
    server = TestServer(data_dir, dataset="demo", port=free_port())
    with server:
        xnat = Xnat(server)
        for n in range(3):
            xnat.put_file(LIVE_URI, f"live{n}.txt", content(f"live{n}", 200 + n))
        static = {f"{READ_SESSION}/resources/NOTES/files/{path}": data
                  for path, data in xnat.files(f"{READ_URI}/resources/NOTES").items()}
        with xnat.paused() as c:
            scans = c.get(f"{READ_URI}/scans", params={"format": "json"}).json()
            document_id = c.get(META_SESSION_URI, params={"format": "json"}).json()[
                "items"][0]["data_fields"]["ID"]
        for scan in scans["ResultSet"]["Result"]:
            folder = f"{scan['ID']}-{scan['type']}".replace(" ", "_").replace("/", "_")
            files = xnat.files(f"{READ_URI}/scans/{scan['ID']}/resources/DICOM")
            static.update({f"{READ_SESSION}/scans/{folder}/resources/DICOM/files/{p}": data
                           for p, data in files.items()})
        mount = Mount(home / "mnt", server, home / "blocks", make_env(home),
                      ["--timeout", str(TIMEOUT), "--metadata-ttl", str(TTL),
                       "--import-timeout", str(IMPORT_TIMEOUT), "--prearchive-ttl", "1",
                       "--allow-delete"])
        mount_xnatfs(server, mount.path, mount.cache_dir, mount.env, mount.options)
        try:
            for path in static:  # the scan folders' names are what the model thinks
                assert (mount.path / path).exists(), path
            yield World(server, mount, xnat, Judge(BOUNDS), static, document_id)
        finally:
            server.set_knobs(fail_rate=0, drop_rate=0, truncate_rate=0, hang=False)
            unmount_and_wait(mount.path)
