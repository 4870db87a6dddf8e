"""Multi-label subtypes: pos_weight, per-class thresholds, CV folds, metrics, labels CSV, parent/child runs."""

import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ichflow.errors import DataError, ParameterError
from ichflow.metric_names import mlflow_key, run_metrics
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.multilabel import MultilabelConfig, train_multilabel
from ichflow.tasks.multilabel import folds as cvf
from ichflow.tasks.multilabel import report as mreport
from ichflow.tasks.multilabel.labels import with_derived
from ichflow.tasks.multilabel.labels_csv import is_labels_csv, read_labels_csv
from ichflow.tasks.multilabel.metrics import (aggregate, headline_markdown, multilabel_metrics, pooled_cis,
                                              pooled_metrics, support)
from ichflow.tasks.multilabel.config import parse_classes, parse_multipliers, validate_labels

CLASSES = ["IVH", "IPH", "SAH"]


# ------------------------------------------------------------------------------------------------ pos_weight
def test_pos_weight_from_training_prevalence_and_multipliers():
    y = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    w = sc.prevalence_pos_weight(y)
    np.testing.assert_allclose(w, [5.0, 1.0, 2.0])     # negatives / positives; no positives -> 1
    np.testing.assert_allclose(sc.prevalence_pos_weight(y, [2, 1, 0.5]), [10.0, 1.0, 1.0])
    # under a sampler the prevalence is the one the batches have: weight 3 on the IVH slice -> 3 / 8 vs 5 / 8
    sw = np.array([3, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(sc.prevalence_pos_weight(y, sample_weights=sw)[0], 5 / 3)
    with pytest.raises(ValueError, match="3 classes"):
        sc.prevalence_pos_weight(y, [1, 2])


def test_multipliers_and_classes_parsing():
    np.testing.assert_allclose(parse_multipliers("", 3), [1, 1, 1])
    np.testing.assert_allclose(parse_multipliers("1,2,0.5", 3), [1, 2, 0.5])
    for bad, msg in (("1,2", "2 values for 3"), ("1,x,2", "comma-separated"), ("1,0,1", "> 0")):
        with pytest.raises(ParameterError, match=f"parameter pos_weight_multipliers: .*{msg}"):
            parse_multipliers(bad, 3)
    assert parse_classes(" IVH, IPH ,SAH") == CLASSES
    with pytest.raises(ParameterError, match="parameter classes: has duplicates"):
        parse_classes("IVH,IVH")


# ------------------------------------------------------------------------------------------------ thresholds
def test_thresholds_are_chosen_per_class():
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0]])
    p = np.array([[0.9, 0.01], [0.7, 0.02], [0.3, 0.08], [0.1, 0.07], [0.2, 0.03], [0.05, 0.02]])
    thr = sc.per_class_thresholds(y, p, goal="f1")
    assert thr[0] == pytest.approx(0.5)       # between 0.7 (last bleed) and 0.3
    assert thr[1] == pytest.approx(0.05)      # class 2 lives at low scores: its own cut, between 0.07 and 0.03
    pred = p >= thr[None, :]
    assert (pred == y.astype(bool)).all()
    thr_r = sc.per_class_thresholds(y, p, goal="recall", target_recall=0.5)
    assert thr_r[0] == pytest.approx(0.8)     # recall 1/2 reached at 0.9 with precision 1


# ------------------------------------------------------------------------------------------------ folds
def _manifest(pattern: dict[str, tuple[str, ...]], slices: int = 4) -> pd.DataFrame:
    rows = []
    for pid, kinds in pattern.items():
        for s in range(slices):
            on = s in (1, 2)
            rows.append({"patient_id": pid, "slice_index": s, "has_lesion": on and bool(kinds),
                         **{c: int(on and c in kinds) for c in ("IVH", "IPH", "SAH", "EDH", "SDH")}})
    return pd.DataFrame(rows)


