"""Tree against client stand-ins: its choice of listings, and how long nodes live.

The mount tests show what a real walk costs and that the kernel's forgets
break nothing; these cover the branch that our XNAT-compatible server never
takes (a server that ignores ``files?all=true``), and that a forgotten node
is really let go.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, cast

import pytest

from xnatfs import client as xc
from xnatfs import tree as tree_module
from xnatfs.errors import NotFound
from xnatfs.areas.archive import PENDING_SUBJECT, SUBJECT, ArchiveArea
from xnatfs.areas.root import RootArea
from xnatfs.tree import ROOT_INODE, Tree


def archive_tree(server: Any) -> tuple[Tree, ArchiveArea]:
    """A tree with the archive area only (no kernel to tell of changes)."""
    tree = Tree(server)
    archive = ArchiveArea(tree, cast(Any, None))
    tree.register(RootArea(tree, cast(Any, None), [archive]))
    tree.register(archive)
    return tree, archive


def remote_file(scan_id: str | None, path: str) -> xc.RemoteFile:
    owner = f"/data/experiments/E1/scans/{scan_id}" if scan_id else "/data/experiments/E1"
    return xc.RemoteFile(path=path, size=1, digest=None,
                         uri=f"{owner}/resources/7/files/{path}", resource_label="DICOM",
                         resource_id="7", scan_id=scan_id,
                         owner_kind="scan" if scan_id else "session")


class SessionOnlyServer:
    """An XNAT that answers ``files?all=true`` with the session's own files only."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def get_experiment(self, experiment_id: str) -> xc.ExperimentDetail:
        self.calls.append("item")
        dicom = xc.Resource(id="7", label="DICOM", format="DICOM", content=None,
                            file_count=1, file_size=1)
        return xc.ExperimentDetail(
            id=experiment_id, label="MR1", project="P", subject_id="S1",
            xsi_type="xnat:mrSessionData", date=None, insert_date=None,
            scans=(xc.Scan(id="2", type="T1", series_description=None,
                           xsi_type="xnat:mrScanData", quality=None, resources=(dicom,)),),
            resources=(dicom,))

    async def list_experiment_files(self, experiment_id: str) -> list[xc.RemoteFile]:
        self.calls.append("files?all=true")
        return [remote_file(None, "qc.json")]

    async def list_scan_files(self, experiment_id: str) -> list[xc.RemoteFile]:
        self.calls.append("scans/ALL/files")
        return [remote_file("2", "1.dcm")]


async def test_a_server_ignoring_all_true_still_shows_scan_files() -> None:
    server: Any = SessionOnlyServer()
    groups = await archive_tree(server)[1].session_files("E1")
    assert [f.path for f in groups[("2", "DICOM")]] == ["1.dcm"]
    assert [f.path for f in groups[(None, "DICOM")]] == ["qc.json"]
    assert server.calls == ["item", "files?all=true", "scans/ALL/files"]


class NoSubjectColumnServer:
    """An XNAT whose project-wide experiment listing leaves out ``subject_ID``."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def list_experiments(self, project: str, subject: str | None = None
                               ) -> list[xc.Experiment]:
        self.calls.append(f"experiments of {subject or 'the project'}")
        owner = None if subject is None else subject
        return [xc.Experiment(id=f"E_{subject}", label=f"{subject}_MR1", project=project,
                              subject_id=owner, xsi_type="xnat:mrSessionData", date=None,
                              insert_date=None)]


async def test_a_walk_falls_back_to_subject_listings_without_subject_ids() -> None:
    server: Any = NoSubjectColumnServer()
    _, archive = archive_tree(server)
    assert [e.id for e in await archive.subject_experiments("P", "S1")] == ["E_S1"]
    assert [e.id for e in await archive.subject_experiments("P", "S2")] == ["E_S2"]
    assert server.calls == ["experiments of S1", "experiments of the project",
                            "experiments of S2"]


class ManySubjectsServer:
    """One project with many subjects: a listing that makes many nodes at once."""

    def __init__(self, subjects: int) -> None:
        self.subjects = subjects

    async def list_projects(self) -> list[xc.Project]:
        return [xc.Project(id="P", name=None, secondary_id=None, description=None)]

    async def list_subjects(self, project: str) -> list[xc.Subject]:
        return [xc.Subject(id=f"S{i}", label=f"SUBJ{i:04d}", project=project, insert_date=None)
                for i in range(self.subjects)]


async def walked_project(tree: Tree, *, remember: bool) -> list[Any]:
    """List the root and the project, handing every entry to the "kernel" if asked;
    the project's subjects (not its resources/ folder nor its tables)."""
    (project, *_) = await tree.children(ROOT_INODE)
    if remember:
        tree.remember(project)
    subjects = [n for n in await tree.children(project.inode) if n.kind is SUBJECT]
    if remember:
        for subject in subjects:
            tree.remember(subject)
    return subjects


