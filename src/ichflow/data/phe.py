"""Reader for PHE-SICH-CT-IDS ``SubdatasetC_PNG`` (and the same tree as ``SubdatasetB_JPG``).

Layout::

    set/image{N}/{NNNN}_{SS}.png              CT slice
    label/label{N}/{NNNN}_{SS}.png            perihematomal EDEMA mask, 0/255
    annotation/annotation{N}/{NNNN}_{SS}.xml  Pascal VOC box(es) around hematoma + edema;
                                              an XML without <object> is a negative slice

Quirks of the published data handled here (each reported as an anomaly, never silently):
3-digit XML stems (``013_05.xml`` belongs to patient 0013), XMLs without an image (patient 70,
``0071_05``), an XML ``<filename>`` that disagrees with the file's own name (the file name wins),
slices without XML (label falls back to the mask).

Never a silent replacement: two files naming one slice (``0001_5.png`` beside ``0001_05.png``) are a
DataError naming both; a file of another patient in a patient folder is dropped with a warning; one slice in
two formats keeps the first of ``IMAGE_SUFFIXES`` (PNG, lossless) with a warning; a box coordinate that is not
a finite number is a DataError; an inverted box, or one outside the image, is dropped with a warning, and a
slice left without any valid box is dropped (its label is unknown).
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ichflow.data.images import IMAGE_SUFFIXES, decode_mask, faint_mask_detail, read_gray
from ichflow.data.manifest import make_manifest
from ichflow.data.report import ValidationReport
from ichflow.errors import DataError

SUBDATASETS = ("SubdatasetC_PNG", "SubdatasetB_JPG")
_STEM = re.compile(r"^(\d+)_(\d+)$")
_FOLDER = re.compile(r"^(image|label|annotation)(\d+)$")


def find_root(data_dir: str | Path) -> Path | None:
    """The folder holding ``set/``: ``data_dir`` itself or one of its published subdatasets."""
    data_dir = Path(data_dir)
    for cand in (data_dir, *(data_dir / s for s in SUBDATASETS)):
        if (cand / "set").is_dir():
            return cand
    return None


def parse_voc(path: Path) -> tuple[list[list[float]], str | None]:
    """Boxes (xyxy pixels) and the ``<filename>`` field of a VOC XML. Raises DataError if malformed."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(path, f"malformed XML ({exc})") from exc
    if root.tag != "annotation":
        raise DataError(path, f"not a Pascal VOC annotation (root element <{root.tag}>)")
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(path, "<object> without <bndbox>")
        try:
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError) as exc:
            raise DataError(path, "bndbox coordinates missing or not numbers") from exc
        if not all(math.isfinite(v) for v in box):
            raise DataError(path, f"bndbox coordinates {box} are not all finite numbers")
        boxes.append(box)
    return boxes, root.findtext("filename")


def _index_folder(parent: Path, prefix: str, suffixes, report: ValidationReport) -> dict[tuple[int, int], Path]:
    """Map (patient number, slice number) -> file for every ``parent/{prefix}{N}/*``."""
    index: dict[tuple[int, int], Path] = {}
    if not parent.is_dir():
        return index
    for folder in sorted(parent.iterdir()):
        m = _FOLDER.match(folder.name)
        if not folder.is_dir() or not m or m.group(1) != prefix:
            if not folder.name.startswith("."):
                report.warn("unexpected_entry", folder, f"not a {prefix}<N> folder; ignored")
            continue
        folder_pid = int(m.group(2))
        for f in sorted(folder.iterdir()):
            if f.name.startswith("."):
                continue
            if f.suffix.lower() not in suffixes:
                report.warn("unexpected_file", f, "not a slice file; ignored")
                continue
            sm = _STEM.match(f.stem)
            if not sm:
                report.warn("unexpected_file", f, "name is not <patient>_<slice>; ignored")
                continue
            pid, sl = int(sm.group(1)), int(sm.group(2))
            if pid != folder_pid:  # a misplaced file: neither patient can be trusted to own it
                report.warn("patient_mismatch", f, f"file says patient {pid}, folder says {folder_pid}; "
                                                    "file ignored", drops_data=True)
                continue
            if len(sm.group(1)) != 4:
                report.warn("nonstandard_stem", f, f"{len(sm.group(1))}-digit stem; mapped to patient "
                                                    f"{pid:04d} slice {sl:02d}")
            seen = index.get((pid, sl))
            if seen is None:
                index[(pid, sl)] = f
            elif seen.stem == f.stem and seen.suffix.lower() != f.suffix.lower():
                keep, drop = sorted((seen, f), key=lambda p: suffixes.index(p.suffix.lower()))
                report.warn("duplicate_format", drop, f"the same slice as {keep.name} in another format; "
                                                      f"{keep.name} used, this file ignored", drops_data=True)
                index[(pid, sl)] = keep
            else:
                raise DataError(f, f"names patient {pid:04d} slice {sl:02d} like {seen}; two files for one "
                                   "slice: remove or rename one of them")
    return index


