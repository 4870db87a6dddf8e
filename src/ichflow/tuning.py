"""Optuna studies over any task, every trial a child MLflow run of the study's parent run.

Structure in MLflow: the ``tune`` run (the run ``mlflow run`` created, or a new one) is the parent; each
trial opens its own child run explicitly with ``parent_run_id`` (never via ``MLFLOW_RUN_ID``, which
``mlflow run`` exports and which would make the first "child" resume the parent: MLflow #12639/#15713);
the child mirrors the Optuna state (tag ``optuna.state`` COMPLETE/PRUNED/FAIL; run status FINISHED/KILLED/
FAILED). After the search the best parameters are refit once with the test split evaluated and the model
registered: that run is the candidate the registry's ``promote`` takes (tag ``ichflow.best_run_id``).

Storage: a journal file under ``work/optuna/`` by default (safe for several processes on one machine),
or any Optuna RDB URL (sqlite:///…, postgresql+psycopg2://…; ``ICHFLOW_OPTUNA_STORAGE`` when ``storage`` is
empty). The study is created once, before the workers start; running again with the same ``study_name``
resumes it. Passwords never go into the URL we log: pass them as ``PGPASSWORD`` (or ~/.pgpass); a password
written in the URL anyway is masked in every param, tag and message.

Lost workers (journal and RDB storages): every running trial sends an Optuna heartbeat every ``heartbeat_s``
seconds (Optuna's journal storage has no heartbeat of its own: ``HeartbeatJournalStorage`` adds it as a trial
system attribute, so Optuna's heartbeat thread, ``fail_stale_trials`` and retry callback work the same).
A trial whose worker died (SIGKILL, OOM, lost machine) stops beating; the next trial start anywhere in the
study, or this run's recovery step, finds it stale after the grace period, fails it, marks its MLflow child
run FAILED (tag ``ichflow.failure``) and enqueues one retry with the same parameters. The run that
launched the workers then tops the study up to ``n_trials`` finished trials itself.

Signals: SIGINT/SIGTERM to ``tune`` stop its workers; an interrupted trial fails in Optuna and its MLflow run
ends KILLED, as does the ``tune`` run. Workers die with the ``tune`` process (they get SIGTERM), so a killed
``tune`` leaves no worker training on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing as mp
import os
import socket
import time
import typing
import warnings

import mlflow
import optuna
from optuna.storages import JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat

from ichflow.cli import die_with_parent, install_signal_handlers, mark_given
from ichflow.configs import PRUNERS, TuneConfig
from ichflow.errors import ParameterError, check_choice, check_range
from ichflow.metric_names import log_metrics
from ichflow.paths import work_dir
from ichflow.project_files import load_project_file
from ichflow.tasks.spec import task_spec
from ichflow.tracking import (FAILURE_TAG, StoreError, close_interrupted_run, log_params_once, mask_uri,
                              process_tags, reuse_active_run, task_run)

log = logging.getLogger(__name__)


def load_space(task: str, path: str = ""):
    """Load the search-space module for ``task`` (``suggest(trial) -> dict``, ``FIXED``, ``MONITOR``)."""
    module = load_project_file("tuning", task, path, "space", required=("suggest", "MONITOR"))
    module.FIXED = getattr(module, "FIXED", {})
    module.PRUNER = getattr(module, "PRUNER", None)  # optional: () -> optuna pruner, overrides `pruner`
    return module


def task_parts(task: str):
    """(config class, train function) of ``task`` from the task registry."""
    spec = task_spec(task)
    return spec.config_class(), spec.train_function()


def parse_overrides(text: str, config_cls) -> dict:
    """"a=1,b=x" -> typed dict using the config's field types."""
    if not text.strip():
        return {}
    types = typing.get_type_hints(config_cls)
    out = {}
    for item in text.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or key not in types:
            raise ParameterError("overrides", f"{item.strip()!r} is not name=value with a parameter of "
                                              f"{config_cls.__name__}")
        out[key] = _typed(key, value, types[key])
    return out


