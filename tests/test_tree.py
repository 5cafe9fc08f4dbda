"""Tree's choice of listings, against a client stand-in that records calls.

The mount tests show what a real walk costs; these cover the branch that our
XNAT-compatible server never takes: a server that ignores ``files?all=true``.
"""

from __future__ import annotations

from typing import Any

from xnatfs import client as xc
from xnatfs.tree import Tree


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
    groups = await Tree(server).session_files("E1")
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
    tree = Tree(server)
    assert [e.id for e in await tree.subject_experiments("P", "S1")] == ["E_S1"]
    assert [e.id for e in await tree.subject_experiments("P", "S2")] == ["E_S2"]
    assert server.calls == ["experiments of S1", "experiments of the project",
                            "experiments of S2"]
