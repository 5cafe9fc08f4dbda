"""The mount's status file (``.xnatfs-status.json``) and ``xnatfs status``.

Its counters are checked against the test server's request log, which
records every request the mount sent (the tests' own steering excluded):
a site administrator reads them to know what a mount costs XNAT. One server
and one mount for the module; each test compares the counters before and
after what it does.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xnatfs.testing.harness import TestServer

from .conftest import Mount, module_mount

STATUS = ".xnatfs-status.json"
SESSION = Path("NEURO_PUB/NP001/NP001_MR1")
DICOM = SESSION / "scans" / "3-T2_FLAIR" / "resources" / "DICOM" / "files"


@pytest.fixture(scope="module")
def server(demo_copy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:  # noqa: ANN001
    with TestServer(demo_copy(tmp_path_factory.mktemp("status") / "data"),
                    dataset="demo") as server:
        yield server


@pytest.fixture(scope="module")
def mount(server: TestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount for the module, unmounted and waited for (its logout is its own)."""
    with module_mount(server, tmp_path_factory.mktemp("status-home"), wait=True) as mount:
        yield mount


def status(mount: Mount) -> dict[str, Any]:
    return json.loads((mount.path / STATUS).read_bytes())


def settled(mount: Mount) -> dict[str, Any]:
    """The counters once no download runs or waits: a whole-file download may go
    on after ``cat`` has its bytes (it fills the cache to the end)."""
    give_up = time.monotonic() + 30
    while True:
        now = status(mount)
        if now["downloads"]["in_flight"] == 0 and now["downloads"]["queued"] == 0:
            return now
        assert time.monotonic() < give_up, now["downloads"]
        time.sleep(0.05)


def grown(before: dict[str, int], after: dict[str, int]) -> Counter[str]:
    """What each counter of a section gained between two readings."""
    return Counter({key: after.get(key, 0) - before.get(key, 0)
                    for key in set(before) | set(after) if after.get(key, 0) != before.get(key, 0)})


