"""The shared cache tier (``--shared-cache DIR``): several mounts on one machine,
each with its own local cache, one shared folder standing for the cluster
file system. What XNAT served is counted in the test server's request log."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from xnatfs.blockcache import DEFAULT_BLOCK_SIZE as BS
from xnatfs.blockcache.shared import HEADER_SIZE, LAYOUT, SharedCache, prune, unpack
from xnatfs.testing.harness import TestServer

from .conftest import Mount, daemon_pid, unmount, wait_for

DATA_ROUTES = {"files.download", "files.stream"}
STATUS = ".xnatfs-status.json"
ADMIN = ("admin", "admin")
RNG = random.Random(23)
SMALL = {f"slice{i:02d}.dcm": RNG.randbytes(RNG.randrange(40_000, 400_000)) for i in range(12)}
BIG = RNG.randbytes(2 * BS + 12_345)        # three blocks, the last one short
FILES = {**SMALL, "big.bin": BIG}
OTHERS = {"big2.bin": RNG.randbytes(4 * BS), "big3.bin": RNG.randbytes(BS + 7)}


def mount_all(mount_factory, server: TestServer, shared: Path, names: list[str],  # noqa: ANN001
              user: str = "admin") -> list[Mount]:
    """Mounts on one shared tier, made at once (a mount takes seconds to start)."""
    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda name: mount_factory(
            server, "--shared-cache", str(shared), name=name,
            user=user if name == "alice" else "admin"), names))


def resource(experiment: str) -> Path:
    return Path("P/S") / experiment / "resources/R/files"


@pytest.fixture(scope="module")
def server(demo_copy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:  # noqa: ANN001
    """The demo data set (its users) and project P, which only admin can see."""
    with TestServer(demo_copy(tmp_path_factory.mktemp("shared") / "data"),
                    dataset="demo") as server:
        with httpx.Client(base_url=server.url, auth=ADMIN, timeout=120, trust_env=False) as c:
            assert c.put("/data/projects/P").status_code in (200, 201)
            assert c.put("/data/projects/P/subjects/S").status_code in (200, 201)
            for experiment, files in (("E1", FILES), ("E3", OTHERS)):
                base = f"/data/projects/P/subjects/S/experiments/{experiment}"
                assert c.put(f"{base}?xsiType=xnat:mrSessionData").status_code in (200, 201)
                for name, data in files.items():
                    r = c.put(f"{base}/resources/R/files/{name}", content=data)
                    assert r.status_code == 200, r.text
        yield server


def gets(server: TestServer, mark: int) -> Counter[str]:
    """File downloads since ``mark``, by file name."""
    return Counter(e["path"].rsplit("/", 1)[1] for e in server.requests_since(mark)
                   if e["route"] in DATA_ROUTES)


def status(mount: Mount) -> dict[str, Any]:
    return json.loads((mount.path / STATUS).read_bytes())


def settled(mount: Mount) -> dict[str, Any]:
    """The status once no download runs and every block is published."""
    return wait_for(lambda: _idle(status(mount)), 30, "the mount to settle")


def _idle(document: dict[str, Any]) -> dict[str, Any] | None:
    idle = (document["downloads"]["in_flight"] == 0
            and document["shared_cache"]["entries_being_published"] == 0)
    return document if idle else None


def entries(shared: Path) -> dict[Path, bytes]:
    """The published blocks in the tier, raw (the mounts may be trimming it)."""
    found = {}
    for folder, _subfolders, names in os.walk(shared / LAYOUT):  # skips vanished folders
        for name in filter(str.isdigit, names):
            try:
                found[Path(folder, name)] = Path(folder, name).read_bytes()
            except FileNotFoundError:
                pass
    return found


def leftovers(shared: Path) -> list[Path]:
    return [p for p in (shared / LAYOUT).rglob("*")
            if p.name.startswith(".tmp-") or p.name.endswith(".claim")]


def sound(path: Path, raw: bytes) -> bool:
    return unpack(raw, len(raw) - HEADER_SIZE) is not None


def published_sound(path: Path) -> bool:
    """Whether a sound entry is published at ``path`` (a bad one is removed
    before it is published again)."""
    try:
        return sound(path, path.read_bytes())
    except FileNotFoundError:
        return False


def test_four_mounts_reading_one_session_cost_xnat_about_one_download_per_file(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    shared = tmp_path / "shared"
    mounts = mount_all(mount_factory, server, shared, [f"node{i}" for i in range(4)])
    mark = server.log_mark()
    errors: list[BaseException] = []

    def copy(mount: Mount, target: Path) -> None:
        try:
            subprocess.run(["cp", "-r", str(mount.path / resource("E1")), str(target)],
                           check=True, timeout=120)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=copy, args=(m, tmp_path / f"copy{i}"))
               for i, m in enumerate(mounts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i in range(4):
        for name, data in FILES.items():
            assert (tmp_path / f"copy{i}" / name).read_bytes() == data, (i, name)

    served = gets(server, mark)
    print("downloads from XNAT by file:", dict(served))
    # Each file once; the slack: one file may be fetched twice (a node that
    # waited its bound for a claim downloads it itself).
    assert set(served) == set(FILES)
    assert sum(served.values()) <= len(FILES) + 1, served
    documents = [settled(m) for m in mounts]
    published = sum(d["shared_cache"]["entries_published"] for d in documents)
    assert published >= len(SMALL) + 3
    from_shared = sum(d["bytes"]["from_shared_cache"] for d in documents)
    from_xnat = sum(d["bytes"]["from_xnat"] for d in documents)
    total = 4 * sum(len(d) for d in FILES.values())
    assert from_shared >= total // 2  # three of the four read from the tier, about
    assert from_xnat <= total // 4 + BS
    assert all(sound(p, raw) for p, raw in entries(shared).items())
    assert not leftovers(shared)  # claims go with their publications
    folder = next((shared / LAYOUT).glob("b*/*/*"))
    assert folder.stat().st_mode & 0o7777 == 0o2770


def test_a_damaged_entry_is_detected_replaced_and_the_reader_gets_good_bytes(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    shared = tmp_path / "shared"
    first = mount_factory(server, "--shared-cache", str(shared), name="first")
    assert (first.path / resource("E1") / "big.bin").read_bytes() == BIG
    settled(first)
    tier = SharedCache(shared, BS)
    key = next(p for p in (shared / LAYOUT).glob("b*/*/*") if (p / "2").exists()).name
    truncated, flipped = tier.entry(key, 1), tier.entry(key, 2)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    raw = bytearray(flipped.read_bytes())
    raw[HEADER_SIZE + 1000] ^= 0x40
    flipped.write_bytes(raw)

    second = mount_factory(server, "--shared-cache", str(shared), name="second")
    mark = server.log_mark()
    assert (second.path / resource("E1") / "big.bin").read_bytes() == BIG
    document = settled(second)
    assert document["shared_cache"]["entries_found_bad"] == 2
    # The bad blocks came from XNAT again: one download, or two when the kernel's
    # readahead asked for both at once (without Range, a stream that started at
    # the later block leaves a gap behind it; as without a shared tier).
    assert 1 <= gets(server, mark)["big.bin"] <= 2 and set(gets(server, mark)) == {"big.bin"}
    # Block 0 came from the tier; the download XNAT sends from byte 0 (no
    # Range) fills the blocks after the first bad one.
    assert document["bytes"]["from_shared_cache"] >= BS
    wait_for(lambda: all(published_sound(p) for p in (truncated, flipped)), 10,
             "the bad entries to be published again")


def test_a_killed_mount_leaves_no_half_written_block_and_prune_clears_its_leftovers(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    shared = tmp_path / "shared"
    victim, survivor = mount_all(mount_factory, server, shared, ["victim", "survivor"])
    server.set_knobs(bandwidth_mb_s=4)  # about 4 s for the file
    try:
        reader = subprocess.Popen(["cat", str(victim.path / resource("E3") / "big2.bin")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Killed once a block is published and the next is on its way.
        wait_for(lambda: entries(shared) and leftovers(shared), 30, "a download in the middle")
        os.kill(daemon_pid(victim.path), signal.SIGKILL)
        reader.wait(timeout=30)
    finally:
        server.set_knobs(bandwidth_mb_s=0)
    unmount(victim.path)
    published = entries(shared)
    assert 1 <= len(published) < 4
    assert all(sound(p, raw) for p, raw in published.items())  # nothing half-written visible
    left = leftovers(shared)  # its claims (and a temporary, if killed while writing one)
    assert left
    assert prune(shared, 2**30).removed_temporaries == 0  # too young to be left-overs yet

    # Another mount ignores them (a claim is waited for a bounded time, then
    # downloaded past) and gets the right bytes, partly from the tier.
    assert (survivor.path / resource("E3") / "big2.bin").read_bytes() == OTHERS["big2.bin"]
    assert settled(survivor)["bytes"]["from_shared_cache"] > 0
    assert len(entries(shared)) == 4
    # Pruned by age: nothing of the killed mount stays.
    done = subprocess.run([sys.executable, "-m", "xnatfs.cli", "cache", "prune", "--shared",
                           str(shared), "--max", "1G", "--age", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not leftovers(shared)
    assert len(entries(shared)) == 4


def test_prune_bounds_the_size_and_a_mount_trims_by_itself(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    shared = tmp_path / "shared"
    mount = mount_factory(server, "--shared-cache", str(shared), "--shared-cache-max", "20M",
                          name="trimmer")
    for name in ("big2.bin", "big3.bin"):  # 16 MiB, then 4 MiB and 7 bytes
        assert (mount.path / resource("E3") / name).read_bytes() == OTHERS[name]
        # Publishing a block or releasing a claim is a use of the file: big2.bin's
        # must all come before big3.bin's.
        settled(mount)
        wait_for(lambda: not leftovers(shared), 10, "the claims to be released")

    def size() -> int:
        return sum(len(raw) for raw in entries(shared).values())

    # Over 20 MiB published: the mount trims in the background, whole files,
    # the least recently used (big2.bin) first.
    wait_for(lambda: size() <= 20 * 2**20, 30, "the mount to trim the tier")
    assert size() == HEADER_SIZE * 2 + len(OTHERS["big3.bin"]), {
        str(p.relative_to(shared)): len(raw) for p, raw in entries(shared).items()}
    done = subprocess.run([sys.executable, "-m", "xnatfs.cli", "cache", "prune", "--shared",
                           str(shared), "--max", "1M"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert size() <= 2**20


def test_a_user_who_cannot_see_a_project_gets_nothing_of_it_from_the_tier(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    shared = tmp_path / "shared"
    admin, alice = mount_all(mount_factory, server, shared, ["admin", "alice"], user="alice")
    assert (admin.path / resource("E1") / "slice00.dcm").read_bytes() == SMALL["slice00.dcm"]
    settled(admin)
    assert entries(shared)
    assert (alice.path / "NEURO_PUB").is_dir()  # her mount works
    assert "P" not in os.listdir(alice.path)
    with pytest.raises(FileNotFoundError):
        (alice.path / resource("E1") / "slice00.dcm").read_bytes()
    document = status(alice)
    assert document["bytes"]["from_shared_cache"] == 0
    assert document["shared_cache"]["enabled"]
