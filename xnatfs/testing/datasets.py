"""Deterministic XNAT data sets for the test server.

``build_dataset(store, preset)`` fills an empty :class:`~xnatfs.testing.store.Store`
with users, projects, subjects, MR/CT/PET sessions, scans, resources and real
files. Everything written is a pure function of the preset: dates, times, UIDs
and pixel noise are fixed, so two builds give byte-identical files (only the
store's own insert dates, blob ids and mtimes differ). The files come from
:mod:`xnatfs.testing.imaging` (DICOM series, archives, NIfTI, PNG).

Users (password = login): ``admin`` (site admin), ``alice`` and ``bob``.

Projects of the ``demo`` preset (``bench`` adds ``BENCH``), with sessions:

==========  =============  ============  ===============  ============================
project     accessibility  alice         others           sessions
==========  =============  ============  ===============  ============================
NEURO_PUB   public         member        admin owner      NP001_MR1, NP001_MR2,
                                                          NP002_MR1, NP 003_MR1
ONC-PROT    protected      collaborator  admin owner;     ONC001_CT1, ONC001_PET1,
                                         bob no role      ONC002_CT1
ALICE_LAB   private        owner         (admin: site     AL01_MR1
                                         admin, no role)
SECRET      private        none          bob owner        SEC01_MR1
SAMPLES     public         none          admin owner      pydicom_1CT1_CT,
                                                          pydicom_4MR1_MR,
                                                          nibabel_1234_MR
BENCH       private        member        admin owner      BENCH001_MR1 ... BENCH004_MR2
==========  =============  ============  ===============  ============================

Session labels are ``<subject>_<modality><n>``.

What XNAT knows about them: every subject with a gender has demographics
(gender, handedness, education, and in turn a year of birth, a date of birth
or an age at the first visit), a group (``control``/``patient``) and two
custom variables, ``diagnosis`` and ``site``; ALICE_LAB's ``AL01`` has none.
Every session has a visit (``visit_id`` ``v<n>``, ``visit`` ``Visit <n>``
for its subject's n-th session), a scanner name and a custom variable
``protocol_version``. ``SAMPLES`` holds the real
sample files shipped inside the installed pydicom and nibabel packages
(``CT_small.dcm``, ``MR_small.dcm``, nibabel's two Siemens DTI slices, with
nibabel's NIfTI examples in a session resource ``NIFTI``); files missing from
the installation are skipped, never downloaded.

Names chosen to be awkward for a filesystem but legal in XNAT:

* subject ``NP 003`` and its session ``NP 003_MR1`` contain a space;
* every demo MR session has scan 2 of type ``T1 MPRAGE/2`` (space and
  slash), which must be sanitised where XNAT names zip folders
  ``<scan>-<type>``; the ``T2 FLAIR`` and CT scan types contain spaces too;
* project ``ONC-PROT`` contains a hyphen;
* session resource ``NOTES`` of ``NP001_MR1`` has a file ``scan notes.txt``;
* every session has a ``QC`` resource with ``qc.json`` and the nested
  ``reports/<year>/qc.json`` (``reports/2023/qc.json`` in ``NP001_MR1``);
* archived DICOM files carry XNAT's long names,
  ``<StudyInstanceUID>-<SeriesNumber>-<InstanceNumber>-<hash>.dcm``.

Scan resources: ``DICOM`` (format DICOM, content RAW) on every scan with
DICOM; ``NIFTI`` (a ``.nii.gz`` plus a BIDS-style JSON sidecar) and
``SNAPSHOTS`` (PNG, content ORIGINAL montage and THUMBNAIL) on some. The
``bench`` preset adds 4 subjects x 2 MR sessions with two 224-slice 256x256
series each, and scan 4 ``BOLD rest`` of ``BENCH001_MR1`` whose ``NIFTI``
resource holds an uncompressed 4D ``.nii`` of just over 1 GiB.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import pydicom
import pydicom.data

from .imaging import (
    BENCH_PROTOCOL,
    DicomSeries,
    PROTOCOLS,
    ScanPlan,
    decimal_string,
    make_uid,
    png_bytes,
    snapshot_images,
    synthetic_study,
    write_dicom_archive,
    write_dicom_series,
    write_nifti,
)
from .store import Store


@dataclass(frozen=True)
class DatasetSpec:
    """Sizes of a generated data set; presets are instances, tests make tiny ones."""

    demo: bool = True            # the demo projects (NEURO_PUB, ONC-PROT, ...)
    samples: bool = True         # the SAMPLES project of pydicom/nibabel files
    matrix: int = 128            # rows = columns of demo series
    slices: int = 24             # slices of the main demo series
    bench_subjects: int = 0      # 0 = no BENCH project
    bench_sessions: int = 2      # MR sessions per bench subject
    bench_matrix: int = 256
    bench_slices: int = 224
    big_nifti_bytes: int = 0     # data size of the bench 4D NIfTI; 0 = none
    big_nifti_volume: tuple[int, int, int] = (128, 128, 64)


PRESETS = {
    "none": DatasetSpec(demo=False, samples=False),
    "demo": DatasetSpec(),
    "bench": DatasetSpec(bench_subjects=4, big_nifti_bytes=1 << 30),
}

USERS = (  # login = password
    ("admin", True, "Site", "Admin"),
    ("alice", False, "Alice", "Anderson"),
    ("bob", False, "Bob", "Brown"),
)


@dataclass(frozen=True)
class _Session:
    label: str
    modality: str
    date: str                    # YYYY-MM-DD
    time: str                    # HH:MM:SS
    manufacturer: str
    model: str
    field_strength: str = ""
    notes: tuple[str, ...] = ()  # file names in a NOTES resource
    qc_assessor: bool = False    # a manual QC assessor, with its report as an output resource


@dataclass(frozen=True)
class _Subject:
    label: str
    gender: str
    yob: str
    sessions: tuple[_Session, ...]


@dataclass(frozen=True)
class _Project:
    id: str
    name: str
    description: str
    accessibility: str
    owner: str
    pi: tuple[str, str]
    roles: tuple[tuple[str, str], ...]
    subjects: tuple[_Subject, ...]


_SESSION_TYPES = {"MR": "Brain^Routine", "CT": "CT HEAD WO", "PT": "PET/CT FDG Brain"}
_XSI = {"MR": "xnat:mr", "CT": "xnat:ct", "PT": "xnat:pet"}

_DEMO_PROJECTS = (
    _Project("NEURO_PUB", "Neuroimaging Demo (public)", "Longitudinal brain MR study.",
             "public", "admin", ("Maria", "Garcia"), (("alice", "member"),), (
        _Subject("NP001", "male", "1961", (
            _Session("NP001_MR1", "MR", "2023-03-14", "09:12:33", "SIEMENS", "Prisma_fit", "3",
                     notes=("notes.txt", "scan notes.txt")),
            _Session("NP001_MR2", "MR", "2023-09-19", "14:05:10", "SIEMENS", "Prisma_fit", "3",
                     qc_assessor=True),
        )),
        _Subject("NP002", "female", "1975", (
            _Session("NP002_MR1", "MR", "2023-04-02", "11:30:00", "GE MEDICAL SYSTEMS",
                     "DISCOVERY MR750", "3"),
        )),
        _Subject("NP 003", "female", "1988", (
            _Session("NP 003_MR1", "MR", "2023-05-21", "16:45:02", "Philips", "Ingenia", "1.5"),
        )),
    )),
    _Project("ONC-PROT", "Oncology PET/CT (protected)", "Brain PET/CT follow-up.",
             "protected", "admin", ("Ken", "Tanaka"), (("alice", "collaborator"),), (
        _Subject("ONC001", "male", "1950", (
            _Session("ONC001_CT1", "CT", "2022-11-08", "08:02:11", "SIEMENS",
                     "SOMATOM Definition AS+"),
            _Session("ONC001_PET1", "PT", "2022-11-08", "08:40:55", "SIEMENS",
                     "Biograph128_mCT", notes=("notes.txt",)),
        )),
        _Subject("ONC002", "female", "1958", (
            _Session("ONC002_CT1", "CT", "2022-12-01", "13:20:00", "GE MEDICAL SYSTEMS",
                     "Revolution CT"),
        )),
    )),
    _Project("ALICE_LAB", "Alice's pilot (private)", "Pilot scans owned by alice.",
             "private", "alice", ("Alice", "Anderson"), (), (
        _Subject("AL01", "", "", (
            _Session("AL01_MR1", "MR", "2024-01-16", "10:00:00", "SIEMENS", "Skyra", "3"),
        )),
    )),
    _Project("SECRET", "Restricted study (private)", "Alice has no access here.",
             "private", "bob", ("Bob", "Brown"), (), (
        _Subject("SEC01", "male", "1970", (
            _Session("SEC01_MR1", "MR", "2023-06-30", "07:55:40", "SIEMENS", "Prisma_fit", "3"),
        )),
    )),
)


def _bench_project(spec: DatasetSpec) -> _Project:
    first_visit = dt.date(2024, 1, 8)
    subjects = tuple(
        _Subject(f"BENCH{n:03d}", ("male", "female")[n % 2], str(1960 + n), tuple(
            _Session(f"BENCH{n:03d}_MR{k}", "MR",
                     (first_visit + dt.timedelta(days=91 * (k - 1) + n)).isoformat(),
                     "10:30:00", "SIEMENS", "Prisma_fit", "3")
            for k in range(1, spec.bench_sessions + 1)))
        for n in range(1, spec.bench_subjects + 1))
    return _Project("BENCH", "Benchmark data", "Large series for throughput tests.",
                    "private", "admin", ("Site", "Admin"), (("alice", "member"),), subjects)


# ------------------------------------------------------------------- builder


def build_dataset(store: Store, preset: str | DatasetSpec = "demo") -> None:
    """Fill an empty store with users and the preset's projects (see module doc)."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown data set {preset!r}; choose from {sorted(PRESETS)}")
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    for login, admin, firstname, lastname in USERS:
        store.add_user(login, login, admin=admin, firstname=firstname, lastname=lastname)
    if spec.demo:
        for project in _DEMO_PROJECTS:
            _add_project(store, project, PROTOCOLS, spec.matrix, spec.slices)
    if spec.samples:
        _add_samples(store)
    if spec.bench_subjects:
        project = _bench_project(spec)
        _add_project(store, project, {"MR": BENCH_PROTOCOL}, spec.bench_matrix,
                     spec.bench_slices)
        if spec.big_nifti_bytes:
            _add_big_nifti(store, project, spec)


