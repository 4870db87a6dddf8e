"""A generic labels CSV as a data source for the subtype task (the shape the original analysis sketched).

::

    image,IVH,IPH,SAH            required: ``image`` (path, relative to the CSV's folder or absolute)
    p01/ct1.png,1,0,1            and one 0/1 column per class (any names; IVH/IPH/SAH/EDH/SDH fill
    p01/ct2.png,0,1,0            the manifest's subtype columns, other names are kept as extra columns)

Optional columns: ``patient_id`` (or ``patient``) and ``slice_index`` (or ``slice``). Without a patient
column the patient is the image's folder when the images sit in several folders; if they all share one
folder every image is treated as its own patient, which is reported: slices of one scan on both sides of
a split leak, so add a patient column in that case. Without a slice column slices are ordered by file name
(natural order) within each patient, which is what 2.5D input uses as the axial order.

Use it with ``-P dataset=csv -P data_dir=/path/labels.csv`` (or any ``data_dir`` ending in ``.csv``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from ichflow.data.images import read_gray
from ichflow.data.manifest import SUBTYPES, make_manifest, save_manifest
from ichflow.data.report import ValidationReport
from ichflow.data.splits import split_patients
from ichflow.engine.files import atomic_dir
from ichflow.errors import DataError
from ichflow.prepare import Prepared, prepared_folder

PATIENT_COLUMNS = ("patient_id", "patient")
SLICE_COLUMNS = ("slice_index", "slice")


def is_labels_csv(data_dir: str, dataset: str) -> bool:
    return dataset == "csv" or (dataset == "auto" and str(data_dir).lower().endswith(".csv")
                                and Path(data_dir).expanduser().is_file())


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def read_labels_csv(csv_path: str | Path, workers: int = 4) -> tuple[pd.DataFrame, ValidationReport, list[str]]:
    """(manifest, validation report, class columns) of a labels CSV. Fatal problems raise DataError."""
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise DataError(path, "labels CSV not found")
    try:
        df = pd.read_csv(io.StringIO(path.read_bytes().decode("utf-8-sig")), dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(path, f"not a readable CSV ({exc})") from exc
    df.columns = [c.strip() for c in df.columns]
    if "image" not in df.columns:
        raise DataError(path, f"wrong CSV header: no 'image' column; found {list(df.columns)}; expected "
                              "image,<class>,... (optional patient_id, slice_index)")
    pcol = next((c for c in PATIENT_COLUMNS if c in df.columns), None)
    scol = next((c for c in SLICE_COLUMNS if c in df.columns), None)
    classes = [c for c in df.columns if c not in ("image", pcol, scol)]
    if not classes:
        raise DataError(path, "no class columns after 'image' (expected e.g. image,IVH,IPH,SAH)")
    if df.empty:
        raise DataError(path, "no rows")
    for c in classes:
        bad = ~df[c].str.strip().isin(("0", "1"))
        if bad.any():
            i = int(df.index[bad][0])
            raise DataError(path, f"column {c!r}, data row {i + 2}: value {df.loc[i, c]!r} is not 0 or 1")
    report = ValidationReport("csv", str(path))
    root = path.parent
    images = [Path(p.strip()) if Path(p.strip()).is_absolute() else root / p.strip() for p in df["image"]]

    def size(p: Path):
        if not p.exists():
            return None
        arr = read_gray(p)  # DataError for truncated / non-image files
        return arr.shape

    with ThreadPoolExecutor(max_workers=workers) as pool:
        shapes = list(pool.map(size, images))
    keep = []
    for i, (img, shape) in enumerate(zip(images, shapes)):
        if shape is None:
            report.warn("missing_image", img, f"listed in {path.name} row {i + 2} but missing; row dropped")
        else:
            keep.append(i)
    if not keep:
        raise DataError(path, "none of the listed images exists")

    if pcol:
        patients = df[pcol].str.strip()
    else:
        folders = {img.parent for img in images}
        if len(folders) > 1:
            patients = pd.Series([img.parent.name for img in images])
            report.warn("patient_from_folder", path, "no patient_id column: the image's folder is the patient")
        else:
            patients = pd.Series([img.stem for img in images])
            report.warn("one_patient_per_image", path,
                        "no patient_id column and all images in one folder: every image is its own patient. "
                        "If several images come from one scan the split leaks; add a patient_id column")
    rows = []
    for i in keep:
        h, w = shapes[i]
        flags = {c: int(df.loc[i, c].strip()) for c in classes}
        rows.append({"dataset": "csv", "patient_id": str(patients.iloc[i]), "image_path": str(images[i].resolve()),
                     "mask_path": "", "boxes": json.dumps([]), "has_lesion": any(flags.values()),
                     "has_mask": False, "mask_pixels": -1, "width": w, "height": h,
                     "slice_index": int(float(df.loc[i, scol])) if scol else -1,
                     **{s: flags.get(s, pd.NA) for s in SUBTYPES}, "_flags": flags})
    if not scol:  # natural file-name order within each patient
        by_patient: dict[str, list[dict]] = {}
        for r in rows:
            by_patient.setdefault(r["patient_id"], []).append(r)
        for group in by_patient.values():
            for j, r in enumerate(sorted(group, key=lambda r: _natural(Path(r["image_path"]).name))):
                r["slice_index"] = j
    dup = pd.DataFrame([(r["patient_id"], r["slice_index"]) for r in rows]).duplicated()
    if dup.any():
        r = rows[int(dup.idxmax())]
        raise DataError(path, f"patient {r['patient_id']} has slice_index {r['slice_index']} twice")
    flags = {id(r): r.pop("_flags") for r in rows}
    manifest = make_manifest(rows)
    extra = [c for c in classes if c not in SUBTYPES]
    if extra:
        lookup = {(r["patient_id"], r["slice_index"]): flags[id(r)] for r in rows}
        for c in extra:
            manifest[c] = [lookup[(p, s)][c] for p, s in zip(manifest["patient_id"], manifest["slice_index"])]
    report.summarise(manifest)
    return manifest, report, classes


def prepare_labels_csv(cfg) -> Prepared:
    """:func:`ichflow.prepare.prepare_data` for a labels CSV: manifest, report and patient split on disk."""
    manifest, report, _ = read_labels_csv(cfg.data_dir)
    test_f, val_f = cfg.test_fraction, cfg.val_fraction
    try:
        split = split_patients(manifest, (1.0 - val_f - test_f, val_f, test_f), seed=cfg.split_seed,
                               n_folds=cfg.n_folds)
    except ValueError as exc:  # too few patients for the requested splits
        raise DataError(cfg.data_dir, f"{exc}; lower val_fraction/test_fraction or add patients") from None
    out_dir = prepared_folder("csv", "real", manifest, split)
    if not (out_dir / "manifest.csv").exists():
        with atomic_dir(out_dir) as tmp:
            save_manifest(manifest, tmp / "manifest.csv")
            split.to_csv(tmp / "split.csv", index=False)
            (tmp / "validation_report.md").write_text(report.to_markdown())
            (tmp / "validation_report.json").write_text(report.to_json())
            fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
            (tmp / "config.json").write_text(json.dumps({**fields, "reader": "csv", "source": "real"}, indent=2,
                                                        default=str))
    return Prepared("csv", "real", Path(cfg.data_dir).expanduser().resolve().parent, manifest, split, report,
                    out_dir)
