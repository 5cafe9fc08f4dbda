"""Reading DICOM uploads the way XNAT's importers do, without any HTTP.

The server hands over a request body as it arrives (a DICOM-zip upload is
read front to back, while it is sent, as XNAT reads it) or spooled to a file
(multipart and single-file uploads). This module turns it into a stream of
:class:`DicomInstance` objects, one parsed header at a time, each backed by a
spooled file that still holds the original bytes.
:mod:`xnatfs.testing.prearchive` files them into sessions.

What XNAT does, and what we copy (``web/.../archive/DicomZipImporter``,
``GradualDicomImporter``, ``xft/utils/fileExtraction/Format``):

* **Archive type comes from the name.** DICOM-zip matches the body's name
  against ``Format``'s regexes: ``*.zip``/``*.zar`` is a zip, ``*.tar``/``*.xar``
  a tar, ``*.tgz``/``*.tar.gz`` a gzipped tar, a bare ``*.gz`` is refused
  ("Unsupported format GZ") and anything else is "Unsupported format UNKNOWN".
  XNAT never sniffs a zip: a body named ``upload.zip`` that is not a zip reads
  as an empty zip. We sniff in one place only: inside the tar family we let
  :mod:`tarfile` detect the compression, so a gzip body sent as ``x-tar``
  still imports (XNAT would fail with "unable to read data from file").
* **Entries that are themselves archives** (by name) are imported recursively.
* **There is no junk filter.** Every non-directory entry goes through the
  gradual importer, so ``__MACOSX/._x.dcm`` or ``.DS_Store`` fails the whole
  upload with 400 "unable to read DICOM object {name}" unless
  ``Ignore-Unparsable=true``, which skips such entries (if nothing at all was
  readable, the last such error is still raised).
* **Entry names are reduced to their last path component** before use, so XNAT
  itself cannot be tricked by ``../``. We go further and refuse archives whose
  entry names are absolute or contain ``..`` (400), as the project requires.
* **An instance must carry SOP Class and SOP Instance UIDs** ("object {name}
  contains no SOP Class UID", 400).

Labels follow ``ClassicDicomObjectIdentifier``: session label = PatientID,
subject = PatientName, both with ``[^\\w-]`` (ASCII) replaced by ``_``; a
missing session label becomes ``dicom_upload``. Scan IDs follow
``DICOMSessionBuilder``: the SeriesNumber (a leading ``+`` becomes ``_``), or
the SeriesInstanceUID with ``[^\\w]`` replaced by ``_`` when there is none.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import tarfile
import tempfile
import zlib
from typing import IO, BinaryIO
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pydicom
from pydicom.multival import MultiValue

from xnatfs.testing.store import StoreError
from xnatfs.testing.zipstream import ZipStreamError, iter_zip_stream

DEFAULT_SESSION_LABEL = "dicom_upload"
OTHER_MODALITY = "OT"
SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
COPY_CHUNK = 1 << 20

# Format.getFormat(): first match wins, case-sensitive, whole name.
_ARCHIVE_FORMATS = (
    ("TAR", re.compile(r".*\.[tx]ar")),
    ("TGZ", re.compile(r".*\.t(ar\.)?gz")),
    ("ZIP", re.compile(r".*\.z(ip|ar)")),
    ("GZ", re.compile(r"(?!.*\.tar\.gz$).*\.gz")),
)

# Modalities in the order XNAT prefers one as a session's lead modality;
# secondary objects (SR, PR, KO, SEG, OT...) only lead when nothing else does.
_LEAD_MODALITY_ORDER = ("PT", "MR", "CT", "NM", "US", "XA", "RF", "CR", "DX", "MG",
                        "IO", "OP", "OPT", "SM", "XC", "ES", "GM", "ECG", "SR")
_XSI_PREFIX = {
    "MR": "mr", "CT": "ct", "PT": "pet", "NM": "nm", "US": "us", "XA": "xa", "RF": "rf",
    "CR": "cr", "DX": "dx", "MG": "mg", "IO": "io", "OP": "op", "OPT": "opt", "SM": "sm",
    "XC": "xc", "ES": "es", "GM": "gm", "ECG": "ecg", "SR": "sr",
}

_HEADER_KEYWORDS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "SeriesNumber", "InstanceNumber", "Modality", "SeriesDescription", "StudyDescription",
    "PatientID", "PatientName", "StudyDate", "StudyTime", "Manufacturer",
    "ManufacturerModelName", "MagneticFieldStrength",
]


@dataclass(frozen=True)
class DicomInstance:
    """One uploaded DICOM object: its header fields and the file holding its bytes."""

    path: Path
    name: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    series_number: str
    instance_number: str
    modality: str
    series_description: str
    study_description: str
    patient_id: str
    patient_name: str
    study_date: str
    study_time: str
    manufacturer: str
    model: str
    field_strength: str

    @property
    def scan_id(self) -> str:
        """The scan ID before clash renaming (``DICOMSessionBuilder``)."""
        number = self.series_number
        if number.startswith("+"):
            number = "_" + number[1:]
        return number or re.sub(r"\W", "_", self.series_uid, flags=re.ASCII)

    @property
    def scan_xsi_type(self) -> str:
        return scan_xsi_type(self.modality, self.sop_class_uid)

    @property
    def session_label(self) -> str:
        return clean_label(self.patient_id) or DEFAULT_SESSION_LABEL

    @property
    def subject_label(self) -> str:
        return clean_label(self.patient_name)

    @property
    def scan_date(self) -> str:
        """StudyDate as XNAT shows it, ``2001-09-24``."""
        d = re.sub(r"\D", "", self.study_date)
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else ""

    @property
    def scan_time(self) -> str:
        """StudyTime as the prearchive lists it, ``HH:mm:ss.SSS`` (``08:52:11.146``)."""
        whole, _, fraction = self.study_time.partition(".")
        t = whole.replace(":", "")
        if len(t) < 2 or not t.isdigit():
            return ""
        t = t.ljust(6, "0")[:6]
        millis = (fraction if fraction.isdigit() else "").ljust(3, "0")[:3]
        return f"{t[:2]}:{t[2:4]}:{t[4:6]}.{millis}"


def clean_label(value: str) -> str:
    """``dicom-xnat-util`` ``Labels.toLabelChars``: ``[^\\w-]`` becomes ``_``."""
    return re.sub(r"[^\w-]", "_", value.strip(), flags=re.ASCII)


def entry_basename(name: str) -> str:
    """The last path component, splitting on ``/`` and ``\\`` as XNAT does."""
    return re.split(r"[\\/]", name)[-1]


def requested_file_name(name: str) -> str | None:
    """The name XNAT keeps for an uploaded file (``Files.toFileNameChars``), or
    None when it would have to invent one (``getSafeFile``)."""
    cleaned = re.sub(r"[^\w.-]", "_", entry_basename(name), flags=re.ASCII)
    if cleaned in (".", "..") or not re.fullmatch(r"[\w.-]+", cleaned, flags=re.ASCII):
        return None
    return cleaned


def generated_file_name(instance: DicomInstance) -> str:
    """A stand-in for XNAT's default file-name template,
    ``${StudyInstanceUID}-${SeriesNumber}-${InstanceNumber}-${HashSOPClassUIDWithSOPInstanceUID}``;
    XNAT uses it when the uploaded name is unusable or already taken by
    another object in the same scan directory."""
    digest = _java_string_hash(instance.sop_class_uid + instance.sop_instance_uid)
    parts = (instance.study_uid, instance.series_number, instance.instance_number, f"{digest:x}")
    return ("-".join(parts) + ".dcm").lstrip(".")


def _java_string_hash(text: str) -> int:
    h = 0
    for ch in text:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return h


def lead_modality(modalities: Iterable[str]) -> str:
    present = {m for m in modalities if m}
    for modality in _LEAD_MODALITY_ORDER:
        if modality in present:
            return modality
    return min(present) if present else OTHER_MODALITY


def scan_xsi_type(modality: str, sop_class_uid: str = "") -> str:
    if sop_class_uid == SECONDARY_CAPTURE_SOP_CLASS:
        return "xnat:scScanData"
    prefix = _XSI_PREFIX.get(modality)
    return f"xnat:{prefix}ScanData" if prefix else "xnat:otherDicomScanData"


def session_xsi_type(modalities: Iterable[str]) -> str:
    prefix = _XSI_PREFIX.get(lead_modality(modalities))
    return f"xnat:{prefix}SessionData" if prefix else "xnat:otherDicomSessionData"


def scan_modality_code(xsi_type: str) -> str:
    """``ScanIdValidator``'s modality code for merge renames: two letters of the
    xsiType (``xnat:mrScanData`` gives ``MR``), with ``PE`` corrected to ``PT``."""
    if not xsi_type.startswith("xnat:"):
        return ""
    code = xsi_type[5:7].upper()
    return "PT" if code == "PE" else code


def archive_format(name: str) -> str | None:
    """XNAT's ``Format`` for a file name: TAR, TGZ, ZIP, GZ, or None."""
    for fmt, pattern in _ARCHIVE_FORMATS:
        if pattern.fullmatch(name):
            return fmt
    return None