def _add_project(store: Store, project: _Project, protocols: dict[str, tuple[ScanPlan, ...]],
                 matrix: int, slices: int) -> None:
    store.add_project(project.id, name=project.name, description=project.description,
                      accessibility=project.accessibility, owner=project.owner, pi=project.pi)
    for login, role in project.roles:
        store.set_role(project.id, login, role)
    for number, subject in enumerate(project.subjects):
        values, custom = _subject_metadata(project, number, subject)
        subject_id = store.add_subject(project.id, subject.label, user=project.owner,
                                       custom=custom, **values)
        for visit, session in enumerate(subject.sessions, start=1):
            with store.transaction():
                _add_session(store, project, subject, subject_id, session, visit,
                             protocols[session.modality], matrix, slices)


_HANDEDNESS = ("right", "right", "left", "ambidextrous")
_DIAGNOSES = ("control", "patient")


def _subject_metadata(project: _Project, number: int,
                      subject: _Subject) -> tuple[dict[str, str], dict[str, str]]:
    """Demographics, group and two custom variables, a pure function of the
    subject's place in its project. The age is given three ways in turn:
    year of birth, date of birth, age at the first visit."""
    if not subject.gender:  # ALICE_LAB's pilot subject: nothing recorded
        return {}, {}
    values = {"gender": subject.gender, "handedness": _HANDEDNESS[number % 4],
              "education": str(12 + 2 * (number % 4)),
              "subject_group": _DIAGNOSES[number % 2]}
    born = int(subject.yob)
    if number % 3 == 0:
        values["yob"] = subject.yob
    elif number % 3 == 1:
        values["dob"] = f"{born}-{1 + number % 12:02d}-{10 + number % 18:02d}"
    else:
        first = subject.sessions[0].date if subject.sessions else f"{born + 40}-01-01"
        values["age"] = str(int(first[:4]) - born)
    custom = {"diagnosis": _DIAGNOSES[number % 2],
              "site": f"{project.id.split('_')[0].split('-')[0].lower()}-{1 + number % 2}"}
    return values, custom


