"""The 8-bit phantom written as a real CT DICOM series in Hounsfield units (for tests and demos).

The phantom (``synthetic.write_phe``) is brain-windowed 8-bit data; here each grey level goes back to HU with
``windows.to_hu(gray, brain)`` (level 40, width 80: brain ~31 HU, CSF ~11 HU, edema ~21 HU, blood ~58 HU),
except grey 0, which lies below the window and in the phantom is only the background outside the head: it is
written as air (``air_hu``, -1000 HU), so the series has realistic air and the brain window still gives 0 there.

Pixels are stored like a scanner stores them: signed 16-bit integers, ``HU = stored * RescaleSlope +
RescaleIntercept`` with intercept -1024 and slope 1. Integer HU cannot hold 256 levels inside an 80 HU window
(0.31 HU per level), so rounding to whole HU moves a value by up to 0.5 HU = 1.6 grey levels: the brain window
of the written series gives back the phantom within **2 grey levels** (the mean error is below 1 level). With
``rescale_slope=0.25`` (valid DICOM, less usual) the step is 0.25 HU and the brain window gives back the phantom
exactly.

Every UID is derived from the patient id (``pydicom.uid.generate_uid(entropy_srcs=...)``), so writing the same
phantom twice gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from ichflow.data.images import read_gray, read_mask
from ichflow.data.synthetic import PhantomSpec, write_phe
from ichflow.data.windows import PRESETS, Window, to_hu

RESCALE_INTERCEPT = -1024.0


def series_uids(patient_id: str, series_number: int = 1) -> dict[str, str]:
    """Deterministic study / series / frame-of-reference UIDs of a patient's phantom series."""
    return {
        "study": generate_uid(entropy_srcs=[patient_id, "study"]),
        "series": generate_uid(entropy_srcs=[patient_id, "series", str(series_number)]),
        "frame": generate_uid(entropy_srcs=[patient_id, "frame-of-reference"]),
    }


def phantom_to_hu(slices_uint8: np.ndarray, window: Window = PRESETS["brain"], air_hu: float = -1000.0) -> np.ndarray:
    """8-bit phantom -> HU (float32): ``to_hu`` under ``window``, grey 0 (below the window) as air."""
    gray = np.asarray(slices_uint8)
    hu = to_hu(gray, window)
    hu[gray == 0] = air_hu
    return hu


def write_dicom_series(folder: str | Path, slices_uint8: np.ndarray, pixel_spacing: float = 0.508,
                       slice_thickness: float = 5.0, patient_id: str = "PHANTOM0001", study_date: str = "20240101",
                       series_number: int = 1, series_description: str = "Phantom head CT",
                       window: Window = PRESETS["brain"], rescale_slope: float = 1.0,
                       air_hu: float = -1000.0) -> list[Path]:
    """Write (N, H, W) uint8 phantom slices (inferior -> superior, display orientation) as a CT series.

    One file per slice, ``IM0001.dcm``... in ``folder`` (created), explicit VR little endian, axial
    (ImageOrientationPatient 1\\0\\0\\0\\1\\0), z increasing by ``slice_thickness`` from 0, the image centred on
    x = y = 0. Returns the file paths in slice order.
    """
    slices = np.asarray(slices_uint8)
    if slices.ndim != 3 or slices.dtype != np.uint8:
        raise ValueError(f"slices_uint8 must be (N, H, W) uint8, got {slices.shape} {slices.dtype}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu = phantom_to_hu(slices, window, air_hu)
    stored = np.rint((hu - RESCALE_INTERCEPT) / rescale_slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError(f"HU range {hu.min():g}..{hu.max():g} does not fit int16 with slope {rescale_slope:g}")
    stored = stored.astype(np.int16)
    uids = series_uids(patient_id, series_number)
    paths = []
    for k, pixels in enumerate(stored):
        ds = _ct_slice(pixels, k, uids, patient_id, study_date, series_number, series_description,
                       pixel_spacing, slice_thickness, window, rescale_slope)
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_slice(pixels: np.ndarray, k: int, uids: dict, patient_id: str, study_date: str, series_number: int,
              series_description: str, pixel_spacing: float, slice_thickness: float, window: Window,
              rescale_slope: float) -> FileDataset:
    """One CT Image Storage dataset (with file meta) for slice ``k`` of the series."""
    rows, cols = pixels.shape
    sop_uid = generate_uid(entropy_srcs=[uids["series"], str(k)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame"], ""
    ds.PatientID, ds.PatientName = patient_id, f"Phantom^{patient_id}"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = study_date, "120000", study_date, "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "CT", "ichflow", "phantom"
    ds.SeriesNumber, ds.SeriesDescription, ds.BodyPartExamined = series_number, series_description, "HEAD"
    ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = 120
    z = k * slice_thickness
    ds.ImagePositionPatient = [-(cols - 1) / 2 * pixel_spacing, -(rows - 1) / 2 * pixel_spacing, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation, ds.SliceThickness = z, slice_thickness
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, rescale_slope, "HU"
    ds.WindowCenter, ds.WindowWidth = window.level, window.width
    ds.WindowCenterWidthExplanation = window.name.upper()
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def phantom_patient(spec: PhantomSpec = PhantomSpec(n_patients=1), patient: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(slices (N, H, W) uint8, edema masks (N, H, W) bool) of phantom patient ``patient`` (1-based), exactly as
    ``write_phe`` generates it (written to a temp folder and read back with the normal readers)."""
    if patient < 1:
        raise ValueError(f"patient numbers start at 1, got {patient}")
    # Each patient has its own RNG stream ([seed, patient]), so generating only the first ``patient`` patients
    # gives the same pixels as the full phantom.
    spec = dataclasses.replace(spec, n_patients=patient)
    with tempfile.TemporaryDirectory(prefix="ichflow-phantom-") as tmp:
        root = write_phe(tmp, spec)
        stems = [f"{patient:04d}_{s:02d}.png" for s in range(spec.n_slices)]
        slices = np.stack([read_gray(root / "set" / f"image{patient}" / s) for s in stems])
        masks = np.stack([read_mask(root / "label" / f"label{patient}" / s) for s in stems])
    return slices, masks


def write_phantom_series(folder: str | Path, spec: PhantomSpec = PhantomSpec(n_patients=1), patient: int = 1,
                         **kwargs) -> tuple[list[Path], np.ndarray]:
    """Write phantom patient ``patient`` as a CT series in ``folder``; returns (file paths, edema mask (N, H, W)
    bool in slice order). ``kwargs`` go to :func:`write_dicom_series` (patient id defaults to ``PHANTOM<NNNN>``)."""
    slices, edema = phantom_patient(spec, patient)
    kwargs.setdefault("patient_id", f"PHANTOM{patient:04d}")
    return write_dicom_series(folder, slices, **kwargs), edema
