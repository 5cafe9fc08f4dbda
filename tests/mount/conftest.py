"""Real kernel mounts of the test server, through the ``xnatfs`` command."""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from xnatfs.testing.imaging import synthetic_study, write_dicom_archive
from xnatfs.testing.harness import TestServer, pids_with_cmdline


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and any(
        os.access(os.path.join(d, "fusermount3"), os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep))


pytestmark = pytest.mark.skipif(not fuse_available(), reason="FUSE is not available")


@dataclass
class Mount:
    """A mounted xnatfs: where it is, and the server behind it."""

    path: Path
    server: TestServer
    cache_dir: Path
    env: dict[str, str]
    options: list[str]

    def remount(self) -> None:
        """Unmount, wait for the old process to exit (so that the new one sees
        exactly what it left in the cache directory), and mount again."""
        unmount_and_wait(self.path)
        mount_xnatfs(self.server, self.path, self.cache_dir, self.env, self.options)


def unmount_and_wait(mountpoint: Path, timeout: float = 60) -> None:
    """Unmount, and return once the process that served the mount has exited
    (whatever it still does after the unmount, such as logging out, is done)."""
    pidfd = os.pidfd_open(daemon_pid(mountpoint))
    try:
        unmount(mountpoint)
        ready, _, _ = select.select([pidfd], [], [], timeout)
        assert ready, "the xnatfs process did not exit after unmount"
    finally:
        os.close(pidfd)


def daemon_pid(mountpoint: Path) -> int:
    """The xnatfs process serving ``mountpoint``."""
    pids = pids_with_cmdline("--foreground", str(mountpoint.resolve()))
    if not pids:
        raise AssertionError(f"no xnatfs process serves {mountpoint}")
    return pids[0]


def mount_xnatfs(server: TestServer, mountpoint: Path, cache_dir: Path, env: dict[str, str],
                 options: list[str]) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "xnatfs.cli", "mount", server.url, str(mountpoint),
           "--cache-dir", str(cache_dir), "--log-level", "INFO",
           "--log-file", str(cache_dir.parent / "mount.log"), *options]
    subprocess.run(cmd, env=env, check=True, timeout=60)


def unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, timeout=60)


def drop_kernel_entries() -> None:
    """Make the kernel drop its unused dentries and inodes, which sends the mount
    FUSE forgets for them (root only: otherwise the calling test is skipped)."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
    except PermissionError:
        pytest.skip("dropping the kernel's caches needs root")


def make_env(home: Path, user: str = "admin") -> dict[str, str]:
    """The environment of a mount; the demo users' passwords are their names."""
    env = dict(os.environ, XNAT_USER=user, XNAT_PASS=user,
               XDG_CACHE_HOME=str(home / "cache"), XDG_CONFIG_HOME=str(home / "config"))
    env.pop("XNAT_URL", None)
    return env


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator:
    """Mount a server with options; everything mounted is unmounted afterwards."""
    mounts: list[Mount] = []

    def factory(server: TestServer, *options: str, name: str = "mnt",
                user: str = "admin") -> Mount:
        home = tmp_path / f"home-{name}"
        cache = home / "blocks"
        mount = Mount(tmp_path / name, server, cache, make_env(home, user), list(options))
        mount_xnatfs(server, mount.path, cache, mount.env, mount.options)
        mounts.append(mount)
        return mount

    yield factory
    for mount in mounts:
        unmount(mount.path)