def _study_uid(project_id: str, session_label: str) -> str:
    return make_uid("study", project_id, session_label)


def _add_session(store: Store, project: _Project, subject: _Subject, subject_id: str,
                 session: _Session, visit: int, protocol: tuple[ScanPlan, ...], matrix: int,
                 slices: int) -> None:
    study_uid = _study_uid(project.id, session.label)
    # Pixel noise and head placement differ per session, as they would.
    seed = int.from_bytes(hashlib.md5(study_uid.encode()).digest()[:4], "big")
    experiment_id = store.add_experiment(
        project.id, subject_id, session.label, f"{_XSI[session.modality]}SessionData",
        user=project.owner, date=session.date, time=session.time, modality=session.modality,
        uid=study_uid, session_type=_SESSION_TYPES[session.modality],
        scanner_manufacturer=session.manufacturer, scanner_model=session.model,
        field_strength=session.field_strength, visit_id=f"v{visit}", visit=f"Visit {visit}",
        scanner=f"{session.manufacturer.split()[0]}_{session.model}".upper()[:32],
        custom={"protocol_version": f"{2022 + visit}.1"})
    for scan in protocol:
        series = DicomSeries(
            patient_name=subject.label, patient_id=session.label, study_uid=study_uid,
            series_number=scan.number, series_description=scan.description,
            modality=session.modality, slices=scan.scout_slices or slices, rows=matrix,
            cols=matrix, seed=seed, study_date=session.date.replace("-", ""),
            study_time=session.time.replace(":", ""),
            study_description=_SESSION_TYPES[session.modality],
            manufacturer=session.manufacturer, model=session.model,
            field_strength=session.field_strength, patient_sex=subject.gender[:1].upper(),
            patient_birth_date=f"{subject.yob}0101" if subject.yob else "")
        scan_pk = store.add_scan(
            experiment_id, str(scan.number), f"{_XSI[session.modality]}ScanData",
            type=scan.type, quality=scan.quality, series_description=scan.description,
            uid=series.series_uid, frames=str(series.slices), modality=session.modality)
        _add_scan_files(store, experiment_id, scan_pk, scan, series, session)
    _add_session_files(store, experiment_id, project, session, protocol)


