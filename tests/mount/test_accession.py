"""Accession IDs as paths through a real mount: ``MOUNT/XNAT_E00001`` and friends
are links to the labelled folders, whatever tool follows them."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from xnatfs.testing.harness import TestServer, share_session
from xnatfs.testing.store import Store

from .conftest import Mount, make_env, mount_xnatfs, unmount


def item_id(server: TestServer, url: str) -> str:
    with httpx.Client(base_url=server.url, auth=("admin", "admin")) as c:
        answer = c.get(url, params={"format": "json"})
        answer.raise_for_status()
        return str(answer.json()["items"][0]["data_fields"]["ID"])


def module_mount(server: TestServer, home: Path, user: str) -> Iterator[Mount]:
    mount = Mount(home / "mnt", server, home / "blocks", make_env(home, user), [])
    mount_xnatfs(server, mount.path, mount.cache_dir, mount.env, mount.options)
    yield mount
    unmount(mount.path)


@pytest.fixture(scope="module")
def admin_mount(demo_server: TestServer, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Mount]:
    """One admin mount of the shared demo server for the tests that only read."""
    yield from module_mount(demo_server, tmp_path_factory.mktemp("ids-admin"), "admin")


@pytest.fixture(scope="module")
def alice_mount(demo_server: TestServer, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Mount]:
    yield from module_mount(demo_server, tmp_path_factory.mktemp("ids-alice"), "alice")


def same_folder(link: Path, folder: Path) -> None:
    """``link`` leads to ``folder``: the same inode, entries and target, with
    ``stat -L``, ``realpath`` and Python alike."""
    assert link.is_symlink()
    assert os.stat(link).st_ino == os.stat(folder).st_ino
    assert sorted(os.listdir(link)) == sorted(os.listdir(folder))
    assert os.path.realpath(link) == str(folder)
    shown = subprocess.run(["realpath", str(link)], check=True, capture_output=True,
                           text=True).stdout.strip()
    assert shown == str(folder)
    inode = subprocess.run(["stat", "-L", "-c", "%i", str(link)], check=True,
                           capture_output=True, text=True).stdout.strip()
    assert int(inode) == os.stat(folder).st_ino


def test_subject_session_and_assessor_ids_at_the_root(admin_mount: Mount) -> None:
    server, root = admin_mount.server, admin_mount.path
    subject = item_id(server, "/data/projects/NEURO_PUB/subjects/NP001")
    session = item_id(server, "/data/projects/NEURO_PUB/experiments/NP001_MR2")
    assessor = item_id(server, "/data/projects/NEURO_PUB/experiments/NP001_MR2"
                               "/assessors/NP001_MR2_QC")
    labelled = root / "NEURO_PUB" / "NP001"
    expected = {subject: labelled, session: labelled / "NP001_MR2",
                assessor: labelled / "NP001_MR2" / "assessors" / "NP001_MR2_QC"}
    for accession, folder in expected.items():
        same_folder(root / accession, folder)
        assert os.readlink(root / accession) == str(folder.relative_to(root))
    assert accession not in os.listdir(root)  # resolved, never listed
    scans = subprocess.run(["ls", str(root / session / "scans")], check=True,
                           capture_output=True, text=True).stdout
    assert scans.split() == sorted(os.listdir(labelled / "NP001_MR2" / "scans"))
    in_shell = subprocess.run(f"cd {root}/{session} && ls scans", shell=True, check=True,
                              capture_output=True, text=True).stdout
    assert in_shell == scans
    dicom = next((labelled / "NP001_MR2" / "scans").rglob("*.dcm"))
    by_id = root / session / dicom.relative_to(labelled / "NP001_MR2")
    assert by_id.read_bytes() == dicom.read_bytes()


def test_ids_in_project_and_subject_folders(admin_mount: Mount) -> None:
    server, project = admin_mount.server, admin_mount.path / "NEURO_PUB"
    subject = item_id(server, "/data/projects/NEURO_PUB/subjects/NP 003")
    session = item_id(server, "/data/projects/NEURO_PUB/experiments/NP 003_MR1")
    same_folder(project / subject, project / "NP 003")
    assert os.readlink(project / subject) == "NP 003"
    same_folder(project / "NP 003" / session, project / "NP 003" / "NP 003_MR1")
    assert os.readlink(project / "NP 003" / session) == "NP 003_MR1"
    # Only where they belong: a session's ID is not a subject's, nor elsewhere.
    assert not (project / session).exists()
    assert not (admin_mount.path / "ONC-PROT" / subject).exists()


def test_what_an_id_costs(admin_mount: Mount) -> None:
    """A session's ID costs its item, which its folder then uses; names not shaped
    like IDs cost nothing, and a miss is cached."""
    server, root = admin_mount.server, admin_mount.path
    session = item_id(server, "/data/projects/ONC-PROT/experiments/ONC002_CT1")
    mark = server.log_mark()
    assert os.listdir(root / session / "scans")
    items = [e for e in server.requests_since(mark) if e["path"] == f"/data/experiments/{session}"]
    assert len(items) == 1, items
    mark = server.log_mark()
    for name in (".git", ".Trash", ".Trash-0", "autorun.inf", "XNAT_X00001", "XNAT_S", "HEAD"):
        assert not (root / name).exists()
    assert server.requests_since(mark) == []
    for _ in range(3):
        assert not (root / "XNAT_E99999").exists()
        assert not (root / "XNAT_S99999").exists()
    asked = [e["path"] for e in server.requests_since(mark)]
    assert sorted(asked) == ["/data/experiments/XNAT_E99999",
                             "/data/subjects/XNAT_S99999/projects"], asked


def test_an_id_the_user_cannot_read_is_enoent(alice_mount: Mount) -> None:
    server, root = alice_mount.server, alice_mount.path
    for url in ("/data/projects/SECRET/subjects/SEC01",
                "/data/projects/SECRET/experiments/SEC01_MR1"):
        accession = item_id(server, url)
        with pytest.raises(FileNotFoundError):
            os.lstat(root / accession)
        with pytest.raises(OSError) as missing:
            os.listdir(root / accession)
        assert missing.value.errno == errno.ENOENT
    readable = item_id(server, "/data/projects/ALICE_LAB/experiments/AL01_MR1")
    same_folder(root / readable, root / "ALICE_LAB" / "AL01" / "AL01_MR1")


def test_listed_names_win_and_shares_resolve_where_the_user_can_read(
        fresh_server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """A project and a subject named like IDs stay folders; an object of a project
    alice cannot read resolves, for her, into the project it is shared into
    (under its label there), and for admin into its own project."""
    with httpx.Client(base_url=fresh_server.url, auth=("admin", "admin")) as c:
        for url in ("/data/projects/OWN", "/data/projects/LAB", "/data/projects/OWN/subjects/S1",
                    "/data/projects/OWN/subjects/S1/experiments/S1_MR?xsiType=xnat:mrSessionData",
                    "/data/projects/OWN/subjects/S1/experiments/S1_MR/scans/1"
                    "?xsiType=xnat:mrScanData&type=T1"):
            assert c.put(url).status_code in (200, 201), url
    subject = item_id(fresh_server, "/data/projects/OWN/subjects/S1")
    session = item_id(fresh_server, "/data/projects/OWN/experiments/S1_MR")
    with httpx.Client(base_url=fresh_server.url, auth=("admin", "admin")) as c:
        # A project whose ID is the session's, and a subject labelled with the subject's.
        assert c.put(f"/data/projects/{session}").status_code in (200, 201)
        assert c.put(f"/data/projects/LAB/subjects/{subject}").status_code in (200, 201)
    store = Store(fresh_server.data_dir)
    try:
        store.set_role("LAB", "alice", "member")
    finally:
        store.close()
    share_session(fresh_server, "OWN", subject, session, into="LAB",
                  subject_label="SHARED_S1", session_label="SHARED_MR")
    admin = mount_factory(fresh_server, name="admin")
    alice = mount_factory(fresh_server, name="alice", user="alice")
    assert (admin.path / session).is_dir() and not (admin.path / session).is_symlink()
    same_folder(admin.path / subject, admin.path / "OWN" / "S1")
    same_folder(admin.path / "OWN" / "S1" / session, admin.path / "OWN" / "S1" / "S1_MR")
    lab = admin.path / "LAB"
    assert (lab / subject).is_dir() and not (lab / subject).is_symlink()  # the listed label
    assert sorted(os.listdir(alice.path)) == [".xnatfs-status.json", "LAB", "prearchive", "uploads"]
    same_folder(alice.path / subject, alice.path / "LAB" / "SHARED_S1")
    same_folder(alice.path / session, alice.path / "LAB" / "SHARED_S1" / "SHARED_MR")
    assert os.listdir(alice.path / session / "scans") == ["1-T1"]