def _typed(key: str, value: str, typ: type):
    if typ is bool:
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ParameterError("overrides", f"{key}={value!r}: expected true or false")
        return value.lower() in ("1", "true", "yes")
    if typ in (int, float):
        try:
            number = float(value)
        except ValueError:
            raise ParameterError("overrides", f"{key}={value!r}: expected a number") from None
        if typ is int and not number.is_integer():
            raise ParameterError("overrides", f"{key}={value!r}: expected an integer")
        return typ(number)
    return value


def data_values(cfg: TuneConfig) -> dict:
    """The data parameters tune passes to every trial: those not left to the task ('' / auto), so a preset
    given in ``overrides`` still picks its dataset."""
    return {k: getattr(cfg, k) for k in ("data_dir", "dataset") if getattr(cfg, k) not in ("", "auto")}


def trial_config(config_cls, values: dict):
    """The task config of a trial; ``values`` count as given, so a preset in ``overrides`` fills only the rest."""
    return mark_given(config_cls(**values), values)


def storage_url(cfg: TuneConfig, study_name: str) -> str:
    if cfg.storage or os.environ.get("ICHFLOW_OPTUNA_STORAGE"):
        return cfg.storage or os.environ["ICHFLOW_OPTUNA_STORAGE"]
    path = work_dir() / "optuna" / f"{study_name}.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"journal:{path}"


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with Optuna's heartbeat: the last beat is a trial system attribute.

    A RUNNING trial whose last beat (or start, for a retry that inherited an old beat) is older than the grace
    period is stale; trials that never beat (run without a heartbeat) are left alone, as RDBStorage does.
    """

    BEAT = "ichflow.heartbeat"

    def __init__(self, backend, heartbeat_interval: int, grace_period: int, heartbeat_stale_trial_callback=None):
        super().__init__(backend)
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, self.BEAT, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process already failed this trial as stale: Optuna ends the beating after it

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return [t._trial_id for t in running if self.BEAT in t.system_attrs
                and now - max(t.system_attrs[self.BEAT], t.datetime_start.timestamp()) > self.grace_period]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.heartbeat_stale_trial_callback


def open_storage(url: str, heartbeat_s: int = 0):
    """The Optuna storage at ``url``, with a heartbeat of running trials when ``heartbeat_s`` > 0.

    An unreachable database raises :class:`StoreError` naming the URL with its password masked.
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        backend = JournalFileBackend(url[len("journal:"):])
        if heartbeat_s and heartbeat_s > 0:
            return HeartbeatJournalStorage(backend, int(heartbeat_s), 2 * int(heartbeat_s), on_stale_trial)
        return JournalStorage(backend)
    kwargs = {}
    if heartbeat_s and heartbeat_s > 0:
        kwargs = {"heartbeat_interval": int(heartbeat_s), "grace_period": 2 * int(heartbeat_s),
                  "heartbeat_stale_trial_callback": on_stale_trial}
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        with warnings.catch_warnings():  # heartbeat_interval is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except Exception as exc:  # sqlalchemy OperationalError & co: one line, the URL without its password
        raise StoreError("Optuna storage", url, _first_line(exc)) from exc


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0]


_RETRY = None