def _add_scan_files(store: Store, experiment_id: str, scan_pk: int, scan: ScanPlan,
                    series: DicomSeries, session: _Session) -> None:
    dicom = store.add_resource(experiment_id, scan_pk, "DICOM", format="DICOM", content="RAW")
    for name, data in series.files():
        _add_bytes(store, dicom, name, data, format="DICOM", content="RAW")
    if scan.snapshots:
        original, thumbnail = snapshot_images(series)
        snapshots = store.add_resource(experiment_id, scan_pk, "SNAPSHOTS", format="PNG",
                                       content="SNAPSHOTS")
        _add_bytes(store, snapshots, f"{scan.number}_qc.png", original,
                   format="PNG", content="ORIGINAL")
        _add_bytes(store, snapshots, f"{scan.number}_qc_t.png", thumbnail,
                   format="PNG", content="THUMBNAIL")
    if scan.nifti:
        nifti = store.add_resource(experiment_id, scan_pk, "NIFTI", format="NIFTI",
                                   content="NIFTI")
        stem = f"{scan.description}_{scan.number}"
        blob, path = store.new_blob_file()
        size, digest = write_nifti(
            path, (series.cols, series.rows, series.slices), modality=series.modality,
            voxel_size=(series.pixel_spacing, series.pixel_spacing, series.slice_thickness),
            seed=series.seed, compress=True)
        store.add_file(nifti, f"{stem}.nii.gz", blob, size, digest, format="NIFTI")
        sidecar = {
            "Modality": series.modality, "Manufacturer": series.manufacturer,
            "ManufacturersModelName": series.model, "SeriesDescription": scan.description,
            "SeriesNumber": scan.number, "SeriesInstanceUID": series.series_uid,
            "AcquisitionDateTime": f"{session.date}T{session.time}.000000",
            "SliceThickness": series.slice_thickness, "ConversionSoftware": "xnatfs.testing",
        }
        if series.modality == "MR":
            sidecar["MagneticFieldStrength"] = float(series.field_strength)
        _add_bytes(store, nifti, f"{stem}.json", _json(sidecar), format="JSON")


