"""CT volumes in Hounsfield units: a DICOM series folder or a NIfTI file, as axial slices in display order.

Every reader returns a :class:`Volume` whose ``hu`` is (N, H, W) float32 HU with slices ordered from inferior to
superior and each slice in the radiological display orientation of an axial DICOM image (rows run anterior ->
posterior, columns patient right -> left), whatever the orientation stored in the file. ``affine`` maps
(column, row, slice) indices of ``hu`` to RAS+ millimetres (the NIfTI convention); ``file_affine`` /
:meth:`Volume.to_file_order` give back the input's own voxel order and affine, so a mask written for a NIfTI
input has exactly the input's affine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Volume:
    hu: np.ndarray                           # (N, H, W) float32 HU, inferior -> superior, display orientation
    spacing: tuple[float, float, float]      # (slice, row, column) in mm, from the file (never assumed)
    affine: np.ndarray                       # 4x4, (column, row, slice) index of ``hu`` -> RAS+ mm
    file_affine: np.ndarray                  # 4x4 affine of the voxels as stored (NIfTI file, DICOM pixel layout)
    ornt: np.ndarray                         # nibabel orientation: file voxel axes -> (column, row, slice) of hu
    name: str                                # output stem: study/series for DICOM, file stem for NIfTI
    path: Path                               # the DICOM folder or NIfTI file
    kind: str                                # "dicom" | "nifti"
    datasets: list = field(default_factory=list)  # DICOM: the source datasets, one per slice of ``hu``
    series_uid: str = ""

    @property
    def voxel_ml(self) -> float:
        dz, dy, dx = self.spacing
        return dz * dy * dx / 1000.0

    def to_file_order(self, array: np.ndarray) -> np.ndarray:
        """An (N, H, W) array on ``hu``'s grid in the input file's voxel order and shape: the inverse of the
        reader's reorientation (``ornt``), so it pairs with ``file_affine``. A DICOM series stored in display
        order has the identity ``ornt`` (``file_affine == affine``); flipped rows/columns do not."""
        from nibabel.orientations import apply_orientation

        xyz = np.asarray(array).transpose(2, 1, 0)      # (column, row, slice)
        inverse = np.zeros((len(self.ornt), 2))
        for axis, (target, flip) in enumerate(np.asarray(self.ornt)):
            inverse[int(target)] = (axis, flip)
        return apply_orientation(xyz, inverse)


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_file(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def is_volume_input(path: str | Path) -> bool:
    """A NIfTI file or a folder of DICOM files (what :func:`read_volume` reads)."""
    from ichflow.data.dicom import is_dicom_folder

    path = Path(path)
    return (path.is_file() and is_nifti_file(path)) or (path.is_dir() and is_dicom_folder(path))


def read_volume(path: str | Path, series_uid: str = "") -> Volume:
    """The HU volume of a NIfTI file or of one DICOM series folder (``series_uid`` picks one of several)."""
    if is_nifti_file(path):
        from ichflow.data.nifti import read_nifti

        return read_nifti(path)
    from ichflow.data.dicom import read_dicom_series

    return read_dicom_series(path, series_uid=series_uid)
