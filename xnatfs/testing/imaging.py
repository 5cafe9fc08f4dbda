"""Synthetic imaging data for the test server and the tests: DICOM series of a
3D head phantom, DICOM archives (zip, tar.gz), NIfTI volumes and PNG snapshots.

Everything written is a pure function of its arguments: dates, times, UIDs
and pixel noise are fixed, so two builds give byte-identical files. The data
sets (:mod:`xnatfs.testing.datasets`) are made of these, and tests use them
to make upload material.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import io
import math
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, UID, ExplicitVRLittleEndian, generate_uid



# ----------------------------------------------------------------------- UIDs


def make_uid(*parts: object) -> UID:
    """A UID that depends only on ``parts``, so rebuilding gives the same UIDs."""
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[str(p) for p in parts])


# Fixed rather than pydicom's, so files do not change with the pydicom version.
IMPLEMENTATION_CLASS_UID = make_uid("xnatfs", "implementation")
IMPLEMENTATION_VERSION_NAME = "XNATFS_TESTDATA"

# ------------------------------------------------------------------- phantom

# A 3D Shepp-Logan-like head: value, semi-axes (x, y, z), centre (x, y, z) in
# [-1, 1] coordinates. Values are chosen so that everything inside the head
# has positive density (skull 1.0, brain 0.25, ventricles 0.1, lesions 0.35).
_ELLIPSOIDS = (
    (1.00, 0.690, 0.920, 0.900, 0.00, 0.000, 0.00),
    (-0.75, 0.662, 0.874, 0.880, 0.00, -0.018, 0.00),
    (-0.15, 0.110, 0.310, 0.220, 0.22, 0.000, 0.00),
    (-0.15, 0.160, 0.410, 0.280, -0.22, 0.000, 0.00),
    (0.10, 0.210, 0.250, 0.410, 0.00, 0.350, -0.15),
    (0.10, 0.046, 0.046, 0.050, 0.00, 0.100, 0.25),
    (0.10, 0.046, 0.046, 0.050, 0.00, -0.100, 0.25),
    (0.10, 0.046, 0.023, 0.050, -0.08, -0.605, 0.00),
    (0.10, 0.023, 0.023, 0.020, 0.00, -0.606, 0.00),
    (0.10, 0.023, 0.046, 0.020, 0.06, -0.605, 0.00),
)


def _random_bytes(count: int, *key: int) -> np.ndarray:
    """``count`` uint8 values from PCG64's raw stream, which numpy keeps stable
    across versions (its distributions are not guaranteed to be)."""
    generator = np.random.PCG64(np.random.SeedSequence(list(key)))
    return generator.random_raw((count + 7) // 8).view(np.uint8)[:count]


def _phantom_slice(rows: int, cols: int, z: float, seed: int) -> np.ndarray:
    """Density of the head phantom cut at height ``z`` in [-1, 1]; ``seed``
    shifts and scales the head a little so that subjects differ."""
    jitter = _random_bytes(3, seed, 0).astype(np.float32) / 255.0
    shift_x, shift_y = (jitter[:2] - 0.5) * 0.1
    scale = 0.9 + 0.15 * jitter[2]
    x = (np.linspace(-1, 1, cols, dtype=np.float32) - shift_x) / scale
    y = (np.linspace(1, -1, rows, dtype=np.float32) - shift_y) / scale
    density = np.zeros((rows, cols), np.float32)
    for value, ax, ay, az, cx, cy, cz in _ELLIPSOIDS:
        reach = 1.0 - ((z / scale - cz) / az) ** 2
        if reach <= 0:
            continue
        inside = (((y - cy) / ay) ** 2)[:, None] + (((x - cx) / ax) ** 2)[None, :] <= reach
        density[inside] += value
    return density


def _intensities(density: np.ndarray, modality: str, noise: np.ndarray) -> np.ndarray:
    """Physical values for a modality: HU for CT, arbitrary units otherwise."""
    head = density > 0.01
    bone = density > 0.6
    noise = noise.astype(np.float32) - 128.0
    if modality == "CT":
        values = np.where(head, np.where(bone, 800.0, density * 150.0), -1000.0) + noise * 0.1
    elif modality == "PT":
        values = np.where(head, np.where(bone, 50.0, density * 8000.0) + noise * 0.8, 0.0)
    else:
        values = np.where(head, np.where(bone, 300.0, 400.0 + density * 2400.0), 0.0)
        values += noise * 0.15
    return values


def _slice_position(index: int, slices: int) -> float:
    """Height of slice ``index`` in the phantom's [-1, 1] coordinates."""
    return (index + 0.5) / slices * 2.0 - 1.0


