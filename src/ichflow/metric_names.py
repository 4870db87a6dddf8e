"""How our metrics are named in MLflow: grouped by the data they were measured on.

Code computes metrics under flat names (``val_dice``, ``test_f1_ci_low``, ``patients_train``); MLflow stores
them namespaced so the UI groups them into sections and a run's results are not buried under bookkeeping:

* ``train/…``, ``val/…``, ``test/…`` — the patient split they were measured on;
* ``cv/…`` (per-fold mean and spread), ``oof/…`` (pooled out-of-fold), ``heldout/…`` (an outer fold's held-out
  patients), ``eval/…`` (the ``evaluate`` entry point on a user's folder);
* ``info/…`` — bookkeeping: patient and slice counts, epochs, timings, thresholds, class support;
* ``objective``, ``best_value``, ``best_trial`` stay as they are: the one number a study compares.

The mapping is one-to-one, so :func:`run_metrics` gives code its flat names back (and passes a run logged
before this naming through unchanged). MLflow's own ``system/…`` metrics are left alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlflow

SPLIT_NAMESPACES = ("train", "val", "test", "cv", "oof", "heldout", "eval")
BOOKKEEPING = "info"
UNPREFIXED = frozenset({"objective", "best_value", "best_trial"})


def mlflow_key(name: str) -> str:
    """``val_dice`` -> ``val/dice``, ``patients_train`` -> ``info/patients_train``; keys with a ``/`` unchanged."""
    if "/" in name or name in UNPREFIXED:
        return name
    head, sep, rest = name.partition("_")
    if sep and rest and head in SPLIT_NAMESPACES:
        return f"{head}/{rest}"
    return f"{BOOKKEEPING}/{name}"


def flat_name(key: str) -> str:
    """The inverse of :func:`mlflow_key`: ``test/dice`` -> ``test_dice``, ``info/epochs_run`` -> ``epochs_run``."""
    head, sep, rest = key.partition("/")
    if sep and head == BOOKKEEPING:
        return rest
    if sep and head in SPLIT_NAMESPACES:
        return f"{head}_{rest}"
    return key


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """``mlflow.log_metrics`` under the namespaced keys."""
    if metrics:
        mlflow.log_metrics({mlflow_key(k): float(v) for k, v in metrics.items()}, step=step)


def run_metrics(run) -> dict[str, float]:
    """A run's latest metrics under the flat names code uses (``run`` from ``MlflowClient.get_run``)."""
    return {flat_name(k): v for k, v in run.data.metrics.items()}
