"""Reading through a real mount with real tools: pread, threads, mmap, nibabel, pydicom.

Every byte read through the mount is compared with the same bytes fetched
straight from the server over HTTP, and the server's request log says what the
mount asked for: how often each byte was downloaded, and whether a read that
should have come from the cache went to the server at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import mmap
import os
import random
import threading
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nibabel
import numpy as np
import pydicom
import pytest

from xnatfs.blockcache import DEFAULT_BLOCK_SIZE
from xnatfs.areas.remote_files import SERIES_READ_AHEAD
from xnatfs.testing.harness import TestServer
from xnatfs.testing.store import Store

from .conftest import wait_for

BS = DEFAULT_BLOCK_SIZE
ADMIN = ("admin", "admin")
# Routes and client request kinds that carry file contents.
DATA_ROUTES = {"files.download", "files.stream"}
FILES = Path("P/S/E/resources/R/files")
DEFAULT_KNOBS = {"range": False, "bandwidth_mb_s": 0.0, "latency_ms": 0.0, "fail_rate": 0.0,
                 "drop_rate": 0.0, "truncate_rate": 0.0, "hang": False, "fault_path": ""}

BIG_SIZE = 5 * BS + 12_345          # six blocks, the last one short
BIG = random.Random(3).randbytes(BIG_SIZE)


# ----------------------------------------------------------------- helpers
def http(server: TestServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, auth=ADMIN, timeout=120, trust_env=False)


def put_files(server: TestServer, files: dict[str, bytes], *, experiment: str = "E",
              resource: str = "R") -> None:
    """Project P, subject S, session ``experiment`` and the files in its resource."""
    with http(server) as c:
        assert c.put("/data/projects/P").status_code in (200, 201)
        assert c.put("/data/projects/P/subjects/S").status_code in (200, 201)
        base = f"/data/projects/P/subjects/S/experiments/{experiment}"
        assert c.put(f"{base}?xsiType=xnat:mrSessionData").status_code in (200, 201)
        for name, data in files.items():
            r = c.put(f"{base}/resources/{resource}/files/{name}?overwrite=true", content=data)
            assert r.status_code == 200, r.text


def put_files_in_one_zip(server: TestServer, files: dict[str, bytes]) -> None:
    """:func:`put_files` for thousands of files: one zip that XNAT unpacks into
    resource R (``extract=true``) rather than a request per file."""
    put_files(server, {})
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with http(server) as c:
        r = c.put("/data/projects/P/subjects/S/experiments/E/resources/R/files/files.zip",
                  params={"extract": "true"}, content=packed.getvalue())
        assert r.status_code == 200, r.text
        listed = c.get("/data/projects/P/subjects/S/experiments/E/resources/R/files",
                       params={"format": "json"}).json()["ResultSet"]["Result"]
    assert sorted(row["Name"] for row in listed) == sorted(files)


def fetch(server: TestServer, name: str, experiment: str = "E") -> bytes:
    with http(server) as c:
        r = c.get(f"/data/projects/P/subjects/S/experiments/{experiment}"
                  f"/resources/R/files/{name}")
        r.raise_for_status()
        return r.content


def data_requests(server: TestServer, mark: int) -> list[dict[str, Any]]:
    return [e for e in server.requests_since(mark) if e["route"] in DATA_ROUTES]


def blob_of(server: TestServer, name: str) -> Path:
    """Where the server keeps the bytes of file ``name`` of resource R."""
    store = Store(server.data_dir)
    try:
        rows = store.query("SELECT blob FROM files WHERE path = ?", (name,))
        assert len(rows) == 1, rows
        return store.blob_path(rows[0]["blob"])
    finally:
        store.close()


def drop_page_cache() -> None:
    """Make the next reads reach the mount rather than the kernel's page cache
    (root only; otherwise the reads that follow test less, but still pass)."""
    os.sync()
    with contextlib.suppress(PermissionError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------- fixtures
@pytest.fixture
def fresh_server(started_fresh_server: TestServer) -> TestServer:
    """conftest's ``fresh_server``, started while the test before ran (none of
    this module's tests looks for its data under ``tmp_path``)."""
    return started_fresh_server


@pytest.fixture(scope="module")
def big_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    """One server for the tests that only read: a big random file and a NIfTI volume."""
    server = TestServer(tmp_path_factory.mktemp("read") / "data", dataset="none")
    with server:
        volume = np.random.default_rng(7).standard_normal((64, 64, 40, 24)).astype(np.float32)
        image = nibabel.Nifti1Image(volume, np.diag([2.0, 2.0, 3.0, 1.0]))
        put_files(server, {"big.bin": BIG, "volume.nii": image.to_bytes(),
                           "small.txt": b"hello\n" * 1000})
        yield server


