"""Promotion in the MLflow Model Registry with aliases and an audit trail.

Aliases (stages are deprecated): the winner gets ``@champion``, the champion it replaced ``@previous``,
a candidate that did not win ``@challenger``. Every decision, promoted or not, is written on the candidate
version as a tag ``ichflow.promotion.<UTC time>`` holding JSON (rule, both metric sets, deltas, previous
champion, run ids, split digest, time); ``promotion_history`` reads them back.

The rule per task lives in ``registry/<task>.py`` (editable): PRIMARY metric must improve by >= MARGIN;
each GUARDS metric must not drop by more than its tolerance. Candidates are compared with the champion on
the same evaluation data (same split digest).

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

from ichflow.errors import ParameterError, UserError
from ichflow.paths import work_dir
from ichflow.project_files import load_project_file
from ichflow.tasks.spec import task_spec

TAG_PREFIX = "ichflow.promotion."


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


def load_rule(task: str, path: str = "") -> dict:
    mod = load_project_file("registry", task, path, "rule", required=("PRIMARY", "MARGIN"))
    return {"primary": mod.PRIMARY, "margin": float(mod.MARGIN), "guards": dict(getattr(mod, "GUARDS", {})),
            "source": mod.SOURCE}


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
    return mlflow.register_model(f"runs:/{run_id}/{model_path}", name)


def _alias(client, name, alias):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metrics(client, run_id, keys) -> dict:
    data = client.get_run(run_id).data.metrics
    return {k: data[k] for k in keys if k in data}


def candidate(client: mlflow.MlflowClient, task: str, run_id: str, rule: dict):
    """(run, metrics the rule reads) of a candidate; ParameterError when it cannot be one."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ParameterError("run_id", f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}") from None
    metrics = _metrics(client, run_id, [rule["primary"], *rule["guards"]])
    if rule["primary"] not in metrics:
        raise ParameterError("run_id", f"run {run_id} has no {rule['primary']!r} metric: only runs of task "
                                       f"{task} evaluated on their test split can be promoted")
    return run, metrics


def promote(task: str, run_id: str, rule_path: str = "", evaluate_champion=None) -> Decision:
    """Compare the candidate run's model with ``@champion`` and move the aliases. Returns the decision.

    ``evaluate_champion(model_uri, candidate_run) -> metrics`` re-evaluates the champion when it was tested
    on other data than the candidate; without it such a comparison is refused.
    """
    client = mlflow.MlflowClient()
    name = task_spec(task).registered_name
    rule = load_rule(task, rule_path)
    keys = [rule["primary"], *rule["guards"]]
    cand_run, cand_metrics = candidate(client, task, run_id, rule)
    digest = cand_run.data.tags.get("ichflow.split_digest", "")
    with _model_lock(name):
        version = version_for_run(client, name, run_id)
        champ = _alias(client, name, "champion")
        champ_metrics = None
        if champ is not None and champ.version == version.version:
            return _record(client, Decision(name, version.version, run_id, True, "already champion", rule,
                                            cand_metrics, champ.version, champ.run_id, cand_metrics, {}, digest))
        if champ is not None:
            champ_run = client.get_run(champ.run_id)
            if champ_run.data.tags.get("ichflow.split_digest", "") == digest:
                champ_metrics = _metrics(client, champ.run_id, keys)
            elif evaluate_champion is not None:
                champ_metrics = evaluate_champion(f"models:/{name}/{champ.version}", cand_run)
            else:
                raise UserError(f"champion v{champ.version} of {name} was evaluated on split "
                                 f"{champ_run.data.tags.get('ichflow.split_digest')} but the candidate on {digest}: "
                                 "re-evaluate the champion on the candidate's test split first")
        promoted, reason, deltas = decide(rule, cand_metrics, champ_metrics)
        decision = Decision(name, version.version, run_id, promoted, reason, rule, cand_metrics,
                            champ.version if champ else None, champ.run_id if champ else None,
                            champ_metrics or {}, deltas, digest)
        if promoted:
            if champ is not None:
                client.set_registered_model_alias(name, "previous", champ.version)
            client.set_registered_model_alias(name, "champion", version.version)
            time.sleep(0.2)
            now = _alias(client, name, "champion")
            if now is None or now.version != version.version:  # another writer got in between
                decision.promoted = False
                decision.reason = f"lost a promotion race to v{now.version if now else '?'}"
        if not decision.promoted:
            client.set_registered_model_alias(name, "challenger", version.version)
        return _record(client, decision)


def _record(client, decision: Decision) -> Decision:
    decision.time = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    payload = asdict(decision)
    payload["rule"] = {k: v for k, v in payload["rule"].items() if k != "source"} | {"source": decision.rule.get("source", "")}
    client.set_model_version_tag(decision.model_name, decision.candidate_version, TAG_PREFIX + decision.time,
                                 json.dumps(payload, sort_keys=True))
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


@dataclass
class PromoteConfig:
    """Promote a candidate (a run, or the refit of a study's best trial) if it beats @champion."""

    task: str = "segmentation"
    run_id: str = ""
    study_name: str = ""     # '' with no run_id -> the newest tune run of this task
    rule: str = ""           # rule file; '' -> registry/<task>.py


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
    from ichflow.tracking import log_params_once, task_run

    task_spec(cfg.task)
    rule = load_rule(cfg.task, cfg.rule)
    run_id = cfg.run_id or candidate_from_study(cfg.task, cfg.study_name)
    candidate(mlflow.MlflowClient(), cfg.task, run_id, rule)  # a bad candidate fails before a run is opened
    with task_run("promote", run_name=f"promote-{cfg.task}"):
        log_params_once({"task": cfg.task, "candidate_run_id": run_id, "study_name": cfg.study_name})
        from ichflow.evaluation import champion_evaluator

        # a champion tested on other data is re-evaluated on the candidate's test split (child run)
        evaluate = champion_evaluator(cfg.task, [rule["primary"], *rule["guards"]])
        decision = promote(cfg.task, run_id, cfg.rule, evaluate_champion=evaluate)
        mlflow.log_dict(asdict(decision), "decision.json")
        mlflow.set_tags({"ichflow.promoted": str(decision.promoted), "ichflow.model_version": decision.candidate_version})
    verdict = "PROMOTED to @champion" if decision.promoted else "kept as @challenger"
    print(f"[promote] {decision.model_name} v{decision.candidate_version} {verdict}: {decision.reason}")
    return decision


@dataclass
class HistoryConfig:
    """Print the promotion log of a registered model."""

    task: str = "segmentation"


def run_history(cfg: HistoryConfig) -> list[dict]:
    name = task_spec(cfg.task).registered_name
    events = promotion_history(name)
    print(f"Promotion history of {name} ({len(events)} decisions)")
    for e in events:
        champ = f"v{e['champion_version']}" if e["champion_version"] else "none"
        primary = e["rule"]["primary"]
        print(f"{e['time']}  v{e['candidate_version']:<4} {'PROMOTED' if e['promoted'] else 'rejected':9} "
              f"vs champion {champ:<5} {primary}={e['candidate_metrics'].get(primary, float('nan')):.4f}  "
              f"{e['reason']}  (run {e['candidate_run_id'][:8]}, split {e['split_digest']})")
    return events
