"""``evaluate``: a registered model on a labelled data folder, as a hospital checks it on its own data.

Real tiny models trained on the synthetic phantom. On the test patients of the default split, the evaluate
run reproduces the training run's test metrics (eval_* == test_*); on all patients it scores every patient;
promotion re-evaluates a champion tested on other data on the candidate's test split.
"""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from ichflow.data.images import read_gray
from ichflow.errors import DataError
from ichflow.evaluation import EvaluateConfig, run_evaluate
from ichflow.data.splits import subset
from ichflow.metric_names import run_metrics
from ichflow.prepare import DataConfig, prepare_data
from ichflow.registry import PromoteConfig, load_rule, run_promote
from ichflow.tasks.spec import DEGENERATE_TAG, TASKS

REPO = Path(__file__).resolve().parents[1]
# metrics of the training run the served model cannot reproduce: the loss needs logits (pyfunc: probabilities)
NOT_REPRODUCED = {"loss"}


SEG_TINY = dict(epochs=1, steps_per_epoch=2, batch_size=4, patch_size=64, num_workers=0, eval_batch_size=4, tta="none")


@pytest.fixture(scope="module")
def store(shared_store):
    """This module evaluates the session's tiny models: it works in their store (and sets the aliases it needs)."""
    return shared_store


@pytest.fixture(scope="module")
def seg(store, tiny_model):
    return tiny_model("segmentation")


def _prefixed(metrics: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in metrics.items() if k.startswith(prefix + "_")}


def _assert_reproduces(train_run, eval_run, ignore=NOT_REPRODUCED, rel=1e-6):
    test = {k: v for k, v in _prefixed(run_metrics(train_run), "test").items() if k not in ignore}
    ev = _prefixed(run_metrics(eval_run), "eval")
    assert set(test) <= set(ev), sorted(set(test) - set(ev))
    for key, value in test.items():
        assert ev[key] == pytest.approx(value, rel=rel, abs=1e-9), key
    return test, ev


@pytest.mark.slow
def test_segmentation_on_the_test_split_reproduces_the_training_test_metrics(seg):
    uri = f"models:/ich-segmentation/{seg['model_version']}"
    res = run_evaluate(EvaluateConfig(model_uri=uri, patients="test"))
    client = mlflow.MlflowClient()
    run, train = client.get_run(res["run_id"]), client.get_run(seg["run_id"])
    test, ev = _assert_reproduces(train, run)
    assert {"dice", "dice_ci_low", "dice_pooled", "sensitivity", "volume_abs_err_ml", "slice_f1"} <= set(test)
    assert res["eval_dice"] == pytest.approx(seg["test_dice"])
    # provenance: the model, its task, the data and the split (the training run's digest: same test patients)
    p = run.data.params
    assert p["model_uri"] == uri and p["model_version"] == str(seg["model_version"])
    assert p["model_run_id"] == seg["run_id"] and p["task"] == "segmentation" and p["patients"] == "test"
    assert p["split_digest"] == train.data.params["split_digest"] == run.data.tags["ichflow.split_digest"]
    assert p["data_root"] == train.data.params["data_root"]
    contexts = {next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in run.inputs.dataset_inputs}
    assert "evaluation" in contexts
    # the task's figures and per-patient table, identical to the training run's test table
    arts = {a.path for folder in ("figures", "eval") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"figures/eval_pixel_confusion.png", "figures/eval_overlays.png", "eval/eval_per_patient.csv",
            "eval/eval_metrics.json"} <= arts
    mine = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                           artifact_path="eval/eval_per_patient.csv"))
    theirs = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=train.info.run_id,
                                                             artifact_path="eval/test_per_patient.csv"))
    pd.testing.assert_frame_equal(mine, theirs)


