"""A real XNAT client (xnatpy, PyPI ``xnat``) against the test server, unchanged.

If xnatpy cannot tell our server from XNAT on these workflows, neither can
the mount. Each download is compared byte for byte with the server's blob.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import xnat

from xnatfs.testing.imaging import synthetic_study, write_dicom_archive
from xnatfs.testing.harness import TestServer, share_session
from xnatfs.testing.store import Store


@pytest.fixture(scope="module")
def session(demo_server: TestServer) -> Iterator[xnat.session.XNATSession]:
    with xnat.connect(demo_server.url, user="admin", password="admin",
                      extension_types=False) as connection:
        yield connection


def server_md5(server: TestServer, experiment_id: str, scan_id: str | None,
               resource: str, relpath: str) -> str:
    """The digest of the file as the server stores it, read from its own database."""
    store = Store(server.data_dir)
    try:
        scan_pk = store.scan(experiment_id, scan_id)["pk"] if scan_id else None
        row = store.resource(experiment_id, scan_pk, resource)
        f = store.file(row["id"], relpath)
        assert f is not None
        return hashlib.md5(store.blob_path(f.blob).read_bytes()).hexdigest()
    finally:
        store.close()


def test_connect_with_password_and_walk(session: xnat.session.XNATSession) -> None:
    assert {"NEURO_PUB", "ONC-PROT", "ALICE_LAB", "SAMPLES"} <= set(session.projects.keys())
    project = session.projects["NEURO_PUB"]
    assert project.name
    subjects = project.subjects
    assert len(subjects) >= 2
    walked_files = 0
    for subject in subjects.values():
        for experiment in subject.experiments.values():
            assert experiment.label and experiment.project == "NEURO_PUB"
            for scan in experiment.scans.values():
                assert scan.type is not None and scan.__xsi_type__.startswith("xnat:")
                for resource in scan.resources.values():
                    assert resource.label
                    for f in resource.files.values():
                        assert int(f.size) > 0  # xnatpy HEADs the file and returns the header text
                        walked_files += 1
    assert walked_files > 20


def test_connect_with_alias_token(demo_server: TestServer) -> None:
    token = httpx.get(f"{demo_server.url}/data/services/tokens/issue",
                      auth=("alice", "alice")).json()
    with xnat.connect(demo_server.url, user=token["alias"], password=token["secret"],
                      extension_types=False) as connection:
        assert connection.logged_in_user == "alice"
        ids = set(connection.projects.keys())
        assert "NEURO_PUB" in ids and "SECRET" not in ids


def _mr_session(session: xnat.session.XNATSession):  # noqa: ANN202 - xnatpy class
    return session.projects["NEURO_PUB"].subjects["NP001"].experiments["NP001_MR1"]


def test_scan_zip_download_is_byte_identical(session: xnat.session.XNATSession,
                                             demo_server: TestServer, tmp_path: Path) -> None:
    experiment = _mr_session(session)
    scan = experiment.scans["2"]
    target = tmp_path / "scan.zip"
    scan.download(str(target))
    with zipfile.ZipFile(target) as zf:
        names = zf.namelist()
        assert names and all(
            n.startswith("NP001_MR1/scans/2-T1_MPRAGE_2/resources/") for n in names)
        for name in names:
            _, _, _, _, resource, _, relpath = name.split("/", 6)
            digest = server_md5(demo_server, experiment.id, "2", resource, relpath)
            assert hashlib.md5(zf.read(name)).hexdigest() == digest


def test_session_download_dir_layout(session: xnat.session.XNATSession,
                                     tmp_path: Path) -> None:
    experiment = _mr_session(session)
    experiment.download_dir(str(tmp_path))
    scans_dir = tmp_path / "NP001_MR1" / "scans"
    assert (scans_dir / "2-T1_MPRAGE_2" / "resources" / "DICOM" / "files").is_dir()


def test_single_file_download_is_byte_identical(session: xnat.session.XNATSession,
                                                demo_server: TestServer,
                                                tmp_path: Path) -> None:
    experiment = _mr_session(session)
    resource = experiment.scans["2"].resources["DICOM"]
    name, remote = sorted(resource.files.items())[0]
    target = tmp_path / "one.dcm"
    remote.download(str(target))  # xnatpy checks the listed digest as well
    assert hashlib.md5(target.read_bytes()).hexdigest() == server_md5(
        demo_server, experiment.id, "2", "DICOM", name)


def test_protected_project_is_listed_and_its_data_forbidden(demo_server: TestServer) -> None:
    with xnat.connect(demo_server.url, user="bob", password="bob",
                      extension_types=False) as connection:
        assert "ONC-PROT" in connection.projects.keys()
        assert "SECRET" in connection.projects.keys() and "ALICE_LAB" not in connection.projects
        with pytest.raises(xnat.exceptions.XNATResponseError, match="403"):
            connection.get_json("/data/projects/ONC-PROT/subjects")
        with pytest.raises(xnat.exceptions.XNATResponseError, match="404"):
            connection.get_json("/data/projects/SECRET_NOPE/subjects")


def test_import_zip_then_archive_through_xnatpy(tmp_path: Path,
                                                started_demo_server: TestServer) -> None:
    """On a server of its own: archiving adds a subject, which the shared demo
    server's readers (a walk that counts requests, say) must not see."""
    server = started_demo_server
    with xnat.connect(server.url, user="admin", password="admin",
                      extension_types=False) as session:
        series = synthetic_study("Import^Test", "IMP001", modality="MR", slices=6, rows=32,
                                 cols=32, seed=7)
        archive = tmp_path / "study.zip"
        members = write_dicom_archive(archive, series)
        prearchived = session.services.import_(str(archive), project="NEURO_PUB",
                                               import_handler="DICOM-zip")
        assert isinstance(prearchived, xnat.prearchive.PrearchiveSession)
        listed = [s for s in session.prearchive.sessions("NEURO_PUB")
                  if s.uri == prearchived.uri]
        assert len(listed) == 1 and listed[0].status == "READY"
        n_files = sum(len(scan.files) for scan in listed[0].scans)
        assert n_files == len(members)
        experiment = listed[0].archive(subject="IMPSUBJ", experiment="IMP001_MR")
        assert experiment.label == "IMP001_MR"
        scans = session.projects["NEURO_PUB"].subjects["IMPSUBJ"].experiments["IMP001_MR"].scans
        numbers = sorted((str(s.series_number) for s in series), key=int)
        assert sorted(scans.keys(), key=int) == numbers
        assert prearchived.uri not in {s.uri for s in session.prearchive.sessions("NEURO_PUB")}


