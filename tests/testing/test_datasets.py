"""The generated data sets: reproducible, valid files, and the access model tests rely on."""

from __future__ import annotations

import hashlib
import io
import re
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from xnatfs.testing.datasets import PRESETS, DatasetSpec, build_dataset, sample_files
from xnatfs.testing.imaging import (
    png_bytes,
    synthetic_study,
    write_dicom_archive,
    write_dicom_series,
    write_nifti,
)
from xnatfs.testing.store import Store
from xnatfs.testing.storefiles import md5_file

TINY = DatasetSpec(matrix=16, slices=4, bench_subjects=1, bench_sessions=1, bench_matrix=16,
                   bench_slices=6, big_nifti_bytes=100_000, big_nifti_volume=(16, 16, 8))

SOP_CLASSES = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2",
               "PT": "1.2.840.10008.5.1.4.1.1.128"}


def _build(root: Path, preset: str | DatasetSpec = TINY) -> Store:
    store = Store(root)
    build_dataset(store, preset)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    store = _build(tmp_path_factory.mktemp("tiny"))
    yield store
    store.close()


def _files(store: Store) -> list:
    return store.query(
        "SELECT e.project, e.label AS session, e.uid AS study_uid, e.id AS experiment_id,"
        " s.scan_id, s.uid AS series_uid, s.modality, s.frames, s.xsi_type AS scan_xsi,"
        " r.label AS resource, r.format AS resource_format, f.path, f.size, f.digest, f.blob,"
        " f.format, f.content"
        " FROM files f JOIN resources r ON f.resource_id = r.id"
        " JOIN experiments e ON r.experiment_id = e.id LEFT JOIN scans s ON r.scan_pk = s.pk"
        " ORDER BY e.project, e.label, s.scan_id, r.label, f.path")


def _inventory(store: Store) -> list[tuple]:
    """Everything a build decides, without the store's own ids and timestamps."""
    files = [(r["project"], r["session"], r["study_uid"], r["scan_id"], r["series_uid"],
              r["resource"], r["path"], r["size"], r["digest"], r["format"], r["content"])
             for r in _files(store)]
    sessions = [tuple(r) for r in store.query(
        "SELECT project, label, xsi_type, date, time, modality, uid, session_type,"
        " scanner_manufacturer, scanner_model, field_strength FROM experiments ORDER BY id")]
    scans = [tuple(r) for r in store.query(
        "SELECT experiment_id, scan_id, type, quality, xsi_type, series_description, uid,"
        " frames, modality FROM scans ORDER BY pk")]
    return files + sessions + scans


def _named_link(store: Store, row, directory: Path) -> Path:
    """nibabel picks the format from the file name, which blobs do not have."""
    link = directory / f"{row['blob']}-{row['path'].replace('/', '_')}"
    link.symlink_to(store.blob_path(row["blob"]))
    return link


def test_build_is_deterministic(store: Store, tmp_path: Path) -> None:
    again = _build(tmp_path / "again")
    try:
        assert _inventory(again) == _inventory(store)
    finally:
        again.close()


def test_recorded_sizes_and_digests_match_blobs(store: Store) -> None:
    rows = _files(store)
    assert len(rows) > 100
    for row in rows:
        blob = store.blob_path(row["blob"])
        assert blob.stat().st_size == row["size"], row["path"]
        assert md5_file(blob) == row["digest"], row["path"]


def test_dicom_series_parse_with_consistent_uids(store: Store) -> None:
    by_scan: dict[tuple, list] = {}
    for row in _files(store):
        if row["resource"] == "DICOM":
            by_scan.setdefault((row["experiment_id"], row["scan_id"]), []).append(row)
    assert len(by_scan) > 20
    for rows in by_scan.values():
        first = rows[0]
        datasets = [pydicom.dcmread(store.blob_path(r["blob"])) for r in rows]
        assert len(rows) == int(first["frames"])
        assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
        for ds in datasets:
            assert ds.StudyInstanceUID == first["study_uid"]
            assert ds.SeriesInstanceUID == first["series_uid"]
            assert str(ds.SeriesNumber) == first["scan_id"]
            assert ds.Modality == first["modality"]
            assert ds.pixel_array.shape[-2:] == (ds.Rows, ds.Columns)
            if first["project"] != "SAMPLES":
                assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
                assert ds.SOPClassUID == SOP_CLASSES[ds.Modality]
                assert ds.pixel_array.max() > 0
                assert first["path"].startswith(f"{ds.StudyInstanceUID}-{ds.SeriesNumber}-")


