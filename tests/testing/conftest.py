"""Fixtures for the test server's import and prearchive logic: a store and
small synthetic DICOM files written with pydicom."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from xnatfs.testing.store import Store

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_uid_counter = itertools.count(1)


def _new_uid() -> str:
    return f"1.2.826.0.1.3680043.8.498.{next(_uid_counter)}"


def _write_dicom(path: Path, *, study_uid: str, series_uid: str, sop_uid: str | None = None,
                series_number: str | None = "1", instance_number: int = 1,
                modality: str = "MR", patient_id: str = "PID001",
                patient_name: str = "Doe^Jane", series_description: str = "T1W",
                study_date: str = "20230219", study_time: str = "083000",
                sop_class_uid: str | None = MR_IMAGE_STORAGE, preamble: bool = True) -> Path:
    """A tiny valid DICOM object (2x2 pixels); ``None`` leaves a field out."""
    ds = Dataset()
    if sop_class_uid is not None:
        ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid or _new_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    if series_number is not None:
        ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.SeriesDescription = series_description
    ds.StudyDescription = "BRAIN"
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "Scanner 3000"
    ds.MagneticFieldStrength = "3"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class_uid or MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(path, enforce_file_format=True)
    else:
        # A bare dataset, as some senders store them: implicit VR, no preamble.
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


@pytest.fixture
def new_uid() -> Callable[[], str]:
    """A fresh, valid DICOM UID on each call."""
    return _new_uid


@pytest.fixture
def write_dicom() -> Callable[..., Path]:
    """``write_dicom(path, study_uid=..., series_uid=..., **fields)``: one object."""
    return _write_dicom


@pytest.fixture
def write_study(tmp_path: Path) -> Callable[..., list[Path]]:
    """``write_study(series=[(number, modality, count), ...], **fields)``: files
    for one study, ``study{n}/s{series index}/{number}-{instance}.dcm``."""
    directories = itertools.count(1)

    def write(series: list[tuple[str | None, str, int]] = [("1", "MR", 2)], *,
              study_uid: str | None = None, **fields: object) -> list[Path]:
        directory = tmp_path / f"study{next(directories)}"
        study_uid = study_uid or _new_uid()
        paths = []
        for index, (number, modality, count) in enumerate(series, 1):
            series_uid = _new_uid()
            for instance in range(1, count + 1):
                paths.append(_write_dicom(
                    directory / f"s{index}" / f"{number}-{instance}.dcm", study_uid=study_uid,
                    series_uid=series_uid, series_number=number, instance_number=instance,
                    modality=modality, **fields))
        return paths

    return write


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A store with project P (owner admin, member bob, collaborator carol)."""
    store = Store(tmp_path / "store")
    store.add_user("admin", "admin", admin=True)
    store.add_user("bob", "bob")
    store.add_user("carol", "carol")
    store.add_project("P", owner="admin", secondary_id="P_ALIAS")
    store.set_role("P", "bob", "member")
    store.set_role("P", "carol", "collaborator")
    yield store
    store.close()
