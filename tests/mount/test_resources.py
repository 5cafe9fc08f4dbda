"""Results written back into XNAT's resources through a real mount, checked over HTTP.

What a pipeline does at the end of a run: ``dcm2niix`` into a new NIFTI
resource of the scan it converted, nibabel saving a derived volume, ``cp -r``
or ``rsync`` of an output tree, tempfile + ``os.replace``. Every check reads
what XNAT has over HTTP (listing digests, or the bytes themselves), not only
through the mount; what is refused (overwrite, delete, a reader's write, a
killed writer) leaves XNAT's files, the scanner's DICOM above all, as they
were.

The tests share one demo server (started on a copy of the data set, built
once for the run: conftest's ``demo_data``): each writes only into resources of labels of its own,
and its mounts have ended, sending all they queued, before the next test
starts. The few that change the demo's own files (NOTES) get a server of
their own, on another copy (a copy starts in about a second; building takes
five).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from xnatfs.testing.harness import TestServer, pids_with_cmdline

from .conftest import (ADMIN, Mount, daemon_pid, drop_kernel_entries, mount_xnatfs,
                       peak_in_flight, unmount_and_wait, wait_for)
from .test_cli import wait_for_unmount

SESSION = Path("NEURO_PUB/NP001/NP001_MR1")      # the mount's path of the demo session
SESSION_URI = "/data/projects/NEURO_PUB/subjects/NP001/experiments/NP001_MR1"
NOTES_URI = f"{SESSION_URI}/resources/NOTES"     # notes.txt, "scan notes.txt"


# ------------------------------------------------------------------ servers
@pytest.fixture(scope="module")
def server(demo_copy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:  # noqa: ANN001
    """The demo server the module's tests share: each writes into resources of
    labels of its own, and changes no file the demo data set came with."""
    data = demo_copy(tmp_path_factory.mktemp("resources-shared") / "data")
    with TestServer(data, dataset="demo") as srv:
        yield srv


@pytest.fixture
def own_server(started_demo_server: TestServer) -> TestServer:
    """A demo server of the test's own, for a test that changes the demo's files."""
    return started_demo_server


@pytest.fixture
def mount_factory(mount_factory):  # noqa: ANN001, ANN201
    """The mounts of :func:`conftest.mount_factory`; after the test, each one
    still mounted is unmounted and its process waited for: whatever it still
    had queued has been sent before the next test meets the shared server."""
    made: list[Mount] = []

    def factory(*args, **kwargs) -> Mount:  # noqa: ANN002, ANN003
        made.append(mount_factory(*args, **kwargs))
        return made[-1]

    yield factory
    for mount in made:
        if pids_with_cmdline("--foreground", str(mount.path.resolve())):
            unmount_and_wait(mount.path)


# --------------------------------------------------------- what XNAT has
def http(server: TestServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, auth=ADMIN, timeout=60)


def listed(server: TestServer, resource_uri: str) -> dict[str, tuple[str, int]]:
    """XNAT's listing of a resource: path → (MD5, size); {} if there is no such resource."""
    with http(server) as c:
        answer = c.get(f"{resource_uri}/files", params={"format": "json"})
    if answer.status_code == 404:
        return {}
    answer.raise_for_status()
    rows = answer.json()["ResultSet"]["Result"]
    paths = [r["URI"].split("/files/", 1)[1] for r in rows]
    assert len(paths) == len(set(paths)), f"a path listed twice: {sorted(paths)}"
    return {p: (r["digest"], int(r["Size"])) for p, r in zip(paths, rows)}


def fetched(server: TestServer, resource_uri: str) -> dict[str, bytes]:
    """Every file of a resource, downloaded: path → bytes."""
    with http(server) as c:
        return {path: c.get(f"{resource_uri}/files/{quote(path)}").content
                for path in listed(server, resource_uri)}


def resource_labels(server: TestServer, owner_uri: str) -> set[str]:
    with http(server) as c:
        rows = c.get(f"{owner_uri}/resources", params={"format": "json"}).json()
    return {r["label"] for r in rows["ResultSet"]["Result"]}


def scanner_dicom(server: TestServer, session_uri: str = SESSION_URI) -> dict[str, str]:
    """MD5 of the downloaded bytes of every file of the session's DICOM resources."""
    out = {}
    with http(server) as c:
        for scan in c.get(f"{session_uri}/scans").json()["ResultSet"]["Result"]:
            uri = f"{session_uri}/scans/{scan['ID']}/resources/DICOM"
            for path in listed(server, uri):
                out[f"{scan['ID']}/{path}"] = hashlib.md5(
                    c.get(f"{uri}/files/{quote(path)}").content).hexdigest()
    assert out
    return out