def _script_env(store):
    """The environment of a user's shell: this store, no experiment chosen."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.slow
def test_all_patients_through_the_champion_alias(seg, store):
    """The entry script run directly on other data (a 5-patient phantom): every patient, the model found by its
    alias, the run in experiment ichflow-evaluate."""
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("ich-segmentation", "champion", str(seg["model_version"]))
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--model_uri",
                           "models:/ich-segmentation@champion", "--patients", "all", "--synthetic_patients", "5"],
                          env=_script_env(store), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ich-segmentation v{seg['model_version']}" in proc.stdout and "5 patients" in proc.stdout
    exp = client.get_experiment_by_name("ichflow-evaluate")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
    prep = prepare_data(DataConfig(synthetic_patients=5))
    assert run_metrics(run)["eval_n_patients"] == prep.manifest["patient_id"].nunique() == 5
    assert run.data.params["model_version"] == str(seg["model_version"]) and run.data.params["patients"] == "all"
    assert run.data.params["evaluated_slices"] == str(len(prep.manifest))
    assert run.data.tags["ichflow.task"] == "evaluate"
    assert 0.0 <= run_metrics(run)["eval_dice"] <= 1.0


class _NotOurs(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def test_bad_model_uri_and_foreign_models_give_clear_errors(store):
    with pytest.raises(DataError, match="parameter model_uri: cannot load 'models:/no-such-model/1'"):
        run_evaluate(EvaluateConfig(model_uri="models:/no-such-model/1"))
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(name="model", python_model=_NotOurs(), pip_requirements=["mlflow"])
    with pytest.raises(DataError, match="is not an ichflow model"):
        run_evaluate(EvaluateConfig(model_uri=f"runs:/{run.info.run_id}/model"))
    with pytest.raises(DataError, match="parameter patients"):
        run_evaluate(EvaluateConfig(model_uri=f"runs:/{run.info.run_id}/model", patients="train"))
    # the entry script: one line on stderr and exit code 2
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--model_uri", "models:/nope@x"],
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: parameter model_uri: cannot load 'models:/nope@x'" in proc.stderr


@pytest.mark.slow
def test_segmentation_model_on_data_without_masks_is_refused(seg, synthetic_ctich):
    with pytest.raises(DataError, match="needs PHE edema masks"):
        run_evaluate(EvaluateConfig(model_uri=f"models:/ich-segmentation/{seg['model_version']}",
                                    dataset="synthetic-ctich"))


@pytest.mark.slow
def test_mlflow_run_evaluate_entry_point(seg, store):
    env = _script_env(store)
    env["MLFLOW_EXPERIMENT_NAME"] = "evaluate-cli"
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "evaluate", "--env-manager", "local",
           "-P", f"model_uri=models:/ich-segmentation/{seg['model_version']}", "-P", "patients=test"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[evaluate] segmentation model ich-segmentation v" in proc.stdout
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("evaluate-cli").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert run_metrics(runs[0])["eval_dice"] == pytest.approx(seg["test_dice"])


@pytest.mark.slow
def test_a_champion_from_another_split_is_compared_only_on_patients_it_did_not_train_on(seg, tmp_path):
    """Both models are re-evaluated on the candidate's validation patients outside the champion's training split."""
    from ichflow.tasks.segmentation import SegmentationConfig, train_segmentation

    client = mlflow.MlflowClient()
    client.set_registered_model_alias("ich-segmentation", "champion", str(seg["model_version"]))
    other = DataConfig(split_seed=8, val_fraction=0.5)
    cand = train_segmentation(SegmentationConfig(**SEG_TINY, split_seed=8, val_fraction=0.5))
    for run_id in (cand["run_id"], seg["run_id"]):   # this test is about the comparison, not the gate
        if DEGENERATE_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, DEGENERATE_TAG)
    rule = tmp_path / "rule.py"
    rule.write_text('PRIMARY = "val_dice"\nMARGIN = -1.0\nGUARDS = {}\nFLOOR = {}\n')
    champ_prep, cand_prep = prepare_data(DataConfig()), prepare_data(other)
    unseen = (set(subset(cand_prep.manifest, cand_prep.split, "val")["patient_id"])
              - set(subset(champ_prep.manifest, champ_prep.split, "train")["patient_id"]))
    assert len(unseen) >= 2 and cand_prep.split_digest != champ_prep.split_digest

    decision = run_promote(PromoteConfig(task="segmentation", run_id=cand["run_id"], rule=str(rule)))
    assert decision.compared_on.startswith(f"{len(unseen)} validation patients of the candidate")
    promote_run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                     f"params.candidate_run_id = '{cand['run_id']}'")[0]
    children = client.search_runs([promote_run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{promote_run.info.run_id}'")
    assert len(children) == 2 and {c.data.params["evaluated_patients"] for c in children} == {str(len(unseen))}
    by_version = {c.data.params["model_version"]: run_metrics(c) for c in children}
    assert decision.champion_metrics["val_dice"] == pytest.approx(by_version[str(seg["model_version"])]["eval_dice"])
    assert decision.candidate_metrics["val_dice"] == pytest.approx(
        by_version[decision.candidate_version]["eval_dice"])
    assert decision.deltas["val_dice"] == pytest.approx(
        decision.candidate_metrics["val_dice"] - decision.champion_metrics["val_dice"])

    # the other way round: the first model's validation patients outside the new champion's training split
    client.set_registered_model_alias("ich-segmentation", "champion", decision.candidate_version)
    back = (set(subset(champ_prep.manifest, champ_prep.split, "val")["patient_id"])
            - set(subset(cand_prep.manifest, cand_prep.split, "train")["patient_id"]))
    again = run_promote(PromoteConfig(task="segmentation", run_id=seg["run_id"], rule=str(rule)))
    if len(back) >= 2:
        assert again.compared_on.startswith(f"{len(back)} validation patients of the candidate")
    else:   # fewer than two patients neither trained on: refused, never compared on trained-on patients
        assert again.decision == "rejected" and again.reason.startswith("not comparable with the champion")


# ------------------------------------------------------------------ the other tasks: one tiny model each
@pytest.mark.slow
@pytest.mark.parametrize("name", ["classification", "detection-fasterrcnn"])
def test_other_tasks_on_the_test_split_reproduce_the_training_test_metrics(store, tiny_model, name):
    trained = tiny_model(name)
    model_name = TASKS[name.split("-")[0]].registered_name
    res = run_evaluate(EvaluateConfig(model_uri=f"models:/{model_name}/{trained['model_version']}", patients="test"))
    client = mlflow.MlflowClient()
    run = client.get_run(res["run_id"])
    test, _ = _assert_reproduces(client.get_run(trained["run_id"]), run)
    rule = load_rule(run.data.params["task"])
    assert {k[len("test_"):] for k in rule["report"]} <= set(test)   # what the model page reports is reproduced
    figs = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert any("confusion" in f and "eval" in f for f in figs), figs
    if name.startswith("detection"):
        # the served model scores every test slice with the bits the training run did (same resize, same
        # batches), so a near-threshold slice cannot flip between the two
        def scores(run_id, split):
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"eval/{split}_slices.csv")
            return pd.read_csv(path)["max_score"].to_numpy()

        np.testing.assert_array_equal(scores(run.info.run_id, "eval"), scores(trained["run_id"], "test"))


@pytest.mark.slow
def test_subtype_model_on_the_test_split(store, tiny_model):
    """The subtype model (trained by CV on the CT-ICH-like phantom) on the test patients of its data."""
    trained = tiny_model("multilabel")
    uri = f"models:/ich-subtypes/{trained['model_version']}"
    res = run_evaluate(EvaluateConfig(model_uri=uri, patients="test", n_folds=3))
    client = mlflow.MlflowClient()
    run, train = client.get_run(res["run_id"]), client.get_run(trained["run_id"])
    assert run.data.params["split_digest"] == train.data.tags["ichflow.prepare_split_digest"]
    m = run_metrics(run)
    # the metrics the model page reports, under the training run's names (there: mean over CV folds), per class,
    # support, CIs
    rule = load_rule("multilabel")
    for key in (*rule["report"], "test_micro_f1", "test_micro_auc"):
        assert key in run_metrics(train) and "eval_" + key[len("test_"):] in m, key
    for c in ("IVH", "IPH", "SAH"):
        assert f"eval_{c}_precision" in m and f"eval_{c}_threshold" in m and f"eval_support_{c}_slices" in m
    assert {"eval_macro_auc_ci_low", "eval_macro_auc_ci_high", "eval_support_patients"} <= set(m)
    figs = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/eval_multilabel_confusion.png", "figures/eval_cooccurrence.png"} <= figs
    # the logged predictions are the served model's, scan by scan
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                            artifact_path="eval/eval_predictions.csv"),
                        dtype={"patient_id": str})
    assert table["patient_id"].nunique() == m["eval_support_patients"]
    cfg = TASKS["multilabel"].config_class()()   # the tiny model trains on the task's default phantom
    prep = prepare_data(DataConfig(dataset="synthetic-ctich", synthetic_patients=cfg.synthetic_patients,
                                   synthetic_slices=cfg.synthetic_slices, n_folds=3))
    pid = table["patient_id"].iloc[0]
    scan = prep.manifest[prep.manifest["patient_id"] == pid].sort_values("slice_index")
    served = mlflow.pyfunc.load_model(uri).predict(np.stack([read_gray(p) for p in scan["image_path"]]))
    np.testing.assert_allclose(table.loc[table["patient_id"] == pid, "IVH_probability"].to_numpy(),
                               served["IVH_probability"].to_numpy(), rtol=1e-6)
