"""Promotion: the gate (floors, degenerate models), rule decisions on validation metrics, alias moves, the audit
trail in the UI (tags, descriptions), idempotent registration, racing promotions.

Uses a real MLflow registry (sqlite) with small real pyfunc models standing in for trained candidates.
"""

import multiprocessing as mp
import os

import mlflow
import pytest

from ichflow.errors import ParameterError
from ichflow.registry import decide, gate, load_rule, promote, promotion_history
from ichflow.tasks.spec import DEGENERATE_TAG, TASKS

RULE = {"primary": "val_roc_auc", "margin": 0.01, "guards": {"val_recall": 0.02}, "floor": {"val_roc_auc": 0.6}}


class Constant(mlflow.pyfunc.PythonModel):
    def __init__(self, value):
        self.value = value

    def predict(self, context, model_input, params=None):
        return [self.value] * len(model_input)


def _candidate(auc, recall, digest="d1", register=True, test_f1=0.5, degenerate=""):
    """A classification run as the training leaves it: val metrics decide, test metrics are reported."""
    with mlflow.start_run(run_name=f"cand-{auc}") as run:
        mlflow.set_tags({"ichflow.split_digest": digest, "ichflow.task": "classification"})
        if degenerate:
            mlflow.set_tag(DEGENERATE_TAG, degenerate)
        mlflow.log_metrics({"val_roc_auc": auc, "val_recall": recall, "test_f1": test_f1,
                            "test_f1_ci_low": test_f1 - 0.1, "test_f1_ci_high": test_f1 + 0.05})
        mlflow.pyfunc.log_model(name="model", python_model=Constant(auc),
                                registered_model_name="ich-classification" if register else None,
                                pip_requirements=["mlflow"])
    return run.info.run_id


@pytest.mark.parametrize("cand,champ,expected", [
    ({"val_roc_auc": 0.90, "val_recall": 0.9}, None, True),
    ({"val_roc_auc": 0.92, "val_recall": 0.9}, {"val_roc_auc": 0.90, "val_recall": 0.9}, True),
    ({"val_roc_auc": 0.905, "val_recall": 0.9}, {"val_roc_auc": 0.90, "val_recall": 0.9}, False),   # within margin
    ({"val_roc_auc": 0.85, "val_recall": 0.9}, {"val_roc_auc": 0.90, "val_recall": 0.9}, False),    # worse
    ({"val_roc_auc": 0.95, "val_recall": 0.85}, {"val_roc_auc": 0.90, "val_recall": 0.9}, False),   # guard
    ({"val_roc_auc": 0.95, "val_recall": 0.89}, {"val_roc_auc": 0.90, "val_recall": 0.9}, True),    # within tol
])
def test_decide(cand, champ, expected):
    promoted, reason, _ = decide(RULE, cand, champ)
    assert promoted is expected, reason


def test_gate_stops_degenerate_and_below_floor_candidates_first():
    assert gate(RULE, {"val_roc_auc": 0.99}, degenerate="near-constant scores") == (
        "degenerate", "degenerate model: near-constant scores")
    assert gate(RULE, {"val_roc_auc": 0.55}) == ("below_floor", "val_roc_auc 0.550 < floor 0.6")
    assert gate(RULE, {}) == ("below_floor", "val_roc_auc missing < floor 0.6")
    assert gate(RULE, {"val_roc_auc": 0.6}) is None


def test_rules_of_every_task_decide_on_validation_with_a_floor():
    for task, spec in TASKS.items():
        rule = load_rule(task)
        prefix = "oof_" if spec.cross_validated else "val_"
        assert rule["primary"].startswith(prefix) and rule["margin"] >= 0, task
        assert all(k.startswith(prefix) for k in [*rule["guards"], *rule["floor"]]), task
        assert rule["floor"] and all(0 < v < 1 for v in rule["floor"].values()), task
        assert rule["report"] and all(k.startswith("test_") for k in rule["report"]), task


def test_a_rule_deciding_on_the_test_split_is_refused(tmp_path):
    path = tmp_path / "rule.py"
    path.write_text('PRIMARY = "test_dice"\nMARGIN = 0.0\n')
    with pytest.raises(ParameterError, match="test metric; the test split never decides"):
        load_rule("segmentation", str(path))


