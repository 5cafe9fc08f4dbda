"""The archive area through a real mount, browsed with ls, stat, find, cp, getfattr."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from xnatfs.testing.harness import TestServer, share_session
from xnatfs.testing.store import Store

from .conftest import Mount, drop_kernel_entries

SESSION = Path("NEURO_PUB/NP001/NP001_MR1")


def server_files(mount: Mount, experiment_label: str = "NP001_MR1",
                 project: str = "NEURO_PUB") -> dict[str, dict[str, str]]:
    """Relative mount path (below the session) → listing row, straight from the server."""
    with httpx.Client(base_url=mount.server.url, auth=("admin", "admin")) as c:
        base = f"/data/projects/{project}/experiments/{experiment_label}"
        scans = {s["ID"]: s for s in c.get(f"{base}/scans").json()["ResultSet"]["Result"]}
        out = {}
        for scan_id, scan in scans.items():
            from xnatfs.naming import scan_folder_name

            folder = scan_folder_name(scan_id, scan["type"])
            resources = c.get(f"{base}/scans/{scan_id}/resources").json()["ResultSet"]["Result"]
            for r in resources:
                files = c.get(f"{base}/scans/{scan_id}/resources/{r['label']}/files").json()
                for f in files["ResultSet"]["Result"]:
                    rel = f["URI"].split("/files/", 1)[1]
                    out[f"scans/{folder}/resources/{r['label']}/files/{rel}"] = f
        for r in c.get(f"{base}/resources").json()["ResultSet"]["Result"]:
            files = c.get(f"{base}/resources/{r['label']}/files").json()
            for f in files["ResultSet"]["Result"]:
                rel = f["URI"].split("/files/", 1)[1]
                out[f"resources/{r['label']}/files/{rel}"] = f
    return out


def test_root_lists_projects_and_reserved_folders(demo_mount: Mount) -> None:
    names = set(os.listdir(demo_mount.path))
    assert {"NEURO_PUB", "ONC-PROT", "ALICE_LAB", "SAMPLES", "uploads", "prearchive"} <= names


def test_projects_named_like_the_mounts_own_folders_are_reachable(
        tmp_path: Path, mount_factory, demo_copy) -> None:  # noqa: ANN001
    """A project whose ID is ``uploads`` or ``prearchive`` was left out of the root;
    it is listed under the suffixed name of names listed twice, and the area's
    folder keeps its name."""
    with TestServer(demo_copy(tmp_path / "data"), dataset="demo") as server:
        store = Store(server.data_dir)
        try:
            for project in ("uploads", "prearchive"):
                store.add_project(project, accessibility="public")
        finally:
            store.close()
        mount = mount_factory(server)
        names = os.listdir(mount.path)
        for project in ("uploads", "prearchive"):
            twins = [n for n in names if n.startswith(project + "%~")]
            assert len(twins) == 1, names
            assert os.getxattr(mount.path / twins[0], "user.xnat.id") == project.encode()
            assert sorted(os.listdir(mount.path / twins[0])) == [  # the project, empty
                "project.xml", "resources", "scans.csv", "sessions.csv", "subjects.csv"]
        assert "UPLOAD_STATUS.txt" in os.listdir(mount.path / "uploads")
        assert "uploads" in os.listdir(mount.path / "uploads")  # its upload folder
        assert os.listxattr(mount.path / "prearchive") == []  # the area's folder, no project


def test_hierarchy_and_scan_folder_names(demo_mount: Mount) -> None:
    root = demo_mount.path
    assert set(os.listdir(root / "NEURO_PUB")) >= {"NP001", "NP002", "NP 003"}
    assert set(os.listdir(root / SESSION)) == {"scans", "resources", "session.xml"}
    scans = set(os.listdir(root / SESSION / "scans"))
    assert "2-T1_MPRAGE_2" in scans
    # A bare scan ID resolves although it is not listed: a link to the scan's folder...
    bare, full = root / SESSION / "scans" / "2", root / SESSION / "scans" / "2-T1_MPRAGE_2"
    assert "2" not in scans and bare.is_dir() and os.readlink(bare) == "2-T1_MPRAGE_2"
    assert os.listdir(bare / "resources")
    assert os.getxattr(bare, "user.xnat.id") == b"2"
    # ...so nothing below it is a second name of a folder: a shell inside the
    # listed folders stays there, whatever is looked up through the bare name.
    here = os.getcwd()
    inner = full / "resources" / "NIFTI"
    os.chdir(inner)
    try:
        os.listdir(bare / "resources" / "NIFTI" / "files")
        assert os.getcwd() == str(inner)
        assert (bare / "resources").stat().st_ino == (full / "resources").stat().st_ino
    finally:
        os.chdir(here)


def test_stat_sizes_match_listings_without_per_file_requests(demo_mount: Mount) -> None:
    expected = server_files(demo_mount)
    mark = demo_mount.server.log_mark()
    for rel, row in expected.items():
        st = os.stat(demo_mount.path / SESSION / rel)
        assert st.st_size == int(row["Size"]), rel
        assert st.st_mode & 0o777 == 0o444
    routes = [e["route"] for e in demo_mount.server.requests_since(mark)]
    assert "files.download" not in routes
    # One listing per level on the way down, then the session: its item and
    # one listing of every file, its scans' and its own.
    walk = ["projects.list", "subjects.list", "experiments.list"]
    assert routes[:3] == walk
    assert routes[3:] == ["experiment.get", "files.list"], routes


def test_a_whole_session_costs_two_requests(demo_mount: Mount) -> None:
    """``ls -lR`` of a session's scans, then of its own resources, then of its
    assessors: its item and one ``files?all=true`` listing, whatever its size."""
    session = demo_mount.path / "NEURO_PUB" / "NP001" / "NP001_MR2"
    os.stat(session)
    mark = demo_mount.server.log_mark()
    out = subprocess.run(["ls", "-lR", str(session / "scans")], check=True,
                         capture_output=True, text=True).stdout
    assert ".dcm" in out
    requests = demo_mount.server.requests_since(mark)
    documents = [e["path"] for e in requests if "format=xml" in e["query"]]  # scan.xml
    assert len(documents) == len(set(documents)) == out.count("scan.xml"), documents
    requests = [e for e in requests if "format=xml" not in e["query"]]
    assert [e["route"] for e in requests] == ["experiment.get", "files.list"], requests
    assert re.fullmatch(r"/data/experiments/\w+/files", requests[1]["path"])
    assert "all=true" in requests[1]["query"]
    mark = demo_mount.server.log_mark()
    out = subprocess.run(["ls", "-lR", str(session / "resources")], check=True,
                         capture_output=True, text=True).stdout
    assert "qc.json" in out
    out = subprocess.run(["ls", "-lR", str(session / "assessors")], check=True,
                         capture_output=True, text=True).stdout
    assert "report.json" in out
    assert [e for e in demo_mount.server.requests_since(mark)
            if "format=xml" not in e["query"]] == []  # assessor.xml: its document


def test_assessors_are_folders_of_their_sessions(demo_mount: Mount, tmp_path: Path) -> None:
    """``assessors/<label>/resources/<resource>/files/...``, as XNAT's download
    page lays them out, with their output resources; only sessions with
    assessors have the folder."""
    session = demo_mount.path / "NEURO_PUB" / "NP001" / "NP001_MR2"
    assert sorted(os.listdir(session)) == ["assessors", "resources", "scans", "session.xml"]
    assert "assessors" not in os.listdir(demo_mount.path / SESSION)
    assessor = session / "assessors" / "NP001_MR2_QC"
    assert os.getxattr(assessor, "user.xnat.xsi_type") == b"xnat:qcAssessmentData"
    target = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(assessor), str(target)], check=True)
    with httpx.Client(base_url=demo_mount.server.url, auth=("admin", "admin")) as c:
        base = os.getxattr(assessor, "user.xnat.uri").decode()
        rows = c.get(f"{base}/resources/QC/files").json()["ResultSet"]["Result"]
        expected = {r["URI"].split("/files/", 1)[1]: r["digest"] for r in rows}
    copied = target / "resources" / "QC" / "files"
    assert {str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file()} == \
        set(expected) == {"report.json", "ratings/motion.txt"}
    for rel, digest in expected.items():
        assert hashlib.md5((copied / rel).read_bytes()).hexdigest() == digest, rel


def test_walking_a_project_lists_its_experiments_once(demo_mount: Mount) -> None:
    """The first subject opened costs its own listing; from the second on, one
    listing of the project's experiments serves every subject of the walk."""
    project = demo_mount.path / "NEURO_PUB"
    subjects = sorted(name for name in os.listdir(project)
                      if name != "resources" and not name.endswith((".csv", ".xml")))
    assert len(subjects) == 3
    mark = demo_mount.server.log_mark()
    seen = {s: set(os.listdir(project / s)) - {"resources", "subject.xml"} for s in subjects}
    paths = [e["path"] for e in demo_mount.server.requests_since(mark)
             if e["route"] == "experiments.list"]
    assert len(paths) == 2, paths
    assert re.fullmatch(r"/data/projects/NEURO_PUB/subjects/\w+/experiments", paths[0])
    assert paths[1] == "/data/projects/NEURO_PUB/experiments"
    with httpx.Client(base_url=demo_mount.server.url, auth=("admin", "admin")) as c:
        for subject in subjects:
            rows = c.get(f"/data/projects/NEURO_PUB/subjects/{subject}/experiments"
                         ).json()["ResultSet"]["Result"]
            assert seen[subject] == {r["label"] for r in rows}, subject