# ---------------------------------------------------------------------- DICOM

_SOP_CLASSES = {
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}
_WINDOWS = {"MR": ("600", "1200"), "CT": ("40", "80"), "PT": ("1500", "3000")}
_FIELD_OF_VIEW_MM = 240.0
_HEAD_HEIGHT_MM = 180.0
_CT_RESCALE_INTERCEPT = -1024


def decimal_string(value: float) -> str:
    """A DICOM decimal string short enough for the 16-character limit."""
    return f"{value:.6g}"


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while number:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
    return text or "0"


@dataclass(frozen=True)
class DicomSeries:
    """One synthetic DICOM series; every header value and pixel follows from it.

    ``extra`` sets further attributes by keyword (e.g. ``PatientComments``) on
    every instance. ``modality`` is ``MR``, ``CT`` or ``PT``.
    """

    patient_name: str
    patient_id: str
    study_uid: str
    series_number: int
    series_description: str
    modality: str = "MR"
    slices: int = 16
    rows: int = 64
    cols: int = 64
    seed: int = 0
    study_date: str = "20230314"
    study_time: str = "091233"
    study_description: str = ""
    manufacturer: str = "SIEMENS"
    model: str = "Prisma_fit"
    field_strength: str = "3"
    patient_sex: str = ""
    patient_birth_date: str = ""
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def series_uid(self) -> str:
        return make_uid(self.study_uid, "series", self.series_number)

    @property
    def pixel_spacing(self) -> float:
        return _FIELD_OF_VIEW_MM / max(self.rows, self.cols)

    @property
    def slice_thickness(self) -> float:
        return round(_HEAD_HEIGHT_MM / self.slices, 3)

    def sop_uid(self, instance: int) -> UID:
        return make_uid(self.series_uid, "instance", instance)

    def file_name(self, instance: int) -> str:
        """XNAT's archive naming: study UID, series, instance and a short hash."""
        digest = hashlib.md5(f"{_SOP_CLASSES[self.modality]}{self.sop_uid(instance)}".encode())
        return (f"{self.study_uid}-{self.series_number}-{instance}-"
                f"{_base36(int.from_bytes(digest.digest()[:5], 'big'))}.dcm")

    def intensities(self, index: int) -> np.ndarray:
        """Physical values of slice ``index`` (0-based), shape (rows, cols)."""
        density = _phantom_slice(self.rows, self.cols, _slice_position(index, self.slices),
                                 self.seed)
        noise = _random_bytes(self.rows * self.cols, self.seed, self.series_number, index + 1)
        return _intensities(density, self.modality, noise.reshape(self.rows, self.cols))

    def stored_pixels(self, index: int) -> np.ndarray:
        """Slice ``index`` as the 12-bit unsigned values stored in PixelData."""
        values = self.intensities(index)
        if self.modality == "CT":
            values = values - _CT_RESCALE_INTERCEPT
        return np.clip(np.rint(values), 0, 4095).astype("<u2")

    def files(self) -> Iterator[tuple[str, bytes]]:
        """(file name, Part 10 bytes) for each instance, in instance order."""
        ds = self._header()
        corner = -_FIELD_OF_VIEW_MM / 2
        for index in range(self.slices):
            instance = index + 1
            sop_uid = self.sop_uid(instance)
            z = -_HEAD_HEIGHT_MM / 2 + (index + 0.5) * self.slice_thickness
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = instance
            ds.ImagePositionPatient = [decimal_string(corner), decimal_string(corner), decimal_string(z)]
            ds.SliceLocation = decimal_string(z)
            ds.PixelData = self.stored_pixels(index).tobytes()
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            yield self.file_name(instance), buffer.getvalue()

    def _header(self) -> Dataset:
        """Attributes shared by every instance of the series."""
        sop_class = UID(_SOP_CLASSES[self.modality])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"] if self.modality == "MR" \
            else ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = self.study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = self.study_time
        ds.AccessionNumber = ""
        ds.Modality = self.modality
        ds.Manufacturer = self.manufacturer
        ds.InstitutionName = "xnatfs Imaging Centre"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = self.study_description
        ds.SeriesDescription = self.series_description
        ds.ManufacturerModelName = self.model
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientBirthDate = self.patient_birth_date
        ds.PatientSex = self.patient_sex
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = decimal_string(self.slice_thickness)
        ds.SpacingBetweenSlices = decimal_string(self.slice_thickness)
        ds.ProtocolName = self.series_description
        self._modality_header(ds)
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = self.series_number
        ds.AcquisitionNumber = 1
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = make_uid(self.study_uid, "frame-of-reference")
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = self.rows
        ds.Columns = self.cols
        ds.PixelSpacing = [decimal_string(self.pixel_spacing), decimal_string(self.pixel_spacing)]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter, ds.WindowWidth = _WINDOWS[self.modality]
        if self.modality == "CT":
            ds.RescaleIntercept = str(_CT_RESCALE_INTERCEPT)
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
        for keyword, value in self.extra.items():
            setattr(ds, keyword, value)
        return ds

    def _modality_header(self, ds: Dataset) -> None:
        if self.modality == "MR":
            ds.ScanningSequence = ["GR", "IR"]
            ds.SequenceVariant = ["SK", "SP", "MP"]
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = "2300"
            ds.EchoTime = "2.98"
            ds.InversionTime = "900"
            ds.MagneticFieldStrength = self.field_strength
            ds.FlipAngle = "9"
        elif self.modality == "CT":
            ds.KVP = "120"
            ds.ConvolutionKernel = "H30s"
            ds.ExposureTime = "1000"
            ds.XRayTubeCurrent = "250"
        else:
            ds.Units = "BQML"
            ds.DecayCorrection = "START"
            ds.SeriesType = ["STATIC", "IMAGE"]
            ds.CorrectedImage = ["DECY", "ATTN", "SCAT"]
            ds.RadiopharmaceuticalInformationSequence = [Dataset()]
            ds.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical = "Fluorodeoxyglucose"