@pytest.fixture
def server(big_server: TestServer) -> Iterator[TestServer]:
    """``big_server`` with its knobs put back after each test."""
    big_server.set_knobs(**DEFAULT_KNOBS)
    yield big_server
    big_server.set_knobs(**DEFAULT_KNOBS)


# ------------------------------------------------------ 1. partial and random
@pytest.mark.parametrize("server_range", [True, False], ids=["range", "norange"])
def test_random_preads_match_http(server: TestServer, mount_factory, server_range: bool) -> None:
    server.set_knobs(range=server_range)
    mount = mount_factory(server, "--range", "auto")
    path = mount.path / FILES / "big.bin"
    assert fetch(server, "big.bin") == BIG
    assert os.stat(path).st_size == BIG_SIZE
    size = BIG_SIZE
    mark = server.log_mark()
    fd = os.open(path, os.O_RDONLY)
    try:
        # A few bytes in the middle first: with Range, only about a block is fetched.
        assert os.pread(fd, 10, 2 * BS + 77) == BIG[2 * BS + 77:2 * BS + 87]
        if server_range:
            fetched = sum(e["bytes"] for e in data_requests(server, mark))
            assert fetched <= 2 * BS, f"{fetched} bytes fetched for a 10-byte read"
        edges = [(0, 1), (0, 4096), (BS - 1, 2), (BS - 100, 200), (2 * BS - 5, BS + 10),
                 (BS, BS), (size - 1, 1), (size - 10, 100), (size - BS - 3, BS + 3),
                 (size, 10), (size + 4096, 10), (3 * BS, 2 * BS + 12_345)]
        rng = random.Random(11)
        reads = edges + [(rng.randrange(size), rng.choice([1, 17, 4096, 65_536, 300_000,
                                                           BS, BS + 1, 3 * BS]))
                         for _ in range(150)]
        for offset, length in reads:
            got = os.pread(fd, length, offset)
            assert got == BIG[offset:offset + length], (offset, length, len(got))
    finally:
        os.close(fd)
    with open(path, "rb") as f:  # EOF through a buffered file object
        f.seek(size - 3)
        assert f.read() == BIG[-3:]
        assert f.read() == b""


@pytest.mark.parametrize("server_range", [True, False], ids=["range", "norange"])
def test_first_download_learns_range_support_without_a_probe(server: TestServer, mount_factory,
                                                             server_range: bool) -> None:
    """The first download of a mount asks for a range and its answer tells whether
    the server honours Range: reading a file costs one request, not a probe first."""
    server.set_knobs(range=server_range)
    mount = mount_factory(server, "--range", "auto")
    path = mount.path / FILES / "small.txt"
    os.stat(path)
    mark = server.log_mark()
    assert path.read_bytes() == b"hello\n" * 1000
    # (The next file of the folder may be fetched ahead too: count this one's.)
    requests = [e for e in data_requests(server, mark) if e["path"].endswith("/small.txt")]
    assert len(requests) == 1, requests
    assert requests[0]["range"] == ("0-5999" if server_range else None)  # as honoured
    # What it learnt holds for the next file: a ranged read of big.bin fetches
    # about a block with Range, and streams the file from its start without.
    mark = server.log_mark()
    with open(mount.path / FILES / "big.bin", "rb") as f:
        f.seek(3 * BS + 5)
        assert f.read(10) == BIG[3 * BS + 5:3 * BS + 15]

    def big_requests() -> list[dict[str, Any]]:
        return [e for e in data_requests(server, mark) if e["path"].endswith("/big.bin")]

    # Without Range the download runs on to the end of the file after the read
    # returned; the server logs a request when it ends.
    wait_for(lambda: bool(big_requests()), 60, "the download of big.bin to end")
    ranges = [e["range"] for e in big_requests()]
    assert ranges == ([f"{3 * BS}-{4 * BS - 1}"] if server_range else [None]), ranges