@pytest.fixture()
def fresh_registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    session_uri = os.environ["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("Default")  # the fluent API caches an experiment id of the previous store
    yield uri
    mlflow.set_tracking_uri(session_uri)  # later tests (and their subprocesses) use the session store again
    mlflow.set_experiment("Default")


def test_alias_moves_audit_and_no_duplicate_versions(fresh_registry):
    client = mlflow.MlflowClient()
    first = _candidate(0.80, 0.90)
    d1 = promote("classification", first)
    assert d1.promoted and d1.reason == "no champion yet" and d1.decision == "promoted"
    better = _candidate(0.88, 0.91)
    d2 = promote("classification", better)
    assert d2.promoted and d2.champion_version == d1.candidate_version
    assert str(client.get_model_version_by_alias("ich-classification", "champion").version) == d2.candidate_version
    assert str(client.get_model_version_by_alias("ich-classification", "previous").version) == d1.candidate_version
    worse = _candidate(0.70, 0.95)
    d3 = promote("classification", worse)
    assert not d3.promoted and d3.decision == "rejected"
    assert str(client.get_model_version_by_alias("ich-classification", "challenger").version) == d3.candidate_version
    assert str(client.get_model_version_by_alias("ich-classification", "champion").version) == d2.candidate_version
    # promoting the same run again registers nothing new
    n_versions = len(client.search_model_versions("name='ich-classification'"))
    promote("classification", worse)
    assert len(client.search_model_versions("name='ich-classification'")) == n_versions
    history = promotion_history("ich-classification")
    assert [h["promoted"] for h in history] == [True, True, False, False]
    last = history[2]
    assert last["champion_metrics"]["val_roc_auc"] == 0.88 and last["candidate_metrics"]["val_roc_auc"] == 0.70
    assert last["deltas"]["val_roc_auc"] == pytest.approx(-0.18)
    assert last["split_digest"] == "d1" and last["candidate_run_id"] == worse and last["time"]


def test_the_test_split_does_not_decide(fresh_registry):
    promote("classification", _candidate(0.80, 0.9, test_f1=0.95))
    better_on_val = _candidate(0.86, 0.9, test_f1=0.60)     # worse on test, better on validation
    decision = promote("classification", better_on_val)
    assert decision.promoted and decision.report_metrics["test_f1"] == 0.60
    assert "test_f1" not in decision.candidate_metrics and "test_f1" not in decision.deltas


@pytest.mark.parametrize("kind,cand", [("below_floor", dict(auc=0.55, recall=0.9)),
                                       ("degenerate", dict(auc=0.99, recall=1.0,
                                                           degenerate="every val slice called positive"))])
def test_a_gated_candidate_is_registered_without_any_alias(fresh_registry, kind, cand, capsys):
    from ichflow.registry import console_line

    client = mlflow.MlflowClient()
    decision = promote("classification", _candidate(**cand))      # even the first candidate: no champion
    assert not decision.promoted and decision.decision == kind
    version = client.get_model_version("ich-classification", decision.candidate_version)
    assert version.aliases == [] and version.tags["ichflow.decision"] == kind
    assert version.tags["ichflow.reason"] == decision.reason
    assert console_line(decision).startswith(f"ich-classification v{decision.candidate_version} NOT PROMOTED ({kind}")
    if kind == "below_floor":
        assert decision.reason == "val_roc_auc 0.550 < floor 0.6"
    # a good candidate after it becomes the first champion
    good = promote("classification", _candidate(0.8, 0.9))
    assert good.promoted and good.reason == "no champion yet"


def test_decisions_are_readable_on_the_model_pages(fresh_registry):
    client = mlflow.MlflowClient()
    promote("classification", _candidate(0.80, 0.90))
    d = promote("classification", _candidate(0.88, 0.91, test_f1=0.77))
    page = client.get_model_version("ich-classification", d.candidate_version).description
    assert page.startswith("**Decision: PROMOTED to `@champion`**")
    assert "| val_roc_auc | 0.8800 |" in page and "+0.0800" in page and f"champion v{d.champion_version}" in page
    assert "test_f1 0.7700 [0.670, 0.820]" in page and "never decides" in page and "d1" in page
    model = client.get_registered_model("ich-classification").description
    assert model.startswith(TASKS["classification"].summary)
    assert f"`@champion`: version {d.candidate_version}" in model and "val_roc_auc 0.8800" in model


def test_unregistered_run_gets_registered_once(fresh_registry):
    run_id = _candidate(0.8, 0.8, register=False)
    d = promote("classification", run_id)
    assert d.promoted
    versions = mlflow.MlflowClient().search_model_versions(f"name='ich-classification' and run_id='{run_id}'")
    assert len(versions) == 1


def test_champion_on_other_split_is_not_compared_blindly(fresh_registry):
    promote("classification", _candidate(0.80, 0.9, digest="A"))
    decision = promote("classification", _candidate(0.95, 0.9, digest="B"))   # no re-evaluation available here
    assert not decision.promoted and decision.decision == "rejected"
    assert decision.reason.startswith("not comparable with the champion") and "split A" in decision.reason


def _race(run_id, uri, out):
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    out.put((run_id, promote("classification", run_id).promoted))


def test_two_racing_promotions_leave_one_champion(fresh_registry):
    promote("classification", _candidate(0.65, 0.9))
    a, b = _candidate(0.90, 0.9), _candidate(0.91, 0.9)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(r, fresh_registry, q)) for r in (a, b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    promoted = dict(q.get(timeout=5) for _ in procs)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("ich-classification", "champion")
    assert all(p.exitcode == 0 for p in procs)
    # decisions are serialised: b (the better one) wins whichever order they ran in; a was promoted only if it
    # went first, and then b replaced it, leaving a as @previous
    assert champion.run_id == b and promoted[b]
    if promoted[a]:
        assert client.get_model_version_by_alias("ich-classification", "previous").run_id == a
    else:
        assert client.get_model_version_by_alias("ich-classification", "challenger").run_id == a
    believers = [h["candidate_run_id"] for h in promotion_history("ich-classification") if h["promoted"]]
    assert believers[-1] == b


def test_history_entry_point_prints_log(fresh_registry, capsys):
    from ichflow.registry import HistoryConfig, run_history

    promote("classification", _candidate(0.80, 0.90))
    promote("classification", _candidate(0.50, 0.90))
    events = run_history(HistoryConfig(task="classification"))
    out = capsys.readouterr().out
    assert len(events) == 2 and "PROMOTED" in out and "no champion yet" in out
    assert "below_floor" in out and "val_roc_auc 0.500 < floor 0.6" in out