def on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat-stale trial (its worker died): close its MLflow child run as FAILED and retry it once."""
    global _RETRY
    run_id = trial.user_attrs.get("mlflow_run_id") or _find_trial_run(study.study_name, trial.number)
    reason = "worker lost: no Optuna heartbeat within the grace period"
    if run_id:
        try:
            client = mlflow.MlflowClient()
            run = client.get_run(run_id)
            if run.info.status == "RUNNING":
                client.set_tag(run_id, "optuna.state", "FAIL")
                client.set_tag(run_id, "ichflow.failure", reason)
                client.set_terminated(run_id, "FAILED")
        except Exception as exc:  # never let bookkeeping stop the study
            log.warning("could not mark the MLflow run %s of stale trial %d FAILED: %s", run_id, trial.number, exc)
    log.warning("trial %d of study %s is stale (%s): failed%s, MLflow run %s marked FAILED", trial.number,
                study.study_name, reason, "" if trial.system_attrs.get("retry_history") else " and retried once",
                run_id or "(none)")
    if _RETRY is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            _RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    _RETRY(study, trial)


def _find_trial_run(study_name: str, number: int) -> str:
    client = mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"tags.`optuna.study` = '{study_name}' and tags.`optuna.trial` = '{number}' "
                                    "and attributes.status = 'RUNNING'", max_results=1) if exps else []
    return runs[0].info.run_id if runs else ""


def make_pruner(name: str, max_epochs: int):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, max_epochs))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ParameterError("pruner", f"must be one of median, hyperband, none; got {name!r}")


_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def _objective_factory(cfg: TuneConfig, study_name: str, parent_run_id: str, experiment_id: str):
    config_cls, train_fn = task_parts(cfg.task)
    space = load_space(cfg.task, cfg.space)
    base = {**data_values(cfg), **space.FIXED,
            **parse_overrides(cfg.overrides, config_cls)}

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        task_cfg = trial_config(config_cls, {**base, **params, "evaluate_test": False, "register": False})
        tags = {"optuna.study": study_name, "optuna.trial": str(trial.number),
                "ichflow.worker": f"{socket.gethostname()}:{os.getpid()}", **process_tags()}
        retried = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retried is not None:
            tags["optuna.retry_of"] = str(retried)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=f"trial-{trial.number:03d}",
                               parent_run_id=parent_run_id, nested=mlflow.active_run() is not None, tags=tags,
                               log_system_metrics=True)
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        state, reported = "FAIL", {}
        try:
            mlflow.log_params({f"trial.{k}": v for k, v in params.items()})

            def report(epoch: int, metrics: dict) -> None:
                value = metrics.get(space.MONITOR)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    return
                trial.report(float(value), epoch)
                reported["objective"] = float(value)
                trial.set_user_attr("epochs_run", epoch + 1)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} ({space.MONITOR}={value:.4f})")

            with reuse_active_run():
                result = train_fn(task_cfg, on_epoch_end=report)
            value = float(result["objective"])
            for key, val in result.items():  # e.g. the val-optimal conf_threshold found without retraining
                if key.startswith("best_") and isinstance(val, (int, float)):
                    trial.set_user_attr(key, val)
            state = "COMPLETE"
            return value
        except optuna.TrialPruned:
            state = "PRUNED"
            if reported:  # Optuna's value of a pruned trial: the last one it reported
                log_metrics(reported)
            raise
        except KeyboardInterrupt as exc:  # SIGINT/SIGTERM: Optuna fails the trial; the run says it was killed
            mlflow.set_tags({"optuna.state": state, FAILURE_TAG: f"interrupted ({exc})"})
            close_interrupted_run(exc)
            raise
        finally:
            if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id:
                mlflow.set_tag("optuna.state", state)
                mlflow.end_run(status=_STATUS[state])
    return objective


def _worker_process(*args) -> None:
    """A spawned worker: signals end its trial like the CLI's do, and it dies with the ``tune`` process."""
    install_signal_handlers()
    die_with_parent()
    try:
        _worker(*args)
    except KeyboardInterrupt as exc:
        log.warning("worker interrupted by %s: %s", exc, "; ".join(getattr(exc, "__notes__", [])))
        raise SystemExit(128 + getattr(exc, "signum", 2)) from None


def _worker(cfg: TuneConfig, study_name: str, url: str, parent_run_id: str, experiment_id: str, n_trials: int,
            worker: int) -> None:
    """One trial process. Runs ``n_trials`` trials (its share) against the shared storage."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # never resume the parent from a worker
    logging.basicConfig(level=logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(cfg.task, cfg.space)
    pruner = space.PRUNER() if space.PRUNER else make_pruner(cfg.pruner, _max_epochs(cfg))
    study = optuna.load_study(study_name=study_name, storage=open_storage(url, cfg.heartbeat_s),
                              sampler=optuna.samplers.TPESampler(seed=cfg.seed + worker), pruner=pruner)
    study.optimize(_objective_factory(cfg, study_name, parent_run_id, experiment_id), n_trials=n_trials,
                   timeout=cfg.timeout_min * 60 or None, catch=(Exception,), gc_after_trial=True,
                   callbacks=[best_so_far_line])


def best_so_far_line(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial (Optuna callback): its state and value, and the study's best so far."""
    value = f" {trial.value:.4f}" if trial.value is not None else ""
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = (f"best so far {study.best_value:.4f} (trial {study.best_trial.number})" if completed
            else "no completed trial yet")
    print(f"[tune] trial {trial.number} {trial.state.name.lower()}{value}; {best}", flush=True)