def _add_session_files(store: Store, experiment_id: str, project: _Project,
                       session: _Session, protocol: tuple[ScanPlan, ...]) -> None:
    qc = store.add_resource(experiment_id, None, "QC", format="JSON", content="QC")
    verdict = "fail" if any(scan.quality == "unusable" for scan in protocol) else "pass"
    report = {
        "project": project.id, "session": session.label, "date": session.date,
        "rater": "qc-bot", "overall": verdict,
        "scans": {str(scan.number): scan.quality for scan in protocol},
    }
    _add_bytes(store, qc, "qc.json", _json({"session": session.label, "overall": verdict}),
               format="JSON")
    _add_bytes(store, qc, f"reports/{session.date[:4]}/qc.json", _json(report), format="JSON")
    if session.qc_assessor:
        assessor_id = store.add_assessor(experiment_id, f"{session.label}_QC",
                                         "xnat:qcAssessmentData", date=session.date)
        out = store.add_resource(experiment_id, None, "QC", format="JSON",
                                 content="QC", assessor_id=assessor_id)
        _add_bytes(store, out, "report.json", _json(report), format="JSON")
        _add_bytes(store, out, "ratings/motion.txt",
                   f"{session.label}: motion 0.21 mm (mean FD), rating 1 of 4\n".encode(),
                   format="TXT")
    if session.notes:
        notes = store.add_resource(experiment_id, None, "NOTES", format="TXT", content="NOTES")
        for name in session.notes:
            text = f"{session.label} ({session.date} {session.time}): {name}\n"
            _add_bytes(store, notes, name, text.encode(), format="TXT")