def no_caches() -> None:
    """Have the kernel drop its page cache, so that reads reach the mount (root only)."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except PermissionError:
        pytest.skip("dropping the kernel's caches needs root")


def test_request_counters_match_the_servers_log(mount: Mount, tmp_path: Path) -> None:
    server = mount.server
    before = settled(mount)
    mark = server.log_mark()
    os.listdir(mount.path)
    files = sorted((mount.path / DICOM).iterdir())[:3]
    read = {f.name: f.read_bytes() for f in files}  # cat of three files
    local = tmp_path / "result.txt"
    local.write_text("a result of the pipeline\n")
    resource = mount.path / SESSION / "resources" / "STATUS_CHECK"
    resource.mkdir()
    shutil.copy(local, resource / "files" / "result.txt")  # cp into a resource
    after = settled(mount)
    log = server.requests_since(mark)

    by_kind = grown(before["requests"]["by_kind"], after["requests"]["by_kind"])
    assert sum(by_kind.values()) == len(log) == (
        after["requests"]["total"] - before["requests"]["total"])
    assert grown(before["requests"]["by_status"], after["requests"]["by_status"]) == Counter(
        str(entry["status"]) for entry in log)
    downloads = [e for e in log if e["route"] == "files.download"]
    assert by_kind["files.stream"] == len(downloads) >= 1
    assert by_kind["file.put"] == sum(e["method"] == "PUT" and "/files/" in e["path"]
                                      for e in log) == 1
    from_xnat = after["bytes"]["from_xnat"] - before["bytes"]["from_xnat"]
    assert from_xnat == sum(e["bytes"] for e in downloads) >= sum(map(len, read.values()))
    assert after["requests"]["retries"] == before["requests"]["retries"]
    assert after["uploads"]["in_flight"] == after["uploads"]["behind_a_close"] == 0
    assert after["uploads"]["sent"] - before["uploads"]["sent"] == 1


def test_a_second_read_comes_from_the_local_cache(mount: Mount) -> None:
    notes = mount.path / SESSION / "resources" / "NOTES" / "files" / "notes.txt"
    first = notes.read_bytes()
    assert first
    settled(mount)
    no_caches()
    before = settled(mount)
    mark = mount.server.log_mark()
    assert notes.read_bytes() == first
    after = settled(mount)
    assert mount.server.requests_since(mark) == []
    assert after["requests"]["total"] == before["requests"]["total"]
    assert after["bytes"]["from_xnat"] == before["bytes"]["from_xnat"]
    assert after["bytes"]["from_local_cache"] - before["bytes"]["from_local_cache"] == len(first)


def test_the_file_is_read_only_and_stat_gives_its_size(mount: Mount) -> None:
    path = mount.path / STATUS
    assert STATUS in os.listdir(mount.path)
    assert path.stat().st_size == len(path.read_bytes())
    document = json.loads(subprocess.run(["cat", str(path)], capture_output=True,
                                         check=True).stdout)
    assert document["format"] == 1 and document["site"] == mount.server.url.rstrip("/")
    assert path.stat().st_mode & 0o222 == 0
    with pytest.raises(OSError) as refused:
        path.write_text("{}")
    assert refused.value.errno in (errno.EACCES, errno.EROFS)
    assert subprocess.run(["rm", "-f", str(path)], capture_output=True).returncode != 0
    assert path.exists()


def test_errors_count_failed_operations_not_missing_names(mount: Mount) -> None:
    before = status(mount)["errors"]
    assert not (mount.path / "NO_SUCH_PROJECT").exists()  # a lookup: no failure
    with pytest.raises(OSError) as refused:
        (mount.path / "NEURO_PUB" / "not-a-folder.txt").write_text("x")
    after = status(mount)["errors"]
    name = errno.errorcode[refused.value.errno]
    assert grown(before["by_errno"], after["by_errno"]) == {name: 1}
    assert after["total"] - before["total"] == 1


def test_xnatfs_status_prints_the_counters(mount: Mount) -> None:
    document = settled(mount)
    shown = subprocess.run([sys.executable, "-m", "xnatfs.cli", "status", str(mount.path)],
                           capture_output=True, text=True, check=True, env=mount.env).stdout
    assert f"requests          {document['requests']['total']}  (retries " in shown
    for kind, n in document["requests"]["by_kind"].items():
        assert f"  {kind:24} {n}\n" in shown
    assert "bytes from XNAT   " in shown and "downloads         0 in flight" in shown
    raw = subprocess.run([sys.executable, "-m", "xnatfs.cli", "status", "--json",
                          str(mount.path)], capture_output=True, check=True,
                         env=mount.env).stdout
    assert json.loads(raw)["requests"]["by_kind"] == document["requests"]["by_kind"]
    elsewhere = subprocess.run([sys.executable, "-m", "xnatfs.cli", "status", "/tmp"],
                               capture_output=True, text=True, env=mount.env)
    assert elsewhere.returncode == 1 and "not an xnatfs mount" in elsewhere.stderr


def test_503_answers_show_as_retries_and_5xx(mount: Mount) -> None:
    server = mount.server
    target = sorted((mount.path / DICOM).iterdir())[-1]
    target.stat()  # listed before the fault: only its download fails
    before = settled(mount)
    mark = server.log_mark()
    server.set_knobs(fail_rate=1.0, fault_status=503, fault_path=r"/files/" + target.name)
    try:
        with pytest.raises(OSError):
            target.read_bytes()
        after = settled(mount)
    finally:
        server.set_knobs(fail_rate=0.0, fault_path="")
    log = server.requests_since(mark)
    refused = [e for e in log if e["status"] == 503]
    # Besides, the mount asks whether the server it counts as down is back.
    probes = [e for e in log if e["path"] == "/data/JSESSION" and e["status"] != 503]
    assert refused and len(refused) + len(probes) == len(log)
    requests = after["requests"]
    assert requests["server_errors_5xx"] - before["requests"]["server_errors_5xx"] == len(refused)
    grew = grown(before["requests"]["by_status"], requests["by_status"])
    assert grew.pop("503") == len(refused)
    assert sum(grew.values()) <= len(probes), grew  # the probes' answers, once counted
    retries = requests["retries"] - before["requests"]["retries"]
    assert 1 <= retries < len(refused)  # each operation's first attempt is no retry
    assert after["errors"]["total"] > before["errors"]["total"]
    assert target.read_bytes()  # the server answers again: so does the mount

