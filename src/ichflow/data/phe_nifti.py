"""Reader for PHE-SICH-CT-IDS ``SubdatasetA_NIFIT`` (3D NIfTI volumes in HU), and its phantom writer.

Layout (the published folder really is spelled ``NIFIT``)::

    SubdatasetA_NIFIT/NIFIT/set/NNNN.nii.gz     CT volume of patient NNNN, HU
    SubdatasetA_NIFIT/NIFIT/label/NNNN.nii.gz   perihematomal EDEMA mask volume (non-zero = edema), same grid

Every task trains on 8-bit slices listed in a manifest, so :func:`read_phe_nifti` materialises each volume once
as windowed 8-bit PNG slices and 0/255 mask PNGs under ``work/cache/nifti/<patient>-<digest>/`` (the digest
covers the source files' paths, sizes and mtimes and the window, so a changed file or window converts again;
each patient's folder is written to a temp folder and renamed, so an interrupted conversion never leaves half a
cache) and returns the manifest the PNG reader returns, with the same columns (``dataset`` = ``phe_nifti``).

Differences to the PNG reader (``data/phe.py``), by construction of the source:

* slices come from the volume, reoriented to display orientation (``data/nifti.py``); ``slice_index`` runs
  inferior -> superior (0-based);
* ``has_lesion`` = the edema mask has pixels on the slice (SubdatasetA has no VOC boxes);
* ``boxes`` are DERIVED FROM THE EDEMA MASK: one box per group of mask pixels closer than ``BOX_MERGE_MM``
  (so a broken rim around one hematoma stays one box), ``[xmin, ymin, xmax + 1, ymax + 1]``. The published boxes
  enclose hematoma + edema; these enclose the edema only, so they are smaller (where the rim is incomplete) or
  equal (where the rim surrounds the hematoma) and missing on slices with hematoma but no edema.

The window and voxel geometry of each patient (spacing, display and file affine, source files) are kept in
``volume.json`` beside its slices: :func:`volume_info` / :func:`volume_infos` read them back.
Problems: a volume without a label volume is kept unlabelled (``missing_mask``), a label without a volume is
ignored (``orphan_mask``); a mask whose shape or affine differs from its volume's is a DataError naming both.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ichflow.data import phe
from ichflow.data.manifest import make_manifest
from ichflow.data.nifti import is_nifti_name, nifti_stem, read_nifti, read_nifti_mask, write_nifti_volume
from ichflow.data.report import ValidationReport
from ichflow.data.windows import Window, apply_window, parse_window
from ichflow.engine.files import atomic_dir
from ichflow.errors import DataError
from ichflow.paths import cache_dir

SUBDATASET = "SubdatasetA_NIFIT"
INNER = "NIFIT"
DATASET = "phe_nifti"
CACHE_VERSION = 1
BOX_MERGE_MM = 5.0


# ------------------------------------------------------------------------------------------------- layout
def _has_volumes(folder: Path) -> bool:
    return folder.is_dir() and any(is_nifti_name(p) and p.is_file() for p in folder.iterdir())


def find_root(data_dir: str | Path) -> Path | None:
    """The folder holding ``set/`` with NIfTI volumes: ``data_dir``, ``NIFIT/``, ``SubdatasetA_NIFIT/`` or
    ``SubdatasetA_NIFIT/NIFIT/`` below it."""
    data_dir = Path(data_dir)
    for cand in (data_dir, data_dir / INNER, data_dir / SUBDATASET, data_dir / SUBDATASET / INNER):
        if _has_volumes(cand / "set"):
            return cand
    return None


def detect(data_dir: str | Path) -> Path | None:
    """:func:`find_root` for dataset auto-detection: None where the PNG layout is found elsewhere under
    ``data_dir`` (a full release with both subdatasets reads as PNG, the published slices and VOC boxes)."""
    root = find_root(data_dir)
    if root is None:
        return None
    png = phe.find_root(data_dir)
    return root if png is None or png.resolve() == root.resolve() else None


def _patient_id(stem: str) -> str:
    return f"{int(stem):04d}" if stem.isdigit() else stem


def _index(folder: Path, report: ValidationReport) -> dict[str, Path]:
    """{patient_id: NIfTI file} of ``folder``; two files for one patient are a DataError naming both."""
    index: dict[str, Path] = {}
    if not folder.is_dir():
        return index
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue
        if not (f.is_file() and is_nifti_name(f)):
            report.warn("unexpected_file", f, "not a .nii/.nii.gz file; ignored")
            continue
        stem = nifti_stem(f)
        pid = _patient_id(stem)
        if stem.isdigit() and len(stem) != 4:
            report.warn("nonstandard_stem", f, f"{len(stem)}-digit stem; mapped to patient {pid}")
        if pid in index:
            raise DataError(f, f"names patient {pid} like {index[pid]}; two files for one patient: remove or "
                               "rename one of them")
        index[pid] = f
    return index


# -------------------------------------------------------------------------------------------------- cache
def _file_key(path: Path | None):
    if path is None:
        return None
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cache_folder(pid: str, image: Path, label: Path | None, window: Window) -> Path:
    """``work/cache/nifti/<patient>-<digest>``: changes with the source files (path, size, mtime) and window."""
    key = json.dumps({"v": CACHE_VERSION, "pid": pid, "image": _file_key(image), "label": _file_key(label),
                      "window": window.as_dict()}, sort_keys=True)
    return cache_dir() / "nifti" / f"{pid}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def mask_boxes(mask: np.ndarray, merge_px: int) -> list[list[int]]:
    """``[xmin, ymin, xmax + 1, ymax + 1]`` per group of mask pixels closer than ``merge_px``, left to right."""
    from scipy import ndimage

    if not mask.any():
        return []
    groups, n = ndimage.label(ndimage.binary_dilation(mask, iterations=max(1, merge_px)), np.ones((3, 3)))
    boxes = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(mask & (groups == i))
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    return sorted(boxes)


def _write_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path)


def _convert(pid: str, image: Path, label: Path | None, window: Window, target: Path) -> dict:
    """Materialise one patient into ``target`` (atomically); returns its ``volume.json`` content."""
    vol = read_nifti(image)
    mask = read_nifti_mask(label, vol) if label is not None else None
    gray = apply_window(vol.hu, window)
    merge_px = int(round(BOX_MERGE_MM / min(vol.spacing[1], vol.spacing[2])))
    slices = []
    with atomic_dir(target) as tmp:
        for sub in ("set", "label") if mask is not None else ("set",):
            (tmp / sub).mkdir()
        for k in range(gray.shape[0]):
            stem = f"{pid}_{k:02d}"
            _write_png(gray[k], tmp / "set" / f"{stem}.png")
            entry = {"slice_index": k, "image": f"set/{stem}.png", "mask": "", "mask_pixels": -1, "boxes": []}
            if mask is not None:
                _write_png(mask[k] * 255, tmp / "label" / f"{stem}.png")
                entry.update(mask=f"label/{stem}.png", mask_pixels=int(mask[k].sum()),
                             boxes=mask_boxes(mask[k], merge_px))
            slices.append(entry)
        info = {"patient_id": pid, "source": str(image.resolve()), "label": str(label.resolve()) if label else "",
                "window": window.as_dict(), "spacing_mm": list(vol.spacing), "shape": list(gray.shape),
                "affine": vol.affine.tolist(), "file_affine": vol.file_affine.tolist(),
                "ornt": np.asarray(vol.ornt).tolist(), "slices": slices}
        (tmp / "volume.json").write_text(json.dumps(info, indent=1))
    return info


def _cached(pid: str, image: Path, label: Path | None, window: Window) -> tuple[Path, dict]:
    """(cache folder, volume.json) of one patient, converting it when not cached yet (or the cache is broken)."""
    target = cache_folder(pid, image, label, window)
    try:
        return target, json.loads((target / "volume.json").read_text())
    except (OSError, ValueError):
        if target.exists():  # not written by us as a whole (a rename is all or nothing): rebuild it
            shutil.rmtree(target, ignore_errors=True)
    _convert(pid, image, label, window, target)
    return target, json.loads((target / "volume.json").read_text())  # the copy that won a concurrent rename


def volume_info(image_path: str | Path) -> dict:
    """``volume.json`` (window, spacing_mm (slice, row, column), affines, source) of a manifest row's slice."""
    return json.loads((Path(image_path).parent.parent / "volume.json").read_text())


