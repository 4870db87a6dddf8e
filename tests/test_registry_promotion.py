"""Promotion: rule decisions, alias moves, audit trail, idempotent registration, racing promotions.

Uses a real MLflow registry (sqlite) with small real pyfunc models standing in for trained candidates.
"""

import multiprocessing as mp
import os

import mlflow
import pytest

from ichflow.errors import UserError
from ichflow.registry import decide, load_rule, promote, promotion_history

RULE = {"primary": "test_f1", "margin": 0.01, "guards": {"test_recall": 0.02}}


class Constant(mlflow.pyfunc.PythonModel):
    def __init__(self, value):
        self.value = value

    def predict(self, context, model_input, params=None):
        return [self.value] * len(model_input)


def _candidate(f1, recall, digest="d1", register=True):
    with mlflow.start_run(run_name=f"cand-{f1}") as run:
        mlflow.set_tag("ichflow.split_digest", digest)
        mlflow.log_metrics({"test_f1": f1, "test_recall": recall})
        mlflow.pyfunc.log_model(name="model", python_model=Constant(f1),
                                registered_model_name="ich-classification" if register else None,
                                pip_requirements=["mlflow"])
    return run.info.run_id


@pytest.mark.parametrize("cand,champ,expected", [
    ({"test_f1": 0.90, "test_recall": 0.9}, None, True),
    ({"test_f1": 0.92, "test_recall": 0.9}, {"test_f1": 0.90, "test_recall": 0.9}, True),
    ({"test_f1": 0.905, "test_recall": 0.9}, {"test_f1": 0.90, "test_recall": 0.9}, False),   # within margin
    ({"test_f1": 0.85, "test_recall": 0.9}, {"test_f1": 0.90, "test_recall": 0.9}, False),    # worse
    ({"test_f1": 0.95, "test_recall": 0.85}, {"test_f1": 0.90, "test_recall": 0.9}, False),   # guard regression
    ({"test_f1": 0.95, "test_recall": 0.89}, {"test_f1": 0.90, "test_recall": 0.9}, True),    # guard within tol
])
def test_decide(cand, champ, expected):
    promoted, reason, _ = decide(RULE, cand, champ)
    assert promoted is expected, reason


def test_rules_load_for_every_task():
    for task in ("segmentation", "classification", "detection", "multilabel"):
        rule = load_rule(task)
        assert rule["primary"].startswith("test_") and rule["margin"] >= 0


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
    assert d1.promoted and d1.reason == "no champion yet"
    better = _candidate(0.88, 0.91)
    d2 = promote("classification", better)
    assert d2.promoted and d2.champion_version == d1.candidate_version
    assert client.get_model_version_by_alias("ich-classification", "champion").version == d2.candidate_version
    assert client.get_model_version_by_alias("ich-classification", "previous").version == d1.candidate_version
    worse = _candidate(0.70, 0.95)
    d3 = promote("classification", worse)
    assert not d3.promoted
    assert client.get_model_version_by_alias("ich-classification", "challenger").version == d3.candidate_version
    assert client.get_model_version_by_alias("ich-classification", "champion").version == d2.candidate_version
    # promoting the same run again registers nothing new
    n_versions = len(client.search_model_versions("name='ich-classification'"))
    promote("classification", worse)
    assert len(client.search_model_versions("name='ich-classification'")) == n_versions
    history = promotion_history("ich-classification")
    assert [h["promoted"] for h in history] == [True, True, False, False]
    last = history[2]
    assert last["champion_metrics"]["test_f1"] == 0.88 and last["candidate_metrics"]["test_f1"] == 0.70
    assert last["deltas"]["test_f1"] == pytest.approx(-0.18)
    assert last["split_digest"] == "d1" and last["candidate_run_id"] == worse and last["time"]


def test_unregistered_run_gets_registered_once(fresh_registry):
    run_id = _candidate(0.8, 0.8, register=False)
    d = promote("classification", run_id)
    assert d.promoted
    versions = mlflow.MlflowClient().search_model_versions(f"name='ich-classification' and run_id='{run_id}'")
    assert len(versions) == 1


def test_champion_on_other_split_is_not_compared_blindly(fresh_registry):
    promote("classification", _candidate(0.80, 0.9, digest="A"))
    with pytest.raises(UserError, match="evaluated on split A"):
        promote("classification", _candidate(0.95, 0.9, digest="B"))


def _race(run_id, uri, out):
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    out.put((run_id, promote("classification", run_id).promoted))


def test_two_racing_promotions_leave_one_champion(fresh_registry):
    promote("classification", _candidate(0.50, 0.9))
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
    events = run_history(HistoryConfig(task="classification"))
    out = capsys.readouterr().out
    assert len(events) == 1 and "PROMOTED" in out and "no champion yet" in out