def test_session_and_scan_types_match_modality(store: Store) -> None:
    prefixes = {"MR": "xnat:mr", "CT": "xnat:ct", "PT": "xnat:pet"}
    for row in store.query("SELECT xsi_type, modality FROM experiments"):
        assert row["xsi_type"] == f"{prefixes[row['modality']]}SessionData"
    for row in store.query("SELECT xsi_type, modality FROM scans"):
        assert row["xsi_type"] == f"{prefixes[row['modality']]}ScanData"


def test_nifti_files_load(store: Store, tmp_path: Path) -> None:
    rows = [r for r in _files(store) if r["format"] == "NIFTI"]
    assert any(r["path"].endswith(".nii.gz") for r in rows)
    images = {r["path"]: nib.load(_named_link(store, r, tmp_path), mmap=True) for r in rows}
    for image in images.values():
        assert np.isfinite(np.asanyarray(image.dataobj[..., 0])).all()
    big = [r for r in rows if r["path"] == "fmri_rest_mb8_4.nii"]
    assert len(big) == 1 and big[0]["size"] >= TINY.big_nifti_bytes
    image = images["fmri_rest_mb8_4.nii"]
    assert image.shape[:3] == TINY.big_nifti_volume and image.ndim == 4
    assert image.shape[3] == int(big[0]["frames"])
    assert isinstance(image.dataobj.get_unscaled(), np.memmap)
    assert np.asanyarray(image.dataobj[..., -1]).std() > 0


def test_write_nifti_streams_reproducibly(tmp_path: Path) -> None:
    for name in ("a.nii", "b.nii", "c.nii.gz", "d.nii.gz"):
        size, digest = write_nifti(tmp_path / name, (12, 10, 6, 5), seed=3)
        assert (size, digest) == ((tmp_path / name).stat().st_size, md5_file(tmp_path / name))
    assert md5_file(tmp_path / "a.nii") == md5_file(tmp_path / "b.nii")
    assert md5_file(tmp_path / "c.nii.gz") == md5_file(tmp_path / "d.nii.gz")
    plain, packed = nib.load(tmp_path / "a.nii"), nib.load(tmp_path / "c.nii.gz")
    assert plain.shape == (12, 10, 6, 5) and plain.get_data_dtype() == np.int16
    assert np.array_equal(plain.get_fdata(), packed.get_fdata())