def test_cp_r_session_is_byte_identical(demo_mount: Mount, tmp_path: Path) -> None:
    target = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(demo_mount.path / SESSION), str(target)], check=True)
    expected = server_files(demo_mount)
    copied = {str(p.relative_to(target)): p for p in target.rglob("*")
              if p.is_file() and p.suffix != ".xml"}  # the documents: test_documents.py
    assert set(copied) == set(expected)
    for rel, row in expected.items():
        assert hashlib.md5(copied[rel].read_bytes()).hexdigest() == row["digest"], rel


def test_find_lists_everything_and_ls_l_costs_one_listing(demo_mount: Mount) -> None:
    session = demo_mount.path / "NEURO_PUB" / "NP002" / "NP002_MR1"
    mark = demo_mount.server.log_mark()
    out = subprocess.run(["find", str(session), "-ls"], check=True, capture_output=True,
                         text=True).stdout
    assert ".dcm" in out
    routes = [e["route"] for e in demo_mount.server.requests_since(mark)
              if "format=xml" not in e["query"]]  # the documents: test_documents.py
    below_subject = [r for r in routes if r not in ("projects.list", "subjects.list",
                                                     "experiments.list")]
    assert below_subject == ["experiment.get", "files.list"], routes
    mark = demo_mount.server.log_mark()
    subprocess.run(["ls", "-lR", str(session)], check=True, capture_output=True)
    assert demo_mount.server.requests_since(mark) == []  # all cached


