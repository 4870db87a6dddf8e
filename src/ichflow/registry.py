"""Promotion in the MLflow Model Registry: a gate, a rule, aliases and a readable audit trail.

Aliases (stages are deprecated): the winner gets ``@champion``, the champion it replaced ``@previous``, a
candidate that lost the comparison ``@challenger``; a candidate stopped by the gate gets no alias at all.

The gate, before any comparison: a candidate whose training run is tagged ``ichflow.degenerate`` (its
validation predictions show it learned nothing) is ``degenerate``; one below a ``FLOOR`` of its rule file is
``below_floor``. The rule (``registry/<task>.py``, editable): the ``PRIMARY`` metric must improve by >= ``MARGIN``
and each ``GUARDS`` metric may not drop by more than its tolerance. Rules read validation metrics (out-of-fold
for cross-validated tasks): the test split never decides, it is only reported (``REPORT``). A champion from
the same split is compared on its logged validation metrics; one from another split is re-evaluated with the
candidate on the candidate's validation patients that the champion did not train on (never on patients one
of them trained on), or the comparison is refused with the reason.

Every decision is written on the candidate version: tags ``ichflow.decision`` (promoted | rejected |
below_floor | degenerate) and ``ichflow.reason``, a Markdown description (decision, rule, candidate vs
champion table with CIs and deltas, test metrics, data), and the JSON record ``ichflow.promotion.<UTC time>``
that ``promotion_history`` reads. The registered model's description says what the model does and the
current champion's headline.

Two promotions racing: decisions of one model name are serialised with a lock file, and the alias is
re-read after it is set; a candidate whose alias was overwritten is recorded as having lost the race.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import mlflow
from mlflow.exceptions import MlflowException

from ichflow import model_pages
from ichflow.configs import HistoryConfig, PromoteConfig
from ichflow.engine.modelio import register_verified
from ichflow.errors import ParameterError, UserError
from ichflow.metric_names import run_metrics
from ichflow.paths import work_dir
from ichflow.project_files import load_project_file
from ichflow.tasks.spec import DEGENERATE_TAG, spec_by_model_name, task_spec

TAG_PREFIX = "ichflow.promotion."
DECISIONS = ("promoted", "rejected", "below_floor", "degenerate")


class NotComparable(UserError):
    """The candidate and the champion share no patients that neither trained on (or were cross-validated on
    other folds): recorded as a rejection with this reason."""


@dataclass
class Decision:
    model_name: str
    candidate_version: str
    candidate_run_id: str
    promoted: bool
    reason: str
    rule: dict
    candidate_metrics: dict
    champion_version: str | None = None
    champion_run_id: str | None = None
    champion_metrics: dict = field(default_factory=dict)
    deltas: dict = field(default_factory=dict)
    split_digest: str = ""
    time: str = ""
    decision: str = ""             # one of DECISIONS
    compared_on: str = ""          # which patients the candidate and the champion were compared on
    report_metrics: dict = field(default_factory=dict)   # test metrics, shown beside the decision


def load_rule(task: str, path: str = "") -> dict:
    mod = load_project_file("registry", task, path, "rule", required=("PRIMARY", "MARGIN"))
    if str(mod.PRIMARY).startswith("test_"):
        raise ParameterError("rule", f"{mod.SOURCE}: PRIMARY {mod.PRIMARY!r} is a test metric; the test split "
                                     "never decides (use val_* or oof_*)")
    default_report = tuple(f"test_{k}" for k in task_spec(task).headline)
    return {"primary": mod.PRIMARY, "margin": float(mod.MARGIN), "guards": dict(getattr(mod, "GUARDS", {})),
            "floor": {k: float(v) for k, v in getattr(mod, "FLOOR", {}).items()},
            "report": tuple(getattr(mod, "REPORT", default_report)), "source": mod.SOURCE}


def decision_keys(rule: dict) -> list[str]:
    return list(dict.fromkeys([rule["primary"], *rule["guards"], *rule["floor"]]))


def gate(rule: dict, candidate_metrics: dict, degenerate: str = "") -> tuple[str, str] | None:
    """(decision, reason) when the candidate may not be aliased at all, else None. Pure: no MLflow."""
    if degenerate:
        return "degenerate", f"degenerate model: {degenerate}"
    for key, floor in rule["floor"].items():
        value = candidate_metrics.get(key)
        if value is None or value != value:
            return "below_floor", f"{key} missing < floor {floor:g}"
        if value < floor:
            return "below_floor", f"{key} {value:.3f} < floor {floor:g}"
    return None


def decide(rule: dict, candidate: dict, champion: dict | None) -> tuple[bool, str, dict]:
    """(promote?, reason, deltas) for candidate vs champion metrics under the rule. Pure: no MLflow."""
    primary = rule["primary"]
    if primary not in candidate:
        raise KeyError(f"candidate has no {primary!r} metric (has {sorted(candidate)})")
    if champion is None:
        return True, "no champion yet", {}
    deltas = {k: candidate[k] - champion[k] for k in [primary, *rule["guards"]] if k in candidate and k in champion}
    if primary not in deltas:
        return True, f"champion has no {primary!r} metric", deltas
    if deltas[primary] < rule["margin"]:
        return False, (f"{primary} {candidate[primary]:.4f} vs champion {champion[primary]:.4f}: "
                       f"improvement {deltas[primary]:+.4f} < margin {rule['margin']}"), deltas
    for guard, tol in rule["guards"].items():
        if guard in deltas and deltas[guard] < -float(tol):
            return False, f"guard {guard} regressed by {-deltas[guard]:.4f} > tolerance {tol}", deltas
    return True, f"{primary} improved by {deltas[primary]:+.4f} (margin {rule['margin']}), guards held", deltas


@contextlib.contextmanager
def _model_lock(name: str):
    path = work_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def version_for_run(client: mlflow.MlflowClient, name: str, run_id: str, model_path: str = "model"):
    """The registered version of ``run_id``'s model, registering it only if it has none (no duplicates)."""
    found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if found:
        return sorted(found, key=lambda v: int(v.version))[0]
    return register_verified(f"runs:/{run_id}/{model_path}", name)  # with the SHA-256 of its files


