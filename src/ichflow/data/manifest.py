"""The manifest: one row per CT slice, the same columns for every source.

Columns
-------
dataset        reader that produced the row: ``phe`` (PNG/JPG), ``phe_nifti`` (SubdatasetA volumes) or ``ctich``
patient_id     patient identifier as in the source (``0013``, ``049``)
slice_index    axial position within the patient (0-based for PHE, as published for CT-ICH)
image_path     absolute path of the 8-bit slice
mask_path      absolute path of the mask ('' when the source has none)
boxes          JSON list of pixel ``[xmin, ymin, xmax, ymax]`` boxes ('[]' for none)
has_lesion     slice label: PHE = an annotated box, CT-ICH = any hemorrhage
has_mask       a mask file exists
mask_pixels    lesion pixels of the mask under the one mask convention (data.images.read_mask); -1 without
IVH IPH SAH EDH SDH   subtype flags (0/1; empty where the source has no subtype labels)
width height   image size in pixels
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from ichflow.errors import DataError

SUBTYPES = ("IVH", "IPH", "SAH", "EDH", "SDH")
MASK_READERS = ("phe", "phe_nifti")   # readers whose manifests carry PHE edema masks
COLUMNS = (
    "dataset", "patient_id", "slice_index", "image_path", "mask_path", "boxes",
    "has_lesion", "has_mask", "mask_pixels", *SUBTYPES, "width", "height",
)
_DTYPES = {
    "dataset": "string", "patient_id": "string", "slice_index": "int64",
    "image_path": "string", "mask_path": "string", "boxes": "string",
    "has_lesion": "bool", "has_mask": "bool", "mask_pixels": "int64",
    **{s: "Int8" for s in SUBTYPES}, "width": "int64", "height": "int64",
}


def make_manifest(rows: list[dict]) -> pd.DataFrame:
    """Build a manifest with the canonical column order and dtypes, sorted by patient and slice.

    Raises DataError naming both files when two rows are the same patient and slice (one would silently
    shadow the other in every split, cache and metric).
    """
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = df.astype(_DTYPES)
    df = df.sort_values(["patient_id", "slice_index"], kind="stable").reset_index(drop=True)
    twice = df.duplicated(["patient_id", "slice_index"], keep=False)
    if twice.any():
        first, second = df[twice].iloc[0], df[twice].iloc[1]
        raise DataError(second["image_path"], f"patient {first['patient_id']} slice {first['slice_index']} "
                                              f"is also {first['image_path']}: two files for one slice")
    return df


def save_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write_text(path, df.to_csv(index=False))


def load_manifest(path: str | Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"patient_id": "string", "mask_path": "string"}, keep_default_na=False,
                     na_values={s: [""] for s in SUBTYPES})
    return df.astype(_DTYPES)


def patient_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: slice counts, lesion slices and subtype presence (max over slices)."""
    agg = {"slice_index": "count", "has_lesion": "sum", "has_mask": "sum"}
    agg.update({s: "max" for s in SUBTYPES})
    pt = df.groupby("patient_id", sort=True).agg(agg).rename(
        columns={"slice_index": "slices", "has_lesion": "lesion_slices", "has_mask": "mask_slices"})
    pt["positive"] = pt["lesion_slices"] > 0
    return pt


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write via a temp file + rename so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