def _max_epochs(cfg: TuneConfig) -> int:
    config_cls, _ = task_parts(cfg.task)
    space = load_space(cfg.task, cfg.space)
    merged = {**space.FIXED, **parse_overrides(cfg.overrides, config_cls)}
    return int(merged.get("epochs", getattr(config_cls(), "epochs", 10)))


def shares(n_trials: int, n_workers: int) -> list[int]:
    """Trials per worker, summing exactly to n_trials (no lost or extra trials)."""
    return [n_trials // n_workers + (1 if i < n_trials % n_workers else 0) for i in range(n_workers)]


def validate(cfg: TuneConfig) -> None:
    """Every parameter checked before any storage is opened or any run started."""
    config_cls, _ = task_parts(cfg.task)
    check_range("n_trials", cfg.n_trials, 1)
    check_range("n_workers", cfg.n_workers, 1)
    check_range("timeout_min", cfg.timeout_min, 0)
    check_range("heartbeat_s", cfg.heartbeat_s, 0)
    check_choice("pruner", cfg.pruner, PRUNERS)
    check_storage(cfg.storage or os.environ.get("ICHFLOW_OPTUNA_STORAGE", ""))
    if cfg.storage and mask_uri(cfg.storage) != cfg.storage and os.environ.get("MLFLOW_RUN_ID"):
        # ichflow masks it in what it logs, but `mlflow run` has already recorded every -P value verbatim
        raise ParameterError("storage", f"{mask_uri(cfg.storage)!r} holds a password, which `mlflow run` has "
                                        f"recorded in clear as a parameter of run {os.environ['MLFLOW_RUN_ID']}: "
                                        "change that password, and pass it as PGPASSWORD or in ~/.pgpass")
    space = load_space(cfg.task, cfg.space)
    overrides = parse_overrides(cfg.overrides, config_cls)
    check_trial_config(cfg, config_cls, space, overrides)


def check_storage(url: str) -> None:
    """'' (journal file), ``journal:<path>`` or an SQLAlchemy URL whose database driver is installed."""
    if not url or url.startswith("journal:"):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ParameterError("storage", f"{mask_uri(url)!r} is not journal:<file> nor a database URL with an "
                                        f"installed driver (sqlite:///…, postgresql+psycopg2://…): {_first_line(exc)}"
                             ) from None


def check_trial_config(cfg: TuneConfig, config_cls, space, overrides: dict) -> None:
    """A trial's task config (overrides + one point of the search space) passes the task's own checks, so a
    bad override or a space of another task fails here, not as every trial failing inside the study."""
    from ichflow.tasks.recipe import TaskRecipe

    quiet, verbosity = optuna.logging.WARNING, optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(quiet)  # the throw-away in-memory study is no news to the user
    try:
        params = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=cfg.seed)).ask())
    finally:
        optuna.logging.set_verbosity(verbosity)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ParameterError("space", f"{space.SOURCE} suggests {unknown}, which {config_cls.__name__} has no "
                                      f"parameter for (a search space of another task?)")
    values = {**data_values(cfg), **space.FIXED, **overrides, **params,
              "evaluate_test": False, "register": False}
    recipe_cls = next(c for c in _all_subclasses(TaskRecipe) if getattr(c, "spec", None) is not None
                      and c.spec.name == cfg.task)
    try:
        recipe_cls().checked(trial_config(config_cls, values))
    except ParameterError as exc:
        source = "overrides" if exc.name in overrides else "space" if exc.name in params else exc.name
        raise ParameterError(source, exc.problem if source == exc.name else f"{exc.name}: {exc.problem}") from None