def read_dicom(path: Path, name: str) -> DicomInstance:
    """Parse one DICOM object's header; raise StoreError(400) as XNAT would."""
    name = entry_basename(name)
    unreadable = StoreError(400, f"unable to read DICOM object {name}")
    if not _looks_like_dicom(path):
        raise unreadable
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=_HEADER_KEYWORDS)
        fields = {keyword: _text(ds, keyword) for keyword in _HEADER_KEYWORDS}
    except Exception as exc:  # pydicom fails on junk in many ways; XNAT catches Throwable here
        raise unreadable from exc
    if not fields["SOPClassUID"]:
        raise StoreError(400, f"object {name} contains no SOP Class UID")
    if not fields["SOPInstanceUID"]:
        raise StoreError(400, f"object {name} contains no SOP Instance UID")
    return DicomInstance(
        path=path, name=name,
        sop_class_uid=fields["SOPClassUID"], sop_instance_uid=fields["SOPInstanceUID"],
        study_uid=fields["StudyInstanceUID"], series_uid=fields["SeriesInstanceUID"],
        series_number=fields["SeriesNumber"], instance_number=fields["InstanceNumber"],
        modality=fields["Modality"], series_description=fields["SeriesDescription"],
        study_description=fields["StudyDescription"], patient_id=fields["PatientID"],
        patient_name=fields["PatientName"], study_date=fields["StudyDate"],
        study_time=fields["StudyTime"], manufacturer=fields["Manufacturer"],
        model=fields["ManufacturerModelName"], field_strength=fields["MagneticFieldStrength"],
    )


