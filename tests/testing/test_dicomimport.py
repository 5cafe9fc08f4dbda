"""Parsing DICOM uploads as XNAT's DICOM-zip and gradual-DICOM importers do."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from xnatfs.testing import dicomimport
from xnatfs.testing.dicomimport import (
    archive_format,
    clean_label,
    generated_file_name,
    iter_dicom_instances,
    read_dicom,
    requested_file_name,
)
from xnatfs.testing.store import StoreError

StudyWriter = Callable[..., list[Path]]


def make_zip(path: Path, entries: dict[str, bytes | Path]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in entries.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            archive.writestr(name, data)
    return path


def make_tar(path: Path, entries: dict[str, bytes | Path], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, content in entries.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def instances(path: Path, name: str, work_dir: Path, **kwargs: bool) -> list:
    work_dir.mkdir(exist_ok=True)
    return list(iter_dicom_instances(path, name, work_dir, **kwargs))


@pytest.mark.parametrize(("name", "expected"), [
    ("upload.zip", "ZIP"), ("x.zar", "ZIP"), ("upload.tar", "TAR"), ("x.xar", "TAR"),
    ("upload.tar.gz", "TGZ"), ("x.tgz", "TGZ"), ("x.gz", "GZ"), ("x.dcm", None),
    ("UPLOAD.ZIP", None),  # XNAT's Format regexes are case-sensitive
])
def test_archive_format_follows_xnat_names(name: str, expected: str | None) -> None:
    assert archive_format(name) == expected


def test_read_dicom_extracts_header_fields(tmp_path: Path,
        write_dicom: Callable, new_uid: Callable) -> None:
    study, series = new_uid(), new_uid()
    path = write_dicom(tmp_path / "a.dcm", study_uid=study, series_uid=series,
                       series_number="7", patient_id="PID 1", patient_name="Doe^Jane")
    instance = read_dicom(path, "dir/a.dcm")
    assert instance.name == "a.dcm"
    assert (instance.study_uid, instance.series_uid) == (study, series)
    assert instance.scan_id == "7"
    assert instance.scan_xsi_type == "xnat:mrScanData"
    assert instance.session_label == "PID_1"
    assert instance.subject_label == "Doe_Jane"
    # HH:mm:ss.SSS, as real prearchive listings show scan_time (issue 20, point 8).
    assert (instance.scan_date, instance.scan_time) == ("2023-02-19", "08:30:00.000")
    assert (instance.manufacturer, instance.field_strength) == ("ACME", "3")


def test_scan_id_falls_back_to_series_uid(tmp_path: Path,
        write_dicom: Callable, new_uid: Callable) -> None:
    series = "1.2.3.4"
    path = write_dicom(tmp_path / "a.dcm", study_uid=new_uid(), series_uid=series,
                       series_number=None)
    assert read_dicom(path, "a.dcm").scan_id == "1_2_3_4"


def test_plus_sign_series_number_becomes_underscore(tmp_path: Path,
        write_dicom: Callable, new_uid: Callable) -> None:
    path = write_dicom(tmp_path / "a.dcm", study_uid=new_uid(), series_uid=new_uid(),
                       series_number="+5")
    assert read_dicom(path, "a.dcm").scan_id == "_5"


def test_bare_dataset_without_preamble_is_read(tmp_path: Path,
        write_dicom: Callable, new_uid: Callable) -> None:
    path = write_dicom(tmp_path / "raw", study_uid=new_uid(), series_uid=new_uid(),
                       preamble=False)
    assert read_dicom(path, "raw").modality == "MR"


@pytest.mark.parametrize("content", [b"", b"Bud1" * 50, b"\x00\x05\x16\x07" + bytes(300)])
def test_non_dicom_is_rejected_with_xnat_message(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk"
    path.write_bytes(content)
    with pytest.raises(StoreError) as err:
        read_dicom(path, "__MACOSX/._junk.dcm")
    assert (err.value.status, err.value.message) == (400, "unable to read DICOM object ._junk.dcm")


def test_missing_sop_class_is_rejected(tmp_path: Path,
        write_dicom: Callable, new_uid: Callable) -> None:
    path = write_dicom(tmp_path / "a.dcm", study_uid=new_uid(), series_uid=new_uid(),
                       sop_class_uid=None)
    with pytest.raises(StoreError) as err:
        read_dicom(path, "a.dcm")
    assert err.value.message == "object a.dcm contains no SOP Class UID"


def test_labels_are_cleaned_like_xnat() -> None:
    assert clean_label(" Doe^Jane Q. ") == "Doe_Jane_Q_"
    assert clean_label("MR-01_a") == "MR-01_a"
    assert clean_label("Zoë") == "Zo_"  # Java's \w is ASCII-only


def test_empty_patient_id_gives_dicom_upload(tmp_path: Path,
        write_dicom: Callable, new_uid: Callable) -> None:
    path = write_dicom(tmp_path / "a.dcm", study_uid=new_uid(), series_uid=new_uid(),
                       patient_id="")
    assert read_dicom(path, "a.dcm").session_label == "dicom_upload"


def test_file_names_follow_get_safe_file(tmp_path: Path, write_dicom: Callable,
                                         new_uid: Callable) -> None:
    assert requested_file_name("a/b/IM 0001.dcm") == "IM_0001.dcm"
    assert requested_file_name("x\\y.dcm") == "y.dcm"
    assert requested_file_name("..") is None
    path = write_dicom(tmp_path / "a.dcm", study_uid="1.2", series_uid=new_uid(),
                       sop_uid="1.2.3", series_number="4", instance_number=9)
    generated = generated_file_name(read_dicom(path, "a.dcm"))
    assert generated.startswith("1.2-4-9-") and generated.endswith(".dcm")


def test_xsi_types_and_lead_modality() -> None:
    assert dicomimport.session_xsi_type(["CT", "PT"]) == "xnat:petSessionData"
    assert dicomimport.session_xsi_type(["SR", "MR"]) == "xnat:mrSessionData"
    assert dicomimport.session_xsi_type(["PR"]) == "xnat:otherDicomSessionData"
    assert dicomimport.scan_xsi_type("OT", "1.2.840.10008.5.1.4.1.1.7") == "xnat:scScanData"
    assert dicomimport.scan_xsi_type("XYZ") == "xnat:otherDicomScanData"
    assert dicomimport.scan_modality_code("xnat:petScanData") == "PT"
    assert dicomimport.lead_modality([""]) == "OT"


def test_zip_yields_every_object_and_cleans_up(tmp_path: Path, write_study: StudyWriter) -> None:
    paths = write_study([("1", "MR", 2), ("2", "MR", 1)])
    archive = make_zip(tmp_path / "u.zip", {f"study/{p.name}": p for p in paths} | {"study/": b""})
    work = tmp_path / "work"
    found = instances(archive, "upload.zip", work)
    assert sorted(i.name for i in found) == sorted(p.name for p in paths)
    assert list(work.iterdir()) == []


def test_spooled_entry_holds_the_original_bytes(tmp_path: Path, write_study: StudyWriter) -> None:
    (path,) = write_study([("1", "MR", 1)])
    archive = make_zip(tmp_path / "u.zip", {"a.dcm": path})
    work = tmp_path / "work"
    work.mkdir()
    for instance in iter_dicom_instances(archive, "upload.zip", work):
        assert instance.path.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("mode", ["w:gz", "w"])
@pytest.mark.parametrize("name", ["upload.tar.gz", "upload.tar"])
def test_tar_family_sniffs_compression(tmp_path: Path, write_study: StudyWriter,
                                       mode: str, name: str) -> None:
    paths = write_study([("1", "MR", 3)])
    archive = make_tar(tmp_path / "u.bin", {f"d/{p.name}": p for p in paths}, mode)
    assert len(instances(archive, name, tmp_path / "work")) == 3


def test_nested_archive_is_imported(tmp_path: Path, write_study: StudyWriter) -> None:
    paths = write_study([("1", "MR", 2)])
    inner = make_zip(tmp_path / "inner.zip", {p.name: p for p in paths})
    outer = make_zip(tmp_path / "outer.zip", {"nested/inner.zip": inner})
    assert len(instances(outer, "upload.zip", tmp_path / "work")) == 2


@pytest.mark.parametrize("entry", ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm",
                                   "C:/evil.dcm", "..\\evil.dcm"])
def test_zip_path_traversal_is_rejected(tmp_path: Path, write_study: StudyWriter,
                                        entry: str) -> None:
    (path,) = write_study([("1", "MR", 1)])
    archive = make_zip(tmp_path / "u.zip", {entry: path})
    with pytest.raises(StoreError) as err:
        instances(archive, "upload.zip", tmp_path / "work")
    assert err.value.status == 400
    assert err.value.message == f"Invalid archive entry name: {entry}"


def test_tar_path_traversal_is_rejected(tmp_path: Path, write_study: StudyWriter) -> None:
    (path,) = write_study([("1", "MR", 1)])
    archive = make_tar(tmp_path / "u.tgz", {"../../evil.dcm": path})
    with pytest.raises(StoreError, match="Invalid archive entry name"):
        instances(archive, "upload.tar.gz", tmp_path / "work")


def test_junk_entry_fails_the_upload(tmp_path: Path, write_study: StudyWriter) -> None:
    (path,) = write_study([("1", "MR", 1)])
    archive = make_zip(tmp_path / "u.zip", {"a.dcm": path, "__MACOSX/._a.dcm": b"\x00\x05\x16\x07"})
    with pytest.raises(StoreError) as err:
        instances(archive, "upload.zip", tmp_path / "work")
    assert (err.value.status, err.value.message) == (400, "unable to read DICOM object ._a.dcm")


def test_ignore_unparsable_skips_junk(tmp_path: Path, write_study: StudyWriter) -> None:
    (path,) = write_study([("1", "MR", 1)])
    archive = make_zip(tmp_path / "u.zip", {".DS_Store": b"Bud1" * 20, "a.dcm": path})
    found = instances(archive, "upload.zip", tmp_path / "work", ignore_unparsable=True)
    assert [i.name for i in found] == ["a.dcm"]


def test_only_junk_fails_even_when_ignored(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "u.zip", {"notes.txt": b"hello"})
    with pytest.raises(StoreError, match="unable to read DICOM object notes.txt"):
        instances(archive, "upload.zip", tmp_path / "work", ignore_unparsable=True)


def test_empty_zip_is_rejected(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "u.zip", {"empty/": b""})
    with pytest.raises(StoreError) as err:
        instances(archive, "upload.zip", tmp_path / "work")
    assert err.value.status == 400


def test_body_that_is_not_a_zip_reads_as_an_empty_one(tmp_path: Path) -> None:
    # ZipInputStream stops at the first record that is not a local file header.
    archive = tmp_path / "u.zip"
    archive.write_bytes(b"not a zip at all")
    with pytest.raises(StoreError, match="contained no DICOM objects") as err:
        instances(archive, "upload.zip", tmp_path / "work")
    assert err.value.status == 400


def test_truncated_zip_is_rejected_and_leaves_no_spool(tmp_path: Path,
                                                       write_study: StudyWriter) -> None:
    whole = make_zip(tmp_path / "whole.zip", {"a.dcm": write_study([("1", "MR", 1)])[0]})
    archive = tmp_path / "u.zip"
    archive.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(StoreError, match="unable to read data from file"):
        instances(archive, "upload.zip", tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == []


def test_zip_is_read_from_a_stream(tmp_path: Path, write_study: StudyWriter) -> None:
    archive = make_zip(tmp_path / "u.zip", {f"s/{p.name}": p
                                            for p in write_study([("1", "MR", 3)])})
    work = tmp_path / "work"
    work.mkdir()
    with open(archive, "rb") as body:
        found = [i.name for i in iter_dicom_instances(body, "upload.zip", work)]
    assert len(found) == 3

@pytest.mark.parametrize(("name", "message"), [("upload.bin", "Unsupported format UNKNOWN"),
                                               ("upload.gz", "Unsupported format GZ")])
def test_unsupported_names_are_rejected(tmp_path: Path, name: str, message: str) -> None:
    archive = make_zip(tmp_path / "u.zip", {})
    with pytest.raises(StoreError, match=message):
        instances(archive, name, tmp_path / "work")
