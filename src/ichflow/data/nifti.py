"""NIfTI volumes (.nii / .nii.gz) in and out, in the display orientation every reader shares.

:func:`read_nifti` turns a NIfTI file of any stored orientation into a :class:`~ichflow.data.volumes.Volume`:
HU (N, H, W) float32 with slices inferior -> superior and each slice as an axial DICOM image is displayed
(rows anterior -> posterior, columns patient right -> left), i.e. the (column, row, slice) voxel axes point to
Left, Posterior, Superior (nibabel axcodes ``LPS``). The reorientation is a pure flip/transpose (nearest
orthogonal axes, ``io_orientation``): no resampling, so an oblique scan keeps its voxels and ``affine`` keeps the
obliquity. :func:`write_nifti_like` writes a result (a mask) back in the input file's own voxel order with the
input's affine, so viewers overlay it on the input exactly.

:func:`write_nifti_volume` writes an 8-bit phantom slice stack as a NIfTI in HU, stored the way a real export
would store it (default ``LAS``: what dcm2niix writes), to test all of the above on real files.

Every bad input is a one-line :class:`~ichflow.errors.DataError` naming the file: missing, not a NIfTI,
truncated (the data is read in full here: nibabel reads lazily), a non-finite or singular affine, non-finite
values, a real 4D or a 2D image, a mask whose grid differs from its image's (both files named).
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from nibabel.spatialimages import HeaderDataError

from ichflow.data.volumes import Volume
from ichflow.data.windows import PRESETS, to_hu
from ichflow.errors import DataError

DISPLAY_AXCODES = ("L", "P", "S")          # (column, row, slice) of Volume.hu, as nibabel axcodes
DISPLAY_ORNT = axcodes2ornt(DISPLAY_AXCODES)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MASK_AFFINE_TOL_MM = 1e-3
# header fields that define where the voxels are: copied verbatim so a written file's affine is bit-identical
_GEOMETRY_FIELDS = ("pixdim", "xyzt_units", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z")
_READ_ERRORS = (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile, HeaderDataError, MemoryError)


def nifti_stem(path: str | Path) -> str:
    """``0001.nii.gz`` -> ``0001``; ``scan.nii`` -> ``scan``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def is_nifti_name(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


# --------------------------------------------------------------------------------------------------- reading
def _reason(exc: BaseException, path: Path) -> str:
    """A library error as one short line (DataError messages are one line), without repeating the path."""
    text = " ".join(str(exc).replace(str(path), "the file").split())
    return f"{type(exc).__name__}: {text[:200]}"


def _load(path: Path):
    """The nibabel image of a NIfTI file; DataError for a missing file or anything that is not a NIfTI."""
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a folder, not a NIfTI file")
    try:
        img = nib.load(str(path))
    except ImageFileError as exc:
        raise DataError(path, f"not a NIfTI file ({_reason(exc, path)})") from None
    except _READ_ERRORS as exc:
        raise DataError(path, f"not a readable NIfTI file ({_reason(exc, path)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not a NIfTI file (nibabel reads it as {type(img).__name__})")
    return img


def _full_data(img, path: Path) -> np.ndarray:
    """All voxels as float32 with scl_slope/scl_inter applied, read in full (truncation fails here), 3D."""
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(path, f"image of shape {img.shape}: expected a 3D volume (a 4D file needs a singleton "
                              "4th dimension, a 2D file is a single slice)")
    try:
        data = img.get_fdata(dtype=np.float32)
    except _READ_ERRORS as exc:
        raise DataError(path, f"truncated or corrupt NIfTI data ({_reason(exc, path)})") from None
    data = data.reshape(shape)
    if not np.isfinite(data).all():
        raise DataError(path, f"{int((~np.isfinite(data)).sum())} voxel value(s) are NaN or infinite")
    return data


def _check_affine(affine: np.ndarray, path: Path) -> None:
    if not np.isfinite(affine).all():
        raise DataError(path, "affine (sform/qform) has non-finite entries")
    lin = affine[:3, :3]
    norms = np.linalg.norm(lin, axis=0)
    if (norms <= 1e-6).any() or abs(np.linalg.det(lin)) / float(np.prod(norms)) < 1e-6:
        raise DataError(path, f"singular affine (voxel axes {np.round(lin, 4).tolist()}): no valid voxel geometry")


def display_transform(file_affine: np.ndarray) -> np.ndarray:
    """nibabel orientation taking the file's voxel axes to the display (column, row, slice) = L, P, S axes."""
    return ornt_transform(io_orientation(file_affine), DISPLAY_ORNT)


def _to_display(data: np.ndarray, file_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hu (N, H, W), affine of (column, row, slice), ornt) for file-ordered ``data``."""
    ornt = display_transform(file_affine)
    xyz = apply_orientation(data, ornt)                      # (column, row, slice) axes
    affine = file_affine @ inv_ornt_aff(ornt, data.shape)
    hu = np.ascontiguousarray(xyz.transpose(2, 1, 0), dtype=np.float32)
    return hu, affine, ornt


def read_nifti(path: str | Path) -> Volume:
    """A NIfTI file as a display-oriented HU :class:`Volume` (see the module doc). Raises DataError."""
    path = Path(path)
    img = _load(path)
    file_affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(file_affine, path)
    data = _full_data(img, path)
    hu, affine, ornt = _to_display(data, file_affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)           # (column, row, slice) mm
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    return Volume(hu=hu, spacing=spacing, affine=affine, file_affine=file_affine, ornt=ornt,
                  name=nifti_stem(path), path=path, kind="nifti")


def read_nifti_mask(path: str | Path, like: Volume) -> np.ndarray:
    """(N, H, W) bool mask of a NIfTI label file on the grid of its image ``like`` (any non-zero voxel is lesion).

    The mask is reoriented by its own affine; a different shape or affine (beyond 1e-3 mm) than the image's is
    a DataError naming both files."""
    path = Path(path)
    mask = read_nifti(path)
    if mask.hu.shape != like.hu.shape:
        raise DataError(path, f"mask shape {_file_shape(mask)} differs from image shape {_file_shape(like)} "
                              f"of {like.path}")
    if not np.allclose(mask.affine, like.affine, rtol=0.0, atol=MASK_AFFINE_TOL_MM):
        worst = float(np.abs(mask.affine - like.affine).max())
        raise DataError(path, f"mask affine differs from the affine of image {like.path} by up to {worst:.4g} "
                              f"mm (tolerance {MASK_AFFINE_TOL_MM} mm): not the same voxel grid")
    return mask.hu != 0


def _file_shape(volume: Volume) -> tuple[int, ...]:
    return tuple(int(s) for s in volume.to_file_order(volume.hu).shape)


# --------------------------------------------------------------------------------------------------- writing
def _save_atomic(img, path: Path) -> Path:
    """nib.save into a temp file beside ``path`` (same suffix: nibabel compresses by name), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{nifti_stem(path)}.", suffix=suffix)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _geometry_header(volume: Volume) -> nib.Nifti1Header | None:
    """A header carrying the input file's geometry fields verbatim, when its affine is ``volume.file_affine``."""
    if volume.kind != "nifti":
        return None
    try:
        src = nib.load(str(volume.path)).header
    except Exception:  # noqa: BLE001 - the input moved or changed: fall back to writing the affine
        return None
    if not np.array_equal(src.get_best_affine(), volume.file_affine):
        return None
    hdr = nib.Nifti1Header()
    for key in _GEOMETRY_FIELDS:
        hdr[key] = src[key]
    return hdr


def write_nifti_like(volume: Volume, array: np.ndarray, path: str | Path, dtype=np.uint8) -> Path:
    """Write ``array`` (N, H, W, on ``volume.hu``'s grid) as a NIfTI in the input file's voxel order whose affine
    is ``volume.file_affine`` (sform and qform copied from the input, else both set with code 1). Atomic."""
    array = np.asarray(array)
    if array.shape != volume.hu.shape:
        raise ValueError(f"array shape {array.shape} != volume shape {volume.hu.shape}")
    data = np.ascontiguousarray(volume.to_file_order(array)).astype(dtype)
    hdr = _geometry_header(volume)
    img = nib.Nifti1Image(data, volume.file_affine, header=hdr)
    if hdr is None:
        img.set_sform(volume.file_affine, code=1)
        img.set_qform(volume.file_affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    return _save_atomic(img, Path(path))


def display_affine(shape_nhw: tuple[int, int, int], spacing=(5.0, 0.508, 0.508)) -> np.ndarray:
    """A head-CT-like RAS+ affine for (column, row, slice) = L, P, S axes, centred on the volume."""
    dz, dy, dx = (float(s) for s in spacing)
    n, h, w = shape_nhw
    affine = np.diag([-dx, -dy, dz, 1.0])
    affine[:3, 3] = [dx * (w - 1) / 2, dy * (h - 1) / 2, -dz * (n - 1) / 2]
    return affine


def write_nifti_volume(path: str | Path, slices_uint8: np.ndarray, spacing=(5.0, 0.508, 0.508),
                       axcodes: tuple[str, str, str] = ("L", "A", "S"), window: str = "brain",
                       label: bool = False) -> Path:
    """Write display-ordered slices (N, H, W; inferior -> superior) as a NIfTI stored in ``axcodes`` order.

    Images: 8-bit brain-windowed values -> HU (``windows.to_hu``), rounded, int16 with scl_slope 1 / inter 0.
    ``label=True``: a 0/1 uint8 mask (any non-zero value is lesion). ``spacing`` is (slice, row, column) mm.
    The default ``LAS`` storage is dcm2niix's (x toward patient left, y anterior, z superior); the reader
    must flip rows to display them, which it does for any orthogonal storage order.
    """
    slices = np.asarray(slices_uint8)
    if slices.ndim != 3:
        raise ValueError(f"expected (N, H, W) slices, got shape {slices.shape}")
    if label:
        data, dtype = (slices != 0).astype(np.uint8), np.uint8
    else:
        data, dtype = np.rint(to_hu(slices, PRESETS[window])).astype(np.int16), np.int16
    affine = display_affine(slices.shape, spacing)
    xyz = data.transpose(2, 1, 0)                                    # (column, row, slice) = L, P, S
    ornt = ornt_transform(DISPLAY_ORNT, axcodes2ornt(tuple(axcodes)))
    stored = np.ascontiguousarray(apply_orientation(xyz, ornt))
    file_affine = affine @ inv_ornt_aff(ornt, xyz.shape)
    img = nib.Nifti1Image(stored, file_affine, dtype=dtype)
    img.set_sform(file_affine, code=1)
    img.set_qform(file_affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)
    return _save_atomic(img, Path(path))
