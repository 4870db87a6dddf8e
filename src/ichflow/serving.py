"""Batch prediction with any registered ichflow model (``predict`` entry point).

Input: one image, a folder of slices (one scan, in natural order of the file names), a folder of such
folders (one scan each), or a data folder in a supported layout (PHE-SICH-CT-IDS, CT-ICH: one scan per
patient). The model's task comes from its MLflow metadata. Output folder (fixed layout)::

    predictions.csv              one row per slice: scan, slice, image, and the task's scores
    masks/<scan>/<slice>.png     segmentation: 0/255 edema mask at the model's threshold
    boxes.csv                    detection: one row per box
    overlays/<scan>/<slice>.png  segmentation / detection: the slice with the prediction drawn
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ichflow.data import ctich, phe
from ichflow.data.images import IMAGE_SUFFIXES, read_gray
from ichflow.data.manifest import atomic_write_text
from ichflow.errors import DataError, ParameterError


@dataclass
class PredictConfig:
    """Predict with a registered model on images, writing masks/boxes/overlays and a CSV of slice scores."""

    model_uri: str = "models:/ich-segmentation@champion"
    input: str = ""
    output: str = "predictions"
    overlays: bool = True


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem)]


def discover_scans(source: str | Path) -> dict[str, list[Path]]:
    """{scan name: slice files in axial order} for a file, a scan folder, a folder of scans or a dataset."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(source, f"not an image file (expected one of {IMAGE_SUFFIXES})")
        return {source.stem: [source]}
    if not source.is_dir():
        raise DataError(source, "input does not exist")
    for reader, finder in ((phe.read_phe, phe.find_root), (ctich.read_ctich, ctich.find_root)):
        if finder(source) is not None:
            manifest, _ = reader(source)
            return {pid: [Path(p) for p in g.sort_values("slice_index")["image_path"]]
                    for pid, g in manifest.groupby("patient_id", sort=True)}
    direct = sorted((p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if direct:
        return {source.name: direct}
    scans = {}
    for sub in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted((p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if files:
            scans[sub.name] = files
    if not scans:
        raise DataError(source, "no slice images found (png/jpg), neither directly nor in sub-folders")
    return scans


def load_scan(files: list[Path]) -> np.ndarray:
    slices = [read_gray(f) for f in files]
    shape = slices[0].shape
    for f, s in zip(files, slices):
        if s.shape != shape:
            raise DataError(f, f"slice size {s.shape[1]}x{s.shape[0]} differs from {shape[1]}x{shape[0]} of "
                               f"{files[0].name} in the same scan")
    return np.stack(slices)


def _overlay_mask(img: np.ndarray, mask: np.ndarray) -> Image.Image:
    rgb = np.repeat(img[..., None], 3, axis=-1).astype(np.float32)
    rgb[mask > 0] = 0.5 * rgb[mask > 0] + 0.5 * np.array([255, 40, 40])
    return Image.fromarray(rgb.astype(np.uint8))


def _overlay_boxes(img: np.ndarray, boxes: pd.DataFrame) -> Image.Image:
    pil = Image.fromarray(img).convert("RGB")
    draw = ImageDraw.Draw(pil)
    for b in boxes.itertuples():
        draw.rectangle([b.x1, b.y1, b.x2, b.y2], outline=(255, 60, 60), width=2)
        draw.text((b.x1 + 2, max(0, b.y1 - 12)), f"{b.score:.2f}", fill=(255, 255, 0))
    return pil


def run_predict(cfg: PredictConfig) -> pd.DataFrame:
    from ichflow.tracking import log_params_once, task_run

    from ichflow.evaluation import load_model

    if not cfg.input:
        raise ParameterError("input", "give an image, a folder of slices or a data folder (-P input=...)")
    scans = discover_scans(cfg.input)
    loaded = load_model(cfg.model_uri)  # a wrong URI, alias or version: one line naming model_uri
    model, meta, task = loaded.pyfunc, loaded.meta, loaded.task
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    rows, box_rows = [], []
    with task_run("predict", run_name=f"predict-{task}"):
        log_params_once({"model_uri": cfg.model_uri, "model_name": loaded.name, "model_version": loaded.version,
                         "input": cfg.input, "output": str(out), "task": task, "scans": len(scans)})
        for scan, files in tqdm(scans.items(), desc="scans", unit="scan"):
            arr = load_scan(files)
            base = [{"scan": scan, "slice": i, "image": str(f)} for i, f in enumerate(files)]
            if task == "segmentation":
                probs = np.asarray(model.predict(arr))
                masks = (probs >= float(meta.get("threshold", 0.5))).astype(np.uint8)
                spacing = float(meta.get("pixel_spacing_mm", 0.508)) ** 2 * float(meta.get("slice_thickness_mm", 5.0))
                for i, r in enumerate(base):
                    r.update(lesion_pixels=int(masks[i].sum()), max_probability=float(probs[i].max()),
                             positive=int(masks[i].any()), lesion_ml=masks[i].sum() * spacing / 1000.0)
                    _save(Image.fromarray(masks[i] * 255), out / "masks" / scan / f"{files[i].stem}.png")
                    if cfg.overlays and masks[i].any():
                        _save(_overlay_mask(arr[i], masks[i]), out / "overlays" / scan / f"{files[i].stem}.png")
            elif task == "detection":
                boxes = pd.DataFrame(model.predict(arr))
                for i, r in enumerate(base):
                    mine = boxes[boxes["slice_index"] == i]
                    r.update(n_boxes=len(mine), max_score=float(mine["score"].max()) if len(mine) else 0.0)
                    if cfg.overlays and len(mine):
                        _save(_overlay_boxes(arr[i], mine), out / "overlays" / scan / f"{files[i].stem}.png")
                box_rows += [{"scan": scan, "image": str(files[int(b.slice_index)]), **b._asdict()}
                             for b in boxes.itertuples(index=False)]
            else:
                scores = pd.DataFrame(model.predict(arr)).reset_index(drop=True)
                for i, r in enumerate(base):
                    r.update(scores.iloc[i].to_dict())
            rows += base
        table = pd.DataFrame(rows)
        atomic_write_text(out / "predictions.csv", table.to_csv(index=False))
        mlflow.log_artifact(str(out / "predictions.csv"))
        if task == "detection":
            atomic_write_text(out / "boxes.csv", pd.DataFrame(box_rows).to_csv(index=False))
            mlflow.log_artifact(str(out / "boxes.csv"))
        mlflow.log_metrics({"slices": len(table), "scans": len(scans)})
    print(f"[predict] {task}: {len(table)} slices of {len(scans)} scan(s) -> {out / 'predictions.csv'}")
    return table


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