# ----------------------------------------------------- 2. concurrent readers
@pytest.mark.parametrize("server_range", [False, True], ids=["norange", "range"])
def test_concurrent_readers_download_each_byte_once(server: TestServer, mount_factory,
                                                    server_range: bool) -> None:
    server.set_knobs(range=server_range)
    mount = mount_factory(server, "--range", "on" if server_range else "off")
    path = mount.path / FILES / "big.bin"
    os.stat(path)
    readers = 6
    barrier = threading.Barrier(readers)
    chunks = [65_536, 1 << 20, 300_001, 3 * 4096, 2 << 20, 131_072]
    mark = server.log_mark()

    def read(k: int) -> list[int]:
        """Read the whole file from a different start, wrapping around; bad offsets."""
        start = (k * BIG_SIZE // readers) // 4096 * 4096
        bad = []
        fd = os.open(path, os.O_RDONLY)
        try:
            barrier.wait(timeout=30)
            for lo, hi in ((start, BIG_SIZE), (0, start)):
                for offset in range(lo, hi, chunks[k]):
                    length = min(chunks[k], hi - offset)
                    if os.pread(fd, length, offset) != BIG[offset:offset + length]:
                        bad.append(offset)
        finally:
            os.close(fd)
        return bad

    with ThreadPoolExecutor(readers) as pool:
        results = list(pool.map(read, range(readers)))
    assert results == [[]] * readers
    downloads = data_requests(server, mark)
    assert all(e["status"] in (200, 206) for e in downloads), downloads  # none cut short
    total = sum(e["bytes"] for e in downloads)
    assert total <= 1.2 * BIG_SIZE, f"{total / BIG_SIZE:.2f} x the file was downloaded"


# ----------------------------------------------- 3. header of a slow big file
def test_header_read_does_not_wait_for_the_whole_file(server: TestServer,
                                                      mount_factory) -> None:
    server.set_knobs(range=False)
    mount = mount_factory(server)  # --range auto: the probe finds no Range support
    path = mount.path / FILES / "big.bin"
    os.stat(path)
    server.set_knobs(bandwidth_mb_s=1.0)  # the whole file would take over 20 s
    mark = server.log_mark()
    started = time.monotonic()
    with open(path, "rb") as f:
        header = f.read(4096)
    elapsed = time.monotonic() - started
    assert header == BIG[:4096]
    assert elapsed < 8, f"a 4 KiB read took {elapsed:.1f} s"
    finished = [e for e in data_requests(server, mark) if e["bytes"] >= BIG_SIZE]
    assert finished == [], "the read waited for the whole download"


def test_a_read_far_into_a_file_waits_while_its_download_moves(server: TestServer,
                                                                 mount_factory) -> None:
    """Without Range, the tail of a cold file comes after all the bytes before it:
    the read waits as long as they keep coming, not ``4 × --timeout`` in all;
    once nothing arrives for that long, it fails."""
    server.set_knobs(range=False)
    mount = mount_factory(server, "--timeout", "0.5")  # a read gives up after 2 s still
    path = mount.path / FILES / "big.bin"
    os.stat(path)
    server.set_knobs(bandwidth_mb_s=5.0)  # the stream takes about 4 s to reach the end
    started = time.monotonic()
    with open(path, "rb") as f:
        f.seek(BIG_SIZE - 4096)
        tail = f.read(4096)
    assert tail == BIG[-4096:]
    assert time.monotonic() - started > 2  # longer than any one wait was allowed


def test_header_reads_of_many_big_files_do_not_wait_for_each_other(fresh_server: TestServer,
                                                                   mount_factory) -> None:
    """Each header read starts a whole-file download (no Range); more files than
    parallel downloads must not make the later reads wait for the earlier files."""
    tail = random.Random(4).randbytes(3 * BS)
    files = {f"big{i}.bin": f"header {i}".encode().ljust(4096, b".") + tail for i in range(10)}
    put_files(fresh_server, files)
    mount = mount_factory(fresh_server, "--range", "off")
    for name in files:
        os.stat(mount.path / FILES / name)
    fresh_server.set_knobs(bandwidth_mb_s=0.5)  # each file would take 25 s
    for name, data in files.items():
        started = time.monotonic()
        with open(mount.path / FILES / name, "rb") as f:
            assert f.read(4096) == data[:4096]
        elapsed = time.monotonic() - started
        assert elapsed < 8, f"the header of {name} took {elapsed:.1f} s"
    fresh_server.set_knobs(bandwidth_mb_s=0)


# --------------------------------------------- 4. re-read from the cache only
@pytest.mark.parametrize("server_range", [True, False], ids=["range", "norange"])
def test_reread_after_page_cache_drop_and_remount_needs_no_data_requests(
        server: TestServer, mount_factory, server_range: bool) -> None:
    server.set_knobs(range=server_range)
    mount = mount_factory(server, "--range", "auto")
    names = ["big.bin", "volume.nii", "small.txt"]
    expected = {name: fetch(server, name) for name in names}
    for name in names:
        assert read_all(mount.path / FILES / name) == expected[name]

    drop_page_cache()
    mark = server.log_mark()
    for name in names:
        assert read_all(mount.path / FILES / name) == expected[name]
    assert data_requests(server, mark) == []

    mount.remount()
    mark = server.log_mark()
    for name in names:
        assert read_all(mount.path / FILES / name) == expected[name]
    assert data_requests(server, mark) == []


# ------------------------------------------------- 5. changed on the server
@pytest.mark.parametrize("new_size", ["same", "bigger", "smaller"])
def test_changed_file_is_read_anew_after_the_metadata_ttl(fresh_server: TestServer,
                                                          mount_factory, new_size: str) -> None:
    old = random.Random(1).randbytes(BS + 5000)
    new = {"same": random.Random(2).randbytes(len(old)),
           "bigger": random.Random(2).randbytes(2 * BS + 1),
           "smaller": random.Random(2).randbytes(1000)}[new_size]
    put_files(fresh_server, {"changing.bin": old})
    mount = mount_factory(fresh_server, "--metadata-ttl", "1")
    path = mount.path / FILES / "changing.bin"
    assert read_all(path) == old
    with open(path, "rb") as kept:  # an open file keeps its pages, as a reader would
        assert kept.read(100) == old[:100]
        put_files(fresh_server, {"changing.bin": new})
        assert fetch(fresh_server, "changing.bin") == new
        def sees_new() -> bool:
            data = read_all(path)
            assert data in (old, new), "a mix of the old and new file"
            return data == new

        wait_for(sees_new, 20, "the new contents")
    for _ in range(3):
        assert read_all(path) == new
    assert os.stat(path).st_size == len(new)


def test_a_handle_opened_before_a_change_reads_as_stale(fresh_server: TestServer,
                                                        mount_factory) -> None:
    """Once the mount has seen a file's new version (it was opened again), a
    handle opened on the old one gets ESTALE for what it has not read yet,
    rather than the new version's bytes after the old one's; the new handle
    reads the new bytes."""
    old = random.Random(21).randbytes(BS + 5000)
    new = random.Random(22).randbytes(2 * BS + 1)
    put_files(fresh_server, {"changing.bin": old})
    mount = mount_factory(fresh_server, "--metadata-ttl", "1")
    path = mount.path / FILES / "changing.bin"
    kept = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(kept, 100, 0) == old[:100]
        put_files(fresh_server, {"changing.bin": new})
        wait_for(lambda: os.stat(path).st_size == len(new), 20, "the new size")
        fresh = os.open(path, os.O_RDONLY)  # the mount now serves the new version
        try:
            with pytest.raises(OSError) as info:
                os.pread(kept, 4096, BS)
            assert info.value.errno == errno.ESTALE
            assert os.pread(fresh, len(new), 0) == new[:len(new)]
        finally:
            os.close(fresh)
    finally:
        os.close(kept)


def test_a_file_replaced_while_open_is_never_served_spliced(fresh_server: TestServer,
                                                            mount_factory) -> None:
    """A file replaced on the server (same size, listing not yet refreshed) while
    a reader holds it open: a later read of bytes not fetched yet fails with
    ESTALE, rather than returning the new version's bytes after the old one's.
    (A whole-file reader is caught by the digest check; this one reads in part.)"""
    old = random.Random(11).randbytes(BIG_SIZE)
    new = random.Random(12).randbytes(BIG_SIZE)
    put_files(fresh_server, {"replaced.bin": old})
    store = Store(fresh_server.data_dir)  # XNAT's Last-Modified has 1 s steps: an older file
    try:
        store.execute("UPDATE files SET mtime = mtime - 3600 WHERE path = 'replaced.bin'")
    finally:
        store.close()
    fresh_server.set_knobs(range=True)
    mount = mount_factory(fresh_server, "--range", "auto")
    path = mount.path / FILES / "replaced.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == old[:4096]
        put_files(fresh_server, {"replaced.bin": new})
        with pytest.raises(OSError) as info:
            os.pread(fd, 4096, BIG_SIZE - 4096)
        assert info.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    # Nor is the old version served again from what was cached of it: a new
    # reader gets the new bytes, which fail the (old) listed digest until the
    # listing is refreshed.
    with pytest.raises(OSError) as info:
        read_all(path)
    assert info.value.errno == errno.ESTALE


def test_a_file_deleted_while_open_reads_as_stale(fresh_server: TestServer,
                                                  mount_factory) -> None:
    """ESTALE, as NFS says it, rather than ENOENT, which read(2) never returns."""
    data = random.Random(13).randbytes(BIG_SIZE)
    put_files(fresh_server, {"deleted.bin": data})
    fresh_server.set_knobs(range=True)
    mount = mount_factory(fresh_server, "--range", "auto")
    fd = os.open(mount.path / FILES / "deleted.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data[:4096]
        with http(fresh_server) as c:
            assert c.delete("/data/projects/P/subjects/S/experiments/E/resources/R/files/"
                            "deleted.bin").status_code == 200
        with pytest.raises(OSError) as info:
            os.pread(fd, 4096, BIG_SIZE - 4096)
        assert info.value.errno == errno.ESTALE
    finally:
        os.close(fd)


# ---------------------------------------------- 6. session expiry mid-walk
def test_walk_completes_across_expired_sessions(demo_server: TestServer,
                                                mount_factory) -> None:
    mount = mount_factory(demo_server, name="expiring")
    mark = demo_server.log_mark()
    walked = []
    for step, (dirpath, dirnames, filenames) in enumerate(os.walk(mount.path / "NEURO_PUB")):
        if step % 2 == 0:
            demo_server.expire_sessions()
        walked.append((os.path.relpath(dirpath, mount.path), sorted(dirnames),
                       sorted(filenames)))
    demo_server.expire_sessions()
    notes = mount.path / "NEURO_PUB/NP001/NP001_MR1/resources/NOTES/files/scan notes.txt"
    assert read_all(notes)
    logins = [e for e in demo_server.requests_since(mark)
              if e["route"] == "jsession" and e["method"] == "POST"]
    assert len(logins) >= 2  # the walk really ran into expired sessions

    reference = mount_factory(demo_server, name="reference")
    expected = [(os.path.relpath(d, reference.path), sorted(ds), sorted(fs))
                for d, ds, fs in os.walk(reference.path / "NEURO_PUB")]
    assert walked == expected
    assert sum(len(fs) for _, _, fs in walked) > 20


def test_concurrent_walks_survive_one_expiry(demo_server: TestServer, mount_factory) -> None:
    """Every session entered at once, just after the server forgot our session:
    the requests all get 401, one of them logs in again, all are retried."""
    mount = mount_factory(demo_server, name="expiring-together")
    sessions = sorted(p for p in (mount.path / "NEURO_PUB").glob("*/*") if p.is_dir())
    assert len(sessions) >= 3

    def walk(root: Path) -> list[tuple[str, list[str], list[str]]]:
        return [(os.path.relpath(d, root), sorted(ds), sorted(fs)) for d, ds, fs in os.walk(root)]

    mark = demo_server.log_mark()
    demo_server.expire_sessions()
    with ThreadPoolExecutor(len(sessions)) as pool:
        walked = list(pool.map(walk, sessions))
    logins = [e for e in demo_server.requests_since(mark)
              if e["route"] == "jsession" and e["method"] == "POST"]
    assert len(logins) == 1
    reference = mount_factory(demo_server, name="reference-together")
    assert walked == [walk(reference.path / s.relative_to(mount.path)) for s in sessions]


# ----------------------------------------------- 7. nibabel and pydicom
def test_nibabel_mmap_loads_a_mounted_nifti(server: TestServer, mount_factory,
                                            tmp_path: Path) -> None:
    mount = mount_factory(server)
    local = tmp_path / "volume.nii"
    local.write_bytes(fetch(server, "volume.nii"))
    assert local.stat().st_size > 2 * BS
    mounted = nibabel.load(mount.path / FILES / "volume.nii", mmap=True)
    reference = nibabel.load(local, mmap=False)
    assert isinstance(mounted.dataobj.get_unscaled(), np.memmap)  # really mapped
    assert mounted.shape == reference.shape
    assert np.array_equal(mounted.affine, reference.affine)
    assert np.array_equal(mounted.get_fdata(), reference.get_fdata())
    assert np.array_equal(mounted.dataobj[10:20, :, 5, 3], reference.dataobj[10:20, :, 5, 3])


def test_nibabel_loads_a_compressed_sample(demo_server: TestServer, mount_factory,
                                           tmp_path: Path) -> None:
    mount = mount_factory(demo_server)
    with http(demo_server) as c:
        rows = c.get("/data/projects/SAMPLES/experiments/nibabel_1234_MR/resources/NIFTI/files"
                     ).json()["ResultSet"]["Result"]
        uri = next(r["URI"] for r in rows if r["Name"] == "example4d.nii.gz")
        (tmp_path / "example4d.nii.gz").write_bytes(c.get(uri).content)
    mounted = nibabel.load(next((mount.path / "SAMPLES").glob(
        "*/nibabel_1234_MR/resources/NIFTI/files/example4d.nii.gz")))
    reference = nibabel.load(tmp_path / "example4d.nii.gz")
    assert np.array_equal(mounted.get_fdata(), reference.get_fdata())


def test_pydicom_reads_a_mounted_series(demo_server: TestServer, mount_factory,
                                        tmp_path: Path) -> None:
    mount = mount_factory(demo_server)
    series = mount.path / "NEURO_PUB/NP002/NP002_MR1/scans/2-T1_MPRAGE_2/resources/DICOM/files"
    base = "/data/projects/NEURO_PUB/experiments/NP002_MR1/scans/2/resources/DICOM/files"
    with http(demo_server) as c:
        rows = c.get(base).json()["ResultSet"]["Result"]
        assert len(rows) > 5
        for row in rows:
            (tmp_path / row["Name"]).write_bytes(c.get(row["URI"]).content)
    names = sorted(os.listdir(series))
    assert names == sorted(row["Name"] for row in rows)
    for name in names:
        mounted = pydicom.dcmread(series / name)
        reference = pydicom.dcmread(tmp_path / name)
        assert mounted == reference, name
        assert mounted.PixelData == reference.PixelData
        assert np.array_equal(mounted.pixel_array, reference.pixel_array)


def test_opening_a_file_of_a_series_fetches_the_next_ones_after_it(
        demo_server: TestServer, mount_factory) -> None:
    """The next files of a DICOM folder are fetched ahead, but asked for only
    once the opened file's first bytes are in (the server serves it first)."""
    mount = mount_factory(demo_server, name="series-ahead")
    series = mount.path / "NEURO_PUB/NP002/NP002_MR1/scans/2-T1_MPRAGE_2/resources/DICOM/files"
    names = sorted(os.listdir(series))[:1 + SERIES_READ_AHEAD]  # the opened one, the next ones
    assert len(names) >= 4
    latency = 0.2
    demo_server.set_knobs(latency_ms=latency * 1000)
    try:
        mark = demo_server.log_mark()
        read_all(series / names[0])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            downloads = [e for e in demo_server.requests_since(mark)
                         if e["route"].startswith("files.download")]
            if {e["path"].rsplit("/", 1)[-1] for e in downloads} >= set(names):
                break
            time.sleep(0.05)
    finally:
        demo_server.set_knobs(latency_ms=0.0)
    started = {e["path"].rsplit("/", 1)[-1]: e["t"] - e["ms"] / 1000 for e in downloads}
    assert set(started) == set(names)  # every file fetched once, only the first opened
    assert len(downloads) == len(names)
    assert min(started[n] for n in names[1:]) - started[names[0]] >= 0.9 * latency
    mark = demo_server.log_mark()
    for name in names[1:]:
        read_all(series / name)
    assert not [e for e in demo_server.requests_since(mark)  # (files further on may be)
                if e["route"].startswith("files.download") and e["path"].endswith(tuple(names))]


# ----------------------------------------------------- 8. digest mismatch
@pytest.mark.parametrize("server_range", [False, True], ids=["norange", "range"])
def test_corrupt_blob_fails_the_read_and_is_not_cached(fresh_server: TestServer, mount_factory,
                                                       server_range: bool) -> None:
    size = 2 * BS + 999
    # Bad bytes in the first, a middle and the last block.
    bad_at = {"first.bin": 10, "middle.bin": BS + 10, "last.bin": size - 500}
    good = {name: random.Random(name).randbytes(size) for name in bad_at}
    put_files(fresh_server, good)
    fresh_server.set_knobs(range=server_range)
    for name, offset in bad_at.items():
        garbage = bytearray(good[name])
        garbage[offset:offset + 400] = bytes(400)  # same size, wrong digest
        blob_of(fresh_server, name).write_bytes(garbage)
    mount = mount_factory(fresh_server, "--range", "auto")
    for name in bad_at:
        with pytest.raises(OSError) as info:
            read_all(mount.path / FILES / name)
        assert info.value.errno in (errno.EIO, errno.ESTALE), name

    for name in bad_at:  # repaired on the server: the next read gets good bytes
        blob_of(fresh_server, name).write_bytes(good[name])
        assert read_all(mount.path / FILES / name) == good[name], name
    drop_page_cache()
    for name in bad_at:
        assert read_all(mount.path / FILES / name) == good[name], name


# ------------------------------------------------------- 9. server down
@pytest.mark.parametrize("fault", ["hang", "fail"])
def test_server_down_fails_within_a_bound_and_recovers(fresh_server: TestServer, mount_factory,
                                                       fault: str) -> None:
    payload = random.Random(9).randbytes(BS + 1)
    put_files(fresh_server, {"warm.bin": payload})
    put_files(fresh_server, {"cold.bin": payload}, experiment="E2")
    mount = mount_factory(fresh_server, "--timeout", "2")
    warm = mount.path / FILES / "warm.bin"
    cold_dir = mount.path / "P/S/E2/resources/R/files"
    assert os.stat(warm).st_size == len(payload)  # listings cached, contents not
    assert os.listdir(mount.path / "P/S") == ["subject.xml", "resources", "E", "E2"]

    fresh_server.set_knobs(**({"hang": True} if fault == "hang" else {"fail_rate": 1.0}))

    def timed(call: Callable[[], Any]) -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            call()
        except OSError as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    with ThreadPoolExecutor(2) as pool:
        reading = pool.submit(timed, lambda: read_all(warm))
        listing = pool.submit(timed, lambda: os.listdir(cold_dir))
        for what, future in (("read", reading), ("listing", listing)):
            elapsed, error = future.result(timeout=120)
            assert isinstance(error, OSError), f"the {what} succeeded with the server down"
            assert error.errno in (errno.EIO, errno.ETIMEDOUT), (what, error)
            assert elapsed < 60, f"the {what} took {elapsed:.0f} s to fail"

    fresh_server.set_knobs(hang=False, fail_rate=0.0)
    assert read_all(warm) == payload
    assert os.listdir(cold_dir) == ["cold.bin"]
    assert read_all(cold_dir / "cold.bin") == payload


def test_a_hung_server_fails_fast_after_the_first_failure(fresh_server: TestServer,
                                                          mount_factory) -> None:  # noqa: ANN001
    """Once an operation has given up on a hung server (it counts as down), the
    next uncached ones fail within a second each: a listing, and a read (which
    the kernel asks twice). Each waited a whole request timeout before, 2 s
    here. The first operation after the server is back succeeds at once."""
    sessions = ("E", "E2", "E3", "E4", "E5")
    for experiment in sessions:
        put_files(fresh_server, {"a.bin": b"a"}, experiment=experiment)
    mount = mount_factory(fresh_server, "--timeout", "2")
    root = mount.path / "P/S"
    assert sorted(os.listdir(root)) == sorted(("subject.xml", "resources", *sessions))
    files = {e: root / e / "resources/R/files" for e in sessions}
    assert os.listdir(files["E5"]) == ["a.bin"]  # its listing cached, its bytes not

    def failing(call: Callable[[], Any]) -> float:
        started = time.monotonic()
        with pytest.raises(OSError):
            call()
        return time.monotonic() - started

    fresh_server.set_knobs(hang=True)
    try:
        first = failing(lambda: os.listdir(files["E2"]))  # gives the server up
        listing = failing(lambda: os.listdir(files["E3"]))
        reading = failing(lambda: read_all(files["E5"] / "a.bin"))
    finally:
        fresh_server.set_knobs(hang=False)
    back = time.monotonic()
    assert os.listdir(files["E4"]) == ["a.bin"]
    recovered = time.monotonic() - back
    assert listing < 1.7 and reading < 1.7, (first, listing, reading)
    assert recovered < 1.0, recovered
    assert "seems down" in (mount.cache_dir.parent / "mount.log").read_text()


def test_hostile_and_overlong_labels_become_safe_names(fresh_server: TestServer,
                                                      mount_factory, tmp_path: Path) -> None:
    """Labels come from the server: a newline or an escape sequence is shown
    percent-encoded (not as two lines of ``ls``, nor a colour change), and a
    label longer than a file name may be is cut short with a hash, so the
    subject can still be listed, entered and copied."""
    put_files(fresh_server, {"a.bin": b"a"})
    long_label = "L" * 300
    with http(fresh_server) as c:
        for number, label in enumerate(("evil\nWARNING forged", "\x1b[31mred", long_label)):
            r = c.put(f"/data/projects/P/subjects/ODD{number}", params={"label": label})
            assert r.status_code in (200, 201), r.text
    mount = mount_factory(fresh_server)
    names = os.listdir(mount.path / "P")
    assert "evil%0AWARNING forged" in names and "%1B[31mred" in names
    [long_name] = [n for n in names if n.startswith("LLL")]
    assert len(long_name.encode()) <= 255 and "%~" in long_name
    assert os.path.isdir(mount.path / "P" / long_name)
    assert all("\n" not in n and "\x1b" not in n for n in names)
    subprocess.run(["cp", "-r", str(mount.path / "P"), str(tmp_path / "copy")], check=True)
    assert sorted(os.listdir(tmp_path / "copy")) == sorted(names)


def test_a_name_listed_twice_reaches_both(fresh_server: TestServer, mount_factory) -> None:
    """A file ``x`` beside a folder ``x/`` (or two subjects with one label): the
    second gets a suffix, or only the first could ever be opened."""
    put_files(fresh_server, {"x": b"file", "x/y": b"inside"})
    mount = mount_factory(fresh_server)
    files = mount.path / FILES
    names = sorted(os.listdir(files))
    assert len(names) == 2 and names[0] == "x" and names[1].startswith("x%~")
    for _ in range(2):  # the same names every time it is listed
        assert sorted(os.listdir(files)) == names
    [folder] = [files / n for n in names if (files / n).is_dir()]
    [plain] = [files / n for n in names if (files / n).is_file()]
    assert read_all(plain) == b"file"
    assert read_all(folder / "y") == b"inside"


def test_a_folder_changing_during_a_listing_skips_and_repeats_nothing(
        fresh_server: TestServer, mount_factory) -> None:
    """A big folder is read in several readdir calls, each resuming at an offset.
    Files deleted on the server half-way, with the listing refreshed before the
    next call, must not shift the others: each file is listed once."""
    names = [f"f{i:04d}.bin" for i in range(2000)]
    put_files_in_one_zip(fresh_server, {name: b"x" for name in names})
    mount = mount_factory(fresh_server, "--metadata-ttl", "1")
    folder = mount.path / FILES
    seen = []
    with os.scandir(folder) as entries:
        for entry in entries:
            seen.append(entry.name)
            if len(seen) == 1000:  # well past the first readdir call's entries
                with http(fresh_server) as c:
                    for name in names[:3]:
                        r = c.delete(f"/data/projects/P/subjects/S/experiments/E"
                                     f"/resources/R/files/{name}")
                        assert r.status_code == 200, r.text
                # Another pass shows the deletions once the listing's 1 s is up.
                give_up = time.monotonic() + 30
                while names[0] in os.listdir(folder):
                    assert time.monotonic() < give_up, "the deletions never showed"
    assert sorted(seen) == names  # the pass began before the deletions


def test_an_operation_that_times_out_leaves_the_others_waiting_for_its_listing_alive(
        fresh_server: TestServer, mount_factory) -> None:
    """Two folders of one session wait for the same hung listing. The first
    `ls` fails; the second must get its own answer (the listing's failure, or
    its own timeout) rather than the first one's cancellation, which ended the
    whole mount, and the mount must work once the server answers again."""
    put_files(fresh_server, {"a.bin": b"a"})
    mount = mount_factory(fresh_server, "--timeout", "1")  # operations give up after 4 s
    session = mount.path / "P/S/E"
    assert os.listdir(mount.path / "P/S") == ["subject.xml", "resources", "E"]
    fresh_server.set_knobs(hang=True)

    def list_dir(path: Path) -> BaseException | list[str]:
        try:
            return os.listdir(path)
        except OSError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(list_dir, session / "resources")
        time.sleep(1)  # the second one's own deadline comes a second after the first one's
        second = pool.submit(list_dir, session / "scans")
        results = [first.result(timeout=60), second.result(timeout=60)]
    for result in results:
        assert isinstance(result, OSError), result
        assert result.errno in (errno.ETIMEDOUT, errno.EIO), result

    fresh_server.set_knobs(hang=False)
    assert os.path.ismount(mount.path)
    assert os.listdir(session / "resources") == ["R"]
    assert os.listdir(session / "resources/R/files") == ["a.bin"]


# ------------------------------------------------------------- 10. mmap
def test_mmap_of_a_mounted_file(server: TestServer, mount_factory) -> None:
    mount = mount_factory(server)
    path = mount.path / FILES / "big.bin"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert len(mapped) == BIG_SIZE
        assert mapped[BIG_SIZE - 5:] == BIG[-5:]
        assert mapped[BS - 3:BS + 3] == BIG[BS - 3:BS + 3]
        assert hashlib.sha256(mapped).digest() == hashlib.sha256(BIG).digest()