def _alias(client, name, alias):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metrics(client, run_id, keys) -> dict:
    data = run_metrics(client.get_run(run_id))
    return {k: data[k] for k in keys if k in data}


def candidate(client: mlflow.MlflowClient, task: str, run_id: str, rule: dict):
    """(run, metrics the rule reads) of a candidate; ParameterError when it cannot be one."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ParameterError("run_id", f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}") from None
    if run.data.tags.get("ichflow.task") not in (task, None):
        raise ParameterError("run_id", f"run {run_id} is a {run.data.tags['ichflow.task']} run, not {task}")
    metrics = _metrics(client, run_id, decision_keys(rule))
    if rule["primary"] not in metrics:
        raise ParameterError("run_id", f"run {run_id} has no {rule['primary']!r} metric: only {task} runs that "
                                       "logged a model (evaluate_test=true) can be promoted")
    return run, metrics


def promote(task: str, run_id: str, rule_path: str = "", compare_unseen=None) -> Decision:
    """Gate the candidate run's model, compare it with ``@champion``, move the aliases; returns the decision.

    ``compare_unseen(candidate_uri, champion_uri, candidate_run, champion_run) -> (cand, champ, compared_on)``
    re-evaluates both models on patients neither trained on when the champion comes from another split (it
    raises :class:`NotComparable` when there are none); without it such a comparison is refused.
    """
    client = mlflow.MlflowClient()
    name = task_spec(task).registered_name
    rule = load_rule(task, rule_path)
    cand_run, cand_metrics = candidate(client, task, run_id, rule)
    digest = cand_run.data.tags.get("ichflow.split_digest", "")
    base = dict(model_name=name, candidate_run_id=run_id, rule=rule, split_digest=digest,
                report_metrics=_metrics(client, run_id, _with_ci(rule["report"])))
    with _model_lock(name):
        version = str(version_for_run(client, name, run_id).version)
        champ = _alias(client, name, "champion")
        if champ is not None and str(champ.version) == version:
            return _record(client, Decision(**base, candidate_version=version, promoted=True,
                                            reason="already champion", candidate_metrics=cand_metrics,
                                            decision="promoted"))
        stopped = gate(rule, cand_metrics, cand_run.data.tags.get(DEGENERATE_TAG, ""))
        if stopped is not None:
            return _record(client, Decision(**base, candidate_version=version, promoted=False, reason=stopped[1],
                                            candidate_metrics=cand_metrics, decision=stopped[0],
                                            champion_version=str(champ.version) if champ else None,
                                            champion_run_id=champ.run_id if champ else None))
        decision = _compare(client, rule, base, version, cand_metrics, cand_run, champ, compare_unseen)
        _move_aliases(client, decision, champ)
        return _record(client, decision)


def _compare(client, rule, base, version, cand_metrics, cand_run, champ, compare_unseen) -> Decision:
    """The rule's decision against the champion, on the same patients for both."""
    champ_metrics, compared_on = None, ""
    try:
        if champ is not None:
            cand_metrics, champ_metrics, compared_on = _comparable_metrics(
                client, rule, base, version, cand_metrics, cand_run, champ, compare_unseen)
        promoted, reason, deltas = decide(rule, cand_metrics, champ_metrics)
    except NotComparable as exc:
        promoted, reason, deltas = False, f"not comparable with the champion: {exc}", {}
    return Decision(**base, candidate_version=version, promoted=promoted, reason=reason,
                    candidate_metrics=cand_metrics, champion_version=str(champ.version) if champ else None,
                    champion_run_id=champ.run_id if champ else None, champion_metrics=champ_metrics or {},
                    deltas=deltas, decision="promoted" if promoted else "rejected", compared_on=compared_on)


