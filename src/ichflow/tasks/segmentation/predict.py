"""``predict`` glue: per-slice edema figures, 0/255 masks and overlays of one scan (see ``serving``); for a scan
in HU also a NIfTI mask with the input's affine, a DICOM-SEG for a DICOM series, and the volume in mL from the
scan's own voxel spacing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ichflow.engine.overlays import mask_overlay, save_image

TABLE = None   # no table besides predictions.csv


def predict_scan(model, meta: dict, scan: str, files, arr: np.ndarray, out, overlays: bool):
    """(per-slice columns, extra table rows) for one scan; writes masks/<scan>/ and overlays/<scan>/. 8-bit
    slices carry no spacing: mL use the voxel size the model was trained with."""
    columns, _ = _predict(model, meta, scan, files, arr, out, overlays, trained_voxel_ml(meta))
    return columns, []


def predict_volume(model, meta: dict, volume, files, arr: np.ndarray, out: Path, overlays: bool):
    """(per-slice columns, [], volumes.csv fields) for a HU scan ``volume`` windowed into ``arr``."""
    columns, masks = _predict(model, meta, volume.name, files, arr, out, overlays, volume.voxel_ml)
    from ichflow.data.nifti import write_nifti_like

    nifti = out / "masks" / f"{volume.name}.nii.gz"
    write_nifti_like(volume, masks, nifti)
    summary = {"lesion_voxels": int(masks.sum()), "lesion_ml": float(masks.sum() * volume.voxel_ml),
               "target": meta.get("target", "edema"), "nifti_mask": str(nifti.relative_to(out))}
    if volume.kind == "dicom":
        from ichflow.data.dicom_seg import write_dicom_seg

        seg = out / "masks" / f"{volume.name}.seg.dcm"
        write_dicom_seg(volume, masks.astype(bool), seg)
        summary["dicom_seg"] = str(seg.relative_to(out))
    return columns, [], summary


def trained_voxel_ml(meta: dict) -> float:
    return float(meta.get("pixel_spacing_mm", 0.508)) ** 2 * float(meta.get("slice_thickness_mm", 5.0)) / 1000


def _predict(model, meta, scan, files, arr, out, overlays, voxel_ml):
    probs = np.asarray(model.predict(arr))
    masks = (probs >= float(meta.get("threshold", 0.5))).astype(np.uint8)
    columns = []
    for i, f in enumerate(files):
        columns.append({"lesion_pixels": int(masks[i].sum()), "max_probability": float(probs[i].max()),
                        "positive": int(masks[i].any()), "lesion_ml": masks[i].sum() * voxel_ml})
        save_image(Image.fromarray(masks[i] * 255), out / "masks" / scan / f"{Path(f).stem}.png")
        if overlays and masks[i].any():
            save_image(mask_overlay(arr[i], masks[i]), out / "overlays" / scan / f"{Path(f).stem}.png")
    return columns, masks
