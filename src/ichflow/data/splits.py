"""Patient-level splits: no patient ever on two sides.

Patients are grouped into strata (by patient-level positivity, and for sources with subtype labels by
the rarest subtype the patient has, so rare classes spread over all splits/folds). Within each stratum
patients are shuffled with the seed and dealt out by largest remainder, carrying the rounding across
strata, so split sizes match the fractions and each split sees each stratum in proportion.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from ichflow.data.manifest import SUBTYPES, patient_table

SPLITS = ("train", "val", "test")


def patient_strata(manifest: pd.DataFrame) -> pd.Series:
    """Stratum label per patient: 'neg', 'pos', or 'pos:<rarest subtype>' when subtypes are known."""
    pt = patient_table(manifest)
    known = [s for s in SUBTYPES if pt[s].notna().any()]
    # rarity by number of positive patients: the rarest subtype present defines the stratum
    rarity = sorted(known, key=lambda s: (int(pt[s].fillna(0).sum()), s))
    labels = {}
    for pid, row in pt.iterrows():
        if not row["positive"]:
            labels[pid] = "neg"
            continue
        present = [s for s in rarity if row[s] is not pd.NA and row[s] == 1]
        labels[pid] = f"pos:{present[0]}" if present else "pos"
    return pd.Series(labels, name="stratum").sort_index()


def _ordered_patients(strata: pd.Series, seed: int) -> list[str]:
    """Patients ordered stratum by stratum (smallest stratum first), shuffled within each."""
    rng = np.random.default_rng(seed)
    order = []
    for _, group in sorted(strata.groupby(strata), key=lambda kv: (len(kv[1]), kv[0])):
        ids = sorted(group.index)
        rng.shuffle(ids)
        order.extend(ids)
    return order


def split_patients(manifest: pd.DataFrame, fractions=(0.7, 0.15, 0.15), seed: int = 42,
                   n_folds: int = 5) -> pd.DataFrame:
    """Assign every patient a holdout split (train/val/test) and a cross-validation fold.

    Returns a table with columns patient_id, stratum, split, fold. Deterministic for a given seed.
    """
    fractions = np.asarray(fractions, float)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    strata = patient_strata(manifest)
    n = len(strata)
    if n < 3 and (fractions > 0).sum() > n:
        raise ValueError(f"{n} patient(s) cannot fill {int((fractions > 0).sum())} splits")
    split_of, fold_of = {}, {}
    counts = np.zeros(3)
    done = 0
    for _, group in sorted(strata.groupby(strata), key=lambda kv: (len(kv[1]), kv[0])):
        ids = sorted(group.index)
        np.random.default_rng([seed, _stable_int(group.iloc[0])]).shuffle(ids)
        for pid in ids:
            done += 1
            # give the patient to the split furthest below its target share so far (largest remainder)
            deficit = fractions * done - counts
            k = int(np.argmax(np.where(fractions > 0, deficit, -np.inf)))
            counts[k] += 1
            split_of[pid] = SPLITS[k]
    # make sure every non-empty fraction got at least one patient when possible
    for k, name in enumerate(SPLITS):
        if fractions[k] > 0 and name not in split_of.values():
            donor = max(SPLITS, key=lambda s: list(split_of.values()).count(s))
            pid = sorted(p for p, s in split_of.items() if s == donor)[-1]
            split_of[pid] = name
    for i, pid in enumerate(_ordered_patients(strata, seed + 1)):
        fold_of[pid] = i % max(1, n_folds)
    out = pd.DataFrame({"patient_id": strata.index, "stratum": strata.values})
    out["split"] = out["patient_id"].map(split_of)
    out["fold"] = out["patient_id"].map(fold_of).astype(int)
    return out.sort_values("patient_id").reset_index(drop=True)


def _stable_int(text: str) -> int:
    return int(hashlib.sha1(str(text).encode()).hexdigest()[:8], 16)


def attach_split(manifest: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows with their patient's split and fold columns added."""
    return manifest.merge(split[["patient_id", "split", "fold"]], on="patient_id", how="left", validate="m:1")


def subset(manifest: pd.DataFrame, split: pd.DataFrame, name: str) -> pd.DataFrame:
    ids = set(split.loc[split["split"] == name, "patient_id"])
    return manifest[manifest["patient_id"].isin(ids)].reset_index(drop=True)


def fold_subsets(manifest: pd.DataFrame, split: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out) manifests for one cross-validation fold."""
    held = set(split.loc[split["fold"] == fold, "patient_id"])
    mask = manifest["patient_id"].isin(held)
    return manifest[~mask].reset_index(drop=True), manifest[mask].reset_index(drop=True)