def _comparable_metrics(client, rule, base, version, cand_metrics, cand_run, champ, compare_unseen):
    champ_run = client.get_run(champ.run_id)
    if champ_run.data.tags.get("ichflow.split_digest", "") == base["split_digest"]:
        return cand_metrics, _metrics(client, champ.run_id, decision_keys(rule)), \
            f"the shared validation split (digest {base['split_digest']}): logged metrics of both runs"
    if compare_unseen is None:
        raise NotComparable(f"the champion v{champ.version} was trained on split "
                            f"{champ_run.data.tags.get('ichflow.split_digest')}, the candidate on "
                            f"{base['split_digest']}, and no re-evaluation was possible here")
    name = base["model_name"]
    return compare_unseen(f"models:/{name}/{version}", f"models:/{name}/{champ.version}", cand_run, champ_run)


def _move_aliases(client, decision: Decision, champ) -> None:
    name = decision.model_name
    if decision.promoted:
        if champ is not None:
            client.set_registered_model_alias(name, "previous", champ.version)
        client.set_registered_model_alias(name, "champion", decision.candidate_version)
        time.sleep(0.2)
        now = _alias(client, name, "champion")
        if now is None or str(now.version) != decision.candidate_version:  # another writer got in between
            decision.promoted, decision.decision = False, "rejected"
            decision.reason = f"lost a promotion race to v{now.version if now else '?'}"
    if not decision.promoted:
        client.set_registered_model_alias(name, "challenger", decision.candidate_version)


def _model_metadata(name: str, version: str) -> dict:
    """The MLmodel metadata of a registered version (only the MLmodel file is read)."""
    try:
        return dict(mlflow.models.get_model_info(f"models:/{name}/{version}").metadata or {})
    except (MlflowException, OSError):
        return {}


def _with_ci(keys) -> list[str]:
    return [k for key in keys for k in (key, f"{key}_ci_low", f"{key}_ci_high")]