def digests(root: Path) -> dict[str, tuple[str, int]]:
    """A local tree as a listing: relative path → (MD5, size)."""
    return {str(p.relative_to(root)): (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


def writes_since(server: TestServer, mark: int, fragment: str = "/resources/") -> list[dict]:
    """The file and resource writes (PUT, POST, DELETE) the server answered."""
    return [e for e in server.requests_since(mark)
            if e["method"] in ("PUT", "POST", "DELETE") and fragment in e["path"]]


def mount_log(mount: Mount) -> str:
    return (mount.cache_dir.parent / "mount.log").read_text()


def uploads_cli(mount: Mount, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", *args,
                           "--cache-dir", str(mount.cache_dir)], env=mount.env,
                          capture_output=True, text=True, timeout=120)


def fsync_folder(path: Path) -> None:
    """fsync of a folder: returns once every write-behind file is in XNAT (or failed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def freesurfer_like(subject: str = "sub-01") -> dict[str, bytes]:
    """A recon-all output tree, 302 small files in nested folders; each file's
    bytes are a pure function of its path."""
    names: list[str] = []
    for hemi in ("lh", "rh"):
        names += [f"surf/{hemi}.{s}" for s in (
            "white", "pial", "inflated", "sphere", "sphere.reg", "smoothwm", "orig", "curv",
            "sulc", "thickness", "area", "volume", "jacobian_white")]
        names += [f"label/{hemi}.ctx_{n:02d}.label" for n in range(50)]
        for atlas in ("aparc", "aparc.a2009s", "aparc.DKTatlas", "BA_exvivo"):
            names += [f"stats/{hemi}.{atlas}.stats", f"label/{hemi}.{atlas}.annot"]
    names += [f"mri/{v}.mgz" for v in ("orig", "T1", "brainmask", "aseg", "aparc+aseg", "wm",
                                      "norm", "nu", "brain", "filled")]
    names += [f"mri/orig/{n:03d}.mgz" for n in range(1, 4)]
    names += [f"mri/transforms/bak/talairach.auto.xfm.{n:02d}" for n in range(60)]
    names += ["mri/transforms/talairach.xfm", "stats/aseg.stats", "stats/wmparc.stats",
              "scripts/recon-all.log", "scripts/recon-all.done", "scripts/recon-all-status.log",
              "scripts/build-stamp.txt"]
    names += [f"touch/step{n:02d}.touch" for n in range(80)]
    files = {}
    for rel in names:
        seed = hashlib.sha256(rel.encode()).digest()
        size = (40_000 if rel.endswith(".mgz") else 64) + int.from_bytes(seed[:2], "big") % 6000
        files[f"{subject}/{rel}"] = (seed * (size // len(seed) + 1))[:size]
    assert len(files) == 302
    return files


# ----------------------------------------------------------- 1. dcm2niix
def dcm2niix() -> str | None:
    beside = Path(sys.executable).with_name("dcm2niix")  # the PyPI wheel's, in this venv
    return str(beside) if beside.exists() else shutil.which("dcm2niix")


@pytest.mark.skipif(dcm2niix() is None, reason="dcm2niix is not installed (pip install dcm2niix)")
def test_dcm2niix_converts_a_mounted_scan_into_a_new_nifti_resource(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """The conversion a pipeline runs on the mount: reads the scan's DICOM,
    writes the NIfTI and its JSON sidecar into a new NIFTI resource of the same
    scan; xnatpy then finds exactly the files a local conversion of the same
    DICOM makes, byte for byte (the same binary and options: deterministic)."""
    import xnat

    mount = mount_factory(server)
    scan = mount.path / SESSION / "scans" / "3-T2_FLAIR"
    dicom_before = scanner_dicom(server)
    out = scan / "resources" / "NIFTI" / "files"
    subprocess.run(["mkdir", "-p", str(out)], check=True)
    options = ["-z", "y", "-f", "%p_%s"]
    converted = subprocess.run([dcm2niix(), *options, "-o", str(out),
                                str(scan / "resources" / "DICOM" / "files")],
                               capture_output=True, text=True, timeout=120)
    assert converted.returncode == 0, converted.stdout + converted.stderr
    # The same conversion of the same DICOM, on local disk.
    local_dicom, local_out = tmp_path / "dicom", tmp_path / "local"
    local_out.mkdir()
    shutil.copytree(scan / "resources" / "DICOM" / "files", local_dicom)
    subprocess.run([dcm2niix(), *options, "-o", str(local_out), str(local_dicom)],
                   check=True, capture_output=True, timeout=120)
    expected = {p.name: p.read_bytes() for p in local_out.iterdir()}
    assert sorted(expected) == ["t2_space_dark-fluid_sag_3.json",
                                "t2_space_dark-fluid_sag_3.nii.gz"]
    sidecar = json.loads(expected["t2_space_dark-fluid_sag_3.json"])
    assert sidecar["ConversionSoftware"] == "dcm2niix" and sidecar["SeriesNumber"] == 3
    # xnatpy lists the new resource and downloads what the mount sent.
    with xnat.connect(server.url, user="admin", password="admin",
                      extension_types=False) as session:
        experiment = session.projects["NEURO_PUB"].experiments["NP001_MR1"]
        resource = experiment.scans["3"].resources["NIFTI"]
        assert sorted(resource.files.keys()) == sorted(expected)
        for name, remote in resource.files.items():
            target = tmp_path / "xnatpy" / name
            target.parent.mkdir(exist_ok=True)
            remote.download(str(target))  # xnatpy checks the listed digest too
            assert target.read_bytes() == expected[name], name
    assert sorted(os.listdir(out)) == sorted(expected)
    assert scanner_dicom(server) == dicom_before
    assert " ERROR " not in mount_log(mount)


# ------------------------------------------------------------ 2. nibabel
def test_nibabel_saves_a_derived_volume_read_back_after_a_remount(
        server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """nibabel saves a mask derived from the session's T1 into a new session
    resource, through a --write-behind mount unmounted right after: the unmount
    finishes the sending; a fresh mount reads the same array back."""
    import gzip

    import nibabel as nib

    mount = mount_factory(server, "--write-behind")
    source = mount.path / SESSION / "scans" / "2-T1_MPRAGE_2" / "resources" / "NIFTI" / "files"
    [t1_name] = [n for n in os.listdir(source) if n.endswith(".nii.gz")]
    t1 = nib.load(source / t1_name)
    data = np.asarray(t1.dataobj)
    mask = (data > data.mean()).astype(np.uint8)  # a derived volume: a brain mask
    assert 0 < mask.sum() < mask.size
    resource = mount.path / SESSION / "resources" / "DERIVED"
    resource.mkdir()
    server.set_knobs(answer_delay_ms=1000, fault_path="/resources/DERIVED/files/")
    try:
        nib.save(nib.Nifti1Image(mask, t1.affine), resource / "files" / "brainmask.nii.gz")
        mount.remount()  # returns once the old mount's process is gone
    finally:
        server.set_knobs(answer_delay_ms=0, fault_path="")
    assert "unmounted; finishing 1 write-behind uploads first" in mount_log(mount)
    # XNAT has what nibabel wrote: these bytes are a valid volume with the mask.
    sent = fetched(server, f"{SESSION_URI}/resources/DERIVED")
    assert list(sent) == ["brainmask.nii.gz"]
    from_xnat = nib.Nifti1Image.from_bytes(gzip.decompress(sent["brainmask.nii.gz"]))
    assert np.array_equal(np.asarray(from_xnat.dataobj), mask)
    # The fresh mount reads it from XNAT.
    again = nib.load(mount.path / SESSION / "resources" / "DERIVED" / "files"
                     / "brainmask.nii.gz")
    assert np.array_equal(np.asarray(again.dataobj), mask)
    assert np.allclose(again.affine, t1.affine)
    assert (mount.path / SESSION / "resources" / "DERIVED" / "files"
            / "brainmask.nii.gz").read_bytes() == sent["brainmask.nii.gz"]


# -------------------------------------------------------- 3. cp -r of a tree
@pytest.mark.parametrize("write_behind", [False, True], ids=["waiting", "write-behind"])
def test_cp_r_of_a_freesurfer_tree_one_writer_per_catalog(
        server: TestServer, mount_factory, tmp_path: Path,  # noqa: ANN001
        write_behind: bool) -> None:
    """302 files in nested folders, copied by three ``cp -r`` at once into one
    new resource: every file in XNAT with its digest, and never two requests
    writing that resource's catalog at once (the server fails the second with a
    500, as XNAT does). With write-behind, XNAT answers each upload slowly, so
    that files pile up behind it: they go as a few zips, not 302 requests."""
    tree = write_tree(tmp_path / "freesurfer", freesurfer_like())
    options = ["--write-behind"] if write_behind else []
    mount = mount_factory(server, *options)
    label = "FREESURFER_WB" if write_behind else "FREESURFER"  # a resource of its own
    resource = mount.path / SESSION / "resources" / label
    resource.mkdir()
    target = resource / "files" / "sub-01"
    target.mkdir()
    if write_behind:  # a slow answer (PUTs only: the listing is .../files, no slash)
        server.set_knobs(answer_delay_ms=300, fault_path=f"/resources/{label}/files/")
    mark = server.log_mark()
    groups = (["mri"], ["surf", "label"], ["stats", "scripts", "touch"])
    copies = [subprocess.Popen(["cp", "-r", *[str(tree / "sub-01" / d) for d in group],
                                str(target)], stderr=subprocess.PIPE, text=True)
              for group in groups]
    for copy in copies:
        _, stderr = copy.communicate(timeout=300)
        assert copy.returncode == 0, stderr
    fsync_folder(resource / "files")  # write-behind: waits for XNAT to have them all
    server.set_knobs(answer_delay_ms=0, fault_path="")
    assert listed(server, f"{SESSION_URI}/resources/{label}") == digests(tree)
    writes = writes_since(server, mark, f"/resources/{label}/files")
    assert writes and all(e["status"] == 200 for e in writes), \
        [(e["path"], e["status"]) for e in writes if e["status"] != 200]
    assert peak_in_flight(writes) == 1
    assert not [e for e in server.requests_since(mark) if e["status"] >= 500]
    if write_behind:
        assert len(writes) < 30, len(writes)  # batched
    log = mount_log(mount)
    assert " ERROR " not in log and " WARNING " not in log
    assert log.count("uploaded NEURO_PUB/") == 302


# -------------------------------------------- 4. temporaries renamed into place
def test_tempfile_replaced_into_place_leaves_only_the_final_name(
        server: TestServer, mount_factory) -> None:  # noqa: ANN001
    mount = mount_factory(server)
    resource = mount.path / SESSION / "resources" / "STATS"
    resource.mkdir()
    files = resource / "files"
    mark = server.log_mark()
    payload = json.dumps({"volume_mm3": 1234.5, "subject": "NP001"}).encode()
    with tempfile.NamedTemporaryFile(dir=files, delete=False) as tmp:
        tmp.write(payload)
    temporary = Path(tmp.name).name
    assert temporary.startswith("tmp")
    assert listed(server, f"{SESSION_URI}/resources/STATS") == {}  # kept local until renamed
    os.replace(tmp.name, files / "volumes.json")
    assert listed(server, f"{SESSION_URI}/resources/STATS") == {
        "volumes.json": (hashlib.md5(payload).hexdigest(), len(payload))}
    assert not [e for e in server.requests_since(mark) if temporary in e["path"]]
    assert os.listdir(files) == ["volumes.json"]
    assert (files / "volumes.json").read_bytes() == payload


def test_file_names_reach_xnat_as_written_and_stay_reachable(
        server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """Names with characters URLs treat specially reach XNAT as they are, and the
    file stays under its name once XNAT has it. ``%`` is how the mount escapes
    names (``%25`` is a ``%``, ``%2F`` a ``/`` in a label): ``50%25.txt`` is
    XNAT's ``50%.txt``; a name that is no such escape is refused (it came back
    from XNAT under another name: the file vanished once sent)."""
    mount = mount_factory(server)
    resource = mount.path / SESSION / "resources" / "NAMES"
    resource.mkdir()
    files = resource / "files"
    names = {"sp ace.txt": "sp ace.txt", "a#b.txt": "a#b.txt", "a?b.txt": "a?b.txt",
             "a+b.txt": "a+b.txt", "amp&er;x.txt": "amp&er;x.txt", "ü.txt": "ü.txt",
             "50%25.txt": "50%.txt", "dir 100%25/in.txt": "dir 100%/in.txt"}
    (files / "dir 100%25").mkdir()
    for name in names:
        (files / name).write_bytes(name.encode())
    assert fetched(server, f"{SESSION_URI}/resources/NAMES") == {
        xnat_name: name.encode() for name, xnat_name in names.items()}
    for name in names:  # XNAT's now, read from XNAT under the name it was written as
        assert (files / name).read_bytes() == name.encode(), name
    for bad in ("50%.txt", "a%2Fb.txt", "tab\tname.txt"):
        with pytest.raises(OSError) as refused:
            (files / bad).write_bytes(b"x")
        assert refused.value.errno == errno.EINVAL, bad
    with pytest.raises(OSError) as refused:
        (files / "100%").mkdir()
    assert refused.value.errno == errno.EINVAL
    assert len(listed(server, f"{SESSION_URI}/resources/NAMES")) == len(names)


def test_an_empty_file_reaches_xnat(server: TestServer, mount_factory,  # noqa: ANN001
                                    tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "out", {"touch/done.touch": b"", "log.txt": b"finished\n"})
    mount = mount_factory(server)
    resource = mount.path / SESSION / "resources" / "MARKERS"
    resource.mkdir()
    subprocess.run(["cp", "-r", f"{tree}/.", str(resource / "files")], check=True, timeout=60)
    fsync_folder(resource / "files")
    assert listed(server, f"{SESSION_URI}/resources/MARKERS") == digests(tree)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_twice_sends_nothing_the_second_time(server: TestServer, mount_factory,  # noqa: ANN001
                                                    tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "out", {
        "report.html": b"<html>QC</html>\n", "figures/motion.png": b"\x89PNG fake" * 100,
        "figures/snr.png": b"\x89PNG other" * 50, "tables/metrics.tsv": b"a\tb\n1\t2\n"})
    mount = mount_factory(server)
    resource = mount.path / SESSION / "resources" / "MRIQC"
    resource.mkdir()
    mark = server.log_mark()
    subprocess.run(["rsync", "-a", f"{tree}/", f"{resource}/files/"], check=True, timeout=120)
    first = writes_since(server, mark)
    assert listed(server, f"{SESSION_URI}/resources/MRIQC") == digests(tree)
    # rsync writes ".name.XXXXXX" and renames it: only the real names reach XNAT.
    assert sorted(e["path"].split("/files/", 1)[1] for e in first) == sorted(digests(tree))
    # Another file in the resource: its listing changes, and the mount makes the
    # entries anew (the times rsync set must outlive that).
    (resource / "files" / "extra.txt").write_bytes(b"not rsync's\n")
    drop_kernel_entries()  # the times come from the mount, not the kernel's memory
    mark = server.log_mark()
    again = subprocess.run(["rsync", "-a", "--itemize-changes", f"{tree}/", f"{resource}/files/"],
                           check=True, capture_output=True, text=True, timeout=120)
    assert not [line for line in again.stdout.splitlines() if line.startswith((">f", "<f"))], \
        again.stdout
    assert writes_since(server, mark) == []
    assert listed(server, f"{SESSION_URI}/resources/MRIQC") == {
        **digests(tree), "extra.txt": (hashlib.md5(b"not rsync's\n").hexdigest(), 12)}


# ------------------------------------------------------------ 5. refusals
def test_overwrite_and_delete_are_refused_without_the_options(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    mount = mount_factory(server)
    notes = mount.path / SESSION / "resources" / "NOTES"
    dicom = mount.path / SESSION / "scans" / "3-T2_FLAIR" / "resources" / "DICOM" / "files"
    before, dicom_before = fetched(server, NOTES_URI), scanner_dicom(server)
    assert set(before) == {"notes.txt", "scan notes.txt"}
    (tmp_path / "other.txt").write_text("something else\n")
    mark = server.log_mark()

    def refused(*command: str) -> None:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "Operation not permitted" in result.stderr, \
            (command, result.stderr)

    refused("cp", str(tmp_path / "other.txt"), str(notes / "files" / "notes.txt"))
    refused("sh", "-c", f"echo overwritten > '{notes}/files/notes.txt'")
    refused("sh", "-c", f"echo appended >> '{notes}/files/notes.txt'")
    refused("truncate", "-s", "0", str(notes / "files" / "notes.txt"))
    refused("rm", str(notes / "files" / "scan notes.txt"))
    refused("rm", "-r", str(notes))
    [first_dicom] = sorted(os.listdir(dicom))[:1]
    refused("rm", str(dicom / first_dicom))
    for move in (dicom / first_dicom, notes / "files" / "notes.txt"):
        with pytest.raises(OSError) as moved:  # XNAT has it: moving it would delete it
            os.rename(move, notes / "files" / "moved")
        assert moved.value.errno == errno.EPERM
    assert fetched(server, NOTES_URI) == before
    assert scanner_dicom(server) == dicom_before
    assert writes_since(server, mark) == []
    log = mount_log(mount)
    assert "--allow-overwrite" in log and "--allow-delete" in log  # the log says how
    assert sorted(os.listdir(notes / "files")) == ["notes.txt", "scan notes.txt"]


def test_a_read_only_collaborator_is_refused_and_nothing_is_stored(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """alice may read ONC-PROT, not write to it. XNAT answers her upload with a
    200 and stores nothing; the mount sees that in the listing and fails the
    close (EACCES), keeping the file."""
    session_uri = "/data/projects/ONC-PROT/subjects/ONC001/experiments/ONC001_PET1"
    notes_uri = f"{session_uri}/resources/NOTES"
    mount = mount_factory(server, user="alice", name="alice")
    session = mount.path / "ONC-PROT" / "ONC001" / "ONC001_PET1"
    before, dicom_before = fetched(server, notes_uri), scanner_dicom(server, session_uri)
    with pytest.raises(OSError) as made:
        (session / "resources" / "OUTPUTS").mkdir()
    assert made.value.errno in (errno.EACCES, errno.EPERM)
    # Into a resource she can see: written, then refused at close at the latest.
    with pytest.raises(PermissionError):
        with open(session / "resources" / "NOTES" / "files" / "mine.txt", "wb") as f:
            f.write(b"alice was here\n")
    (tmp_path / "copy.txt").write_bytes(b"a copy\n")
    result = subprocess.run(["cp", str(tmp_path / "copy.txt"),
                             str(session / "resources" / "NOTES" / "files")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Permission denied" in result.stderr
    assert fetched(server, notes_uri) == before
    assert "OUTPUTS" not in resource_labels(server, session_uri)
    assert scanner_dicom(server, session_uri) == dicom_before
    kept = uploads_cli(mount, "list").stdout
    assert "NOTES/files/mine.txt" in kept and "NOTES/files/copy.txt" in kept
    # Discarded from the command line: gone from the running mount too.
    notes = session / "resources" / "NOTES" / "files"
    assert os.getxattr(notes / "mine.txt", "user.xnatfs.upload.state") == b"failed"
    [upload_id] = [line.split()[0] for line in kept.splitlines() if "files/mine.txt" in line]
    assert uploads_cli(mount, "discard", upload_id).returncode == 0
    wait_for(lambda: "mine.txt" not in os.listdir(notes), 10, "the discarded file to go")
    assert sorted(os.listdir(notes)) == ["copy.txt", "notes.txt"]
    os.unlink(notes / "copy.txt")  # rm of a kept file: gone, not an empty file left listed
    assert os.listdir(notes) == ["notes.txt"]
    drop_kernel_entries()
    assert os.listdir(notes) == ["notes.txt"]
    assert "copy.txt" not in uploads_cli(mount, "list").stdout
    assert fetched(server, notes_uri) == before


def test_a_server_error_keeps_the_file_until_it_is_sent(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """XNAT fails every upload into the resource (503) for longer than the mount
    retries: cp fails (EIO), the file is kept and listed; once XNAT is back,
    ``xnatfs uploads retry`` (or copying it again) sends it, once."""
    mount = mount_factory(server)
    resource = mount.path / SESSION / "resources" / "RESULTS"
    resource.mkdir()
    uri = f"{SESSION_URI}/resources/RESULTS"
    result_file = tmp_path / "result.csv"
    result_file.write_bytes(b"roi,volume\nhippocampus,4012\n")
    dicom_before = scanner_dicom(server)
    server.set_knobs(fail_rate=1.0, fault_path="/resources/RESULTS/files")
    try:
        failed = subprocess.run(["cp", str(result_file), str(resource / "files")],
                                capture_output=True, text=True, timeout=120)
    finally:
        server.set_knobs(fail_rate=0.0, fault_path="")
    assert failed.returncode != 0 and "Input/output error" in failed.stderr, failed.stderr
    assert listed(server, uri) == {}
    kept = uploads_cli(mount, "list")
    [line] = [line for line in kept.stdout.splitlines() if "RESULTS/files/result.csv" in line]
    assert " failed " in line and "503" in line
    assert os.getxattr(resource / "files" / "result.csv", "user.xnatfs.upload.state") == b"failed"
    assert scanner_dicom(server) == dicom_before
    expected = {"result.csv": (hashlib.md5(result_file.read_bytes()).hexdigest(),
                               result_file.stat().st_size)}
    mark = server.log_mark()
    retried = uploads_cli(mount, "retry")
    assert retried.returncode == 0, retried.stderr
    assert listed(server, uri) == expected
    sent = [e for e in writes_since(server, mark, "/resources/RESULTS/files")
            if e["status"] == 200]
    assert len(sent) == 1
    assert scanner_dicom(server) == dicom_before
    assert "result.csv" not in uploads_cli(mount, "list").stdout


def test_a_server_error_mid_queue_heals_and_each_file_is_sent_once(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """Write-behind: XNAT fails the resource's uploads for a moment; the
    mount retries, and every file arrives once."""
    mount = mount_factory(server, "--write-behind")
    resource = mount.path / SESSION / "resources" / "QUEUED"
    resource.mkdir()
    tree = write_tree(tmp_path / "out", {f"part{n}.txt": f"part {n}\n".encode() * (n + 1)
                                         for n in range(6)})
    server.set_knobs(fail_rate=1.0, fault_path="/resources/QUEUED/files")
    mark = server.log_mark()
    try:
        subprocess.run(["cp", "-r", f"{tree}/.", str(resource / "files")], check=True,
                       timeout=60)
        wait_for(lambda: any(e["status"] == 503 for e in server.requests_since(mark)),
                 what="the first failed upload")
    finally:
        server.set_knobs(fail_rate=0.0, fault_path="")
    fsync_folder(resource / "files")
    assert listed(server, f"{SESSION_URI}/resources/QUEUED") == digests(tree)
    log = mount_log(mount)
    for name in digests(tree):
        assert log.count(f"QUEUED/files/{name} →") == 1, name
    assert "kept in" not in log


def deleted_spool_copies(mount: Mount) -> list[str]:
    """The mount process's descriptors of local copies already deleted (the
    spool may hold descriptors of the copies it still keeps)."""
    pid = daemon_pid(mount.path)
    uploads = str(mount.cache_dir.resolve() / "uploads") + "/"
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith(uploads) and target.endswith(" (deleted)"):
            found.append(target)
    return found


def test_an_upload_a_silent_server_stopped_reading_leaves_no_descriptor_open(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """Write-behind: XNAT stops reading the body of a result file (httpx's
    WriteTimeout, every attempt of one try); then it is back, the spool's
    retry sends the file, and its local copy is deleted. The mount keeps no
    descriptor of that copy: the soak once found each such file held open
    (deleted) until the garbage collector's next full pass."""
    mount = mount_factory(server, "--write-behind", "--timeout", "0.5")
    resource = mount.path / SESSION / "resources" / "SILENT"
    resource.mkdir()
    out = write_tree(tmp_path / "out", {"volume.nii": os.urandom(32 << 20)})  # more than
    result = out / "volume.nii"                    # loopback's socket buffers take in
    server.set_knobs(hang=True, fault_path="/resources/SILENT/files")
    try:
        shutil.copy(result, resource / "files")  # write-behind: returns at close

        def one_try_failed() -> bool:
            return any(line.startswith("upload of ") and "SILENT/files/volume.nii failed "
                       "(WriteTimeout" in line for line in
                       (entry.split(" WARNING ", 1)[-1] for entry in
                        mount_log(mount).splitlines()))

        wait_for(one_try_failed, what="a try whose every attempt met a WriteTimeout")
    finally:
        server.set_knobs(hang=False, fault_path="")
    fsync_folder(resource / "files")  # the spool's next try sends it
    assert listed(server, f"{SESSION_URI}/resources/SILENT") == digests(out)
    assert "volume.nii" not in uploads_cli(mount, "list").stdout
    wait_for(lambda: not deleted_spool_copies(mount), 5,
             "the descriptors of the deleted local copy to be closed")


