"""Patient-level splits: disjoint, deterministic, stratified."""

import pandas as pd
import pytest

from ichflow.data.ctich import read_ctich
from ichflow.data.splits import attach_split, fold_subsets, split_patients, subset


def _fake_manifest(n_pos=40, n_neg=20, slices=5):
    rows = []
    for i in range(n_pos + n_neg):
        for s in range(slices):
            rows.append({"patient_id": f"{i:03d}", "slice_index": s, "has_lesion": i < n_pos and s == 2,
                         "has_mask": False, **{k: pd.NA for k in ("IVH", "IPH", "SAH", "EDH", "SDH")}})
    return pd.DataFrame(rows)


def test_no_patient_on_two_sides_and_all_assigned():
    m = _fake_manifest()
    split = split_patients(m, (0.6, 0.2, 0.2), seed=1)
    assert split["patient_id"].is_unique
    assert set(split["patient_id"]) == set(m["patient_id"])
    parts = [set(subset(m, split, s)["patient_id"]) for s in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(len(subset(m, split, s)) for s in ("train", "val", "test")) == len(m)


def test_deterministic_for_a_seed_and_different_for_another():
    m = _fake_manifest()
    a = split_patients(m, seed=7)
    b = split_patients(m, seed=7)
    c = split_patients(m, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])


def test_sizes_and_stratification_within_tolerance():
    m = _fake_manifest(n_pos=40, n_neg=20)
    split = split_patients(m, (0.6, 0.2, 0.2), seed=3)
    sizes = split["split"].value_counts()
    assert (sizes["train"], sizes["val"], sizes["test"]) == (36, 12, 12)
    pos_rate = split.assign(pos=split["stratum"] != "neg").groupby("split")["pos"].mean()
    assert (pos_rate - 40 / 60).abs().max() <= 0.1


def test_folds_keep_patients_whole():
    m = _fake_manifest()
    split = split_patients(m, n_folds=5, seed=0)
    assert sorted(split["fold"].unique()) == [0, 1, 2, 3, 4]
    for k in range(5):
        train, held = fold_subsets(m, split, k)
        assert not set(train["patient_id"]) & set(held["patient_id"])
    merged = attach_split(m, split)
    assert merged.groupby("patient_id")["fold"].nunique().max() == 1


def test_bad_fractions_rejected():
    with pytest.raises(ValueError, match="sum"):
        split_patients(_fake_manifest(), (0.5, 0.2, 0.2))


@pytest.mark.realdata
def test_ctich_rare_subtypes_spread_over_folds(ctich_dir):
    manifest, _ = read_ctich(ctich_dir)
    split = split_patients(manifest, n_folds=5, seed=42)
    merged = attach_split(manifest, split)
    for sub in ("IVH", "SAH"):
        folds_with = merged.loc[merged[sub] == 1, "fold"].nunique()
        n_patients = merged.loc[merged[sub] == 1, "patient_id"].nunique()
        assert folds_with == min(5, n_patients), sub
