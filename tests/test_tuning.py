"""Optuna studies: child runs per trial with mirrored states, pruning, resume, two worker processes.

Trials train the real classification task on the synthetic phantom at a tiny size (64², 2 epochs).
"""

import dataclasses
import textwrap

import mlflow
import optuna
import pytest

from ichflow.metric_names import run_metrics
from ichflow.tasks.spec import TASKS
from ichflow.tuning import TuneConfig, load_space, open_storage, run_tune, shares

TINY = "image_size=64,epochs=2,batch_size=16,n_boot=0,gradcam_per_group=0,in_channels=1"


def _children(parent_run_id):
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def _parent_of_last_tune():
    client = mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, "tags.`ichflow.task` = 'tune'", order_by=["attributes.start_time DESC"])[0]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_search_spaces_sample_within_their_own_bounds_and_name_real_parameters(task):
    """Every sampled value lies in the distribution the space declared; every returned key is a task parameter."""
    space = load_space(task)
    fields = {f.name for f in dataclasses.fields(TASKS[task].config_class())}
    assert set(space.FIXED) <= fields
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = space.suggest(trial)
        assert set(params) <= fields, f"{task}: suggest() returns names that are not parameters"
        study.tell(trial, 0.0)
        frozen = study.trials[-1]
        assert frozen.distributions, f"{task}: the space suggested nothing"
        for name, dist in frozen.distributions.items():
            value = frozen.params[name]
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                assert value in dist.choices
            else:
                assert dist.low <= value <= dist.high, (name, value, dist)
    assert space.MONITOR == TASKS[task].objective  # the pruner watches what the task selects on


def test_shares_sum_exactly():
    assert shares(12, 5) == [3, 3, 2, 2, 2] and sum(shares(7, 2)) == 7


@pytest.fixture()
def states_space(tmp_path):
    """A real search space file with a real Optuna pruner: trial 1 fails (invalid param), trial 2 is pruned."""
    path = tmp_path / "space.py"
    path.write_text(textwrap.dedent('''
        import optuna

        MONITOR = "val_roc_auc"
        FIXED = {}

        class PruneTrialTwo(optuna.pruners.BasePruner):
            def prune(self, study, trial):
                return trial.number == 2

        PRUNER = PruneTrialTwo

        def suggest(trial):
            params = {"lr": trial.suggest_float("lr", 1e-3, 3e-3, log=True)}
            if trial.number == 1:
                params["imbalance"] = "not-a-strategy"   # the task rejects it: the trial fails
            return params
    '''))
    return str(path)


@pytest.mark.slow
def test_states_mirrored_resume_and_refit(states_space, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = TuneConfig(task="classification", n_trials=3, study_name="states", storage=storage, space=states_space,
                     overrides=TINY, refit_best=True)
    result = run_tune(cfg)
    assert (result["trials_complete"], result["trials_failed"], result["trials_pruned"]) == (1, 1, 1)
    assert result["trial_epochs_saved_by_pruning"] == 1  # pruned after epoch 0 of 2
    parent = _parent_of_last_tune()
    children = _children(parent.info.run_id)
    by_trial = {c.data.tags.get("optuna.trial"): c for c in children if "optuna.trial" in c.data.tags}
    assert {k: (c.data.tags["optuna.state"], c.info.status) for k, c in by_trial.items()} == {
        "0": ("COMPLETE", "FINISHED"), "1": ("FAIL", "FAILED"), "2": ("PRUNED", "KILLED")}
    assert "val_roc_auc" in run_metrics(by_trial["0"]) and "test_roc_auc" not in run_metrics(by_trial["0"])
    # the comparison view sorts trials on one metric, `objective` (a pruned trial: Optuna's value, its last report)
    study = optuna.load_study(study_name="states", storage=open_storage(storage))
    for number in ("0", "2"):
        assert run_metrics(by_trial[number])["objective"] == pytest.approx(study.trials[int(number)].value)
    assert parent.data.params["best_trial"] == str(study.best_trial.number) == "0"
    assert run_metrics(parent)["best_value"] == pytest.approx(study.best_value)
    refit = mlflow.MlflowClient().get_run(parent.data.tags["ichflow.best_run_id"])
    assert refit.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "test_roc_auc" in run_metrics(refit)  # the test split is touched once: by the refit of the best
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "study")}
    assert {"study/trials.csv", "study/optimization_history.png"} <= artifacts
    # resume: same study name + storage adds trials to the same study
    run_tune(TuneConfig(task="classification", n_trials=1, study_name="states", storage=storage,
                        space=states_space, overrides=TINY, refit_best=False))
    study = optuna.load_study(study_name="states", storage=open_storage(storage))
    assert len(study.trials) == 4


@pytest.mark.slow
def test_two_worker_processes_share_one_study(tmp_path):
    storage = f"journal:{tmp_path / 'study.journal'}"
    cfg = TuneConfig(task="classification", n_trials=4, n_workers=2, study_name="pair", storage=storage,
                     overrides=TINY + ",epochs=1", refit_best=False, pruner="none")
    result = run_tune(cfg)
    study = optuna.load_study(study_name="pair", storage=open_storage(storage))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3]
    assert result["trials_complete"] == 4
    parent = _parent_of_last_tune()
    children = _children(parent.info.run_id)
    run_ids = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert {c.info.run_id for c in children} == run_ids  # every trial is a child of this parent, none lost


@pytest.mark.slow
def test_detection_conf_threshold_is_chosen_on_trial_predictions_without_retraining(tmp_path):
    """YOLO's confidence threshold is no search dimension: each trial trains once, picks the threshold on
    its own val predictions, and the refit of the best trial is given that threshold (its one training)."""
    storage = f"journal:{tmp_path / 'det.journal'}"
    tiny = "engine=yolo,imgsz=64,epochs=1,batch_size=8,overlays=0,num_workers=0"
    result = run_tune(TuneConfig(task="detection", n_trials=2, study_name="det-conf", storage=storage,
                                 overrides=tiny, pruner="none", refit_best=True))
    study = optuna.load_study(study_name="det-conf", storage=open_storage(storage))
    for trial in study.trials:
        assert "conf_threshold" not in trial.params           # not searched: no training per threshold
        assert 0.0 < trial.user_attrs["best_conf_threshold"] <= 1.0
    parent = _parent_of_last_tune()
    children = _children(parent.info.run_id)
    assert len(children) == 2 + 1                              # two trials + the refit: one training each
    trial_runs = [c for c in children if "optuna.trial" in c.data.tags]
    assert all(run_metrics(c)["epochs_run"] == 1 for c in trial_runs)
    refit = mlflow.MlflowClient().get_run(result["refit"]["run_id"])
    best = study.best_trial.user_attrs["best_conf_threshold"]
    assert float(refit.data.params["conf_threshold"]) == pytest.approx(best)
    assert float(refit.data.params["conf_threshold_used"]) == pytest.approx(best, abs=1e-6)


def test_every_finished_trial_prints_one_line_with_the_best_so_far(capsys):
    from ichflow.tuning import best_so_far_line

    study = optuna.create_study(direction="maximize")
    values = iter([0.2, 0.5, 0.1])

    def objective(trial):
        value = next(values)
        if value < 0.15:
            raise optuna.TrialPruned()
        return value

    study.optimize(objective, n_trials=3, callbacks=[best_so_far_line])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["[tune] trial 0 complete 0.2000; best so far 0.2000 (trial 0)",
                     "[tune] trial 1 complete 0.5000; best so far 0.5000 (trial 1)",
                     "[tune] trial 2 pruned; best so far 0.5000 (trial 1)"]