def _png_size(data: bytes) -> tuple[int, int]:
    """Check a greyscale PNG's framing and return (width, height)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    length = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    assert len(zlib.decompress(data[41:41 + length])) == height * (width + 1)
    assert data[-8:-4] == b"IEND"
    return width, height


def test_snapshots_are_png(store: Store) -> None:
    rows = [r for r in _files(store) if r["resource"] == "SNAPSHOTS"]
    assert {r["content"] for r in rows} == {"ORIGINAL", "THUMBNAIL"}
    for row in rows:
        width, height = _png_size(store.blob_path(row["blob"]).read_bytes())
        assert width > 0 and height > 0
    assert _png_size(png_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))) == (4, 3)


def test_users_roles_and_accessibility(store: Store) -> None:
    assert store.user("admin")["is_admin"] and store.check_password("admin", "admin")
    assert not store.user("alice")["is_admin"] and store.check_password("alice", "alice")
    access = {p["id"]: p["accessibility"] for p in store.projects()}
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", project) for project in access)
    assert {"public", "protected", "private"} <= set(access.values())
    alice = {project: store.role(project, "alice") for project in access}
    roles = {role: project for project, role in alice.items() if role}
    assert access[roles["owner"]] == "private"
    assert access[roles["member"]] == "public"
    assert access[roles["collaborator"]] == "protected"
    assert alice["SECRET"] is None and access["SECRET"] == "private"
    assert store.role("ONC-PROT", "bob") is None and access["ONC-PROT"] == "protected"


def test_awkward_names_are_present(store: Store) -> None:
    assert store.subject("NEURO_PUB", "NP 003") is not None
    session = store.experiment("NEURO_PUB", "NP001_MR1")
    assert store.scan(session["id"], "2")["type"] == "T1 MPRAGE/2"
    qc = store.resource(session["id"], None, "QC")
    assert {f.path for f in store.files(qc["id"])} == {"qc.json", "reports/2023/qc.json"}
    notes = store.resource(session["id"], None, "NOTES")
    assert "scan notes.txt" in {f.path for f in store.files(notes["id"])}


def test_session_fields_are_realistic(store: Store) -> None:
    mr = store.experiment("NEURO_PUB", "NP002_MR1")
    assert (mr["date"], mr["time"], mr["field_strength"]) == ("2023-04-02", "11:30:00", "3")
    assert mr["scanner_manufacturer"] == "GE MEDICAL SYSTEMS" and mr["uid"].count(".") > 4
    pet = store.experiment("ONC-PROT", "ONC001_PET1")
    assert pet["xsi_type"] == "xnat:petSessionData" and pet["session_type"]
    assert {s["quality"] for s in store.query("SELECT quality FROM scans")} >= {
        "usable", "questionable", "unusable"}


def test_package_samples_are_copied_verbatim(store: Store) -> None:
    samples = sample_files()
    stored = {r["path"]: r["digest"] for r in _files(store) if r["project"] == "SAMPLES"}
    if not any(name.endswith(".dcm") for name in samples):
        pytest.skip("no sample DICOM files installed")
    for name, path in samples.items():
        assert stored[name] == md5_file(path)


def test_none_preset_has_users_only(tmp_path: Path) -> None:
    store = _build(tmp_path, "none")
    try:
        assert store.projects() == []
        assert {u["login"] for u in store.query("SELECT login FROM users")} >= {"admin", "alice"}
    finally:
        store.close()


def test_demo_preset(tmp_path: Path) -> None:
    store = _build(tmp_path, "demo")
    try:
        sessions = store.query("SELECT modality FROM experiments")
        assert len(sessions) >= 8 and {s["modality"] for s in sessions} >= {"MR", "CT", "PT"}
        assert store.query_one("SELECT frames FROM scans WHERE type = 'T1 MPRAGE/2'")[0] == str(
            PRESETS["demo"].slices)
    finally:
        store.close()


def test_bench_preset_is_big() -> None:
    bench = PRESETS["bench"]
    assert bench.big_nifti_bytes >= 1 << 30
    assert bench.bench_slices >= 200 and bench.bench_matrix >= 256
    assert bench.bench_subjects * bench.bench_sessions * 2 * bench.bench_slices >= 2000


def test_write_dicom_series(tmp_path: Path) -> None:
    paths = write_dicom_series(tmp_path, patient_name="Doe^Jane", patient_id="P1",
                               series_number=7, series_description="t2 axial", modality="CT",
                               slices=3, rows=8, cols=10)
    datasets = [pydicom.dcmread(p) for p in paths]
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3]
    assert datasets[0].pixel_array.shape == (8, 10)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    positions = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert positions == sorted(positions) and len(set(positions)) == 3


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz", ".tar"])
def test_dicom_archive_is_reproducible(tmp_path: Path, suffix: str) -> None:
    study = synthetic_study("Doe^John", "P2", modality="MR", slices=3, rows=8, cols=8)
    first, second = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    names = write_dicom_archive(first, study)
    write_dicom_archive(second, study)
    assert hashlib.md5(first.read_bytes()).digest() == hashlib.md5(second.read_bytes()).digest()
    if suffix == ".zip":
        with zipfile.ZipFile(first) as archive:
            members = {n: archive.read(n) for n in archive.namelist()}
    else:
        with tarfile.open(first) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    assert list(members) == names
    series = {pydicom.dcmread(io.BytesIO(data)).SeriesInstanceUID for data in members.values()}
    assert series == {s.series_uid for s in study}