def _all_subclasses(cls) -> list:
    import importlib

    from ichflow.tasks.spec import TASKS

    for spec in TASKS.values():  # the recipes live in each task's train module
        importlib.import_module(f"{spec.package}.train")
    found, todo = [], list(cls.__subclasses__())
    while todo:
        sub = todo.pop()
        found.append(sub)
        todo.extend(sub.__subclasses__())
    return found


def run_tune(cfg: TuneConfig) -> dict:
    validate(cfg)
    study_name = cfg.study_name or f"ichflow-{cfg.task}"
    url = storage_url(cfg, study_name)
    space = load_space(cfg.task, cfg.space)
    max_epochs = _max_epochs(cfg)
    storage = open_storage(url, cfg.heartbeat_s)  # fails fast, before any run is opened, if unreachable
    with task_run("tune", run_name=f"tune-{cfg.task}") as parent:
        log_params_once({**dataclasses.asdict(cfg), "storage": mask_uri(cfg.storage),
                         "study_name_resolved": study_name, "storage_resolved": mask_uri(url),
                         "search_space_file": space.SOURCE, "monitor": space.MONITOR})
        mlflow.log_artifact(space.SOURCE, artifact_path="search_space")
        # created once here, before any worker: concurrent schema creation crashes sqlite and PostgreSQL
        study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                    load_if_exists=True)
        _fail_stale(study)  # trials of workers that died in an earlier session
        before = len(study.trials)
        t0 = time.perf_counter()
        parent_id, exp_id = parent.info.run_id, parent.info.experiment_id
        if cfg.n_workers <= 1:
            _worker(cfg, study_name, url, parent_id, exp_id, cfg.n_trials, 0)
        else:
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_worker_process, args=(cfg, study_name, url, parent_id, exp_id, n, k),
                                 name=f"tune-worker-{k}") for k, n in enumerate(shares(cfg.n_trials, cfg.n_workers)) if n]
            try:
                for p in procs:
                    p.start()
                for p in procs:
                    p.join()
            except KeyboardInterrupt:  # SIGINT/SIGTERM: the workers end their trials KILLED, then this run
                _stop_workers(procs)
                raise
            failed = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode != 0]
            if failed:
                log.warning("workers exited abnormally: %s (their finished trials are kept)", failed)
                _recover(cfg, study_name, url, parent_id, exp_id, before)
        wall = time.perf_counter() - t0
        study = optuna.load_study(study_name=study_name, storage=open_storage(url))
        summary = summarise_study(study, before, max_epochs, wall)
        log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        log_study_artifacts(study, target_name=task_spec(cfg.task).objective)
        result = {"study_name": study_name, "storage": mask_uri(url), **summary}
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if completed:
            best = study.best_trial
            mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
            mlflow.log_params({"best_trial": best.number})
            log_metrics({"best_value": best.value})
            mlflow.set_tags({"ichflow.best_trial": str(best.number),
                             "ichflow.best_trial_run_id": best.user_attrs.get("mlflow_run_id", "")})
            result.update(best_value=best.value, best_params=best.params,
                          best_trial_run_id=best.user_attrs.get("mlflow_run_id", ""))
            if cfg.refit_best:
                result["refit"] = refit_best(cfg, study, parent_id, exp_id)
                mlflow.set_tag("ichflow.best_run_id", result["refit"]["run_id"])
                if result["refit"].get("model_uri"):
                    mlflow.set_tag("ichflow.best_model_uri", result["refit"]["model_uri"])
    return result