def _pattern(n: int) -> dict[str, tuple[str, ...]]:
    cycle = [("IPH",), ("IVH",), ("SAH",), ("IPH", "IVH"), (), ("EDH",), ("SAH", "IPH"), ()]
    return {f"{i:03d}": cycle[i % len(cycle)] for i in range(n)}


def test_stratified_folds_keep_patients_whole_and_spread_every_class():
    m = _manifest(_pattern(30))
    plabels = cvf.patient_labels(m, CLASSES)
    folds = cvf.stratified_folds(plabels, 5, seed=3)
    assert folds.index.is_unique and set(folds.index) == set(m["patient_id"])   # one fold per patient
    assert sorted(folds.unique()) == [0, 1, 2, 3, 4]
    assert folds.value_counts().max() - folds.value_counts().min() <= 1
    for c in CLASSES:
        assert folds[plabels[c]].nunique() == 5, c                             # positives in every fold
    assert cvf.fold_problems(plabels, folds, 5) == ([], [])
    pd.testing.assert_series_equal(folds, cvf.stratified_folds(plabels, 5, seed=3))   # deterministic


def test_cv_folds_warns_when_a_class_cannot_reach_every_fold():
    pattern = _pattern(30)
    pattern.update({"900": ("SDH",), "901": ("SDH",)})
    m = _manifest(pattern)
    split = pd.DataFrame({"patient_id": sorted(pattern), "split": "train", "fold": 0})   # useless given folds
    with pytest.warns(cvf.FoldWarning, match="class SDH: 2 positive patient"):
        folds, source = cvf.cv_folds(m, split, CLASSES + ["SDH"], 5)
    assert source == "stratified"
    plabels = cvf.patient_labels(m, CLASSES + ["SDH"])
    assert folds[plabels["SDH"]].nunique() == 2 and folds[plabels["IVH"]].nunique() == 5


def test_cv_folds_uses_the_prepared_fold_column_when_it_is_good_and_can_drop_test_patients():
    m = _manifest(_pattern(30))
    plabels = cvf.patient_labels(m, CLASSES)
    good = cvf.stratified_folds(plabels, 5, seed=9)
    split = pd.DataFrame({"patient_id": good.index, "fold": good.to_numpy(),
                          "split": ["test" if i % 6 == 0 else "train" for i in range(len(good))]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", cvf.FoldWarning)
        folds, source = cvf.cv_folds(m, split, CLASSES, 5)
    assert source == "split.fold"
    pd.testing.assert_series_equal(folds, good, check_names=False)
    folds, _ = cvf.cv_folds(m, split, CLASSES, 5, exclude_test=True)
    assert not set(folds.index) & set(split.loc[split["split"] == "test", "patient_id"])
    assert len(folds) == (split["split"] != "test").sum()


def test_a_cv_repeat_re_deals_the_same_patients_into_new_folds():
    m = _manifest(_pattern(30))
    plabels = cvf.patient_labels(m, CLASSES)
    good = cvf.stratified_folds(plabels, 5, seed=9)
    split = pd.DataFrame({"patient_id": good.index, "fold": good.to_numpy(), "split": "train"})
    first, _ = cvf.cv_folds(m, split, CLASSES, 5, seed=42)
    again, source = cvf.cv_folds(m, split, CLASSES, 5, seed=42, repeat=1)
    assert source == "stratified (repeat 1)" and set(again.index) == set(first.index)
    assert (again != first.loc[again.index]).any()                       # other folds, same patients
    for c in CLASSES:
        assert again[plabels[c]].nunique() == 5, c
    pd.testing.assert_series_equal(again, cvf.cv_folds(m, split, CLASSES, 5, seed=42, repeat=1)[0])


def test_repeated_out_of_fold_averages_each_slice_over_its_repeats():
    from ichflow.tasks.multilabel.crossval import FoldOutcome, out_of_fold

    def held(rows, probs, threshold, repeat):
        return FoldOutcome(name="f", fit=None, val={}, heldout={}, thresholds=np.array([threshold]),
                           norm=None, rows=np.array(rows), probs=np.array(probs, np.float32)[:, None], repeat=repeat)

    outcomes = [held([2, 0], [0.9, 0.2], 0.5, 0), held([1], [0.4], 0.5, 0),            # repeat 0: 3 slices
                held([0, 1], [0.6, 0.2], 0.5, 1), held([2], [0.5], 0.6, 1)]            # repeat 1, other folds
    rows, p, calls = out_of_fold(outcomes)
    assert rows.tolist() == [0, 1, 2]
    np.testing.assert_allclose(p[:, 0], [0.4, 0.3, 0.7], rtol=1e-6)
    assert calls[:, 0].tolist() == [True, False, True]     # row 0: one call of two (a tie counts as positive)


# ------------------------------------------------------------------------------------------------ metrics
def test_multilabel_metrics_macro_over_defined_classes_and_micro_f1():
    y = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 0]])
    p = np.array([[0.9, 0.2, 0.1], [0.2, 0.8, 0.3], [0.1, 0.4, 0.2], [0.3, 0.1, 0.4]])
    m = multilabel_metrics(y, p, [0.5, 0.5, 0.5], CLASSES)
    assert m["IVH_roc_auc"] == 1.0 and m["IPH_roc_auc"] == 1.0 and np.isnan(m["SAH_roc_auc"])
    assert m["macro_auc"] == 1.0 and m["macro_auc_classes"] == 2
    assert m["IPH_recall"] == 0.5 and m["IVH_f1"] == 1.0
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))      # tp 2, fp 0, fn 1
    sup = support(pd.DataFrame({"patient_id": ["a", "a", "b", "c"]}), y, CLASSES)
    assert (sup["IPH_slices"], sup["IPH_patients"], sup["SAH_patients"]) == (2, 2, 0)
    agg = aggregate([{"x": 1.0, "y": float("nan")}, {"x": 3.0, "y": 2.0}])
    assert agg["x"] == 2.0 and agg["x_sd"] == pytest.approx(np.sqrt(2)) and agg["y"] == 2.0 and agg["y_folds"] == 1