async def test_nodes_go_once_the_kernel_forgets_them_and_keep_their_inode() -> None:
    tree = archive_tree(ManySubjectsServer(200))[0]
    subjects = await walked_project(tree, remember=True)
    refs = [weakref.ref(s) for s in subjects]
    inodes = {s.name: s.inode for s in subjects}
    project_inode = subjects[0].parent
    del subjects
    gc.collect()
    assert all(r() is not None for r in refs), "held by the kernel: must stay"

    tree.remember(tree.node(inodes["SUBJ0007"]))  # looked up once more
    for inode in inodes.values():
        assert tree.forget(inode, 1) is (inode != inodes["SUBJ0007"])
    assert tree.forget(project_inode, 1)
    gc.collect()
    assert sum(r() is not None for r in refs) == 1  # only the one still held
    assert tree.node(inodes["SUBJ0007"]).name == "SUBJ0007"
    with pytest.raises(NotFound):
        tree.node(inodes["SUBJ0001"])

    # Listed again, the same names come back under the same inode numbers.
    again = await walked_project(tree, remember=False)
    assert {s.name: s.inode for s in again} == inodes
    assert tree.forget(ROOT_INODE, 1) and tree.node(ROOT_INODE).inode == ROOT_INODE



async def test_inode_numbers_are_the_same_in_every_mount() -> None:
    first = await walked_project(archive_tree(ManySubjectsServer(50))[0], remember=False)
    second = await walked_project(archive_tree(ManySubjectsServer(50))[0], remember=False)
    assert [s.inode for s in first] == [s.inode for s in second]
    assert len({s.inode for s in first}) == 50 and ROOT_INODE not in {s.inode for s in first}


async def test_keys_whose_hashes_collide_get_numbers_of_their_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = tree_module._hashed_inode
    monkeypatch.setattr(tree_module, "_hashed_inode",
                        lambda key: 5 if key[0] == "subject" else hashed(key))
    tree = archive_tree(ManySubjectsServer(3))[0]
    subjects = await walked_project(tree, remember=True)
    assert [s.inode for s in subjects] == [5, 6, 7]
    assert [tree.node(i).name for i in (5, 6, 7)] == ["SUBJ0000", "SUBJ0001", "SUBJ0002"]
    # The one on the shared number goes; the others keep theirs when listed again,
    # and it gets the shared number back.
    tree.forget(5, 1)
    tree.forget(subjects[0].parent, 1)  # the project: its listing goes too
    del subjects
    gc.collect()
    with pytest.raises(NotFound):
        tree.node(5)
    # Found on its own number while the shared one is free (not made a second time).
    assert tree._slot(("subject", "P", "S2"))[0] == 7
    again = await walked_project(tree, remember=False)
    assert {s.name: s.inode for s in again} == {"SUBJ0000": 5, "SUBJ0001": 6, "SUBJ0002": 7}


async def test_lookups_reuse_a_big_listing_until_it_changes() -> None:
    server = ManySubjectsServer(2000)
    tree, archive = archive_tree(server)
    subjects = await walked_project(tree, remember=True)
    project = tree.node(subjects[0].parent)
    # Unchanged: the entries already made serve the lookup (no node made again).
    assert await tree.children(project.inode) is await tree.children(project.inode)
    assert (await tree.lookup(project.inode, "SUBJ1999")) is subjects[-1]
    # A refreshed listing with one more subject, and a subject made with mkdir.
    server.subjects = 2001
    tree.invalidate(("subjects", "P"))
    assert (await tree.lookup(project.inode, "SUBJ2000")).subject_id == "S2000"
    archive.add_pending_subject(project, "NEW")
    assert (await tree.lookup(project.inode, "NEW")).kind is PENDING_SUBJECT
    assert (await tree.lookup(project.inode, "SUBJ1999")) is subjects[-1]


class SharedSubjectServer:
    """Subject S1 of project A, shared into project B under another label (XNAT sharing)."""

    async def list_projects(self) -> list[xc.Project]:
        return [xc.Project(id=p, name=None, secondary_id=None, description=None)
                for p in ("A", "B")]

    async def list_subjects(self, project: str) -> list[xc.Subject]:
        label = "OWN_LABEL" if project == "A" else "SHARED_LABEL"
        return [xc.Subject(id="S1", label=label, project=project, insert_date=None)]


async def test_a_shared_subject_is_a_node_of_its_own_in_each_project() -> None:
    tree = archive_tree(SharedSubjectServer())[0]
    a, b = (n for n in await tree.children(ROOT_INODE) if n.name in ("A", "B"))
    in_a = await tree.lookup(a.inode, "OWN_LABEL")
    in_b = await tree.lookup(b.inode, "SHARED_LABEL")
    assert in_a is not in_b and in_a.inode != in_b.inode
    # Listing B does not rename or move A's entry (one directory, one parent).
    assert (await tree.lookup(a.inode, "OWN_LABEL")) is in_a
    assert (in_a.name, in_a.project, in_a.parent) == ("OWN_LABEL", "A", a.inode)
    assert (in_b.name, in_b.project, in_b.parent) == ("SHARED_LABEL", "B", b.inode)
    assert in_a.xattrs["user.xnat.project"] == "A"
