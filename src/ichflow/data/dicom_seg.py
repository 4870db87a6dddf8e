"""A lesion mask as a DICOM Segmentation (DICOM-SEG) of its source CT series, and back.

:func:`write_dicom_seg` stores an (N, H, W) mask on ``Volume.hu``'s grid as a BINARY Segmentation (highdicom)
with one segment, coded in SNOMED CT (category "Morphologically abnormal structure" 49755003, type "Edema"
79654002 by default) and an algorithm identification of family "Artificial Intelligence" (DCM 123110), so PACS
viewers overlay it on the series it references. Each frame references its source slice by SOPInstanceUID and
is stored in that slice's own pixel orientation (the reader's display reorientation is undone with
``Volume.ornt``). Only slices with lesion get a frame; an empty mask gives a valid SEG with one empty frame
per source slice (highdicom cannot omit every frame), which reads back as an empty mask.

:func:`read_dicom_seg_mask` maps the frames back to the slices of a Volume by referenced SOPInstanceUID.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from ichflow import __version__
from ichflow.data.dicom import display_from_file, file_slice_order
from ichflow.data.volumes import Volume
from ichflow.errors import DataError

EDEMA = codes.SCT.Edema                                  # SCT 79654002
CATEGORY = codes.SCT.MorphologicallyAbnormalStructure   # SCT 49755003
AI_FAMILY = codes.DCM.ArtificialIntelligence             # DCM 123110


def write_dicom_seg(volume: Volume, mask: np.ndarray, path: str | Path, label: str = "Perihematomal edema",
                    algorithm_name: str = "ichflow", algorithm_version: str = __version__, series_number: int = 900,
                    property_type: Code = EDEMA, series_description: str = "") -> Path:
    """Write ``mask`` ((N, H, W) bool in the order of ``volume.hu``) as a DICOM-SEG of ``volume``'s series.

    New random series and instance UIDs each call (each call makes a new object); the file is written
    atomically (temp file beside ``path``, then renamed). Raises DataError if ``volume`` is not a DICOM series.
    """
    path = Path(path)
    mask = np.asarray(mask)
    if volume.kind != "dicom" or len(volume.datasets) != volume.hu.shape[0]:
        raise DataError(volume.path, "a DICOM-SEG needs a DICOM source series (one dataset per slice); "
                                     f"this input is {volume.kind}")
    if mask.shape != volume.hu.shape:
        raise ValueError(f"mask shape {mask.shape} != volume shape {volume.hu.shape}")
    order = file_slice_order(volume)
    stored = np.asarray(volume.to_file_order(mask != 0)).transpose(2, 1, 0)   # (slice, row, col) as stored
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label, segmented_property_category=CATEGORY,
        segmented_property_type=property_type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm_name, family=AI_FAMILY, version=algorithm_version),
        anatomic_regions=[codes.SCT.Brain])
    seg = hd.seg.Segmentation(
        source_images=[volume.datasets[i] for i in order], pixel_array=np.ascontiguousarray(stored, np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="ichflow", manufacturer_model_name=algorithm_name, software_versions=algorithm_version,
        device_serial_number="1", content_label="ICHFLOW", content_description=label[:64],
        series_description=series_description or f"{label} ({algorithm_name})"[:64],
        omit_empty_frames=bool(stored.any()))   # all-empty: every frame kept (highdicom would warn and do so)
    return _save_atomic(seg, path)


def _save_atomic(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_dicom_seg_mask(path: str | Path, volume: Volume, segment_number: int = 1) -> np.ndarray:
    """(N, H, W) bool mask of segment ``segment_number`` of a DICOM-SEG, on ``volume.hu``'s grid.

    Frames are placed by their referenced source SOPInstanceUID; a frame referencing a slice that is not in
    ``volume``, or of another size, is a DataError naming the SEG file."""
    path = Path(path)
    ds = _read_seg(path)
    frames = _frames(path, ds)
    index = {str(d.SOPInstanceUID): i for i, d in enumerate(volume.datasets)}
    to_file = {int(hu_i): k for k, hu_i in enumerate(file_slice_order(volume))}
    file_order = np.asarray(volume.to_file_order(np.zeros(volume.hu.shape, bool))).transpose(2, 1, 0).copy()
    if frames.shape[1:] != file_order.shape[1:]:
        raise DataError(path, f"frames of {ds.Columns}x{ds.Rows} pixels do not match the source images "
                              f"({file_order.shape[2]}x{file_order.shape[1]}) of {volume.path}")
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        if _segment_number(path, item, shared, f) != segment_number:
            continue
        uid = _source_uid(path, item, f)
        if uid not in index:
            raise DataError(path, f"frame {f + 1} references SOP instance {uid}, which is not a slice of "
                                  f"{volume.path}")
        file_order[to_file[index[uid]]] |= frames[f] != 0
    return np.ascontiguousarray(display_from_file(volume, file_order.transpose(2, 1, 0)))


def _read_seg(path: Path) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path, force=False)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise DataError(path, f"unreadable DICOM file, truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if ds.get("SOPClassUID") != SegmentationStorage:
        raise DataError(path, f"not a DICOM-SEG (SOP class {ds.get('SOPClassUID', '(none)')})")
    return ds


def _frames(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    try:
        return ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        raise DataError(path, f"cannot decode the SEG frames ({type(exc).__name__}: {exc})") from None


def _segment_number(path: Path, item, shared, frame: int) -> int:
    """The frame's segment: per-frame, or shared by all frames (highdicom shares it for a single segment)."""
    for group in (item, shared):
        if group is not None and "SegmentIdentificationSequence" in group:
            return int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    raise DataError(path, f"frame {frame + 1} has no SegmentIdentificationSequence")


def _source_uid(path: Path, item, frame: int) -> str:
    try:
        return str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
    except (AttributeError, IndexError):
        raise DataError(path, f"frame {frame + 1} does not reference its source image (no "
                              "DerivationImageSequence): cannot place it on the series") from None