def test_entries_the_kernel_forgot_come_back_and_held_ones_stay(demo_mount: Mount) -> None:
    """The mount lets go of what the kernel forgets (a walk over a whole archive
    must not pin every node for the life of the mount), and nothing shows it."""
    project = demo_mount.path / "NEURO_PUB"
    inodes = {p: p.stat().st_ino for p in project.rglob("*")}
    listing = sorted(os.listdir(demo_mount.path / SESSION))
    dicom = next(p for p in inodes if p.suffix == ".dcm")
    head = dicom.read_bytes()[:4096]
    session_fd = os.open(demo_mount.path / SESSION, os.O_RDONLY | os.O_DIRECTORY)
    dicom_fd = os.open(dicom, os.O_RDONLY)
    try:
        drop_kernel_entries()
        # Held open: the kernel kept these, so the mount must have too.
        assert sorted(os.listdir(session_fd)) == listing
        assert os.getxattr(session_fd, "user.xnat.label") == b"NP001_MR1"
        assert os.pread(dicom_fd, 4096, 0) == head
        # Forgotten: found again under the same inode numbers (find and tar rely on it).
        assert {p: p.stat().st_ino for p in project.rglob("*")} == inodes
        assert dicom.read_bytes()[:4096] == head
    finally:
        os.close(session_fd)
        os.close(dicom_fd)


def test_walks_stay_whole_while_the_kernel_keeps_forgetting(demo_mount: Mount) -> None:
    """Forgets race with lookups and readdirplus replies for the same entries;
    a walk must never meet an entry the mount let go of too early."""
    project = demo_mount.path / "NEURO_PUB"
    walk_cmd = ["find", str(project), "-printf", "%i %s %p\\n"]  # stats every entry
    expected = subprocess.run(walk_cmd, check=True, capture_output=True, text=True).stdout
    stop = threading.Event()

    def keep_forgetting() -> None:
        while not stop.is_set():
            drop_kernel_entries()

    drop_kernel_entries()  # skips the test where it is not allowed
    forgetter = threading.Thread(target=keep_forgetting)
    forgetter.start()
    try:
        for _ in range(10):
            walk = subprocess.run(walk_cmd, capture_output=True, text=True)
            assert walk.returncode == 0, walk.stderr
            assert walk.stdout == expected  # same entries, sizes and inode numbers
    finally:
        stop.set()
        forgetter.join()


