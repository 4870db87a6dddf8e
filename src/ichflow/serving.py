"""Batch prediction with any registered ichflow model (``predict`` entry point).

Input: one image, a folder of slices (one scan, in natural order of the file names), a folder of such
folders (one scan each), a data folder in a supported layout (PHE-SICH-CT-IDS, CT-ICH: one scan per
patient), or a scan in Hounsfield units: a DICOM series folder (``series_uid`` picks one of several) or a
NIfTI volume. HU scans are windowed with the window the model was trained with (its metadata ``window``)
and named after the study/series (DICOM) or the file (NIfTI). The model's task comes from its MLflow
metadata. Output folder (fixed layout)::

    predictions.csv              one row per slice: scan, slice, image, and the task's scores
    masks/<scan>/<slice>.png     segmentation: 0/255 edema mask at the model's threshold
    masks/<scan>.nii.gz          segmentation of a HU scan: 0/1 mask with the input's affine (NIfTI)
    masks/<scan>.seg.dcm         segmentation of a DICOM series: DICOM-SEG referencing the source slices
    volumes.csv                  HU scans: source, voxel spacing, window, lesion volume in mL (segmentation)
    boxes.csv                    detection: one row per box
    overlays/<scan>/<slice>.png  segmentation / detection: the slice with the prediction drawn
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from ichflow.data import ctich, phe, phe_nifti
from ichflow.data.images import IMAGE_SUFFIXES, read_gray
from ichflow.configs import PredictConfig  # noqa: F401  (re-exported: ``ichflow.serving.PredictConfig``)
from ichflow.data.manifest import atomic_write_text
from ichflow.data.volumes import is_volume_input, read_volume
from ichflow.data.windows import apply_window, from_metadata
from ichflow.engine.files import staged_output
from ichflow.engine.progress import progress
from ichflow.errors import DataError, ParameterError
from ichflow.metric_names import log_metrics
from ichflow.tasks.spec import task_spec


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
    for reader, finder in ((phe_nifti.read_phe_nifti, phe_nifti.detect), (phe.read_phe, phe.find_root),
                           (ctich.read_ctich, ctich.find_root)):
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
        raise ParameterError("input", "give an image, a folder of slices, a data folder, a DICOM series folder or "
                                      "a NIfTI file (-P input=...)")
    volume = read_volume(cfg.input, cfg.series_uid) if is_volume_input(cfg.input) else None
    scans = {} if volume else discover_scans(cfg.input)
    loaded = load_model(cfg.model_uri)  # a wrong URI, alias or version: one line naming model_uri
    model, meta, task = loaded.pyfunc, loaded.meta, loaded.task
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ParameterError("output", f"{out} is a file, not a folder")
    glue = task_spec(task).predict_glue()
    rows, extra, volumes = [], [], []
    with task_run("predict", run_name=f"predict-{task}"), staged_output(out) as staged:
        # everything is written into ``staged`` beside ``out`` and moved in at the end: a failure partway
        # leaves the previous results in ``out`` whole
        log_params_once({"model_uri": cfg.model_uri, "model_name": loaded.name, "model_version": loaded.version,
                         "input": cfg.input, "output": str(out), "task": task, "scans": len(scans) or 1})
        if volume is not None:
            columns, more, summary = predict_volume(glue, model, meta, volume, staged, cfg.overlays)
            rows += [{"scan": volume.name, "slice": i, "image": str(volume.path), **c} for i, c in enumerate(columns)]
            extra += more
            volumes.append(summary)
        for scan, files in progress(scans.items(), desc="scans", unit="scan"):
            arr = load_scan(files)
            columns, more = glue.predict_scan(model, meta, scan, files, arr, staged, cfg.overlays)
            rows += [{"scan": scan, "slice": i, "image": str(f), **c} for i, (f, c) in enumerate(zip(files, columns))]
            extra += more
        table = pd.DataFrame(rows)
        _write_table(staged / "predictions.csv", table)
        if glue.TABLE:
            _write_table(staged / glue.TABLE, pd.DataFrame(extra))
        if volumes:
            _write_table(staged / "volumes.csv", pd.DataFrame(volumes))
        log_metrics({"slices": len(table), "scans": len(scans) or 1})
    print(f"[predict] {task}: {len(table)} slices of {len(scans) or 1} scan(s) -> {out / 'predictions.csv'}")
    for summary in volumes:
        print(f"[predict] {summary['scan']}: {summary['kind']} {summary['slices']} slices, voxel "
              f"{summary['spacing_mm']} mm, window {summary['window']}"
              + (f", lesion volume {summary['lesion_ml']:.2f} mL" if "lesion_ml" in summary else ""))
    return table


def _write_table(path: Path, table: pd.DataFrame) -> None:
    atomic_write_text(path, table.to_csv(index=False))
    mlflow.log_artifact(str(path))


def predict_volume(glue, model, meta: dict, volume, out: Path, overlays: bool):
    """(per-slice columns, task table rows, volumes.csv row) for one HU scan, windowed as the model was trained.

    The slices are named ``<scan>_<index>`` (inferior -> superior) in masks/ and overlays/; a task whose glue
    has ``predict_volume`` (segmentation) also writes its volume outputs (NIfTI mask, DICOM-SEG, mL)."""
    window = from_metadata(meta)
    arr = apply_window(volume.hu, window)
    summary = {"scan": volume.name, "kind": volume.kind, "source": str(volume.path), "series_uid": volume.series_uid,
               "slices": len(arr), "spacing_mm": "x".join(f"{v:g}" for v in volume.spacing), "window": str(window)}
    files = [Path(f"{volume.name}_{i:03d}.png") for i in range(len(arr))]
    if hasattr(glue, "predict_volume"):
        columns, more, extra_summary = glue.predict_volume(model, meta, volume, files, arr, out, overlays)
        return columns, more, {**summary, **extra_summary}
    columns, more = glue.predict_scan(model, meta, volume.name, files, arr, out, overlays)
    return columns, more, summary