def _stop_workers(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is not None:  # started
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _recover(cfg: TuneConfig, study_name: str, url: str, parent_id: str, exp_id: str, before: int) -> None:
    """After a worker died: fail its stale trial (marking the MLflow run FAILED, enqueueing a retry), then run
    the retries and the dead worker's unstarted share here, so the study still gets ``n_trials`` finished trials.
    """
    storage = open_storage(url, cfg.heartbeat_s)
    study = optuna.load_study(study_name=study_name, storage=storage)
    running = [t for t in study.trials[before:] if t.state == optuna.trial.TrialState.RUNNING]
    if running and cfg.heartbeat_s > 0:
        deadline = time.monotonic() + 2 * cfg.heartbeat_s + cfg.heartbeat_s + 5
        while time.monotonic() < deadline:  # wait out the grace period of the dead worker's last heartbeat
            _fail_stale(study)
            if not any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials[before:]):
                break
            time.sleep(1)
    elif running:
        log.warning("trials %s stay RUNNING: failing a lost worker's trials needs heartbeat_s > 0",
                    [t.number for t in running])
    trials = study.trials
    stale = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    done = [t for t in trials[before:] if t.state.is_finished() and t.number not in stale]
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    missing = max(cfg.n_trials - len(done), len(waiting))
    if missing > 0:
        log.warning("recovering: running %d trial(s) here (%d retried after a lost worker)", missing, len(waiting))
        _worker(cfg, study_name, url, parent_id, exp_id, missing, cfg.n_workers)


def refit_best(cfg: TuneConfig, study: optuna.Study, parent_run_id: str, experiment_id: str) -> dict:
    """Train the best parameters once more, evaluating the test split (its only use) and registering."""
    config_cls, train_fn = task_parts(cfg.task)
    space = load_space(cfg.task, cfg.space)
    best = study.best_trial
    fixed = {**data_values(cfg), **space.FIXED, **parse_overrides(cfg.overrides, config_cls)}
    # replay the search space on the best values: derived params (e.g. joined pos_weight multipliers) come back
    params = space.suggest(optuna.trial.FixedTrial(best.params))
    for key, val in best.user_attrs.items():  # thresholds found on val predictions, e.g. best_conf_threshold
        field = key[len("best_"):]
        if key.startswith("best_") and field in {f.name for f in dataclasses.fields(config_cls)}:
            params[field] = val
    task_cfg = trial_config(config_cls, {**fixed, **params, "evaluate_test": True, "register": True})
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"best-trial-{best.number:03d}-refit",
                          parent_run_id=parent_run_id, nested=True, log_system_metrics=True,
                          tags={"optuna.study": study.study_name, "optuna.best_trial": str(best.number),
                                **process_tags()}):
        try:
            with reuse_active_run():
                out = train_fn(task_cfg)
        except KeyboardInterrupt as exc:  # KILLED, not the FAILED of mlflow's context manager
            close_interrupted_run(exc)
            raise
    return {k: v for k, v in out.items() if isinstance(v, (str, int, float))}


def summarise_study(study: optuna.Study, before: int, max_epochs: int, wall_seconds: float) -> dict:
    states = optuna.trial.TrialState
    new = study.trials[before:]
    count = {s.name: sum(t.state == s for t in new) for s in (states.COMPLETE, states.PRUNED, states.FAIL)}
    epochs_run = sum(len(t.intermediate_values) for t in new)
    saved = sum(max(0, max_epochs - len(t.intermediate_values)) for t in new if t.state == states.PRUNED)
    return {"trials_new": len(new), "trials_total": len(study.trials), "trials_complete": count["COMPLETE"],
            "trials_pruned": count["PRUNED"], "trials_failed": count["FAIL"], "trial_epochs_run": epochs_run,
            "trial_epochs_saved_by_pruning": saved,
            "trial_epochs_saved_fraction": saved / max(1, epochs_run + saved),
            "study_wall_seconds": wall_seconds,
            "trials_per_hour": len(new) / max(wall_seconds, 1e-9) * 3600}


def log_study_artifacts(study: optuna.Study, target_name: str = "objective") -> None:
    from ichflow.engine import figures

    mlflow.log_text(study.trials_dataframe().to_csv(index=False), "study/trials.csv")
    for name, fig in figures.study_figures(study, target_name=target_name):   # skips plots Optuna can't draw
        figures.log_figure(fig, f"study/{name}.png")