def _record(client, decision: Decision) -> Decision:
    """The decision on the version (tags, JSON record, Markdown description) and the model page."""
    decision.time = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    name, version = decision.model_name, decision.candidate_version
    client.set_model_version_tag(name, version, TAG_PREFIX + decision.time,
                                 json.dumps(asdict(decision), sort_keys=True, default=list))
    client.set_model_version_tag(name, version, "ichflow.decision", decision.decision)
    client.set_model_version_tag(name, version, "ichflow.reason", decision.reason[:5000])
    client.update_model_version(name, version, description=model_pages.version_description(
        decision, _model_metadata(name, version)))
    champ = _alias(client, name, "champion")
    headline = _metrics(client, champ.run_id, [decision.rule["primary"], *_with_ci(decision.rule["report"][:1])]) \
        if champ else {}
    client.update_registered_model(name, description=model_pages.model_description(spec_by_model_name(name), champ, headline,
                                                                                 decision.rule))
    return decision



def promotion_history(model_name: str) -> list[dict]:
    """Every recorded decision of a registered model, oldest first."""
    client = mlflow.MlflowClient()
    events = []
    for v in client.search_model_versions(f"name='{model_name}'"):
        for key, value in v.tags.items():
            if key.startswith(TAG_PREFIX):
                events.append(json.loads(value))
    return sorted(events, key=lambda e: e["time"])


def candidate_from_study(task: str, study_name: str = "") -> str:
    """Run id of the refit of the best trial of the newest ``tune`` run for ``task`` (and study)."""
    client = mlflow.MlflowClient()
    flt = f"tags.`ichflow.task` = 'tune' and params.task = '{task}'"
    if study_name:
        flt += f" and params.study_name_resolved = '{study_name}'"
    exps = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(exps, flt, order_by=["attributes.start_time DESC"], max_results=20):
        best = run.data.tags.get("ichflow.best_run_id")
        if best:
            return best
    raise ParameterError("run_id", f"no candidate: no finished tune run with a refit best trial for task={task!r}"
                         + (f" study={study_name!r}" if study_name else "")
                         + "; pass -P run_id=<run> or run the tune entry point first")


def run_promote(cfg: PromoteConfig) -> Decision:
    from ichflow.evaluation import unseen_comparison
    from ichflow.tracking import log_params_once, task_run

    task_spec(cfg.task)
    rule = load_rule(cfg.task, cfg.rule)
    run_id = cfg.run_id or candidate_from_study(cfg.task, cfg.study_name)
    candidate(mlflow.MlflowClient(), cfg.task, run_id, rule)  # a bad candidate fails before a run is opened
    with task_run("promote", run_name=f"promote-{cfg.task}"):
        log_params_once({"task": cfg.task, "candidate_run_id": run_id, "study_name": cfg.study_name})
        # a champion from another split is re-evaluated with the candidate on unseen patients (child runs)
        decision = promote(cfg.task, run_id, cfg.rule, compare_unseen=unseen_comparison(cfg.task, decision_keys(rule)))
        mlflow.log_dict(asdict(decision), "decision.json")
        mlflow.set_tags({"ichflow.promoted": str(decision.promoted), "ichflow.decision": decision.decision,
                         "ichflow.reason": decision.reason[:5000], "ichflow.model_version": decision.candidate_version})
    print(f"[promote] {console_line(decision)}")
    return decision


def console_line(decision: Decision) -> str:
    where = f"{decision.model_name} v{decision.candidate_version}"
    if decision.promoted:
        return f"{where} PROMOTED to @champion: {decision.reason}"
    alias = "kept as @challenger" if decision.decision == "rejected" else "registered without an alias"
    return f"{where} NOT PROMOTED ({decision.decision}, {alias}): {decision.reason}"


def run_history(cfg: HistoryConfig) -> list[dict]:
    name = task_spec(cfg.task).registered_name
    events = promotion_history(name)
    print(f"Promotion history of {name} ({len(events)} decisions)")
    for e in events:
        champ = f"v{e['champion_version']}" if e["champion_version"] else "none"
        primary = e["rule"]["primary"]
        verdict = "PROMOTED" if e["promoted"] else e.get("decision") or "rejected"   # older records: no decision
        print(f"{e['time']}  v{e['candidate_version']:<4} {verdict:11} "
              f"vs champion {champ:<5} {primary}={e['candidate_metrics'].get(primary, float('nan')):.4f}  "
              f"{e['reason']}  (run {e['candidate_run_id'][:8]}, split {e['split_digest']})")
    return events