def _add_big_nifti(store: Store, project: _Project, spec: DatasetSpec) -> None:
    """A resting-state run kept only as NIfTI, big enough to test streaming."""
    session = project.subjects[0].sessions[0]
    experiment = store.experiment(project.id, session.label)
    assert experiment is not None
    experiment_id = experiment["id"]
    volume_bytes = math.prod(spec.big_nifti_volume) * 2
    shape = (*spec.big_nifti_volume, -(-spec.big_nifti_bytes // volume_bytes))
    scan_pk = store.add_scan(
        experiment_id, "4", "xnat:mrScanData", type="BOLD rest", quality="usable",
        series_description="fmri_rest_mb8",
        uid=make_uid(_study_uid(project.id, session.label), "series", 4),
        frames=str(shape[3]), modality="MR")
    resource = store.add_resource(experiment_id, scan_pk, "NIFTI", format="NIFTI",
                                  content="NIFTI")
    blob, path = store.new_blob_file()
    size, digest = write_nifti(path, shape, voxel_size=(2.0, 2.0, 2.0), repetition_time=0.8,
                               seed=4, compress=False)
    store.add_file(resource, "fmri_rest_mb8_4.nii", blob, size, digest, format="NIFTI")


# -------------------------------------------------------------------- samples

_PYDICOM_SAMPLES = ("CT_small.dcm", "MR_small.dcm")
_NIBABEL_DICOM_SAMPLES = ("0.dcm", "1.dcm")
_NIBABEL_NIFTI_SAMPLES = ("example4d.nii.gz", "anatomical.nii", "functional.nii")


def sample_files() -> dict[str, Path]:
    """Sample files present in the installed pydicom and nibabel, by file name.

    pydicom can fetch missing test files from the network; ``download=False``
    keeps this to what is on disk.
    """
    found: dict[str, Path] = {}
    for name in _PYDICOM_SAMPLES:
        located = pydicom.data.get_testdata_file(name, download=False)
        if located and Path(located).is_file():
            found[name] = Path(located)
    nibabel_data = Path(nib.__file__).parent / "tests" / "data"
    for name in _NIBABEL_DICOM_SAMPLES + _NIBABEL_NIFTI_SAMPLES:
        if (nibabel_data / name).is_file():
            found[name] = nibabel_data / name
    return found


def _add_samples(store: Store) -> None:
    """The SAMPLES project: a session per real DICOM study, labelled from its
    header, with nibabel's NIfTI examples beside nibabel's DICOM study."""
    found = sample_files()
    studies: dict[str, tuple[str, list[Path]]] = {}  # study UID -> (package, files)
    for package, names in (("pydicom", _PYDICOM_SAMPLES), ("nibabel", _NIBABEL_DICOM_SAMPLES)):
        for name in names:
            if name in found:
                header = pydicom.dcmread(found[name], stop_before_pixels=True)
                studies.setdefault(header.StudyInstanceUID, (package, []))[1].append(found[name])
    if not studies:
        return
    store.add_project("SAMPLES", name="Package sample files",
                      description="Real DICOM and NIfTI files shipped with pydicom and nibabel.",
                      accessibility="public", owner="admin")
    for package, paths in studies.values():
        header = pydicom.dcmread(paths[0], stop_before_pixels=True)
        subject_label = f"{package}_{header.PatientID}"
        session_label = f"{subject_label}_{header.Modality}"
        subject_id = store.add_subject("SAMPLES", subject_label)
        date, time = str(header.StudyDate), str(header.StudyTime)
        field_strength = header.get("MagneticFieldStrength")
        experiment_id = store.add_experiment(
            "SAMPLES", subject_id, session_label, f"{_XSI[header.Modality]}SessionData",
            date=f"{date[:4]}-{date[4:6]}-{date[6:8]}",
            time=f"{time[:2]}:{time[2:4]}:{time[4:6]}", modality=header.Modality,
            uid=header.StudyInstanceUID, session_type=str(header.get("StudyDescription", "")),
            scanner_manufacturer=str(header.get("Manufacturer", "")),
            scanner_model=str(header.get("ManufacturerModelName", "")),
            field_strength=decimal_string(float(field_strength)) if field_strength else "")
        description = str(header.get("SeriesDescription") or paths[0].stem)
        scan_pk = store.add_scan(
            experiment_id, str(header.get("SeriesNumber") or 1),
            f"{_XSI[header.Modality]}ScanData", type=description,
            series_description=description, uid=header.SeriesInstanceUID,
            frames=str(len(paths)), modality=header.Modality)
        dicom = store.add_resource(experiment_id, scan_pk, "DICOM", format="DICOM",
                                   content="RAW")
        for path in paths:
            _add_path(store, dicom, path.name, path, format="DICOM", content="RAW")
        niftis = [found[name] for name in _NIBABEL_NIFTI_SAMPLES if name in found]
        if package == "nibabel" and niftis:
            resource = store.add_resource(experiment_id, None, "NIFTI", format="NIFTI")
            for path in niftis:
                _add_path(store, resource, path.name, path, format="NIFTI")


# -------------------------------------------------------------------- helpers


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _add_bytes(store: Store, resource_id: int, relpath: str, data: bytes, *,
               format: str = "", content: str = "") -> None:
    blob, size, digest = store.store_blob_bytes(data)
    store.add_file(resource_id, relpath, blob, size, digest, format=format, content=content)


def _add_path(store: Store, resource_id: int, relpath: str, source: Path, *,
              format: str = "", content: str = "") -> None:
    blob, size, digest = store.store_blob_from_path(source)
    store.add_file(resource_id, relpath, blob, size, digest, format=format, content=content)


__all__ = [
    "PRESETS", "USERS", "DatasetSpec", "DicomSeries", "build_dataset", "make_uid",
    "png_bytes", "sample_files", "synthetic_study", "write_dicom_archive",
    "write_dicom_series", "write_nifti",
]