def read_phe(data_dir: str | Path, workers: int = 4) -> tuple["pd.DataFrame", ValidationReport]:  # noqa: F821
    root = find_root(data_dir)
    if root is None:
        raise DataError(data_dir, "no PHE-SICH-CT-IDS layout found (expected set/image<N>/ "
                                  f"or one of {', '.join(SUBDATASETS)}/set/)")
    report = ValidationReport("phe", str(root))
    images = _index_folder(root / "set", "image", IMAGE_SUFFIXES, report)
    if not images:
        raise DataError(root / "set", "no CT slices found (expected set/image<N>/<NNNN>_<SS>.png)")
    masks = _index_folder(root / "label", "label", IMAGE_SUFFIXES, report)
    xmls = _index_folder(root / "annotation", "annotation", (".xml",), report)

    for key in sorted(set(xmls) - set(images)):
        report.warn("orphan_annotation", xmls[key], "annotation without a CT slice; ignored")
    for key in sorted(set(masks) - set(images)):
        report.warn("orphan_mask", masks[key], "mask without a CT slice; ignored")

    def one(key):
        img_path = images[key]
        img = read_gray(img_path)
        h, w = img.shape
        mask_path, mask_pixels, faint = "", -1, 0
        if key in masks:
            mask, faint = decode_mask(masks[key])
            if mask.shape != img.shape:
                raise DataError(masks[key], f"mask size {mask.shape[1]}x{mask.shape[0]} != image size {w}x{h} "
                                            f"of {img_path}")
            mask_path, mask_pixels = str(masks[key].resolve()), int(np.count_nonzero(mask))
        return key, img_path, w, h, mask_path, mask_pixels, faint

    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        decoded = list(pool.map(one, sorted(images)))

    rows = []
    for (pid, sl), img_path, w, h, mask_path, mask_pixels, faint in decoded:
        if not mask_path:
            report.warn("missing_mask", img_path, "no mask in label/; has_mask=False")
        if faint:
            report.warn("faint_jpeg_mask", mask_path, faint_mask_detail(faint), drops_data=True)
        if (pid, sl) in xmls:
            xml_path = xmls[(pid, sl)]
            boxes, fname = parse_voc(xml_path)
            if fname and Path(fname.replace("\\", "/")).stem != xml_path.stem:
                report.warn("filename_field_mismatch", xml_path,
                            f"<filename>{fname}</filename> disagrees with the file name; file name used")
            clipped, invalid = [], []
            for b in boxes:
                c = [min(max(b[0], 0), w), min(max(b[1], 0), h), min(max(b[2], 0), w), min(max(b[3], 0), h)]
                if b[2] <= b[0] or b[3] <= b[1]:
                    invalid.append(f"box {b} is inverted or empty (needs xmin < xmax, ymin < ymax)")
                elif c[2] <= c[0] or c[3] <= c[1]:
                    invalid.append(f"box {b} lies outside the {w}x{h} image")
                else:
                    if c != b:
                        report.warn("box_clipped", xml_path, f"box {b} clipped to the image: {c}")
                    clipped.append(c)
            if invalid and not clipped:  # annotated, but no usable box: neither positive nor negative is known
                report.warn("invalid_box", xml_path, f"{'; '.join(invalid)}; no valid box left, slice "
                                                     f"{img_path.name} dropped", drops_data=True)
                continue
            for problem in invalid:
                report.warn("invalid_box", xml_path, f"{problem}; box dropped", drops_data=True)
            boxes = clipped
            has_lesion = bool(boxes)
        else:
            boxes = []
            has_lesion = mask_pixels > 0
            report.warn("missing_annotation", img_path,
                        f"no annotation XML; has_lesion={has_lesion} taken from the mask, no box")
        if mask_path and (mask_pixels > 0) != has_lesion:
            report.warn("box_mask_disagree", img_path,
                        f"box present={has_lesion} but mask pixels={mask_pixels}")
        rows.append({
            "dataset": "phe", "patient_id": f"{pid:04d}", "slice_index": sl,
            "image_path": str(img_path.resolve()), "mask_path": mask_path, "boxes": json.dumps(boxes),
            "has_lesion": has_lesion, "has_mask": bool(mask_path), "mask_pixels": mask_pixels,
            "width": w, "height": h,
        })
    if not rows:
        raise DataError(root / "set", "no usable CT slices left (see the warnings above)")
    manifest = make_manifest(rows)
    report.summarise(manifest)
    return manifest, report