def write_dicom_series(directory: Path, *, patient_name: str, patient_id: str,
                       study_uid: str | None = None, series_number: int,
                       series_description: str, modality: str = "MR", slices: int = 16,
                       rows: int = 64, cols: int = 64, seed: int = 0,
                       **fields: Any) -> list[Path]:
    """Write one synthetic series into ``directory``; returns the files in instance order.

    ``study_uid`` defaults to one derived from the patient ID and seed, so
    several calls with the same patient make one study. Further ``fields``
    are :class:`DicomSeries` fields (``study_date``, ``manufacturer``, ``extra``...).
    """
    series = DicomSeries(
        patient_name=patient_name, patient_id=patient_id,
        study_uid=study_uid or make_uid("study", patient_id, seed),
        series_number=series_number, series_description=series_description,
        modality=modality, slices=slices, rows=rows, cols=cols, seed=seed, **fields)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in series.files():
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths


class ScanPlan(NamedTuple):
    """One series of an acquisition protocol and the derived data kept for it."""

    number: int                  # SeriesNumber = XNAT scan ID
    type: str                    # XNAT scan type
    description: str             # SeriesDescription
    quality: str
    scout_slices: int = 0        # fixed slice count of a scout; 0 = the main size
    nifti: bool = False          # NIFTI resource, as a converter pipeline would add
    snapshots: bool = True       # SNAPSHOTS resource