@pytest.mark.parametrize("allow_overwrite", [False, True], ids=["refused", "allowed"])
def test_a_file_saved_again_while_its_first_version_is_sent(
        server: TestServer, mount_factory, allow_overwrite: bool) -> None:  # noqa: ANN001
    """Write-behind: a program saves a file, and saves it again before XNAT has
    confirmed the first version (an editor, a pipeline rewriting its report).
    The second version replaces the first in XNAT under --allow-overwrite; without
    it, it is refused, and a folder's fsync says so (it said nothing, and the
    mount no longer showed the file as its own, once the first version was
    confirmed)."""
    options = ["--write-behind"] + (["--allow-overwrite"] if allow_overwrite else [])
    mount = mount_factory(server, *options)
    label = "REPORT_OVERWRITTEN" if allow_overwrite else "REPORT"  # a resource of its own
    resource = mount.path / SESSION / "resources" / label
    resource.mkdir()
    uri = f"{SESSION_URI}/resources/{label}"
    target = resource / "files" / "report.txt"
    first, second = b"first version\n" * 1000, b"second version\n" * 700
    server.set_knobs(answer_delay_ms=2500, fault_path=f"/resources/{label}/files/")
    try:
        target.write_bytes(first)  # returns at once: sent behind the close
        wait_for(lambda: listed(server, uri), what="XNAT to store the first version")
        target.write_bytes(second)  # XNAT has the first; its answer is not back yet
        if allow_overwrite:
            fsync_folder(resource / "files")
        else:
            with pytest.raises(OSError) as refused:
                fsync_folder(resource / "files")
            assert refused.value.errno == errno.EEXIST
    finally:
        server.set_knobs(answer_delay_ms=0, fault_path="")
    assert fetched(server, uri) == {"report.txt": second if allow_overwrite else first}
    kept = uploads_cli(mount, "list").stdout
    if allow_overwrite:
        assert f"{label}/files/report.txt" not in kept
        assert target.read_bytes() == second  # XNAT's, read from XNAT
    else:
        assert os.getxattr(target, "user.xnatfs.upload.state") == b"failed"
        # The first version's result is not the refused second's (open with O_TRUNC
        # started it over, and left it).
        assert "user.xnatfs.upload.result" not in os.listxattr(target)
        assert f"{label}/files/report.txt" in kept and "--allow-overwrite" in kept