def volume_infos(manifest) -> dict[str, dict]:
    """{patient_id: volume.json} for every patient of a ``phe_nifti`` manifest."""
    first = manifest.groupby("patient_id", sort=True)["image_path"].first()
    return {str(pid): volume_info(path) for pid, path in first.items()}


# ------------------------------------------------------------------------------------------------- reader
def _rows(pid: str, folder: Path, info: dict) -> list[dict]:
    h, w = info["shape"][1], info["shape"][2]
    rows = []
    for s in info["slices"]:
        mask_path = str((folder / s["mask"]).resolve()) if s["mask"] else ""
        rows.append({"dataset": DATASET, "patient_id": pid, "slice_index": s["slice_index"],
                     "image_path": str((folder / s["image"]).resolve()), "mask_path": mask_path,
                     "boxes": json.dumps(s["boxes"]), "has_lesion": s["mask_pixels"] > 0,
                     "has_mask": bool(mask_path), "mask_pixels": s["mask_pixels"], "width": w, "height": h})
    return rows


def read_phe_nifti(data_dir: str | Path, window: str | Window = "brain",
                   workers: int = 4) -> tuple["pd.DataFrame", ValidationReport]:  # noqa: F821
    """(manifest, report) of a SubdatasetA layout; slices windowed with ``window`` and cached (module doc)."""
    root = find_root(data_dir)
    if root is None:
        raise DataError(data_dir, f"no PHE-SICH-CT-IDS NIfTI layout found (expected set/NNNN.nii.gz, or "
                                  f"{SUBDATASET}/{INNER}/set/)")
    win = window if isinstance(window, Window) else parse_window(window)
    report = ValidationReport(DATASET, str(root))
    images = _index(root / "set", report)
    if not images:
        raise DataError(root / "set", "no CT volumes found (expected set/NNNN.nii.gz)")
    labels = _index(root / "label", report)
    for pid in sorted(set(labels) - set(images)):
        report.warn("orphan_mask", labels[pid], "label volume without a CT volume; ignored")
    for pid in sorted(set(images) - set(labels)):
        report.warn("missing_mask", images[pid], "no label volume in label/; has_mask=False, has_lesion=False")

    def one(pid):
        return pid, *_cached(pid, images[pid], labels.get(pid), win)

    with ThreadPoolExecutor(max_workers=workers) as pool:  # gzip, numpy and PNG encoding release the GIL
        done = list(pool.map(one, sorted(images)))
    rows = [row for pid, folder, info in done for row in _rows(pid, folder, info)]
    manifest = make_manifest(rows)
    report.summarise(manifest)
    report.counts["window"] = str(win)
    return manifest, report


