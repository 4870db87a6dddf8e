"""Confidence intervals: percentile bootstrap over patients."""

from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np
import pandas as pd


def bootstrap_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                 stat: Callable = np.mean) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat`` over independent units (e.g. per-patient Dice)."""
    vals = np.asarray([v for v in values if v == v], dtype=float)  # drop NaN
    if len(vals) == 0:
        return float("nan"), float("nan")
    if len(vals) == 1:
        return float(vals[0]), float(vals[0])
    rng = np.random.default_rng(seed)
    boots = stat(vals[rng.integers(0, len(vals), size=(n_boot, len(vals)))], axis=1)
    return float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))


def patient_bootstrap_ci(frame: pd.DataFrame, metric: Callable[[pd.DataFrame], float], group: str = "patient_id",
                         n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """CI of a slice-level metric, resampling whole patients (slices of a patient are not independent)."""
    groups = [g for _, g in frame.groupby(group, sort=True)]
    if len(groups) < 2:
        v = metric(frame)
        return float(v), float(v)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), size=len(groups))
        v = metric(pd.concat([groups[i] for i in pick], ignore_index=True))
        if v == v:
            stats.append(v)
    if not stats:
        return float("nan"), float("nan")
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


def finite(metrics: dict) -> dict:
    """Only the finite numeric entries (what MLflow metrics can hold), as floats."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))}