PROTOCOLS = {
    "MR": (ScanPlan(1, "Localizer", "localizer", "usable", scout_slices=3, snapshots=False),
           ScanPlan(2, "T1 MPRAGE/2", "t1_mprage_sag_p2_iso", "usable", nifti=True),
           ScanPlan(3, "T2 FLAIR", "t2_space_dark-fluid_sag", "questionable")),
    "CT": (ScanPlan(1, "Topogram", "Topogram  0.6  T20s", "usable", scout_slices=1,
                     snapshots=False),
           ScanPlan(2, "HEAD 5.0 H30s", "Head 5.0 H30s", "usable", nifti=True),
           ScanPlan(3, "HEAD 1.0 H60s bone", "Head 1.0 H60s", "questionable")),
    "PT": (ScanPlan(1, "PET AC", "PET Brain AC", "usable", nifti=True),
           ScanPlan(2, "PET NAC", "PET Brain NAC", "unusable", snapshots=False)),
}
# Bench sessions: big isotropic 3D anatomy with plain scan types.
BENCH_PROTOCOL = (
    ScanPlan(1, "Localizer", "localizer", "usable", scout_slices=3, snapshots=False),
    ScanPlan(2, "T1w", "t1_mprage_sag_p2_iso_0.8mm", "usable"),
    ScanPlan(3, "T2w", "t2_space_sag_p2_iso_0.8mm", "usable", snapshots=False),
)


def synthetic_study(patient_name: str, patient_id: str, *, modality: str = "MR",
                    slices: int = 8, rows: int = 32, cols: int = 32, seed: int = 0,
                    study_uid: str | None = None, **fields: Any) -> list[DicomSeries]:
    """The series of a typical study of one modality (MR, CT or PT), e.g. for imports."""
    study_uid = study_uid or make_uid("study", patient_id, modality, seed)
    return [
        DicomSeries(patient_name=patient_name, patient_id=patient_id, study_uid=study_uid,
                    series_number=scan.number, series_description=scan.description,
                    modality=modality, slices=scan.scout_slices or slices,
                    rows=rows, cols=cols, seed=seed, **fields)
        for scan in PROTOCOLS[modality]
    ]


_ARCHIVE_TIME = (2023, 3, 14, 9, 12, 33)
_ARCHIVE_MTIME = calendar.timegm((*_ARCHIVE_TIME, 0, 0, 0))


def write_dicom_archive(path: Path, series: Iterable[DicomSeries]) -> list[str]:
    """Write the series as ``.zip``, ``.tar``, ``.tar.gz`` or ``.tgz`` (by suffix),
    with fixed timestamps so the archive bytes are reproducible; members are
    ``<PatientID>/<SeriesNumber>/<file>``. Returns the member names."""
    path = Path(path)
    if not path.name.endswith((".zip", ".tar", ".tar.gz", ".tgz")):
        raise ValueError(f"unsupported archive type: {path.name}")
    names: list[str] = []
    members = ((f"{s.patient_id}/{s.series_number}/{name}", data)
               for s in series for name, data in s.files())
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members:
                info = zipfile.ZipInfo(name, date_time=_ARCHIVE_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, data)
                names.append(name)
        return names
    with open(path, "wb") as raw:
        compressed = not path.name.endswith(".tar")
        stream = gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) \
            if compressed else raw
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for name, data in members:
                entry = tarfile.TarInfo(name)
                entry.size = len(data)
                entry.mtime = _ARCHIVE_MTIME
                entry.mode = 0o644
                archive.addfile(entry, io.BytesIO(data))
                names.append(name)
        if compressed:
            stream.close()
    return names


# ---------------------------------------------------------------------- NIfTI