def _scored(n_patients: int, slices: int = 6, seed: int = 0):
    """(y, p, patient ids): two classes, positives clustered in patients, scores that separate them partly."""
    rng = np.random.default_rng(seed)
    pids = np.repeat([f"p{i:03d}" for i in range(n_patients)], slices)
    sick = np.repeat(rng.random((n_patients, 2)) < 0.3, slices, axis=0)
    y = (sick & (rng.random((len(pids), 2)) < 0.6)).astype(int)
    p = np.round(0.4 * y + 0.6 * rng.random((len(pids), 2)), 2)          # rounded: tied scores too
    return y, p, pids


def _width(ci: dict, key: str) -> float:
    return ci[f"{key}_ci_high"] - ci[f"{key}_ci_low"]


def test_pooled_cis_are_the_patient_bootstrap_of_the_engine_and_contain_the_estimate():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from ichflow.engine.stats import patient_bootstrap_ci

    y, p, pids = _scored(30)
    ci = pooled_cis(y, p, pids, ["A", "B"], seed=3, n_boot=100)
    frame = pd.DataFrame({"patient_id": pids, "i": np.arange(len(y))})
    for j, c in enumerate(["A", "B"]):
        for name, score in (("roc_auc", roc_auc_score), ("pr_auc", average_precision_score)):
            def stat(f, j=j, score=score):
                t = y[f["i"], j]
                return score(t, p[f["i"], j]) if 0 < t.sum() < len(t) else float("nan")
            expected = patient_bootstrap_ci(frame, stat, n_boot=100, seed=3)   # same draws, one metric at a time
            assert (ci[f"{c}_{name}_ci_low"], ci[f"{c}_{name}_ci_high"]) == pytest.approx(expected, abs=1e-12)
    point = pooled_metrics(y, p, p >= 0.5, ["A", "B"])
    ci = pooled_cis(y, p, pids, ["A", "B"], seed=0)
    for key in ("A_roc_auc", "A_pr_auc", "B_roc_auc", "B_pr_auc", "macro_auc"):
        assert ci[f"{key}_ci_low"] <= point[key] <= ci[f"{key}_ci_high"], key
        assert 0 < _width(ci, key) < 1