def test_a_shared_subject_is_an_entry_of_its_own_in_each_project(
        tmp_path: Path, mount_factory, demo_copy) -> None:  # noqa: ANN001
    """XNAT sharing: NP001 of NEURO_PUB shown in ALICE_LAB under other labels. Each
    project has its own entry with its own name, project and inode; neither changes
    when the other is listed; both paths give the same bytes."""
    with TestServer(demo_copy(tmp_path / "data"), dataset="demo") as server:
        share_session(server, "NEURO_PUB", "NP001", "NP001_MR1", into="ALICE_LAB",
                      subject_label="SHARED_SUBJ", session_label="SHARED_MR1")
        mount = mount_factory(server)
        own, shared = mount.path / "NEURO_PUB" / "NP001", mount.path / "ALICE_LAB" / "SHARED_SUBJ"
        for _ in range(2):  # listing one project must not rename the other's entry
            assert "SHARED_SUBJ" in os.listdir(mount.path / "ALICE_LAB")
            assert "NP001" in os.listdir(mount.path / "NEURO_PUB")
            assert os.listdir(shared) == ["subject.xml", "resources", "SHARED_MR1"]
            assert "NP001_MR1" in os.listdir(own)
            assert os.getxattr(shared, "user.xnat.project") == b"ALICE_LAB"
            assert os.getxattr(own, "user.xnat.project") == b"NEURO_PUB"
            assert os.getxattr(shared, "user.xnat.label") == b"SHARED_SUBJ"
        assert os.stat(shared).st_ino != os.stat(own).st_ino
        dicom = next((own / "NP001_MR1").rglob("*.dcm"))
        in_shared = shared / "SHARED_MR1" / dicom.relative_to(own / "NP001_MR1")
        assert in_shared.read_bytes() == dicom.read_bytes()


def test_extended_attributes(demo_mount: Mount) -> None:
    session = demo_mount.path / SESSION
    out = subprocess.run(["getfattr", "-d", str(session)], check=True, capture_output=True,
                         text=True).stdout
    assert 'user.xnat.label="NP001_MR1"' in out
    assert 'user.xnat.xsi_type="xnat:mrSessionData"' in out
    accession = os.getxattr(session, "user.xnat.id").decode()
    assert accession.startswith("XNAT_E")
    dicom = next((session / "scans/2-T1_MPRAGE_2/resources/DICOM/files").iterdir())
    assert len(os.getxattr(dicom, "user.xnat.digest")) == 32
    assert os.getxattr(dicom, "user.xnat.uri").decode().startswith("/data/")


def test_archive_structure_is_read_only_and_its_files_protected(demo_mount: Mount) -> None:
    """Only resources take new files (tests/mount/test_resources.py); what XNAT
    has is neither replaced nor deleted without the mount's options (EPERM)."""
    files = demo_mount.path / SESSION / "resources"
    with pytest.raises(OSError) as info:
        (files / "new.txt").write_text("x")
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError) as info:
        os.mkdir(demo_mount.path / SESSION / "scans" / "99-NEW")
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError) as info:
        os.utime(demo_mount.path / SESSION)
    assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    dicom = next((demo_mount.path / SESSION / "scans/2-T1_MPRAGE_2/resources/DICOM/files")
                 .iterdir())
    before = dicom.read_bytes()
    assert os.stat(dicom).st_mode & 0o777 == 0o444  # XNAT has it: not to be written
    with pytest.raises(OSError) as info:
        dicom.unlink()
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        dicom.write_bytes(b"not the scanner's")
    assert info.value.errno in (errno.EPERM, errno.EACCES)  # root ignores the mode
    assert dicom.read_bytes() == before


def test_missing_names_are_enoent(demo_mount: Mount) -> None:
    assert not (demo_mount.path / "NO_SUCH_PROJECT").exists()
    assert not (demo_mount.path / SESSION / "scans" / "999").exists()


def test_mount_is_private_to_its_user(demo_mount: Mount) -> None:
    mounts = Path("/proc/self/mounts").read_text()
    line = next(line for line in mounts.splitlines() if str(demo_mount.path) in line)
    assert "allow_other" not in line


def test_labels_with_spaces_are_reachable(demo_mount: Mount, tmp_path: Path) -> None:
    session = demo_mount.path / "NEURO_PUB" / "NP 003" / "NP 003_MR1"
    assert (session / "scans").is_dir()
    shutil.copytree(session / "resources", tmp_path / "res")
    assert any((tmp_path / "res").rglob("qc.json"))


def test_a_protected_project_is_listed_and_its_contents_refused(demo_server: TestServer,
                                                                mount_factory) -> None:  # noqa: ANN001
    """bob has no role in ONC-PROT (protected): XNAT lists it to him, as its web
    pages do, and refuses its subjects (403). The mount shows it and answers
    "Permission denied" inside, not "No such file or directory"; a private
    project he cannot see stays unlisted and missing."""
    mount = mount_factory(demo_server, name="bob", user="bob")
    names = os.listdir(mount.path)
    assert "ONC-PROT" in names and "ALICE_LAB" not in names
    assert (mount.path / "ONC-PROT").is_dir()
    with pytest.raises(PermissionError):
        os.listdir(mount.path / "ONC-PROT")
    listing = subprocess.run(["ls", str(mount.path / "ONC-PROT")], capture_output=True,
                             text=True)
    assert listing.returncode != 0 and "Permission denied" in listing.stderr
    with pytest.raises(FileNotFoundError):
        os.listdir(mount.path / "ALICE_LAB")
