"""Reader for CT-ICH (PhysioNet, Hssayeni et al. 2020), JPG release.

Layout::

    hemorrhage_diagnosis.csv      PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,
                                  Subarachnoid,Epidural,Subdural,No_Hemorrhage[,Fracture_Yes_No]
                                  (UTF-8 BOM, CRLF line ends, no final newline as published)
    Patients_CT/{PPP}/brain/{S}.jpg           brain-window slice
    Patients_CT/{PPP}/brain/{S}_HGE_Seg.jpg   hemorrhage mask (full release only; used when present)
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ichflow.data.images import IMAGE_SUFFIXES, decode_mask, faint_mask_detail, read_gray
from ichflow.data.manifest import make_manifest
from ichflow.data.report import ValidationReport
from ichflow.errors import DataError

CSV_NAME = "hemorrhage_diagnosis.csv"
SUBTYPE_COLUMNS = {"Intraventricular": "IVH", "Intraparenchymal": "IPH", "Subarachnoid": "SAH",
                   "Epidural": "EDH", "Subdural": "SDH"}
REQUIRED = ("PatientNumber", "SliceNumber", *SUBTYPE_COLUMNS, "No_Hemorrhage")


def find_root(data_dir: str | Path) -> Path | None:
    data_dir = Path(data_dir)
    return data_dir if (data_dir / CSV_NAME).is_file() else None


def read_labels_csv(path: Path) -> pd.DataFrame:
    try:
        text = path.read_bytes().decode("utf-8-sig")  # strips the BOM; CRLF handled by the csv parser
        df = pd.read_csv(io.StringIO(text))
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(path, f"not a readable CSV ({exc})") from exc
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(path, f"wrong CSV header: missing columns {missing}; found {list(df.columns)}; "
                              f"expected {list(REQUIRED)}")
    bad = df[list(REQUIRED)].apply(pd.to_numeric, errors="coerce").isna().any(axis=1)
    if bad.any():
        raise DataError(path, f"non-numeric values in data rows {[int(i) + 2 for i in df.index[bad][:10]]}")
    return df.astype({c: "int64" for c in REQUIRED})


def read_ctich(data_dir: str | Path, workers: int = 4):
    root = find_root(data_dir)
    if root is None:
        raise DataError(data_dir, f"no CT-ICH layout found (expected {CSV_NAME} and Patients_CT/)")
    csv_path = root / CSV_NAME
    labels = read_labels_csv(csv_path)
    if labels.empty:
        raise DataError(csv_path, "no slices listed")
    report = ValidationReport("ctich", str(root))
    key = ["PatientNumber", "SliceNumber"]
    distinct = labels.drop_duplicates()
    conflicting = distinct.duplicated(key, keep=False)
    if conflicting.any():  # which row is the truth cannot be guessed
        r = distinct[conflicting].iloc[0]
        lines = [int(i) + 2 for i in labels.index[(labels.PatientNumber == r.PatientNumber)
                                                  & (labels.SliceNumber == r.SliceNumber)]]
        raise DataError(csv_path, f"patient {r.PatientNumber} slice {r.SliceNumber} is listed with different "
                                  f"labels on data rows {lines}; keep one row per slice")
    dups = labels.duplicated(key)
    for _, r in labels[dups].iterrows():
        report.warn("duplicate_row", csv_path, f"patient {r.PatientNumber} slice {r.SliceNumber} listed twice "
                                               "with the same labels; one kept")
    labels = labels[~dups]

    def one(r):
        brain = root / "Patients_CT" / f"{int(r.PatientNumber):03d}" / "brain"
        img_path = brain / f"{int(r.SliceNumber)}.jpg"
        if not img_path.exists():
            return r, img_path, None
        img = read_gray(img_path)
        mask_file = brain / f"{int(r.SliceNumber)}_HGE_Seg.jpg"
        mask_path, mask_pixels, faint = "", -1, 0
        if mask_file.exists():
            mask, faint = decode_mask(mask_file)
            if mask.shape != img.shape:
                raise DataError(mask_file, f"mask size {mask.shape[1]}x{mask.shape[0]} != image size "
                                           f"{img.shape[1]}x{img.shape[0]}")
            mask_path, mask_pixels = str(mask_file.resolve()), int(np.count_nonzero(mask))
        return r, img_path, (img.shape, mask_path, mask_pixels, faint)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(one, (r for r in labels.itertuples(index=False))))

    rows = []
    for r, img_path, info in decoded:
        if info is None:
            report.warn("missing_image", img_path, "listed in the CSV but the file is missing; row dropped")
            continue
        (h, w), mask_path, mask_pixels, faint = info
        if faint:
            report.warn("faint_jpeg_mask", mask_path, faint_mask_detail(faint), drops_data=True)
        flags = {short: int(getattr(r, long)) for long, short in SUBTYPE_COLUMNS.items()}
        any_bleed = any(flags.values())
        if any_bleed == bool(r.No_Hemorrhage):
            report.warn("label_conflict", csv_path, f"patient {r.PatientNumber} slice {r.SliceNumber}: "
                                                    f"No_Hemorrhage={r.No_Hemorrhage} but subtypes {flags}; "
                                                    "subtypes used")
        rows.append({
            "dataset": "ctich", "patient_id": f"{int(r.PatientNumber):03d}", "slice_index": int(r.SliceNumber),
            "image_path": str(img_path.resolve()), "mask_path": mask_path, "boxes": json.dumps([]),
            "has_lesion": any_bleed, "has_mask": bool(mask_path), "mask_pixels": mask_pixels,
            **flags, "width": w, "height": h,
        })
    if not rows:
        raise DataError(root / "Patients_CT", "no CT slices found for the rows of the CSV")
    listed = {Path(x) for x in (row["image_path"] for row in rows)}
    used_masks = {Path(row["mask_path"]) for row in rows if row["mask_path"]}
    used = listed | used_masks
    for p in sorted((root / "Patients_CT").glob("*/brain/*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith(".") or p.resolve() in used:
            continue
        if p.with_suffix(".jpg").resolve() in used:
            report.warn("duplicate_format", p, f"the same slice as {p.with_suffix('.jpg').name} in another "
                                               "format; the .jpg (the published format) used, this file ignored",
                        drops_data=True)
        elif p.stem.endswith("_HGE_Seg"):
            report.warn("unused_mask", p, "mask of no listed slice, or not a .jpg; ignored")
        else:
            report.warn("unlisted_image", p, "slice not in the CSV (no label); ignored")
    manifest = make_manifest(rows)
    report.summarise(manifest)
    return manifest, report