def test_pooled_cis_resample_patients_not_slices():
    y, p, pids = _scored(20, slices=4, seed=1)
    ci = pooled_cis(y, p, pids, ["A", "B"], seed=0, n_boot=300)
    # five copies of every slice inside its patient: no new patient, so no new information; a slice bootstrap
    # would see five times the slices and shrink the interval by about sqrt(5)
    ci5 = pooled_cis(np.repeat(y, 5, axis=0), np.repeat(p, 5, axis=0), np.repeat(pids, 5), ["A", "B"], seed=0,
                     n_boot=300)
    for key in ("A_roc_auc", "B_pr_auc", "macro_auc"):
        assert (ci5[f"{key}_ci_low"], ci5[f"{key}_ci_high"]) == pytest.approx(
            (ci[f"{key}_ci_low"], ci[f"{key}_ci_high"]), abs=1e-9), key
    # fewer patients, the same kind of data: wider
    big = pooled_cis(*_scored(160, seed=2), ["A", "B"], seed=0, n_boot=300)
    small = pooled_cis(*_scored(20, seed=2), ["A", "B"], seed=0, n_boot=300)
    for key in ("A_roc_auc", "B_roc_auc", "macro_auc"):
        assert _width(small, key) > 1.5 * _width(big, key), key


def test_pooled_cis_skip_undefined_classes_and_resamples():
    y, p, pids = _scored(20, seed=4)
    y = np.column_stack([y, np.zeros(len(y), int)])                      # class C: no positive at all
    y[:, 1] = 0
    y[pids == "p007", 1] = 1                                             # class B: one positive patient
    p = np.column_stack([p, np.full(len(y), 0.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ci = pooled_cis(y, p, pids, ["A", "B", "C"], seed=0, n_boot=200)
    assert np.isnan(ci["C_roc_auc_ci_low"]) and np.isnan(ci["C_pr_auc_ci_high"])
    assert np.isfinite([ci["B_roc_auc_ci_low"], ci["B_roc_auc_ci_high"]]).all()   # resamples without p007 skipped
    assert np.isfinite([ci["macro_auc_ci_low"], ci["macro_auc_ci_high"]]).all()   # over A and B
    assert np.isnan(pooled_cis(y[:0], p[:0], pids[:0], ["A", "B", "C"])["macro_auc_ci_low"])   # no slices


def test_headline_and_summary_lines_put_the_pooled_ci_first():
    m = {"oof_IVH_roc_auc": 0.7, "oof_IVH_roc_auc_ci_low": 0.6, "oof_IVH_roc_auc_ci_high": 0.8,
         "cv_IVH_roc_auc": 0.65, "cv_IVH_roc_auc_sd": 0.1, "oof_macro_auc": 0.7, "oof_macro_auc_ci_low": 0.6,
         "oof_macro_auc_ci_high": 0.8, "cv_macro_auc": 0.65, "cv_macro_auc_sd": 0.1, "final_model": "fold-1"}
    sup = {"IVH_slices": 24, "IVH_patients": 5}
    table = headline_markdown(m, sup, ["IVH"])
    assert "| IVH | 24 | 5 | 0.700 (95 % CI 0.600–0.800) | 0.650 ± 0.100 | n/a | n/a |" in table
    lines = mreport.cv_lines(m, sup, ["IVH"])
    assert lines[0].startswith("IVH: 24 slices / 5 patients; out-of-fold ROC-AUC 0.700 (95 % CI 0.600–0.800), "
                               "fold mean 0.650 ± 0.100")
    assert lines[-1].startswith("out-of-fold macro AUC 0.700 (95 % CI 0.600–0.800), fold mean 0.650 ± 0.100")


def test_pooled_cis_cost_well_under_a_second_on_a_ctich_sized_set():
    import time

    rng = np.random.default_rng(0)
    pids = rng.integers(0, 82, 2500).astype(str)
    y, p = rng.random((2500, 3)) < 0.03, rng.random((2500, 3))
    t0 = time.perf_counter()
    pooled_cis(y, p, pids, CLASSES, seed=0)
    assert time.perf_counter() - t0 < 5.0          # generous: a shared 2-core CPU


# ------------------------------------------------------------------------------------------------ any
def test_any_is_the_or_of_the_subtypes_on_the_real_ctich_labels(ctich_dir):
    from ichflow.data.ctich import read_ctich

    m, _ = read_ctich(ctich_dir)
    _check_any(m)


def test_any_is_the_or_of_the_subtypes_on_the_phantom_and_folds_stratify_it(synthetic_ctich):
    from ichflow.tasks.multilabel.train import MultilabelRecipe

    recipe = MultilabelRecipe()
    cfg = recipe.checked(MultilabelConfig(dataset="synthetic-ctich", classes="IVH,any", synthetic_patients=12,
                                          synthetic_slices=12, n_folds=3))
    prep = recipe.prepare(cfg)
    _check_any(prep.manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cvf.FoldWarning)
        folds, _ = cvf.cv_folds(prep.manifest, prep.split, ["IVH", "any"], 3)
    plabels = cvf.patient_labels(prep.manifest, ["IVH", "any"])
    assert folds[plabels["any"]].nunique() == 3


def _check_any(m: pd.DataFrame) -> None:
    subtypes = ["IVH", "IPH", "SAH", "EDH", "SDH"]
    derived = with_derived(m, ["IVH", "any"])
    assert derived["any"].notna().all() and derived["any"].sum() > 0
    np.testing.assert_array_equal(derived["any"].to_numpy(int), m[subtypes].to_numpy(int).max(axis=1))
    assert "any" not in with_derived(m.drop(columns="any", errors="ignore"), CLASSES).columns   # only if selected


def test_any_on_a_labels_csv_is_any_listed_class_and_a_csv_column_wins(tmp_path):
    _write_images(tmp_path, ["p1/a.png", "p1/b.png", "p2/a.png"])
    (tmp_path / "labels.csv").write_text("image,IVH,fracture\np1/a.png,0,1\np1/b.png,0,0\np2/a.png,1,0\n")
    m, _, _ = read_labels_csv(tmp_path / "labels.csv")
    assert with_derived(m, ["any"])["any"].tolist() == [1, 0, 1]
    (tmp_path / "own.csv").write_text("image,IVH,any\np1/a.png,0,1\np1/b.png,0,0\np2/a.png,1,0\n")
    m, _, _ = read_labels_csv(tmp_path / "own.csv")
    assert with_derived(m, ["any"])["any"].tolist() == [1, 0, 0]       # the CSV's own column, as given
    phe_like = m.assign(IVH=pd.NA).drop(columns="any")                 # no class labels: nothing to derive
    assert with_derived(phe_like, ["any"])["any"].isna().all()


def test_any_and_rare_subtypes_in_the_folds():
    pattern = _pattern(30)                                               # EDH in 4 patients, SDH in none
    m = with_derived(_manifest(pattern), ["any"])
    split = pd.DataFrame({"patient_id": sorted(pattern), "split": "train", "fold": 0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cvf.FoldWarning)
        folds, _ = cvf.cv_folds(m, split, ["EDH", "SDH", "any"], 5)
    assert sorted(str(w.message).split(" for ")[0] for w in caught) == ["class EDH: 4 positive patient(s)",
                                                                       "class SDH: 0 positive patient(s)"]
    assert folds[cvf.patient_labels(m, ["any"])["any"]].nunique() == 5


def test_class_names_are_checked_against_the_dataset():
    from ichflow.tasks.multilabel.train import MultilabelRecipe

    for dataset in ("ctich", "synthetic-ctich"):
        validate_labels(["IVH", "any"], dataset)
        validate_labels(["EDH", "SDH"], dataset)
        cfg = MultilabelRecipe().checked(MultilabelConfig(dataset=dataset, classes="IVH,any"))
        assert cfg.classes == "IVH,any"
        with pytest.raises(ParameterError, match=r"^parameter classes: \['foo'\] are not subtypes") as err:
            MultilabelRecipe().checked(MultilabelConfig(dataset=dataset, classes="foo"))
        assert "\n" not in str(err.value)
    validate_labels(["foo", "any"], "csv")                               # a labels CSV names its own classes


# ------------------------------------------------------------------------------------------------ labels CSV
def _write_images(folder, names):
    for n in names:
        p = folder / n
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 40), 80, np.uint8)).save(p)


def test_labels_csv_reader_patients_slices_and_extra_classes(tmp_path):
    _write_images(tmp_path, ["p1/s10.png", "p1/s2.png", "p2/a.png"])
    (tmp_path / "labels.csv").write_text("image,IVH,IPH,fracture\np1/s10.png,1,0,1\np1/s2.png,0,0,0\n"
                                         "p2/a.png,0,1,0\np3/gone.png,0,0,0\n")
    m, report, classes = read_labels_csv(tmp_path / "labels.csv")
    assert classes == ["IVH", "IPH", "fracture"]
    assert m["patient_id"].tolist() == ["p1", "p1", "p2"]          # folder = patient
    assert m["slice_index"].tolist() == [0, 1, 0]                 # natural order: s2 before s10
    assert m["IVH"].tolist() == [0, 1, 0] and m["fracture"].tolist() == [0, 1, 0]
    assert m["SAH"].isna().all() and m["has_lesion"].tolist() == [False, True, True]
    assert (m["width"] == 40).all()
    assert [a.kind for a in report.anomalies] == ["missing_image", "patient_from_folder"]
    assert is_labels_csv(str(tmp_path / "labels.csv"), "auto") and not is_labels_csv(str(tmp_path), "auto")


def test_labels_csv_one_folder_and_explicit_patients(tmp_path):
    _write_images(tmp_path, ["ct1.png", "ct2.png", "ct3.png"])
    (tmp_path / "a.csv").write_text("image,IVH,IPH,SAH\nct1.png,1,0,1\nct2.png,0,1,0\nct3.png,0,0,0\n")
    m, report, _ = read_labels_csv(tmp_path / "a.csv")
    assert m["patient_id"].nunique() == 3 and report.of_kind("one_patient_per_image")
    (tmp_path / "b.csv").write_text("image,patient_id,slice_index,IVH\nct1.png,7,3,1\nct2.png,7,1,0\nct3.png,8,1,0\n")
    m, report, classes = read_labels_csv(tmp_path / "b.csv")
    assert classes == ["IVH"] and m["patient_id"].tolist() == ["7", "7", "8"] and m["slice_index"].tolist() == [1, 3, 1]


def test_labels_csv_bad_input_names_the_file_and_problem(tmp_path):
    _write_images(tmp_path, ["ct1.png"])
    cases = {"nohead.csv": ("file,IVH\nct1.png,1\n", "no 'image' column"),
             "value.csv": ("image,IVH\nct1.png,2\n", "column 'IVH', data row 2: value '2' is not 0 or 1"),
             "noclass.csv": ("image\nct1.png\n", "no class columns"),
             "gone.csv": ("image,IVH\nnope.png,1\n", "none of the listed images exists")}
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=msg) as err:
            read_labels_csv(tmp_path / name)
        assert name in str(err.value)
    (tmp_path / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "trunc.csv").write_text("image,IVH\ntrunc.png,1\n")
    with pytest.raises(DataError, match="trunc.png"):
        read_labels_csv(tmp_path / "trunc.csv")


