"""The prepared train/val split as an nnU-Net v2 raw dataset: one 3D case per patient, our split as fold 0.

Layout (nnU-Net's ``dataset_format.md``): ``<raw>/Dataset<ID>_<NAME>/`` with ``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``, ``dataset.json`` and ``splits_final.json`` (one fold: train = our train patients,
val = our val patients, so nnU-Net's internal validation is our validation split). Test patients are never
written: they stay unseen until the final evaluation.

A case is a patient's slices stacked in ``slice_index`` order with spacing (slice thickness, pixel, pixel) in
nnU-Net's (z, y, x) order. The slices are 8-bit brain-windowed PNGs, not Hounsfield units, so the channel is
not called "CT" (that would select nnU-Net's HU clipping); any other name gets its z-score normalisation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ichflow.data.images import mask_foreground
from ichflow.engine.slices import slice_cache

DATASET_ID = 701
DATASET_NAME = f"Dataset{DATASET_ID:03d}_PHE"
FILE_ENDING = ".nii.gz"
CHANNEL_NAMES = {"0": "brain_window"}
LABELS = {"background": 0, "edema": 1}


def case_id(patient_id) -> str:
    """nnU-Net's case identifier of a patient (file-name safe)."""
    return "phe_" + re.sub(r"[^\w.-]", "-", str(patient_id))


def patient_volumes(part: pd.DataFrame):
    """``(case id, image (N, H, W) uint8, label (N, H, W) uint8 0/1)`` per patient of ``part``, slices in
    ``slice_index`` order; any non-zero mask pixel is edema."""
    images = slice_cache(part["image_path"].tolist())
    masks = slice_cache(part["mask_path"].fillna("").tolist(), is_mask=True)
    for pid, group in part.groupby("patient_id", sort=True):
        rows = group.sort_values("slice_index").index.to_numpy()
        yield case_id(pid), np.asarray(images[rows]), mask_foreground(masks[rows]).astype(np.uint8)


def write_volume(array: np.ndarray, spacing_zyx: tuple[float, float, float], path: Path) -> None:
    image = sitk.GetImageFromArray(array)   # numpy (z, y, x) -> ITK (x, y, z)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path), useCompression=True)


def write_raw_dataset(train: pd.DataFrame, val: pd.DataFrame, raw_root: str | Path,
                      spacing_zyx: tuple[float, float, float]) -> Path:
    """Write the train and val patients of the prepared manifest (rows aligned with their slice caches, as
    :func:`ichflow.data.splits.subset` returns them) under ``raw_root``; the dataset folder.

    ``spacing_zyx``: (slice thickness, pixel, pixel) in mm. Raises ValueError when a patient is in both parts
    or two patient ids map to one case id.
    """
    folder = Path(raw_root) / DATASET_NAME
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    cases = {}
    for name, part in (("train", train), ("val", val)):
        cases[name] = []
        for case, image, label in patient_volumes(part):
            write_volume(image, spacing_zyx, folder / "imagesTr" / f"{case}_0000{FILE_ENDING}")
            write_volume(label, spacing_zyx, folder / "labelsTr" / f"{case}{FILE_ENDING}")
            cases[name].append(case)
    check_disjoint(cases["train"], cases["val"])
    dataset_json = {"name": DATASET_NAME, "description": "PHE-SICH-CT-IDS perihematomal edema, 8-bit brain window",
                    "channel_names": CHANNEL_NAMES, "labels": LABELS, "numTraining": len(cases["train"]) +
                    len(cases["val"]), "file_ending": FILE_ENDING, "overwrite_image_reader_writer": "SimpleITKIO"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    (folder / "splits_final.json").write_text(json.dumps([cases], indent=2))
    return folder


def check_disjoint(train_cases: list[str], val_cases: list[str]) -> None:
    every = train_cases + val_cases
    if len(set(every)) != len(every):
        raise ValueError("a case id occurs twice (a patient in both splits, or two ids alike after making them "
                         f"file-name safe): {sorted(c for c in set(every) if every.count(c) > 1)}")
