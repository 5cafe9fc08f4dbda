"""``xnatfs prefetch``: through a running mount, directly from the site, into a
folder (``--to``); interrupted and run again; and the mechanics container
recipes rely on (a bind mount of the mount point, another uid reading)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xnatfs.status import STATUS_FILE_NAME
from xnatfs.testing.harness import TestServer

from .conftest import make_env, mount_xnatfs, reachable_by_everyone, wait_for

SESSION = "NEURO_PUB/NP001/NP001_MR1"
OTHER_SESSION = "NEURO_PUB/NP001/NP001_MR2"
FILE = Path("NEURO_PUB/NP001/NP001_MR1/resources/QC/files/qc.json")
NOBODY = 65534
SLOW_MS = 150  # per request while a run is to be interrupted


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           demo_copy: Callable[[Path], Path]) -> Iterator[TestServer]:
    """A demo server of this module's own: its latency knob is turned here."""
    with TestServer(demo_copy(tmp_path_factory.mktemp("prefetch") / "data")) as served:
        yield served


def prefetch(env: dict[str, str], *args: str, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
    """Run ``xnatfs prefetch`` with stderr a pipe (no terminal, as in a batch log)."""
    return subprocess.run([sys.executable, "-m", "xnatfs.cli", "prefetch", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_prefetch(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "xnatfs.cli", "prefetch", *args],
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def interrupt_prefetch(server: TestServer, env: dict[str, str], log: Path, args: list[str],
                       condition: Callable[[], bool], what: str, sig: signal.Signals) -> None:
    """Run ``xnatfs prefetch ARGS`` against a slowed server until ``condition``,
    then interrupt it with ``sig``: it must exit with 130 (its stderr in ``log``)."""
    server.set_knobs(latency_ms=SLOW_MS)
    try:
        run = start_prefetch(env, log, *args)
        try:
            wait_for(condition, 60, what)
            run.send_signal(sig)
            assert run.wait(timeout=60) == 130
        finally:
            run.kill()
    finally:
        server.set_knobs(latency_ms=0)


def downloads(server: TestServer, mark: int) -> list[str]:
    """Paths of the file downloads the server answered since ``mark``."""
    return [e["path"] for e in server.requests_since(mark) if e["route"] == "files.download"]


def in_flight(mountpoint: Path) -> int:
    """Downloads the mount is making or about to make (its status file)."""
    status = json.loads((mountpoint / STATUS_FILE_NAME).read_bytes())
    return int(status["downloads"]["in_flight"] + status["downloads"]["queued"])


def resource_files(folder: Path) -> dict[str, Path]:
    """What a folder of a mount (or a copy of it) holds under resources' files/
    folders, by path below ``folder`` (found with find(1), not the code tested)."""
    found = subprocess.run(["find", str(folder), "-path", "*/resources/*/files/*", "-type", "f"],
                           capture_output=True, text=True, check=True).stdout.split("\n")
    return {str(Path(p).relative_to(folder)): Path(p) for p in found if p}


def summary_count(stderr: str, what: str) -> int:
    match = re.search(rf"{what}: (\d+) files", stderr)
    assert match, stderr
    return int(match.group(1))


def test_prefetch_through_a_mount_fills_its_cache(server: TestServer, mount_factory,  # noqa: ANN001
                                                  tmp_path: Path) -> None:
    mount = mount_factory(server)
    outside = prefetch(mount.env, str(tmp_path))
    assert outside.returncode == 1 and "not in an xnatfs mount" in outside.stderr
    uploads = prefetch(mount.env, str(mount.path / "uploads"))
    assert uploads.returncode == 1 and "not prefetched" in uploads.stderr

    session = mount.path / SESSION
    listed = resource_files(session)
    assert len(listed) > 40
    mark = server.log_mark()
    run = prefetch(mount.env, str(session), "--progress-interval", "0.1", "--jobs", "3")
    assert run.returncode == 0, run.stderr
    # Progress: periodic lines (no terminal: no carriage returns), then the summary.
    lines = run.stderr.splitlines()
    progress = [line for line in lines if line.startswith("prefetch: [")]
    assert len(progress) >= 2 and "\r" not in run.stderr
    assert f"0/{len(listed)} files" in progress[0]
    assert f"{len(listed)}/{len(listed)} files" in progress[-1]
    assert f"prefetch done: {len(listed)} of {len(listed)} files" in run.stderr
    assert summary_count(run.stderr, "already cached") == 0
    # Each file XNAT has downloaded once; nothing the mount makes (documents,
    # tables) asked for, since they are not read.
    fetched = downloads(server, mark)
    assert len(fetched) == len(set(fetched)) == len(listed)
    assert {e["route"] for e in server.requests_since(mark)} <= {
        "projects.list", "subjects.list", "experiments.list", "experiment.get", "files.list",
        "files.download"}
    some = session / next(iter(listed))
    assert os.getxattr(some, "user.xnatfs.cached") == str(some.stat().st_size).encode()

    # Reading it all now costs XNAT nothing (prefetching again: see the next test).
    mark = server.log_mark()
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(session), str(copy)], check=True, timeout=60)
    assert downloads(server, mark) == []

    # --to DIR through the mount: the mount's layout, the mount's bytes.
    out = tmp_path / "out"
    scan_folder = session / "scans"
    to = prefetch(mount.env, str(scan_folder), "--to", str(out))
    assert to.returncode == 0, to.stderr
    written = resource_files(out)
    expected = {f"{SESSION}/scans/{rel}": path
                for rel, path in resource_files(scan_folder).items()}
    assert set(written) == set(expected) and written
    for rel, path in expected.items():
        assert written[rel].read_bytes() == path.read_bytes()
    assert downloads(server, mark) == []


def test_an_interrupted_prefetch_resumes(server: TestServer, mount_factory,  # noqa: ANN001
                                         tmp_path: Path) -> None:
    mount = mount_factory(server)
    session = mount.path / SESSION
    total = len(resource_files(session))
    mark = server.log_mark()
    log = tmp_path / "first.log"
    interrupt_prefetch(server, mount.env, log, [str(session), "--jobs", "2"],
                       lambda: len(downloads(server, mark)) >= 10, "10 downloads",
                       signal.SIGTERM)
    stderr = log.read_text()
    assert "prefetch interrupted" in stderr and "run the same command again" in stderr
    # What the mount had on its way when the reader went away, it finishes (and caches).
    wait_for(lambda: not in_flight(mount.path), 60, "the mount's downloads to end")
    fetched_before = set(downloads(server, mark))
    assert 10 <= len(fetched_before) < total

    mark = server.log_mark()
    rerun = prefetch(mount.env, str(session))
    assert rerun.returncode == 0, rerun.stderr
    cached = summary_count(rerun.stderr, "already cached")
    assert f"({cached} already cached)" in rerun.stderr  # in the progress line too
    fetched = downloads(server, mark)
    # What was downloaded before the interrupt is cached, skipped, not fetched again.
    assert cached >= 10 and len(fetched) <= total - cached
    # Each file came from XNAT once over both runs.
    assert not set(fetched) & fetched_before and len(set(fetched) | fetched_before) == total


def test_direct_prefetch_into_a_folder_resumes_and_fills_a_later_mounts_cache(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    home = tmp_path / "home-later"  # where mount_factory(name="later") keeps its cache
    env = make_env(home)
    out = tmp_path / "scratch"
    direct = ["--url", server.url, "--cache-dir", str(home / "blocks"), "--to", str(out),
              OTHER_SESSION]
    mark = server.log_mark()
    log = tmp_path / "first.log"
    interrupt_prefetch(server, env, log, [*direct, "--jobs", "2"],
                       lambda: len(resource_files(out)) >= 8 if out.exists() else False,
                       "8 files written", signal.SIGINT)
    assert "prefetch interrupted" in log.read_text()
    done_before = resource_files(out)
    missing = prefetch(env, *direct[:-1], "NEURO_PUB/NOBODY")
    assert missing.returncode == 1 and "NEURO_PUB/NOBODY: not found" in missing.stderr

    rerun = prefetch(env, *direct)
    assert rerun.returncode == 0, rerun.stderr
    assert summary_count(rerun.stderr, "already in the folder") == len(done_before)
    both_runs = downloads(server, mark)
    # Only what was on its way when interrupted (one per reader) was downloaded twice.
    assert len(both_runs) - len(set(both_runs)) <= 2
    assert not [p for p in out.rglob(".xnatfs-part-*")]  # no temporary left

    # A mount started later on this machine finds every block: no download at all,
    # and the folder has the mount's layout and bytes.
    mount = mount_factory(server, name="later")
    mark = server.log_mark()
    shown = resource_files(mount.path / OTHER_SESSION)
    written = resource_files(out / OTHER_SESSION)
    assert set(written) == set(shown) and len(shown) > 40
    for rel, path in shown.items():
        assert written[rel].read_bytes() == path.read_bytes()
    assert set(done_before) <= {f"{OTHER_SESSION}/{rel}" for rel in shown}
    assert downloads(server, mark) == []


def test_a_direct_prefetch_leaves_every_file_it_read_in_the_cache(
        server: TestServer, tmp_path: Path) -> None:
    """The run ends only once the blocks it read are stored and their digest
    checks recorded, the last file's too: a second run finds every file cached
    (before, the blocks of the last few files a reader got from the download
    itself were still on their way to the disk when the run ended)."""
    direct = ["--url", server.url, "--cache-dir", str(tmp_path / "blocks"), OTHER_SESSION]
    env = make_env(tmp_path / "home")
    first = prefetch(env, *direct)
    assert first.returncode == 0, first.stderr
    again = prefetch(env, *direct)
    done = re.search(r"prefetch done: (\d+) of (\d+) files", again.stderr)
    assert again.returncode == 0 and done and done.group(1) == done.group(2), again.stderr
    assert summary_count(again.stderr, "already cached") == int(done.group(2)), again.stderr


def test_direct_prefetch_fills_the_shared_cache_other_nodes_read(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """A login node fills the cluster's shared cache; a node's mount with a cache
    of its own and the same --shared-cache then downloads nothing."""
    shared = tmp_path / "shared"
    login = tmp_path / "login"
    scan = "NEURO_PUB/NP002/NP002_MR1/scans/2"  # a scan by its ID
    run = prefetch(make_env(login), "--url", server.url, "--cache-dir", str(login / "blocks"),
                   "--shared-cache", str(shared), scan)
    assert run.returncode == 0, run.stderr
    node = mount_factory(server, "--shared-cache", str(shared), name="node")
    mark = server.log_mark()
    [folder] = (node.path / scan).parent.glob("2-*")
    files = resource_files(folder)
    assert f"prefetch done: {len(files)} of {len(files)} files" in run.stderr and files
    assert all(path.read_bytes() for path in files.values())
    assert downloads(server, mark) == []
    status = json.loads((node.path / STATUS_FILE_NAME).read_bytes())
    assert status["bytes"]["from_shared_cache"] == sum(p.stat().st_size for p in files.values())


def test_files_that_fail_are_named_and_the_exit_status_says_so(server: TestServer,
                                                                tmp_path: Path) -> None:
    server.set_knobs(fail_rate=1.0, fault_status=403, fault_path=r"/qc\.json$")
    try:
        run = prefetch(make_env(tmp_path), "--url", server.url, "--cache-dir",
                       str(tmp_path / "blocks"), "NEURO_PUB/NP002/NP002_MR1/resources")
    finally:
        server.set_knobs(fail_rate=0.0, fault_status=503, fault_path="")
    assert run.returncode == 1, run.stderr
    assert "failed: 2 files" in run.stderr
    named = re.findall(r"^    (\S+): ", run.stderr, re.MULTILINE)
    assert sorted(named) == [
        "NEURO_PUB/NP002/NP002_MR1/resources/QC/files/qc.json",
        "NEURO_PUB/NP002/NP002_MR1/resources/QC/files/reports/2023/qc.json"]
    files = int(re.search(r"prefetch done: (\d+) of (\d+) files", run.stderr).group(2))
    assert f"prefetch done: {files - 2} of {files} files" in run.stderr


# ------------------------------------------------------------- containers
@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path may be 0700)."""
    if os.geteuid() != 0 or not (shutil.which("setpriv") and shutil.which("unshare")):
        pytest.skip("binding and acting as other users needs root, setpriv and unshare")
    with reachable_by_everyone("xnatfs-containers-") as path:
        yield path


def in_new_namespace(script: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """What ``docker run -v`` and ``apptainer --bind`` do: a mount namespace of
    the container's own in which the mount point is bound to another path."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60,
                          env=dict(variables, PATH=os.environ["PATH"]))


BIND_AND_READ = """
mkdir -p "$DATA" && mount --bind "$MNT" "$DATA" || exit 9
cat "$DATA/$FILE" > "$OUT_ROOT" || exit 10
setpriv --reuid=65534 --regid=65534 --clear-groups -- cat "$DATA/$FILE"
"""


def test_a_bound_mount_point_serves_a_container(server: TestServer, open_dir: Path,
                                                tmp_path: Path) -> None:
    shared = open_dir / "shared"
    mount_xnatfs(server, shared, tmp_path / "a" / "blocks", make_env(tmp_path / "a"),
                 ["--allow-other", "--read-only"])
    private = open_dir / "private"
    mount_xnatfs(server, private, tmp_path / "b" / "blocks", make_env(tmp_path / "b"), [])
    expected = (shared / FILE).read_bytes()
    assert expected

    # --allow-other: bound elsewhere in a new namespace, root and another uid read it.
    bound = in_new_namespace(BIND_AND_READ, MNT=str(shared), DATA=str(open_dir / "data1"),
                             FILE=str(FILE), OUT_ROOT=str(open_dir / "root1"))
    assert bound.returncode == 0, bound.stderr
    assert (open_dir / "root1").read_bytes() == expected
    assert bound.stdout.encode() == expected

    # Without it: the owner (root here) binds and reads; the container's other uid is refused.
    refused = in_new_namespace(BIND_AND_READ, MNT=str(private), DATA=str(open_dir / "data2"),
                               FILE=str(FILE), OUT_ROOT=str(open_dir / "root2"))
    assert (open_dir / "root2").read_bytes() == expected
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