def _looks_like_dicom(path: Path) -> bool:
    """A Part 10 preamble, or a bare dataset starting with group 0002 or 0008.

    dcm4che, which XNAT uses, guesses the same way; without this check pydicom's
    ``force=True`` would happily parse a ``.DS_Store`` into nonsense."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[0:2] in (b"\x02\x00", b"\x08\x00")


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        value = value[0] if value else ""
    return str(value).strip()


def iter_dicom_instances(source: Path | BinaryIO, name: str, work_dir: Path, *,
                         ignore_unparsable: bool = False) -> Iterator[DicomInstance]:
    """DICOM-zip: every object in an archive (a file, or a stream read front to
    back, as XNAT reads a request body), one at a time.

    Each instance's file lives in ``work_dir`` until the consumer moves it away
    or asks for the next instance, so only one entry is on disk at a time.
    """
    skipped: StoreError | None = None
    found_any = False
    for entry_name, entry_path in iter_archive_entries(source, name, work_dir):
        try:
            instance = read_dicom(entry_path, entry_name)
        except StoreError as exc:
            if not ignore_unparsable:
                raise
            skipped = exc
            continue
        found_any = True
        yield instance
    if not found_any:
        raise skipped or StoreError(400, "The upload contained no DICOM objects.")


def iter_archive_entries(source: Path | BinaryIO, name: str,
                         work_dir: Path) -> Iterator[tuple[str, Path]]:
    """Spool each file entry of a zip or tar to ``work_dir`` and yield
    (entry name, spooled path); nested archives are opened in turn."""
    fmt = archive_format(name)
    if fmt not in ("ZIP", "TAR", "TGZ"):
        raise StoreError(400, f"Unsupported format {fmt or 'UNKNOWN'}")
    with contextlib.ExitStack() as stack:
        stream = (stack.enter_context(open(source, "rb")) if isinstance(source, Path)
                  else source)
        entries = _zip_entries(stream, work_dir) if fmt == "ZIP" else _tar_entries(
            stream, work_dir)
        for entry_name, entry_path in entries:
            try:
                if archive_format(entry_name) is not None:
                    yield from iter_archive_entries(entry_path, entry_name, work_dir)
                else:
                    yield entry_name, entry_path
            finally:
                entry_path.unlink(missing_ok=True)


def _zip_entries(stream: BinaryIO, work_dir: Path) -> Iterator[tuple[str, Path]]:
    """Entries by their local headers, as ``ZipInputStream`` reads them: a body
    that is not a zip reads as an empty one."""
    try:
        for entry_name, chunks in iter_zip_stream(stream):
            if entry_name.endswith("/"):
                continue
            _check_entry_name(entry_name)
            yield entry_name, _spool(chunks, work_dir)
    except (ZipStreamError, EOFError, zlib.error) as exc:
        raise StoreError(400, "unable to read data from file") from exc


def _tar_entries(stream: BinaryIO, work_dir: Path) -> Iterator[tuple[str, Path]]:
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            while (member := archive.next()) is not None:
                # tarfile remembers every member it has read; forget them so an
                # archive of 100k files does not grow memory without bound.
                archive.members = []  # type: ignore[attr-defined]  # not in typeshed
                if member.isdir():
                    continue
                _check_entry_name(member.name)
                # Links and devices carry no data: XNAT reads them as empty
                # streams, which then fail as unreadable DICOM.
                source = archive.extractfile(member) if member.isfile() else None
                yield member.name, _spool(_file_chunks(source), work_dir)
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise StoreError(400, "unable to read data from file") from exc


def _file_chunks(source: IO[bytes] | None) -> Iterator[bytes]:
    while source is not None and (data := source.read(COPY_CHUNK)):
        yield data


def _spool(chunks: Iterable[bytes], work_dir: Path) -> Path:
    """Write one entry's bytes to a fresh file in ``work_dir``."""
    fd, name = tempfile.mkstemp(dir=work_dir, prefix="entry-")
    try:
        with os.fdopen(fd, "wb") as sink:
            for data in chunks:
                sink.write(data)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def _check_entry_name(name: str) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] == "/" or ".." in parts or re.match(r"[A-Za-z]:", parts[0]):
        raise StoreError(400, f"Invalid archive entry name: {name}")
