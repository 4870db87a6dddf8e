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
from tqdm.auto import tqdm

from ichflow.data import ctich, phe
from ichflow.data.images import IMAGE_SUFFIXES, read_gray
from ichflow.data.manifest import atomic_write_text
from ichflow.engine.files import staged_output
from ichflow.errors import DataError, ParameterError
from ichflow.tasks.spec import task_spec


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


def run_predict(cfg: PredictConfig) -> pd.DataFrame:
    from ichflow.evaluation import load_model
    from ichflow.tracking import log_params_once, task_run

    if not cfg.input:
        raise ParameterError("input", "give an image, a folder of slices or a data folder (-P input=...)")
    scans = discover_scans(cfg.input)
    loaded = load_model(cfg.model_uri)  # a wrong URI, alias or version: one line naming model_uri
    model, meta, task = loaded.pyfunc, loaded.meta, loaded.task
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ParameterError("output", f"{out} is a file, not a folder")
    glue = task_spec(task).predict_glue()
    rows, extra = [], []
    with task_run("predict", run_name=f"predict-{task}"), staged_output(out) as staged:
        # everything is written into ``staged`` beside ``out`` and moved in at the end: a failure partway
        # leaves the previous results in ``out`` whole
        log_params_once({"model_uri": cfg.model_uri, "model_name": loaded.name, "model_version": loaded.version,
                         "input": cfg.input, "output": str(out), "task": task, "scans": len(scans)})
        for scan, files in tqdm(scans.items(), desc="scans", unit="scan"):
            arr = load_scan(files)
            columns, more = glue.predict_scan(model, meta, scan, files, arr, staged, cfg.overlays)
            rows += [{"scan": scan, "slice": i, "image": str(f), **c} for i, (f, c) in enumerate(zip(files, columns))]
            extra += more
        table = pd.DataFrame(rows)
        atomic_write_text(staged / "predictions.csv", table.to_csv(index=False))
        mlflow.log_artifact(str(staged / "predictions.csv"))
        if glue.TABLE:
            atomic_write_text(staged / glue.TABLE, pd.DataFrame(extra).to_csv(index=False))
            mlflow.log_artifact(str(staged / glue.TABLE))
        mlflow.log_metrics({"slices": len(table), "scans": len(scans)})
    print(f"[predict] {task}: {len(table)} slices of {len(scans)} scan(s) -> {out / 'predictions.csv'}")
    return table