def test_bad_parameters_are_rejected(synthetic_phe):
    for change, msg in (({"sampler": "smote"}, "parameter sampler: must be one of none, balanced"),
                        ({"final_model": "ensemble"}, "parameter final_model"),
                        ({"n_folds": 2}, "parameter n_folds: must be at least 3"),
                        ({"pos_weight": "5"}, "parameter pos_weight"), ({"classes": " , "}, "parameter classes"),
                        ({"threshold_goal": "auc"}, "parameter threshold_goal"),
                        ({"model": "nope"}, "parameter model"),
                        ({"pos_weight_multipliers": "1,2"}, "2 values for 3 classes")):
        with pytest.raises(ParameterError, match=msg):
            train_multilabel(dataclasses.replace(MultilabelConfig(), **change))
    with pytest.raises(ParameterError, match="parameter dataset: .*no subtype labels"):
        train_multilabel(MultilabelConfig(dataset="synthetic", synthetic_patients=12))


@pytest.mark.parametrize("args, name", [(["--n_folds", "1"], "n_folds"),
                                        (["--dataset", "ctich", "--classes", "foo"], "classes")])
def test_a_bad_parameter_on_the_command_line_is_one_error_line_and_exit_2(args, name):
    proc = subprocess.run([sys.executable, "pipelines/multilabel.py", *args],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: parameter {name}:"), proc.stderr


# ------------------------------------------------------------------------------------------------ runs
TINY = MultilabelConfig(synthetic_patients=12, n_folds=3, image_size=64, epochs=1, patience=1, batch_size=8,
                        num_workers=0)


@pytest.mark.slow
def test_cv_run_has_one_child_per_fold_aggregates_on_the_parent_and_a_registered_model(synthetic_ctich):
    result = train_multilabel(dataclasses.replace(TINY, scan_context="auto"))
    client = mlflow.MlflowClient()
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["fold-0", "fold-1", "fold-2"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert "heldout_macro_auc" in run_metrics(child) and "val_macro_auc" in run_metrics(child)
        assert [h.step for h in client.get_metric_history(child.info.run_id, mlflow_key("train_loss"))] == [0]
        # the scan context is chosen per fold on its inner validation, never on its held-out fold
        assert child.data.params["scan_context_used"] in sc.SCAN_CONTEXT
        assert {f"val_macro_auc_scan_context_{c}" for c in sc.SCAN_CONTEXT} <= set(run_metrics(child))
    m = run_metrics(parent)
    for key in ("cv_macro_auc", "cv_macro_auc_sd", "cv_IVH_roc_auc", "cv_IPH_f1", "cv_micro_f1", "test_macro_auc",
                "test_macro_f1", "val_macro_auc", "oof_macro_auc", "support_IVH_slices", "support_SAH_patients",
                "oof_macro_auc_ci_low", "oof_macro_auc_ci_high", "oof_IVH_roc_auc_ci_low", "oof_SAH_pr_auc_ci_high"):
        assert key in m, key
    assert m["oof_macro_auc_ci_low"] <= m["oof_macro_auc"] <= m["oof_macro_auc_ci_high"]
    held = [run_metrics(c)["heldout_macro_auc"] for c in children]
    assert m["cv_macro_auc"] == pytest.approx(np.mean(held))
    assert result["objective"] == m["val_macro_auc"] and result["objective_name"] == "val_macro_auc"
    assert result["folds"] == 3 and result["fold_source"] in ("split.fold", "stratified")
    assert result["test_macro_auc"] == result["cv_macro_auc"] and "oof_macro_auc" in result
    assert result["final_model"] == parent.data.tags["ichflow.final_model"]
    assert isinstance(result["model_version"], int) and result["epochs_run"] == 1
    folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                            artifact_path="eval/cv_folds.csv"),
                        dtype={"patient_id": str})
    assert folds["patient_id"].is_unique and len(folds) == 12 and sorted(folds["fold"].unique()) == [0, 1, 2]
    arts = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/oof_multilabel_confusion.png", "figures/oof_cooccurrence.png"} <= arts
    evals = {f.path for f in client.list_artifacts(parent.info.run_id, "eval")}
    assert {"eval/oof_predictions.csv", "eval/cv_fold_metrics.csv", "eval/cv_support_per_fold.csv",
            "eval/cv_summary.md"} <= evals
    summary = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/eval/cv_summary.md")
    assert "| class | slices | patients | ROC-AUC, out-of-fold |" in summary and "95 % CI" in summary
    assert parent.data.tags["ichflow.final_model"].startswith("fold-")

    loaded = mlflow.pyfunc.load_model(f"models:/ich-subtypes/{result['model_version']}")
    out = loaded.predict((np.random.default_rng(0).random((3, 300, 300)) * 255).astype(np.uint8))
    assert list(out.columns) == ["IVH_probability", "IVH", "IPH_probability", "IPH", "SAH_probability", "SAH"]
    assert len(out) == 3


