"""MLflow spine shared by every entry point.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else MLflow's own default (``sqlite:///mlflow.db`` in the
working directory, artifacts in ``./mlruns``), which is also what ``mlflow ui`` opens in that folder. We
never call ``set_tracking_uri`` ourselves: inside ``mlflow run`` that would detach the run (MLflow #2649).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import mlflow
import pandas as pd


_reuse_active = False


@contextlib.contextmanager
def reuse_active_run():
    """Inside this block ``task_run`` logs into the already active run instead of opening a child.

    Tuning opens one child run per trial itself (with an explicit parent) and trains inside it.
    """
    global _reuse_active
    old, _reuse_active = _reuse_active, True
    try:
        yield
    finally:
        _reuse_active = old


@contextlib.contextmanager
def task_run(task: str, run_name: str | None = None, tags: dict | None = None, nested: bool = False):
    """Start (or, under ``mlflow run``, resume) the run of one entry point.

    Outside ``mlflow run`` the run goes to experiment ``ichflow-<task>`` unless the user chose one with
    ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``.
    """
    active = mlflow.active_run()
    if active is not None and _reuse_active:
        mlflow.set_tags({"ichflow.task": task, **(tags or {})})
        yield active
        return
    nested = nested or active is not None  # a step of a pipeline becomes a child run
    launched = bool(os.environ.get("MLFLOW_RUN_ID")) and mlflow.active_run() is None and not nested
    if not launched and not nested and not (os.environ.get("MLFLOW_EXPERIMENT_NAME")
                                            or os.environ.get("MLFLOW_EXPERIMENT_ID")):
        mlflow.set_experiment(f"ichflow-{task}")
    with mlflow.start_run(run_name=run_name, nested=nested, tags={"ichflow.task": task, **(tags or {})}) as run:
        yield run


def frame_digest(df: pd.DataFrame) -> str:
    return hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()[:12]


def log_dataset_inputs(manifest: pd.DataFrame, split: pd.DataFrame, source: str | Path, dataset: str,
                       target: str = "has_lesion") -> dict[str, str]:
    """Log train/val/test manifests as MLflow dataset inputs; returns {split: digest}."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    from ichflow.data.splits import subset

    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": both are local paths
        warnings.simplefilter("ignore")
        src = resolve_dataset_source(str(source))
    contexts = {"train": "training", "val": "validation", "test": "testing"}
    digests = {}
    for name, context in contexts.items():
        part = subset(manifest, split, name)
        if part.empty:
            continue
        with warnings.catch_warnings():  # schema-inference hints about int columns: not actionable here
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_pandas(part, source=src, name=f"{dataset}-{name}", targets=target)
            mlflow.log_input(ds, context=context)
        digests[name] = ds.digest
    return digests


def log_params_once(params: dict) -> None:
    """Log params the active run does not have yet.

    ``mlflow run`` already logged the entry point's -P parameters (its own rendering of them, e.g. "''"
    for an empty string); logging them again with another rendering is an error in MLflow.
    """
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    fresh = {k: v for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)