def wait_for(probe: Callable[[], Any], timeout: float = 30, what: str = "", *,
             every: float = 0.1) -> Any:
    """Poll ``probe`` every ``every`` s until it returns something true, and return
    that; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return result


@contextmanager
def reachable_by_everyone(prefix: str) -> Iterator[Path]:
    """A fresh folder every user can reach (pytest's tmp_path and /tmp may be
    0700), for tests that act as other users; mounts left in it are unmounted."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for entry in path.iterdir():
            if entry.is_mount():
                unmount(entry)
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def module_mount(server: TestServer, home: Path, *options: str,
                 wait: bool = False) -> Iterator[Mount]:
    """One mount of ``server`` kept in ``home`` (for a module's fixture: tests that
    share it), with mount ``options``; unmounted afterwards, and with ``wait``
    its process waited for."""
    mount = Mount(home / "mnt", server, home / "blocks", make_env(home), list(options))
    mount_xnatfs(server, mount.path, mount.cache_dir, mount.env, mount.options)
    try:
        yield mount
    finally:
        (unmount_and_wait if wait else unmount)(mount.path)


@pytest.fixture
def demo_mount(demo_server: TestServer, mount_factory) -> Mount:  # noqa: ANN001
    return mount_factory(demo_server)


# ------------------------------------------- uploads, and what they make in the prearchive
ADMIN = ("admin", "admin")


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory: pytest.TempPathFactory,
                  demo_copy) -> Iterator[TestServer]:  # noqa: ANN001
    server = TestServer(demo_copy(tmp_path_factory.mktemp("uploads") / "data"), dataset="demo",
                        args=["--prearchive-settle", "1"])
    with server:
        yield server


@pytest.fixture
def mount(upload_server: TestServer, mount_factory) -> Mount:  # noqa: ANN001
    return mount_factory(upload_server, "--prearchive-ttl", "1")


def prearchive_session(server: TestServer, uri: str) -> dict[str, bytes]:
    """Every file of a prearchive session, by name, fetched over HTTP."""
    out = {}
    with httpx.Client(base_url=server.url, auth=ADMIN, timeout=60) as c:
        for scan in c.get(f"{uri}/scans").json()["ResultSet"]["Result"]:
            files = c.get(f"{uri}/scans/{scan['ID']}/resources/DICOM/files").json()
            for f in files["ResultSet"]["Result"]:
                out[f["Name"]] = c.get(f["URI"]).content
    return out


def upload_result(path: Path) -> list[str]:
    assert os.getxattr(path, "user.xnatfs.upload.state") == b"done"
    return os.getxattr(path, "user.xnatfs.upload.result").decode().split()


def mounted_prearchive(mount: Mount, uri: str) -> Path:
    """Where ``/data/prearchive/projects/P/TS/SESSION`` appears in the mount."""
    return mount.path / "prearchive" / Path(*uri.split("/")[4:])


def drop_archive(mount: Mount, tmp_path: Path, name: str, patient: tuple[str, str], *,
                 slices: int, seed: int) -> tuple[Path, str]:
    """``cp`` a small DICOM zip of one study into ``uploads/NEURO_PUB/``; returns the
    local zip and the prearchive URI XNAT gave it."""
    archive = tmp_path / name
    write_dicom_archive(archive, synthetic_study(*patient, slices=slices, rows=16, cols=16,
                                                 seed=seed))
    folder = mount.path / "uploads" / "NEURO_PUB"
    subprocess.run(["cp", str(archive), str(folder)], check=True)
    [uri] = upload_result(folder / name)
    return archive, uri


def member_digests(archive: Path) -> dict[str, str]:
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            return {Path(n).name: hashlib.md5(zf.read(n)).hexdigest() for n in zf.namelist()}
    import tarfile

    with tarfile.open(archive) as tf:
        return {Path(m.name).name: hashlib.md5(tf.extractfile(m).read()).hexdigest()
                for m in tf if m.isfile()}


def peak_in_flight(entries: list[dict]) -> int:
    """The most of these requests the server was answering at once (its request
    log has each request's end and duration)."""
    events = sorted([(e["t"] - e["ms"] / 1000, 1) for e in entries]
                    + [(e["t"], -1) for e in entries])
    in_flight = peak = 0
    for _, delta in events:
        in_flight += delta
        peak = max(peak, in_flight)
    return peak