@pytest.mark.slow
def test_tuning_trial_on_a_labels_csv_keeps_test_patients_out(synthetic_ctich, tmp_path):
    from ichflow.prepare import DataConfig, prepare_data

    prep = prepare_data(DataConfig(dataset="synthetic-ctich"))
    m = prep.manifest
    csv = m[["image_path", "patient_id", "slice_index", "IVH", "IPH", "SAH"]].rename(columns={"image_path": "image"})
    csv.to_csv(tmp_path / "labels.csv", index=False)
    steps = []
    cfg = dataclasses.replace(TINY, dataset="csv", data_dir=str(tmp_path / "labels.csv"), evaluate_test=False,
                              register=False, pos_weight_multipliers="1,2,0.5", sampler="balanced",
                              steps_per_epoch=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cvf.FoldWarning)
        result = train_multilabel(cfg, on_epoch_end=lambda step, metrics: steps.append((step, metrics)))
    assert [s for s, _ in steps] == [0, 1, 2]                       # one global step per fold epoch
    assert all("val_macro_auc" in met for _, met in steps)
    assert "model_version" not in result and "model_uri" not in result
    assert not any(k.startswith("test_") for k in result)
    run = mlflow.get_run(result["run_id"])
    assert run.data.params["reader"] == "csv"
    folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result["run_id"],
                                                            artifact_path="eval/cv_folds.csv"),
                        dtype={"patient_id": str})
    split = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="data/split.csv"),
                        dtype={"patient_id": str})
    test_ids = set(split.loc[split["split"] == "test", "patient_id"])
    assert test_ids and not test_ids & set(folds["patient_id"])


