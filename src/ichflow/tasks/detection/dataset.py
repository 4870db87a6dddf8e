"""The manifest as an Ultralytics YOLO dataset, derived into a cache folder this task owns.

``work/cache/yolo/<digest>/`` (never edited by hand; deleted and rebuilt freely)::

    data.yaml                      path/train/val/test/names for Ultralytics
    index.csv                      one row per exported slice: split, file, patient, slice, boxes (pixels)
    images/{train,val,test}/<patient>_<slice>.png
    labels/{train,val,test}/<patient>_<slice>.txt    'class xc yc w h' normalised to [0, 1];
                                                     an empty file for a negative slice
    labels/{train,val,test}.cache  Ultralytics' label cache (it writes it beside labels/, i.e. here)

The digest covers the slices, their boxes, the patient split and the input channels, so a new split or new
annotations give a new folder. With ``in_channels=3`` every PNG holds the 2.5D stack (slice below, slice,
slice above; edge replication at the ends of a scan) in its three colour channels, in the channel order
OpenCV reads back, which is also the order the pyfunc passes to the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ichflow.data.splits import SPLITS, attach_split
from ichflow.engine.files import atomic_dir
from ichflow.engine.slices import neighbour_indices, slice_cache, stack_channels
from ichflow.paths import cache_dir

EXPORT_VERSION = 3
CLASS_NAME = "lesion"


@dataclass
class YoloDataset:
    root: Path
    data_yaml: Path
    index: pd.DataFrame  # slice_table() columns + in_yolo (written to images/), image, label (exported files)
    digest: str

    def part(self, split: str) -> pd.DataFrame:
        return self.index[self.index["split"] == split].reset_index(drop=True)


def voc_to_yolo(box, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel ``[xmin, ymin, xmax, ymax]`` -> normalised ``(x_center, y_center, w, h)``, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty box {box} inside {width}x{height}")
    return ((x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height)


def yolo_label_text(boxes, width: int, height: int) -> str:
    """The label file of one slice: one 'class xc yc w h' line per box, '' for a negative slice."""
    lines = []
    for b in boxes:
        xc, yc, w, h = voc_to_yolo(b, width, height)
        lines.append(f"0 {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


def slice_positions(manifest: pd.DataFrame) -> np.ndarray:
    """Relative axial position of each slice within its scan: 0 = first slice, 1 = last."""
    rank = manifest.groupby("patient_id")["slice_index"].rank(method="first") - 1
    count = manifest.groupby("patient_id")["slice_index"].transform("count")
    return (rank / (count - 1).clip(lower=1)).to_numpy(float)


def export_digest(manifest: pd.DataFrame, split: pd.DataFrame, channels: int, neg_fraction: float = 1.0,
                  seed: int = 0) -> str:
    cols = manifest[["patient_id", "slice_index", "image_path", "boxes", "width", "height"]].to_csv(index=False)
    parts = split[["patient_id", "split"]].sort_values("patient_id").to_csv(index=False)
    sub = "" if neg_fraction >= 1.0 else f"|neg{neg_fraction:.4f}s{seed}"
    key = f"v{EXPORT_VERSION}|c{channels}{sub}|{cols}|{parts}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def export_yolo(manifest: pd.DataFrame, split: pd.DataFrame, channels: int = 3, neg_fraction: float = 1.0,
                seed: int = 0) -> YoloDataset:
    """Write (or reuse) the YOLO dataset for this manifest + split; returns where it is.

    ``neg_fraction`` < 1 keeps only that share of the train split's negative slices (a fixed random pick per
    ``seed``; every lesion slice is kept); val and test always hold every slice.
    """
    if channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3 (2.5D), got {channels}")
    if not 0.0 < neg_fraction <= 1.0:
        raise ValueError(f"neg_fraction must be in (0, 1], got {neg_fraction}")
    digest = export_digest(manifest, split, channels, neg_fraction, seed)
    root = cache_dir() / "yolo" / digest
    if not ((root / "data.yaml").exists() and (root / "index.csv").exists()):
        with atomic_dir(root) as tmp:
            _write(manifest, split, channels, tmp, neg_fraction, seed)
            _write_yaml(tmp, root)  # data.yaml holds absolute paths: those of the final folder
    return _load(root, digest)


def train_negatives_dropped(table: pd.DataFrame, neg_fraction: float, seed: int) -> np.ndarray:
    """Positions (in ``table``) of the train split's negative slices left out at ``neg_fraction`` < 1.

    A fixed random pick per ``seed``, the same for every engine; lesion slices and val/test are never dropped.
    """
    if neg_fraction >= 1.0:
        return np.zeros(0, int)
    train_neg = np.flatnonzero(((table["split"] == "train") & ~table["has_lesion"].astype(bool)).to_numpy())
    keep = np.random.default_rng([seed, 17]).random(len(train_neg)) < neg_fraction
    return train_neg[~keep]


def slice_table(manifest: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """One row per slice with its split, export file stem, boxes and relative position in the scan.

    ``row`` is the slice's row in ``manifest`` (reset to 0..N-1), i.e. its index into a slice cache of the
    whole manifest.
    """
    man = attach_split(manifest.reset_index(drop=True), split)
    if man["split"].isna().any():
        missing = sorted(man.loc[man["split"].isna(), "patient_id"].unique())[:5]
        raise ValueError(f"patients without a split: {missing}")
    return pd.DataFrame({
        "split": man["split"].astype(str), "row": np.arange(len(man)),
        "stem": [f"{p}_{int(s):03d}" for p, s in zip(man["patient_id"], man["slice_index"])],
        "patient_id": man["patient_id"].astype(str), "slice_index": man["slice_index"].astype(int),
        "boxes": man["boxes"].astype(str), "has_lesion": man["has_lesion"].astype(bool),
        "width": man["width"].astype(int), "height": man["height"].astype(int),
        "position": slice_positions(man), "source_image": man["image_path"].astype(str)})


def _write(manifest: pd.DataFrame, split: pd.DataFrame, channels: int, out: Path, neg_fraction: float = 1.0,
           seed: int = 0) -> None:
    import cv2

    table = slice_table(manifest, split)
    table["in_yolo"] = True
    table.loc[train_negatives_dropped(table, neg_fraction, seed), "in_yolo"] = False
    man = manifest.reset_index(drop=True)
    images = slice_cache(man["image_path"].astype(str).tolist())
    prev_idx, next_idx = neighbour_indices(man)
    for name in SPLITS:
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / "labels" / name).mkdir(parents=True, exist_ok=True)
    for r in table[table["in_yolo"]].itertuples(index=False):
        img_file = out / "images" / r.split / f"{r.stem}.png"
        arr = stack_channels(images, r.row, prev_idx, next_idx, channels)
        if not cv2.imwrite(str(img_file), np.ascontiguousarray(arr if channels == 3 else arr[..., 0]),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"{img_file}: could not write the exported slice")
        label = yolo_label_text(json.loads(r.boxes), r.width, r.height)
        (out / "labels" / r.split / f"{r.stem}.txt").write_text(label)
    table.to_csv(out / "index.csv", index=False)


def _write_yaml(tmp: Path, final: Path) -> None:
    import yaml

    data = {"path": str(final), "train": "images/train", "val": "images/val", "test": "images/test",
            "names": {0: CLASS_NAME}, "nc": 1}
    (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _load(root: Path, digest: str) -> YoloDataset:
    index = pd.read_csv(root / "index.csv", dtype={"patient_id": str, "split": str, "stem": str, "boxes": str,
                                                   "source_image": str}, keep_default_na=False)
    index["in_yolo"] = index["in_yolo"].astype(str).str.lower().eq("true")
    index["image"] = [str(root / "images" / s / f"{t}.png") for s, t in zip(index["split"], index["stem"])]
    index["label"] = [str(root / "labels" / s / f"{t}.txt") for s, t in zip(index["split"], index["stem"])]
    return YoloDataset(root=root, data_yaml=root / "data.yaml", index=index, digest=digest)
