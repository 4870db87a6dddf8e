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
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.multilabel import MultilabelConfig, train_multilabel
from ichflow.tasks.multilabel import folds as cvf
from ichflow.tasks.multilabel.labels_csv import is_labels_csv, read_labels_csv
from ichflow.tasks.multilabel.metrics import aggregate, multilabel_metrics, support
from ichflow.tasks.multilabel.config import parse_classes, parse_multipliers

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


def test_a_bad_parameter_on_the_command_line_is_one_error_line_and_exit_2():
    proc = subprocess.run([sys.executable, "pipelines/multilabel.py", "--n_folds", "1"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: parameter n_folds:"), proc.stderr


# ------------------------------------------------------------------------------------------------ runs
TINY = MultilabelConfig(synthetic_patients=12, n_folds=3, image_size=64, epochs=1, patience=1, batch_size=8,
                        num_workers=0)


@pytest.mark.slow
def test_cv_run_has_one_child_per_fold_aggregates_on_the_parent_and_a_registered_model(synthetic_ctich):
    result = train_multilabel(TINY)
    client = mlflow.MlflowClient()
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["fold-0", "fold-1", "fold-2"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert "heldout_macro_auc" in child.data.metrics and "val_macro_auc" in child.data.metrics
        assert [h.step for h in client.get_metric_history(child.info.run_id, "train_loss")] == [0]
    m = parent.data.metrics
    for key in ("cv_macro_auc", "cv_macro_auc_sd", "cv_IVH_roc_auc", "cv_IPH_f1", "cv_micro_f1", "test_macro_auc",
                "test_macro_f1", "val_macro_auc", "oof_macro_auc", "support_IVH_slices", "support_SAH_patients"):
        assert key in m, key
    held = [c.data.metrics["heldout_macro_auc"] for c in children]
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