class _HashingWriter:
    """Counts and md5-hashes what passes through, so big files are read once."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.size = 0
        self.md5 = hashlib.md5()

    def write(self, data: bytes) -> int:
        self.sink.write(data)
        self.size += len(data)
        self.md5.update(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.sink.flush()


def _nifti_volumes(shape: Sequence[int], modality: str, seed: int) -> Iterator[bytes]:
    """The data block of a NIfTI image, one 3D volume at a time (x fastest).

    Time points repeat one phantom volume with a slow oscillation in its
    brightest tenth and rotating noise, which keeps generation fast and
    memory bounded by a few volumes.
    """
    x_size, y_size, z_size = shape[:3]
    time_points = shape[3] if len(shape) > 3 else 1
    silent = np.full((y_size, x_size), 128, np.uint8)  # _intensities' zero noise
    base = np.stack([
        _intensities(_phantom_slice(y_size, x_size, _slice_position(z, z_size), seed),
                     modality, silent)
        for z in range(z_size)])
    active = (base > np.percentile(base, 90)).astype(np.float32)
    # Keyed by series number 0, which no DICOM series uses.
    noise_bank = [(_random_bytes(base.size, seed, 0, k + 1).astype(np.float32) - 128)
                  .reshape(base.shape) * 0.2 for k in range(min(4, time_points))]
    for t in range(time_points):
        wave = 40.0 * math.sin(2 * math.pi * t / 20)
        volume = base + active * wave + noise_bank[t % len(noise_bank)]
        yield np.clip(np.rint(volume), -32768, 32767).astype("<i2").tobytes()


def write_nifti(path: Path, shape: Sequence[int], *,
                voxel_size: Sequence[float] = (2.0, 2.0, 2.0), repetition_time: float = 2.0,
                modality: str = "MR", seed: int = 0,
                compress: bool | None = None) -> tuple[int, str]:
    """Write an int16 phantom image, gzip-compressed if ``compress`` (by default:
    if the name ends in ``.gz``; blob paths have no suffix, so say it there).

    The header comes from nibabel; the data is streamed volume by volume and
    hashed on the way, so a 1 GiB file costs a few volumes of memory and no
    re-read. Returns (size, md5 hex digest) of the file.
    """
    path = Path(path)
    shape = tuple(int(n) for n in shape)
    zooms = tuple(float(v) for v in voxel_size[:3])
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-(n - 1) * z / 2 for n, z in zip(shape[:3], zooms)]
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_zooms(zooms + ((repetition_time,) if len(shape) > 3 else ()))
    header.set_xyzt_units("mm", "sec")
    header.set_qform(affine, code="scanner")
    header.set_sform(affine, code="scanner")
    header["descrip"] = b"xnatfs synthetic phantom"
    with open(path, "wb") as raw:
        sink = _HashingWriter(raw)
        compressed = path.name.endswith(".gz") if compress is None else compress
        stream: Any = gzip.GzipFile(fileobj=sink, mode="wb", filename="", mtime=0) \
            if compressed else sink
        header.write_to(stream)
        for volume in _nifti_volumes(shape, modality, seed):
            stream.write(volume)
        if compressed:
            stream.close()
    return sink.size, sink.md5.hexdigest()


# ------------------------------------------------------------------------ PNG


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a 2D uint8 array as a greyscale PNG (Pillow is not a dependency)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = image.shape
    rows = np.hstack([np.zeros((height, 1), np.uint8), image])  # filter type 0 per row

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def snapshot_images(series: DicomSeries) -> tuple[bytes, bytes]:
    """XNAT-style QC snapshots: a montage of up to 16 slices and a thumbnail."""
    count = min(16, series.slices)
    picks = [round((k + 0.5) * series.slices / count - 0.5) for k in range(count)]
    centre, width = (float(v) for v in _WINDOWS[series.modality])
    tiles = [np.clip((series.intensities(i) - centre + width / 2) / width * 255, 0, 255)
             .astype(np.uint8) for i in picks]
    grid = math.ceil(math.sqrt(count))
    tiles += [np.zeros_like(tiles[0])] * (grid * grid - count)
    montage = np.vstack([np.hstack(tiles[r * grid:(r + 1) * grid]) for r in range(grid)])
    middle = tiles[count // 2]
    step = max(1, max(middle.shape) // 64)
    return png_bytes(montage), png_bytes(middle[::step, ::step])


# ------------------------------------------------------------------- presets