@pytest.mark.slow
def test_an_any_head_trains_next_to_a_subtype(synthetic_ctich):
    result = train_multilabel(dataclasses.replace(TINY, classes="IVH,any", register=False))
    m = run_metrics(mlflow.get_run(result["run_id"]))
    for key in ("oof_any_roc_auc", "oof_any_roc_auc_ci_low", "oof_any_pr_auc_ci_high", "cv_any_roc_auc",
                "support_any_patients"):
        assert key in m, key
    assert m["support_any_patients"] >= m["support_IVH_patients"]


@pytest.mark.slow
def test_repeated_cv_runs_every_fold_of_every_repeat_and_logs_the_spread(synthetic_ctich):
    result = train_multilabel(dataclasses.replace(TINY, cv_repeats=2, register=False))
    client = mlflow.MlflowClient()
    parent = client.get_run(result["run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == [f"repeat-{r}-fold-{k}" for r in (0, 1) for k in (0, 1, 2)]
    m = run_metrics(parent)
    for key in ("oof_macro_auc", "oof_macro_auc_ci_low", "oof_macro_auc_repeat_mean", "oof_macro_auc_repeat_sd",
                "oof_IVH_roc_auc_repeat_mean"):
        assert key in m, key
    folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                            artifact_path="eval/cv_folds.csv"),
                        dtype={"patient_id": str})
    assert sorted(folds["repeat"].unique()) == [0, 1] and len(folds) == 24
    assert folds.groupby("repeat")["patient_id"].apply(lambda ids: ids.is_unique).all()
    oof = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                          artifact_path="eval/oof_predictions.csv"))
    assert len(oof) == m["support_slices"]                   # each slice once: its repeats averaged