# ------------------------------------------------------------------------------------------------ phantom
def write_phe_nifti(out_dir: str | Path, spec=None, axcodes: tuple[str, str, str] = ("L", "A", "S"),
                    spacing=(5.0, 0.508, 0.508)) -> Path:
    """Write the PNG phantom (``synthetic.write_phe``) as ``SubdatasetA_NIFIT/NIFIT/{set,label}/NNNN.nii.gz``
    under ``out_dir``: HU int16 volumes and 0/1 edema masks, stored in ``axcodes`` order (default ``LAS``, as
    dcm2niix writes), PNG slice SS = volume slice SS counted from inferior. Returns the ``NIFIT`` folder."""
    from ichflow.data.images import read_gray, read_mask
    from ichflow.data.synthetic import PhantomSpec, write_phe

    spec = spec or PhantomSpec()
    out = Path(out_dir) / SUBDATASET / INNER
    with tempfile.TemporaryDirectory(prefix="phe-png-") as tmp:
        manifest, _ = phe.read_phe(write_phe(tmp, spec))
        for pid, group in manifest.groupby("patient_id", sort=True):
            group = group.sort_values("slice_index")
            slices = np.stack([read_gray(p) for p in group["image_path"]])
            masks = np.stack([read_mask(p) for p in group["mask_path"]]).astype(np.uint8)
            write_nifti_volume(out / "set" / f"{pid}.nii.gz", slices, spacing, axcodes)
            write_nifti_volume(out / "label" / f"{pid}.nii.gz", masks, spacing, axcodes, label=True)
    return out
