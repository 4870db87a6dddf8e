"""Patient-level cross-validation folds that spread every selected class over every fold.

The prepare step's ``split.fold`` column is used when it already gives each fold at least one positive
patient of each selected class that has enough positive patients (CT-ICH with IVH/IPH/SAH: it does).
Otherwise (other classes, few patients, a subset of patients) the folds are re-dealt by iterative
stratification over the selected classes (Sechidis et al. 2011, at patient level): the rarest class's
patients are placed first, each into the fold that still lacks that class most. A class with fewer
positive patients than folds cannot reach every fold: that is reported with a :class:`FoldWarning`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ichflow.errors import ParameterError


class FoldWarning(UserWarning):
    """A class cannot have positives in every fold (or the folds could not give it that)."""


def patient_labels(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per patient (sorted), a bool column per class: the patient has a positive slice of it."""
    y = manifest[classes].astype("Float64").fillna(0).astype(float) > 0
    return y.groupby(manifest["patient_id"].astype(str)).max().sort_index()


def stratified_folds(plabels: pd.DataFrame, n_folds: int, seed: int = 0) -> pd.Series:
    """Fold (0..n_folds-1) per patient by iterative stratification over the label columns."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if len(plabels) < n_folds:
        raise ValueError(f"{len(plabels)} patients cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    patients = list(plabels.index)
    rng.shuffle(patients)
    lab = plabels.loc[patients].to_numpy(dtype=bool)
    k = lab.shape[1]
    need = np.tile(lab.sum(axis=0) / n_folds, (n_folds, 1)).astype(float)   # desired positives per fold/class
    need_total = np.full(n_folds, len(patients) / n_folds)
    fold = np.full(len(patients), -1)

    def place(i: int, c: int | None) -> None:
        cand = np.arange(n_folds)
        if c is not None:
            cand = cand[need[cand, c] == need[cand, c].max()]
        cand = cand[need_total[cand] == need_total[cand].max()]
        f = int(cand[rng.integers(len(cand))]) if len(cand) > 1 else int(cand[0])
        fold[i] = f
        need[f] -= lab[i]
        need_total[f] -= 1

    while True:
        left = fold < 0
        counts = (lab & left[:, None]).sum(axis=0)
        if counts.sum() == 0:
            break
        c = int(np.argmin(np.where(counts > 0, counts, np.iinfo(int).max)))   # rarest class still to place
        for i in np.nonzero(left & lab[:, c])[0]:
            place(int(i), c)
    for i in np.nonzero(fold < 0)[0]:       # patients without any selected class: balance fold sizes
        place(int(i), None)
    return pd.Series(fold, index=pd.Index(patients, name="patient_id"), name="fold").sort_index()


def fold_problems(plabels: pd.DataFrame, folds: pd.Series, n_folds: int) -> tuple[list[str], list[str]]:
    """(impossible, missed): classes with < n_folds positive patients; classes some fold lacks though possible."""
    impossible, missed = [], []
    for c in plabels.columns:
        pos = plabels.index[plabels[c]]
        if len(pos) < n_folds:
            impossible.append(c)
        elif folds.loc[pos].nunique() < n_folds:
            missed.append(c)
    return impossible, missed


def cv_folds(manifest: pd.DataFrame, split: pd.DataFrame, classes: list[str], n_folds: int, seed: int = 0,
             exclude_test: bool = False, repeat: int = 0) -> tuple[pd.Series, str]:
    """Fold per patient for cross-validation, and where it came from ('split.fold' or 'stratified').

    ``exclude_test``: leave the patients of the holdout test split out entirely (tuning trials).
    ``repeat`` > 0: a repeated CV's further fold set, always re-dealt (seed ``seed + repeat``).
    """
    plabels = patient_labels(manifest, classes)
    if exclude_test:
        keep = set(split.loc[split["split"] != "test", "patient_id"].astype(str))
        plabels = plabels[plabels.index.isin(keep)]
    if len(plabels) < n_folds:
        raise ParameterError("n_folds", f"{len(plabels)} patients cannot fill {n_folds} folds; use fewer folds "
                                        "or more patients")
    given = split.assign(patient_id=split["patient_id"].astype(str)).set_index("patient_id")["fold"]
    given = given.reindex(plabels.index)
    source = "split.fold"
    if repeat:
        folds, source = stratified_folds(plabels, n_folds, seed + repeat), f"stratified (repeat {repeat})"
    elif given.isna().any() or given.nunique() != n_folds or fold_problems(plabels, given.astype(int), n_folds)[1]:
        folds, source = stratified_folds(plabels, n_folds, seed), "stratified"
    else:
        folds = given.astype(int).rename("fold")
    impossible, missed = fold_problems(plabels, folds, n_folds)
    for c in impossible:
        n = int(plabels[c].sum())
        warnings.warn(f"class {c}: {n} positive patient(s) for {n_folds} folds; {n_folds - n} fold(s) have no "
                      f"{c} positives and no {c} AUC", FoldWarning, stacklevel=2)
    for c in missed:
        warnings.warn(f"class {c}: some fold has no positive patient although {int(plabels[c].sum())} exist",
                      FoldWarning, stacklevel=2)
    return folds, source


def fold_table(folds: pd.Series, plabels: pd.DataFrame) -> pd.DataFrame:
    """patient_id, fold and the patient's class flags (logged as cv/folds.csv)."""
    out = plabels.loc[folds.index].astype(int)
    out.insert(0, "fold", folds.to_numpy())
    return out.reset_index()