def test_a_killed_writer_sends_nothing(server: TestServer, mount_factory,  # noqa: ANN001
                                       tmp_path: Path) -> None:
    mount = mount_factory(server)
    resource = mount.path / SESSION / "resources" / "PARTIAL"
    resource.mkdir()
    source = tmp_path / "volume.bin"
    source.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    dicom_before = scanner_dicom(server)
    mark = server.log_mark()
    writer = subprocess.Popen([sys.executable, "-c", WRITE_THEN_WAIT,
                               str(resource / "files" / "volume.bin"), str(source),
                               str(source.stat().st_size // 2)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline() == "written\n"
    writer.kill()  # SIGKILL, half-way
    writer.wait(timeout=60)  # its files are closed (FLUSH) before it is reaped
    entry = resource / "files" / "volume.bin"
    assert os.getxattr(entry, "user.xnatfs.upload.state") == b"failed"
    assert b"killed (SIGKILL)" in os.getxattr(entry, "user.xnatfs.upload.message")
    assert writes_since(server, mark, "/resources/PARTIAL/files") == []
    assert listed(server, f"{SESSION_URI}/resources/PARTIAL") == {}
    assert scanner_dicom(server) == dicom_before


WRITE_THEN_WAIT = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
os.write(fd, open(sys.argv[2], "rb").read()[:int(sys.argv[3])])
print("written", flush=True)
sys.stdin.read()
"""


def test_a_killed_mount_sends_its_queued_writes_after_the_remount(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """Write-behind files still queued when the mount is killed (-9) are sent by
    the next mount of the same site, each once (the one XNAT stored but never
    confirmed too); a mount of another site (here the same server under another
    name) leaves them alone."""
    mount = mount_factory(server, "--write-behind")
    resource = mount.path / SESSION / "resources" / "CRASH"
    resource.mkdir()
    uri = f"{SESSION_URI}/resources/CRASH"
    tree = write_tree(tmp_path / "out", {f"run{n}/out.txt": f"run {n}\n".encode() * 100
                                         for n in range(5)})
    dicom_before = scanner_dicom(server)
    # XNAT stores the first file, then holds its answer back; the others queue
    # behind it (one request at a time per resource), and the mount is killed.
    held = server.log_mark()
    server.set_knobs(answer_delay_ms=5000, fault_path="/resources/CRASH/files/")
    try:
        (resource / "files" / "run0").mkdir()
        shutil.copy(tree / "run0" / "out.txt", resource / "files" / "run0" / "out.txt")
        wait_for(lambda: listed(server, uri), what="XNAT to store the first file")
        subprocess.run(["cp", "-r", *[str(tree / f"run{n}") for n in range(1, 5)],
                        str(resource / "files")], check=True, timeout=60)
        os.kill(daemon_pid(mount.path), signal.SIGKILL)
        assert wait_for_unmount(mount.path, timeout=30)
    finally:
        server.set_knobs(answer_delay_ms=0, fault_path="")
    assert list(listed(server, uri)) == ["run0/out.txt"]
    # The server logs a request once its answer is over: the held one's entry
    # must be in before the mark, or it would count as a write of what follows.
    wait_for(lambda: writes_since(server, held, "/resources/CRASH/files/run0/"),
             what="the held answer to end")
    # Another site: the same server by another name gets nothing.
    elsewhere = server.url.replace("127.0.0.1", "localhost")
    mark = server.log_mark()
    subprocess.run([sys.executable, "-m", "xnatfs.cli", "mount", elsewhere, str(mount.path),
                    "--cache-dir", str(mount.cache_dir), "--log-level", "INFO",
                    "--log-file", str(tmp_path / "elsewhere.log"), *mount.options],
                   env=mount.env, check=True, timeout=60)
    assert "NEURO_PUB" in os.listdir(mount.path)
    unmount_and_wait(mount.path)
    assert writes_since(server, mark) == []
    # The same site: sent once the mount starts.
    mount_xnatfs(server, mount.path, mount.cache_dir, mount.env, mount.options)
    wait_for(lambda: len(listed(server, uri)) == 5, what="the queued files to be sent")
    assert listed(server, uri) == digests(tree)
    writes = writes_since(server, mark)
    assert writes and all(e["status"] == 200 and "overwrite" not in e["query"] for e in writes)
    log = mount_log(mount)
    for name in digests(tree):  # confirmed once, by the second mount
        assert log.count(f"CRASH/files/{name} →") == 1, name
    assert scanner_dicom(server) == dicom_before
    listing = os.listdir(mount.path / SESSION / "resources" / "CRASH" / "files")
    assert sorted(listing) == [f"run{n}" for n in range(5)]


# --------------------------------------- 6. --allow-overwrite, --allow-delete
def test_overwrite_and_delete_with_the_options(own_server: TestServer, mount_factory,  # noqa: ANN001
                                                tmp_path: Path) -> None:
    server = own_server  # NOTES is changed, then deleted
    mount = mount_factory(server, "--allow-overwrite", "--allow-delete")
    notes = mount.path / SESSION / "resources" / "NOTES" / "files"
    before, dicom_before = fetched(server, NOTES_URI), scanner_dicom(server)
    # Overwrite: the new bytes in XNAT, by cp and by a shell redirection.
    (tmp_path / "new.txt").write_bytes(b"rewritten by cp\n")
    assert (notes / "notes.txt").read_bytes() == before["notes.txt"]  # now in the cache
    subprocess.run(["cp", str(tmp_path / "new.txt"), str(notes / "notes.txt")], check=True)
    assert (notes / "notes.txt").read_bytes() == b"rewritten by cp\n"  # at once
    assert fetched(server, NOTES_URI)["notes.txt"] == b"rewritten by cp\n"
    subprocess.run(["sh", "-c", f"echo rewritten by echo > '{notes}/notes.txt'"], check=True)
    assert fetched(server, NOTES_URI)["notes.txt"] == b"rewritten by echo\n"
    drop_kernel_entries()  # read as XNAT has it now, not as the mount cached it
    assert (notes / "notes.txt").read_bytes() == b"rewritten by echo\n"
    # rm deletes exactly that file.
    os.unlink(notes / "scan notes.txt")
    assert list(fetched(server, NOTES_URI)) == ["notes.txt"]
    # The prefix trap: XNAT's DELETE of "a" would take "a.txt" too.
    traps = mount.path / SESSION / "resources" / "TRAPS"
    traps.mkdir()
    (traps / "files" / "a").write_bytes(b"bare a\n")
    (traps / "files" / "a.txt").write_bytes(b"a dot txt\n")
    traps_uri = f"{SESSION_URI}/resources/TRAPS"
    assert set(listed(server, traps_uri)) == {"a", "a.txt"}
    mark = server.log_mark()
    result = subprocess.run(["rm", str(traps / "files" / "a")], capture_output=True, text=True)
    assert result.returncode != 0 and "Device or resource busy" in result.stderr
    assert fetched(server, traps_uri) == {"a": b"bare a\n", "a.txt": b"a dot txt\n"}
    assert writes_since(server, mark) == []
    os.unlink(traps / "files" / "a.txt")  # no other path starts with it
    assert fetched(server, traps_uri) == {"a": b"bare a\n"}
    os.unlink(traps / "files" / "a")      # nor with this one, now
    assert listed(server, traps_uri) == {}
    # rm -r of a resource removes it from XNAT, with folders in it too (a
    # folder whose last file is deleted stays until rmdir, as on any disk).
    nested = mount.path / SESSION / "resources" / "NESTED"
    nested.mkdir()
    write_tree(nested / "files", {"e.txt": b"e\n", "a/d.txt": b"d\n", "a/b/c.txt": b"c\n"})
    assert set(listed(server, f"{SESSION_URI}/resources/NESTED")) == {"e.txt", "a/d.txt",
                                                                      "a/b/c.txt"}
    mount.remount()  # the folders are XNAT's now, not ones the mount made
    for label in ("NOTES", "NESTED"):
        result = subprocess.run(["rm", "-r", str(mount.path / SESSION / "resources" / label)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert label not in resource_labels(server, SESSION_URI)
        assert label not in os.listdir(mount.path / SESSION / "resources")
    assert scanner_dicom(server) == dicom_before


# ---------------------------------------- 7. project and subject resources
def test_project_and_subject_resources_are_written(server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """Resources of a project, a subject and an assessor, and of a subject and a
    session labelled ``resources`` (listed under the suffixed name of names
    listed twice): written where they are."""
    with http(server) as c:
        assert c.put("/data/projects/NEURO_PUB/subjects/resources").status_code in (200, 201)
        assert c.put("/data/projects/NEURO_PUB/subjects/NP002/experiments/resources",
                     params={"xsiType": "xnat:mrSessionData"}).status_code in (200, 201)
    mount = mount_factory(server)
    project = mount.path / "NEURO_PUB"
    subject_twin = [n for n in os.listdir(project) if n.startswith("resources%~")]
    assert len(subject_twin) == 1, os.listdir(project)
    [twin] = subject_twin
    assert os.getxattr(project / twin, "user.xnat.label") == b"resources"
    session_twin = [n for n in os.listdir(project / "NP002") if n.startswith("resources%~")]
    assert len(session_twin) == 1, os.listdir(project / "NP002")
    assert os.getxattr(project / "NP002" / session_twin[0], "user.xnat.label") == b"resources"
    written = [  # (the resource's folder, a file's path in it, the resource in XNAT)
        (project / "resources" / "PROTOCOL", "protocol.pdf",
         "/data/projects/NEURO_PUB/resources/PROTOCOL"),
        (project / "NP001" / "resources" / "CONSENT", "2023/consent.txt",
         "/data/projects/NEURO_PUB/subjects/NP001/resources/CONSENT"),
        (project / twin / "resources" / "OUT", "x.txt",
         "/data/projects/NEURO_PUB/subjects/resources/resources/OUT"),
        (project / "NP002" / session_twin[0] / "resources" / "OUT", "y.txt",
         "/data/projects/NEURO_PUB/subjects/NP002/experiments/resources/resources/OUT"),
        (project / "NP001" / "NP001_MR2" / "assessors" / "NP001_MR2_QC" / "resources" / "STATS",
         "stats/z.txt", "/data/projects/NEURO_PUB/subjects/NP001/experiments/NP001_MR2/"
                        "assessors/NP001_MR2_QC/out/resources/STATS"),
    ]
    for folder, rel, uri in written:
        folder.mkdir()
        path = folder / "files" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = f"{uri} {rel}\n".encode()
        path.write_bytes(data)
        assert fetched(server, uri) == {rel: data}, uri
        assert sorted(os.listdir(folder / "files")) == [rel.split("/")[0]]
    # The project's own resources folder is still the project's.
    assert "PROTOCOL" in os.listdir(project / "resources")
    assert "PROTOCOL" in resource_labels(server, "/data/projects/NEURO_PUB")
    assert "NP001" in os.listdir(project)


# ------------------------------------------- 8. everyday tools (found in QA)
def test_a_version_written_while_the_last_is_being_sent_waits_for_it(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """Write-behind on a slow link: ``cp`` of a file, then ``cp`` of a longer
    version over it while the first is still going out. The request's length
    and MD5 are taken from the local copy before it is sent, so that copy must
    not change under the request: the second cp waits for the first sending,
    and then replaces it (--allow-overwrite). (The request's body outgrew its
    length and the whole mount stopped.)"""
    mount = mount_factory(server, "--write-behind", "--allow-overwrite")
    resource = mount.path / SESSION / "resources" / "AGAIN"
    resource.mkdir()
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(os.urandom(8_000_000))
    second.write_bytes(os.urandom(12_000_000))
    target = resource / "files" / "volume.bin"
    server.set_knobs(bandwidth_mb_s=4)  # 2 s for the first version's body
    try:
        shutil.copy(first, target)      # returns once it is on local disk
        time.sleep(0.5)                 # its body is on its way now
        subprocess.run(["cp", str(second), str(target)], check=True, timeout=120)
        fsync_folder(resource / "files")
    finally:
        server.set_knobs(bandwidth_mb_s=0)
    assert os.path.ismount(mount.path)
    assert fetched(server, f"{SESSION_URI}/resources/AGAIN") == {
        "volume.bin": second.read_bytes()}
    assert target.read_bytes() == second.read_bytes()
    assert "unexpected error" not in mount_log(mount)


@pytest.mark.parametrize("write_behind", [False, True], ids=["waiting", "write-behind"])
def test_shell_redirections_and_dd_store_what_was_written(
        server: TestServer, mount_factory, write_behind: bool) -> None:  # noqa: ANN001
    """``cmd > file`` and ``dd of=file`` open the file, dup it onto stdout and
    close the first descriptor before writing: that first close (a FUSE flush of
    an empty new file) sent an empty file, and the real content was then
    refused as a duplicate, while the shell said nothing (it ignores its
    close's error) and XNAT kept the empty file. Later content written through
    the same open file replaces what its earlier close sent."""
    mount = mount_factory(server, *(["--write-behind"] if write_behind else []))
    label = "SHELL_WB" if write_behind else "SHELL"  # a resource of its own
    resource = mount.path / SESSION / "resources" / label
    resource.mkdir()
    files = resource / "files"
    subprocess.run(["sh", "-c", f"echo 'volume 1234.5' > '{files}/volume.txt'"], check=True)
    subprocess.run(["bash", "-c", f"printf 'a\\tb\\n' > '{files}/table.tsv'"], check=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={files}/zeros.bin", "bs=4096", "count=4",
                    "conv=notrunc", "status=none"], check=True, timeout=60)
    fsync_folder(files)
    assert fetched(server, f"{SESSION_URI}/resources/{label}") == {
        "volume.txt": b"volume 1234.5\n", "table.tsv": b"a\tb\n", "zeros.bin": bytes(16384)}
    assert " ERROR " not in mount_log(mount)
    assert label not in uploads_cli(mount, "list").stdout
    # Protection holds for another open of the file: it is XNAT's now.
    refused = subprocess.run(["sh", "-c", f"echo again > '{files}/volume.txt'"],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    assert fetched(server, f"{SESSION_URI}/resources/{label}")["volume.txt"] == b"volume 1234.5\n"


def test_sed_in_place_leaves_no_temporary_in_xnat(server: TestServer,
                                                  mount_factory) -> None:  # noqa: ANN001
    """``sed -i`` writes ``./sedXXXXXX`` and renames it over the file: a
    temporary, kept locally. Without --allow-overwrite the rename is refused
    and nothing reaches XNAT (the temporary was sent, and stayed in XNAT for
    good: deleting it needs --allow-delete); with it, the edit replaces the file."""
    mount = mount_factory(server)
    resource = mount.path / SESSION / "resources" / "EDITS"
    resource.mkdir()
    uri = f"{SESSION_URI}/resources/EDITS"
    (resource / "files" / "params.txt").write_bytes(b"threshold=0.5\n")
    mark = server.log_mark()
    result = subprocess.run(["sed", "-i", "s/0.5/0.7/", str(resource / "files" / "params.txt")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Operation not permitted" in result.stderr
    assert fetched(server, uri) == {"params.txt": b"threshold=0.5\n"}
    assert writes_since(server, mark) == []
    assert os.listdir(resource / "files") == ["params.txt"]
    unmount_and_wait(mount.path)
    mount.options.append("--allow-overwrite")
    mount_xnatfs(server, mount.path, mount.cache_dir, mount.env, mount.options)
    subprocess.run(["sed", "-i", "s/0.5/0.7/", str(resource / "files" / "params.txt")],
                   check=True, timeout=60)
    assert fetched(server, uri) == {"params.txt": b"threshold=0.7\n"}
    assert not [e for e in server.requests_since(mark) if "/files/sed" in e["path"]]


@pytest.mark.skipif(shutil.which("vim") is None, reason="vim is not installed")
def test_vim_and_truncate_replace_a_file_under_allow_overwrite(
        own_server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """vim (9.0) saves by opening the file without O_TRUNC and cutting it to
    nothing (ftruncate 0) before it writes; ``truncate -s 0`` opens it so too.
    That is a replacement, allowed by --allow-overwrite (it failed: "E212:
    Can't open file for writing"). Changing XNAT's file in place (a write
    before any truncation, a truncation to another size) is still refused."""
    server = own_server  # NOTES is changed
    mount = mount_factory(server, "--allow-overwrite")
    notes = mount.path / SESSION / "resources" / "NOTES" / "files"
    before = fetched(server, NOTES_URI)
    edited = subprocess.run(["vim", "-u", "NONE", "-N", "-E", "-s", "-c",
                             "call setline(1, 'edited in vim')", "-c", "wq",
                             str(notes / "notes.txt")],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert edited.returncode == 0, edited
    assert fetched(server, NOTES_URI)["notes.txt"] == b"edited in vim\n"
    assert sorted(os.listdir(notes)) == ["notes.txt", "scan notes.txt"]  # no swap file left
    for size in ("5", "+1"):
        result = subprocess.run(["truncate", "-s", size, str(notes / "scan notes.txt")],
                                capture_output=True, text=True)
        assert result.returncode != 0 and "Operation not permitted" in result.stderr, size
    patched = subprocess.run(["dd", "if=/dev/zero", f"of={notes}/scan notes.txt", "bs=1",
                              "count=1", "conv=notrunc", "status=none"],
                             capture_output=True, text=True)
    assert patched.returncode != 0
    assert fetched(server, NOTES_URI)["scan notes.txt"] == before["scan notes.txt"]
    subprocess.run(["truncate", "-s", "0", str(notes / "scan notes.txt")], check=True)
    assert fetched(server, NOTES_URI)["scan notes.txt"] == b""
    assert " ERROR " not in mount_log(mount)


def test_times_set_after_close_are_kept(server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """unzip (and others) set a file's time after closing it, by then XNAT's:
    the time is kept as it is for any file XNAT has (it was lost once the
    listing was made again)."""
    mount = mount_factory(server)
    resource = mount.path / SESSION / "resources" / "UNZIPPED"
    resource.mkdir()
    path = resource / "files" / "a.txt"
    path.write_bytes(b"a\n")
    when = 1_577_880_000  # 2020-01-01
    os.utime(path, (when, when))
    (resource / "files" / "b.txt").write_bytes(b"b\n")  # the listing changes
    time.sleep(1.5)  # the kernel's attributes of a.txt have run out
    assert sorted(os.listdir(resource / "files")) == ["a.txt", "b.txt"]
    assert path.stat().st_mtime == when


def test_a_resource_made_elsewhere_is_seen_by_mkdir(server: TestServer,
                                                   mount_factory) -> None:  # noqa: ANN001
    """Another mount (or XNAT's web page) made the resource a moment ago, after
    this mount listed the resources: ``mkdir`` says it exists, and from then
    on it is there (``mkdir -p R/files`` went on to fail: "No such file or
    directory", for as long as the listing was cached)."""
    here, there = mount_factory(server), mount_factory(server, name="other")
    assert "SHARED" not in os.listdir(here.path / SESSION / "resources")  # listed
    (there.path / SESSION / "resources" / "SHARED").mkdir()
    files = here.path / SESSION / "resources" / "SHARED" / "files"
    subprocess.run(["mkdir", "-p", str(files)], check=True, timeout=60)
    (files / "from-here.txt").write_bytes(b"here\n")
    assert fetched(server, f"{SESSION_URI}/resources/SHARED") == {"from-here.txt": b"here\n"}


def test_a_refused_delete_names_the_file_with_its_folder(
        server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """The log line of a delete refused for the prefix trap names the file's
    whole path in the resource (it left out its folders)."""
    mount = mount_factory(server, "--allow-delete")
    resource = mount.path / SESSION / "resources" / "SURF"
    resource.mkdir()
    write_tree(resource / "files", {"surf/lh.sphere": b"s\n", "surf/lh.sphere.reg": b"r\n"})
    mount.remount()  # XNAT's files now
    result = subprocess.run(["rm", str(resource / "files" / "surf" / "lh.sphere")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Device or resource busy" in result.stderr
    assert "SURF/files/surf/lh.sphere: XNAT would delete surf/lh.sphere.reg" in mount_log(mount)


def test_a_second_copy_over_an_upload_being_sent_waits_for_it(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """(The upload area shares the spool.) ``cp study.zip uploads/P/`` twice at
    once on a slow link: the second waits for the first's import, then is
    imported itself. (The second started a new stream under the first, whose
    close then waited for that stream for ever, the second's close behind it:
    both cp hung, beyond SIGKILL, and so did the unmount.)"""
    mount = mount_factory(server)
    dicom = mount.path / SESSION / "scans" / "3-T2_FLAIR" / "resources" / "DICOM" / "files"
    study = tmp_path / "study.zip"
    with zipfile.ZipFile(study, "w") as zf:
        for name in sorted(os.listdir(dicom)):
            zf.writestr(name, (dicom / name).read_bytes())
    target = mount.path / "uploads" / "NEURO_PUB" / "study.zip"
    mark = server.log_mark()
    server.set_knobs(bandwidth_mb_s=study.stat().st_size / 3e6)  # 3 s a copy
    copies = []
    try:
        copies.append(subprocess.Popen(["cp", str(study), str(target)]))
        time.sleep(1)
        copies.append(subprocess.Popen(["cp", str(study), str(target)]))
        deadline = time.monotonic() + 60
        while any(c.poll() is None for c in copies) and time.monotonic() < deadline:
            time.sleep(0.2)
        hung = [c for c in copies if c.poll() is None]
        if hung:  # free them (and this test run): abort the mount's connection
            minor = subprocess.run(["mountpoint", "-d", str(mount.path)], capture_output=True,
                                   text=True).stdout.strip().split(":")[1]
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1\n")
            os.kill(daemon_pid(mount.path), signal.SIGKILL)
        assert not hung, "cp hung"
    finally:
        server.set_knobs(bandwidth_mb_s=0)
    assert [c.returncode for c in copies] == [0, 0]
    imports = [e for e in server.requests_since(mark) if e["route"] == "services.import"]
    assert [e["status"] for e in imports] == [200, 200]


def test_xnatfs_umount_returns_once_the_queued_files_are_in_xnat(
        server: TestServer, mount_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """A batch job ends with ``xnatfs umount``: files queued behind their close
    (--write-behind) are in XNAT when it returns, not still being sent by a
    process the job's end may kill."""
    mount = mount_factory(server, "--write-behind")
    resource = mount.path / SESSION / "resources" / "LOGS"
    resource.mkdir()
    tree = write_tree(tmp_path / "out", {f"log{i}.txt": f"step {i}\n".encode() for i in range(3)})
    server.set_knobs(answer_delay_ms=500, fault_path="/resources/LOGS/files")
    try:
        subprocess.run(["cp", "-r", f"{tree}/.", str(resource / "files")], check=True, timeout=60)
        done = subprocess.run([sys.executable, "-m", "xnatfs.cli", "umount", str(mount.path)],
                              env=mount.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert listed(server, f"{SESSION_URI}/resources/LOGS") == digests(tree)
    finally:
        server.set_knobs(answer_delay_ms=0, fault_path="")