def test_shared_subjects_and_sessions_through_xnatpy(
        tmp_path: Path, started_demo_server: TestServer) -> None:
    """xnatpy lists a subject shared into another project under its label there;
    the item names the projects it is shared into (``sharing/share``)."""
    server = started_demo_server
    subject_id, session_id = share_session(
        server, "NEURO_PUB", "NP001", "NP001_MR1", into="ALICE_LAB",
        subject_label="SHARED_SUBJ", session_label="SHARED_MR1")
    with xnat.connect(server.url, user="admin", password="admin",
                      extension_types=False) as connection:
        shared = connection.projects["ALICE_LAB"].subjects["SHARED_SUBJ"]
        assert shared.id == subject_id and shared.label == "SHARED_SUBJ"
        assert shared.experiments["SHARED_MR1"].id == session_id
        # The item lists where it is shared, in the shape xnatpy reads labels from.
        item = connection.create_object(f"/data/subjects/{subject_id}")
        [sharing] = [c for c in item.fulldata["children"] if c["field"] == "sharing/share"]
        # The row also has subject_ID and its key xnat_projectParticipant_id (an
        # attribute of projectParticipant; XFT's default key, which FlattenedItem adds).
        assert [(i["meta"]["xsi:type"], i["data_fields"]["label"],
                 i["data_fields"]["project"], i["data_fields"]["subject_ID"])
                for i in sharing["items"]] == [
            ("xnat:projectParticipant", "SHARED_SUBJ", "ALICE_LAB", subject_id)]


def test_assessor_resources_through_xnatpy(session: xnat.session.XNATSession,
                                           demo_server: TestServer, tmp_path: Path) -> None:
    experiment = session.projects["NEURO_PUB"].subjects["NP001"].experiments["NP001_MR2"]
    [assessor] = experiment.assessors.values()
    assert assessor.label == "NP001_MR2_QC" and assessor.image_session_id == experiment.id
    resource = assessor.resources["QC"]
    assert sorted(resource.files.keys()) == ["ratings/motion.txt", "report.json"]
    target = tmp_path / "report.json"
    resource.files["report.json"].download(str(target))  # checked against the listed digest
    with httpx.Client(base_url=demo_server.url, auth=("admin", "admin")) as c:
        rows = c.get(f"/data/experiments/{experiment.id}/files?all=true").json()
    [listed] = [r for r in rows["ResultSet"]["Result"] if r["Name"] == "report.json"
                and "/assessors/" in r["URI"]]
    assert hashlib.md5(target.read_bytes()).hexdigest() == listed["digest"]
