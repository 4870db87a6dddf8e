"""One CT series of a DICOM folder as a display-oriented HU :class:`~ichflow.data.volumes.Volume`.

:func:`read_dicom_series` reads every file under the folder (recursively), groups the CT images by
SeriesInstanceUID, and turns the chosen series into HU (``RescaleSlope`` / ``RescaleIntercept`` per slice)
with slices inferior -> superior and each slice in the radiological display orientation (rows anterior ->
posterior, columns patient right -> left), whatever order the files, InstanceNumbers or
ImageOrientationPatient store: the reorientation is a pure flip/transpose, never a resampling.

Geometry comes from the files only: slices are sorted by ImagePositionPatient projected on the slice normal
(ImageOrientationPatient row x column cosines); ``affine`` (RAS+, NIfTI convention) is built from the direction
cosines, PixelSpacing, the first slice's position and the mean slice step vector (so a gantry tilt stays in the
affine as a shear); ``spacing[0]`` is the distance between slice planes. Only when no file has
ImagePositionPatient are slices ordered by InstanceNumber (assumed to increase along the slice normal) with
SpacingBetweenSlices (else SliceThickness) as the step and the origin at 0.

The DICOM "file order" behind ``file_affine`` / ``ornt`` is (stored column, stored row, slice by position
along the normal): for a series stored in display orientation it is the display order itself (identity
``ornt``, ``file_affine == affine``); for a series with flipped rows/columns ``ornt`` says how to get from the
stored pixels to the display, which the DICOM-SEG writer uses to put a mask back on the stored pixels.

Skipped quietly: files that are not DICOM (no ``DICM`` preamble: text files, images, ACR-NEMA files without
a preamble), DICOMDIR, DICOM objects without pixels (SR, presentation states) and DICOM-SEG objects (a SEG
written beside its source series is not a second series). Everything else that is wrong is one
:class:`~ichflow.errors.DataError` naming the folder or file and the problem; nothing is written anywhere.
Limits: axial series only (slice normal within 30 degrees of superior/inferior, in-plane axes within 30 degrees
of the patient axes: sagittal, coronal and strongly oblique series are refused), single-frame images only
(no Enhanced CT), at least 2 slices (a single slice is no volume: refused, not guessed with SliceThickness).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage, SegmentationStorage, UID

from ichflow.data.volumes import Volume
from ichflow.errors import DataError

DISPLAY_ORNT = axcodes2ornt(("L", "P", "S"))   # (column, row, slice) of Volume.hu
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_OBLIQUE_DEG = 30.0
GAP_FACTOR = 1.5          # a step this many times the median step means missing slices
STEP_TOLERANCE = 0.05     # other steps may differ from the median by this fraction (or STEP_TOL_MM)
STEP_TOL_MM = 0.01
GEOMETRY_TOL = 1e-3       # mm for PixelSpacing, cosine units for ImageOrientationPatient
_SKIP_SOP = {MediaStorageDirectoryStorage, SegmentationStorage}


@dataclass
class _Slice:
    path: Path
    ds: pydicom.Dataset


# ------------------------------------------------------------------------------------------------- discovery
def is_dicom_folder(path: str | Path, max_probe: int = 64) -> bool:
    """A folder holding a ``.dcm`` file or a file with the ``DICM`` marker at byte 128 (probes at most
    ``max_probe`` files' first bytes)."""
    path = Path(path)
    if not path.is_dir():
        return False
    probed = 0
    for root, _dirs, files in os.walk(path):
        for name in sorted(files):
            if name.lower().endswith(".dcm"):
                return True
            if probed < max_probe:
                probed += 1
                if _has_dicm(Path(root) / name):
                    return True
    return False


def _has_dicm(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise DataError(folder, "folder not found")
    if not folder.is_dir():
        raise DataError(folder, "not a folder: a DICOM series is read from the folder holding its files")
    return sorted(Path(root) / name for root, _dirs, names in os.walk(folder) for name in names)


def _header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM file (no pixels), or None for a file that is not DICOM or not an image to read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except InvalidDicomError:
        return None
    except Exception as exc:  # noqa: BLE001 - any parse failure of a file with the DICM marker is a bad file
        raise DataError(path, f"unreadable DICOM file, truncated or corrupt ({_short(exc)})") from None
    sop = UID(str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or ""))
    if sop in _SKIP_SOP:
        return None
    complete = "SeriesInstanceUID" in ds and "Rows" in ds and "Columns" in ds
    if not complete and (not sop or "Image Storage" in sop.name):
        raise DataError(path, "incomplete DICOM image header (no SeriesInstanceUID/Rows/Columns): truncated or "
                              "corrupt file")
    return ds if complete else None   # a non-image object (SR, presentation state...): not ours to read


def _series(folder: Path) -> dict[str, list[_Slice]]:
    groups: dict[str, list[_Slice]] = {}
    for path in _files(folder):
        ds = _header(path)
        if ds is not None:
            groups.setdefault(str(ds.SeriesInstanceUID), []).append(_Slice(path, ds))
    if not groups:
        raise DataError(folder, "no DICOM image files found (a DICOM file has the 'DICM' marker at byte 128)")
    return groups


def _describe(groups: dict[str, list[_Slice]]) -> str:
    parts = []
    for uid, members in sorted(groups.items()):
        ds = members[0].ds
        parts.append(f"{uid} ({ds.get('Modality', '?')}, '{ds.get('SeriesDescription', '')}', "
                     f"{len(members)} file(s))")
    return "; ".join(parts)


def _pick(folder: Path, groups: dict[str, list[_Slice]], series_uid: str) -> tuple[str, list[_Slice]]:
    if series_uid:
        if series_uid not in groups:
            raise DataError(folder, f"series_uid {series_uid} is not in this folder; its series: {_describe(groups)}")
        return series_uid, groups[series_uid]
    if len(groups) > 1:
        raise DataError(folder, f"{len(groups)} series in one folder: {_describe(groups)}; pass "
                                "-P series_uid=<SeriesInstanceUID> to choose one")
    return next(iter(groups.items()))


# --------------------------------------------------------------------------------------------------- checks
def _check_series(folder: Path, uid: str, members: list[_Slice]) -> None:
    first = members[0]
    modality = str(first.ds.get("Modality", ""))
    if modality != "CT":
        raise DataError(folder, f"series {uid} has Modality {modality or '(none)'}: only CT series are read "
                                "(Hounsfield units)")
    if len(members) < 2:
        raise DataError(folder, f"series {uid} has a single slice ({first.path.name}): a volume needs at least "
                                "2 slices")
    for s in members:
        if str(s.ds.get("Modality", "")) != "CT":
            raise DataError(s.path, f"Modality {s.ds.get('Modality', '(none)')} in CT series {uid}")
        if int(s.ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(s.path, f"multi-frame image ({s.ds.NumberOfFrames} frames, e.g. Enhanced CT): only "
                                    "single-frame slices are read; export the series as single-frame images")
        if int(s.ds.get("SamplesPerPixel", 1)) != 1:
            raise DataError(s.path, f"{s.ds.SamplesPerPixel} samples per pixel: not a greyscale CT image")
        if (s.ds.Rows, s.ds.Columns) != (first.ds.Rows, first.ds.Columns):
            raise DataError(s.path, f"image size {s.ds.Columns}x{s.ds.Rows} differs from "
                                    f"{first.ds.Columns}x{first.ds.Rows} of {first.path.name} in the same series")


def _vector(s: _Slice, key: str, size: int) -> np.ndarray:
    value = s.ds.get(key)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (size,) or not np.isfinite(arr).all():
        raise DataError(s.path, f"missing or invalid {key} ({value!r}): cannot place the slice in space")
    return arr


def _same_everywhere(members: list[_Slice], key: str, size: int, what: str) -> np.ndarray:
    """The value of a geometry attribute, required equal (within GEOMETRY_TOL) in every slice."""
    ref = _vector(members[0], key, size)
    for s in members[1:]:
        value = _vector(s, key, size)
        if np.abs(value - ref).max() > GEOMETRY_TOL:
            raise DataError(s.path, f"inconsistent {what}: {key} {value.round(4).tolist()} differs from "
                                    f"{ref.round(4).tolist()} of {members[0].path.name} in the same series")
    return ref


def _orientation(members: list[_Slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(column-index direction, row-index direction, slice normal), unit vectors in LPS."""
    iop = _same_everywhere(members, "ImageOrientationPatient", 6, "orientation")
    x_dir, y_dir = iop[:3], iop[3:]
    nx, ny = np.linalg.norm(x_dir), np.linalg.norm(y_dir)
    if min(nx, ny) < 1e-3 or abs(x_dir @ y_dir) / (nx * ny) > 1e-2:
        raise DataError(members[0].path, f"invalid ImageOrientationPatient {iop.tolist()}: the row and column "
                                         "directions must be non-zero and orthogonal")
    x_dir, y_dir = x_dir / nx, y_dir / ny
    return x_dir, y_dir, np.cross(x_dir, y_dir)


def _check_axial(folder: Path, uid: str, x_dir: np.ndarray, y_dir: np.ndarray, normal: np.ndarray) -> None:
    axis = int(np.argmax(np.abs(normal)))
    if axis != 2:
        plane = "sagittal" if axis == 0 else "coronal"
        raise DataError(folder, f"series {uid} is {plane} (slice normal {normal.round(3).tolist()} in LPS): "
                                "only axial series are read; reconstruct axial slices")
    cos_limit = np.cos(np.radians(MAX_OBLIQUE_DEG))
    for name, vec in (("slice normal", normal), ("row direction", x_dir), ("column direction", y_dir)):
        cos = float(np.abs(vec).max())
        if cos < cos_limit:
            angle = float(np.degrees(np.arccos(min(1.0, cos))))
            raise DataError(folder, f"series {uid} is oblique: its {name} is {angle:.0f} degrees off the patient "
                                    f"axes (at most {MAX_OBLIQUE_DEG:.0f} are read); reconstruct axial slices")


# ------------------------------------------------------------------------------------------------- ordering
def _sorted_by_position(folder: Path, members: list[_Slice], normal: np.ndarray):
    """(slices sorted along the normal, their positions along it (mm), step vector (LPS mm), origin (LPS))."""
    has = ["ImagePositionPatient" in s.ds for s in members]
    if not any(has):
        return _sorted_by_instance(folder, members, normal)
    if not all(has):
        missing = members[has.index(False)]
        raise DataError(missing.path, "no ImagePositionPatient while other slices of the series have one")
    ipp = np.stack([_vector(s, "ImagePositionPatient", 3) for s in members])
    order = np.argsort(ipp @ normal, kind="stable")
    members, ipp = [members[i] for i in order], ipp[order]
    pos = ipp @ normal
    _check_steps(folder, members, pos)
    return members, pos, (ipp[-1] - ipp[0]) / (len(members) - 1), ipp[0]


def _sorted_by_instance(folder: Path, members: list[_Slice], normal: np.ndarray):
    numbers = []
    for s in members:
        if "InstanceNumber" not in s.ds or s.ds.InstanceNumber in (None, ""):
            raise DataError(s.path, "neither ImagePositionPatient nor InstanceNumber: cannot order the slices")
        numbers.append(int(s.ds.InstanceNumber))
    if len(set(numbers)) != len(numbers):
        raise DataError(folder, "no ImagePositionPatient and repeated InstanceNumbers: cannot order the slices")
    members = [members[i] for i in np.argsort(numbers, kind="stable")]
    ds = members[0].ds
    step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if not step or float(step) <= 0:
        raise DataError(folder, "no ImagePositionPatient and no SpacingBetweenSlices/SliceThickness: the slice "
                                "spacing is unknown")
    pos = np.arange(len(members)) * float(step)
    return members, pos, normal * float(step), np.zeros(3)


def _check_steps(folder: Path, members: list[_Slice], pos: np.ndarray) -> None:
    steps = np.diff(pos)
    dup = np.flatnonzero(steps < STEP_TOL_MM)
    if dup.size:
        a, b = members[dup[0]], members[dup[0] + 1]
        raise DataError(folder, f"{a.path.name} and {b.path.name} are at the same position ({pos[dup[0]]:.3f} mm "
                                "along the slice normal): duplicate slices or two acquisitions in one series")
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        where = ", ".join(f"{pos[i]:.2f} -> {pos[i + 1]:.2f} mm ({members[i].path.name} -> "
                          f"{members[i + 1].path.name})" for i in gaps[:5])
        raise DataError(folder, f"missing slices: {gaps.size} gap(s) larger than {GAP_FACTOR}x the slice step "
                                f"{median:.3f} mm, between positions {where} along the slice normal")
    uneven = np.flatnonzero(np.abs(steps - median) > max(STEP_TOLERANCE * median, STEP_TOL_MM))
    if uneven.size:
        i = int(uneven[0])
        raise DataError(folder, f"inconsistent slice spacing: step {steps[i]:.3f} mm between {members[i].path.name} "
                                f"and {members[i + 1].path.name}, median step {median:.3f} mm "
                                f"({uneven.size} uneven step(s))")


# --------------------------------------------------------------------------------------------------- pixels
def _read_hu(s: _Slice) -> tuple[pydicom.Dataset, np.ndarray]:
    """(full dataset, (H, W) float32 HU) of one slice; DataError for missing decoders or bad pixel data."""
    try:
        ds = pydicom.dcmread(s.path, force=False)
    except Exception as exc:  # noqa: BLE001
        raise DataError(s.path, f"unreadable DICOM file, truncated or corrupt ({_short(exc)})") from None
    if "PixelData" not in ds:
        raise DataError(s.path, "no pixel data: truncated or corrupt file")
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    _check_decoder(s.path, ts)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        raise DataError(s.path, f"cannot decode the pixel data ({ts.name or ts}): {_short(exc)}; truncated or "
                                "corrupt file") from None
    if pixels.shape != (ds.Rows, ds.Columns):
        raise DataError(s.path, f"pixel data of shape {pixels.shape}, expected {ds.Rows}x{ds.Columns}")
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return ds, pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _check_decoder(path: Path, ts: UID) -> None:
    if not ts:
        raise DataError(path, "no TransferSyntaxUID in the file meta: truncated or corrupt file")
    if not ts.is_compressed:
        return
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DataError(path, f"pixel data compressed as {ts.name or ts} ({ts}): no decoder exists for this "
                              "transfer syntax; convert the series to an uncompressed one") from None
    if not decoder.is_available:
        needs = " or ".join(_pip_install(dep) for dep in decoder.missing_dependencies) or "a decoder plugin"
        raise DataError(path, f"pixel data compressed as {ts.name} ({ts}) and no decoder for it is installed: "
                              f"{needs} (or decompress the series, e.g. gdcmconv --raw)")


def _pip_install(dependency: str) -> str:
    """pydicom's 'gdcm - requires gdcm>=3.0.10' -> "pip install 'python-gdcm>=3.0.10'" (gdcm's PyPI name)."""
    plugin, _, needs = dependency.partition(" - requires ")
    packages = [re.sub(r"^gdcm\b", "python-gdcm", p.strip()) for p in needs.split(" and ") if p.strip()]
    return "pip install " + " ".join(f"'{p}'" for p in packages) if packages else plugin.strip()


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


# ------------------------------------------------------------------------------------------------- geometry
def _file_affine(x_dir, y_dir, pixel_spacing, step_vec, origin) -> np.ndarray:
    """RAS+ affine of (stored column, stored row, slice sorted along the normal)."""
    lps = np.eye(4)
    lps[:3, 0] = x_dir * pixel_spacing[1]   # PixelSpacing = (row spacing, column spacing)
    lps[:3, 1] = y_dir * pixel_spacing[0]
    lps[:3, 2] = step_vec
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _to_display(stack: np.ndarray, file_affine: np.ndarray):
    """(hu (N, H, W), affine, ornt, hu slice -> file slice index) for a (slice, row, column) stack in file order."""
    ornt = ornt_transform(io_orientation(file_affine), DISPLAY_ORNT)
    xyz = stack.transpose(2, 1, 0)
    hu = np.ascontiguousarray(apply_orientation(xyz, ornt).transpose(2, 1, 0), dtype=np.float32)
    affine = file_affine @ inv_ornt_aff(ornt, xyz.shape)
    n = stack.shape[0]
    order = np.arange(n)[::-1] if ornt[2, 1] < 0 else np.arange(n)
    return hu, affine, ornt, order


def _name(ds: pydicom.Dataset, uid: str) -> str:
    series = str(ds.get("SeriesNumber", "") or "") or uid[-8:]
    parts = [str(ds.get("PatientID", "") or "unknown"), str(ds.get("StudyDate", "") or "nodate"), series]
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p).strip("-.") or "x" for p in parts)


# ------------------------------------------------------------------------------------------------------ api
def read_dicom_series(folder: str | Path, series_uid: str = "") -> Volume:
    """The CT series in ``folder`` (the only one, or ``series_uid``) as a display-oriented HU Volume.

    Raises DataError for every bad input (see the module doc)."""
    folder = Path(folder)
    uid, members = _pick(folder, _series(folder), str(series_uid or "").strip())
    _check_series(folder, uid, members)
    x_dir, y_dir, normal = _orientation(members)
    _check_axial(folder, uid, x_dir, y_dir, normal)
    pixel_spacing = _same_everywhere(members, "PixelSpacing", 2, "pixel spacing")
    if (pixel_spacing <= 0).any():
        raise DataError(members[0].path, f"invalid PixelSpacing {pixel_spacing.tolist()}")
    members, pos, step_vec, origin = _sorted_by_position(folder, members, normal)
    slices = [_read_hu(s) for s in members]
    file_affine = _file_affine(x_dir, y_dir, pixel_spacing, step_vec, origin)
    hu, affine, ornt, order = _to_display(np.stack([h for _, h in slices]), file_affine)
    slice_step = float(abs(pos[-1] - pos[0]) / (len(pos) - 1))
    zooms = np.linalg.norm(affine[:3, :2], axis=0)       # (column, row) mm of hu
    return Volume(hu=hu, spacing=(slice_step, float(zooms[1]), float(zooms[0])), affine=affine,
                  file_affine=file_affine, ornt=ornt, name=_name(slices[0][0], uid), path=folder, kind="dicom",
                  datasets=[slices[i][0] for i in order], series_uid=uid)


def display_from_file(volume: Volume, xyz: np.ndarray) -> np.ndarray:
    """Inverse of ``volume.to_file_order``: a (column, row, slice) array in file order -> (N, H, W) on hu's grid."""
    return apply_orientation(np.asarray(xyz), volume.ornt).transpose(2, 1, 0)


def file_slice_order(volume: Volume) -> np.ndarray:
    """For each file-order slice k, the index of that slice in ``volume.hu`` / ``volume.datasets``."""
    n = volume.hu.shape[0]
    index = np.broadcast_to(np.arange(n)[:, None, None], (n, 1, 1))
    return np.asarray(volume.to_file_order(index))[0, 0, :].astype(int)
