"""MLflow spine shared by every entry point.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else MLflow's own default (``sqlite:///mlflow.db`` in the
working directory, artifacts in ``./mlruns``), which is also what ``mlflow ui`` opens in that folder. We
never call ``set_tracking_uri`` ourselves: inside ``mlflow run`` that would detach the run (MLflow #2649).

Every run records where its process lives (tags ``ichflow.host``, ``ichflow.pid``, ``ichflow.pid_start``,
``ichflow.pid_namespace``). A run interrupted by SIGINT/SIGTERM is ended KILLED; one whose process vanished
(SIGKILL, out of memory, power loss) is marked FAILED by the next run started in its experiment on that host.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import sys
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import pandas as pd

from ichflow.errors import DataError, mask_text
from ichflow.paths import FAILURE_TAG

log = logging.getLogger(__name__)


class StoreError(DataError):
    """A store (tracking server, artifact store, Optuna/MLflow database) failed: one line naming it.

    ``path`` is "<kind> <uri>" with any password masked; the CLI prints ``error: <path>: <problem>``, exit 2.
    """

    def __init__(self, kind: str, uri: str, problem: str):
        self.kind, self.uri = kind, mask_uri(uri)
        super().__init__(f"{kind} {self.uri}".strip(), " ".join(mask_text(problem).split()))


def mask_uri(uri: str) -> str:
    """``scheme://user:secret@host/db`` -> ``scheme://user:***@host/db`` (also ``password=`` query values)."""
    if not uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return mask_text(uri)
    netloc = parts.netloc
    if "@" in netloc:
        cred, _, host = netloc.rpartition("@")
        if ":" in cred:
            netloc = f"{cred.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(?i)(password|secret|token)=[^&]*", r"\1=***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # nothing secret: keep it byte for byte (urlunsplit would turn sqlite:/// into sqlite:/)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_reuse_active = False


@contextlib.contextmanager
def reuse_active_run():
    """Inside this block ``task_run`` logs into the already active run instead of opening a child.

    Tuning opens one child run per trial itself (with an explicit parent) and trains inside it.
    """
    global _reuse_active
    old, _reuse_active = _reuse_active, True
    try:
        yield
    finally:
        _reuse_active = old


@contextlib.contextmanager
def task_run(task: str, run_name: str | None = None, tags: dict | None = None, nested: bool = False,
             log_system_metrics: bool = False):
    """Start (or, under ``mlflow run``, resume) the run of one entry point.

    Outside ``mlflow run`` the run goes to experiment ``ichflow-<task>`` unless the user chose one with
    ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``. ``log_system_metrics`` (training runs): MLflow's
    ``system/*`` metrics (CPU, memory, disk, network, GPU) every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` s,
    from a thread that ends with the run.
    """
    active = mlflow.active_run()
    if active is not None and _reuse_active:
        mlflow.set_tags({"ichflow.task": task, **(tags or {})})
        try:
            yield active
        except Exception as exc:  # the owner of the run (a tuning trial) ends it; name the store that failed
            kind = _store_kind(exc, mlflow.get_tracking_uri())
            if kind is None or isinstance(exc, StoreError):
                raise
            where, note = _where(kind, active.info.artifact_uri, mlflow.get_tracking_uri())
            raise StoreError(kind, where, f"{note}{_first_line(exc)}; {_kept_files(active.info.run_id)}") from exc
        return
    nested = nested or active is not None  # a step of a pipeline becomes a child run
    launched = bool(os.environ.get("MLFLOW_RUN_ID")) and mlflow.active_run() is None and not nested
    uri = mlflow.get_tracking_uri()
    try:
        if not launched and not nested and not (os.environ.get("MLFLOW_EXPERIMENT_NAME")
                                                or os.environ.get("MLFLOW_EXPERIMENT_ID")):
            mlflow.set_experiment(f"ichflow-{task}")
        run = mlflow.start_run(run_name=run_name, nested=nested, log_system_metrics=log_system_metrics or None,
                               tags={"ichflow.task": task, **process_tags(), **(tags or {})})
    except Exception as exc:
        kind = _store_kind(exc, uri)
        if kind is None:
            raise
        raise StoreError(kind, uri, f"cannot start the run: {_first_line(exc)}") from exc
    try:
        if not nested:  # a pipeline's steps share their parent's experiment: reaped once, by the parent
            fail_runs_of_gone_processes(run.info.experiment_id)
        yield run
    except Exception as exc:
        kind = _store_kind(exc, uri)
        if kind is None or isinstance(exc, StoreError):
            _end_run("FAILED")
            raise
        marked = _end_run("FAILED", quick=kind == "tracking server")
        where, note = _where(kind, run.info.artifact_uri, uri)
        raise StoreError(kind, where, f"{note}{_first_line(exc)}; run {run.info.run_id} "
                         f"{'marked FAILED' if marked else 'could not be marked FAILED (store unreachable)'}; "
                         f"{_kept_files(run.info.run_id)}") from exc
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGINT/SIGTERM through cli.install_signal_handlers
        close_interrupted_run(exc)
        raise
    except BaseException:  # SystemExit: like mlflow.start_run's context manager
        _end_run("FAILED")
        raise
    else:
        mlflow.end_run()


def close_interrupted_run(exc: KeyboardInterrupt) -> None:
    """End the active run KILLED; note on ``exc`` which run and where its best checkpoint stays (the CLI prints it)."""
    from ichflow.paths import CHECKPOINT, work_dir

    active = mlflow.active_run()
    if active is None:
        return
    run_id = active.info.run_id
    marked = _end_run("KILLED")
    note = f"run {run_id} {'marked KILLED' if marked else 'could not be marked KILLED (store unreachable)'}"
    checkpoint = work_dir() / "runs" / run_id / CHECKPOINT
    if checkpoint.is_file():
        note += f", best checkpoint kept: {checkpoint}"
    exc.add_note(note)


def process_tags() -> dict[str, str]:
    """Where this process lives; the start time tells a reused pid apart, the namespace a container's pids."""
    pid = os.getpid()
    return {"ichflow.host": socket.gethostname(), "ichflow.pid": str(pid),
            "ichflow.pid_start": _process_start(pid) or "", "ichflow.pid_namespace": _pid_namespace()}


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """Start time of a live ``pid`` (Linux: clock ticks since boot; elsewhere ''); None when there is none."""
    if pid <= 0:
        return None
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rpartition(")")[2].split()  # the command name before ")" may contain spaces
        return None if fields[0] in ("Z", "X") else fields[19]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def fail_runs_of_gone_processes(experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of ``experiment_id`` whose process on this host is gone; their ids.

    Gone: no such pid, or the pid now belongs to a process started at another time. Runs of other hosts (or
    of another pid namespace here) are left alone: their processes cannot be seen from here.
    """
    here = process_tags()
    client = mlflow.MlflowClient()
    try:
        runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING' and "
                                                   f"tags.`ichflow.host` = '{here['ichflow.host']}'")
    except Exception as exc:  # bookkeeping of older runs must never stop this one
        log.warning("could not look for runs left RUNNING by dead processes: %s", _first_line(exc))
        return []
    failed = []
    for run in runs:
        tags = run.data.tags
        if tags.get("ichflow.pid_namespace", "") != here["ichflow.pid_namespace"]:
            continue
        pid = int(tags.get("ichflow.pid") or 0)
        started = _process_start(pid)
        if pid and started is not None and started == tags.get("ichflow.pid_start", started):
            continue  # still alive
        reason = f"process gone (pid {pid} on host {here['ichflow.host']})"
        try:
            client.set_tag(run.info.run_id, FAILURE_TAG, reason)
            client.set_terminated(run.info.run_id, "FAILED")
        except Exception as exc:
            log.warning("could not mark run %s FAILED (%s): %s", run.info.run_id, reason, _first_line(exc))
            continue
        log.warning("run %s was left RUNNING (%s): marked FAILED", run.info.run_id, reason)
        failed.append(run.info.run_id)
    return failed


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    line = (text.splitlines() or [type(exc).__name__])[0]
    cause = re.search(r"Max retries exceeded.*?\(Caused by (.*)\)", line)
    if cause:  # urllib3 repeats the whole URL; what matters is that the retries ran out, and why
        line = f"no answer after {os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '7')} retries: {cause.group(1)}"
    return line if len(line) <= 300 else line[:300] + "…"


def _where(kind: str, artifact_uri: str, tracking_uri: str) -> tuple[str, str]:
    """(uri naming the failed store, note) for a StoreError."""
    if kind == "artifact store":
        note = (f"(proxied by the tracking server {tracking_uri} to its artifacts destination) "
                if artifact_uri.startswith("mlflow-artifacts:") else "")
        return artifact_uri, note
    return ("" if kind == "database" else tracking_uri), ""


def _store_kind(exc: BaseException, tracking_uri: str) -> str | None:
    """Which store an exception comes from, or None when it is not a store failure."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain)
    names = " ".join(f"{type(e).__module__}.{type(e).__name__}" for e in chain)
    if "mlflow-artifacts" in text or "botocore" in names or "boto3" in names or "S3UploadFailed" in names:
        return "artifact store"
    if "API request to" in text or "requests.exceptions" in names or "urllib3" in names:
        return "tracking server"
    if "sqlalchemy" in names or "psycopg" in names:  # a database: MLflow's own (no server) or Optuna's
        return "database" if tracking_uri.startswith(("http:", "https:", "databricks")) else "tracking store"
    return None


def _end_run(status: str, quick: bool = False) -> bool:
    """End the active run with ``status``; ``quick``: one try only (the server is known to be down)."""
    old = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    if quick:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        mlflow.end_run(status=status)
        return True
    except Exception:
        with contextlib.suppress(Exception):  # forget the run locally so the next one can start
            mlflow.tracking.fluent._active_run_stack.get().clear()
        return False
    finally:
        if quick:
            if old is None:
                os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
            else:
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = old


def _kept_files(run_id: str) -> str:
    from ichflow.paths import work_dir

    folder = work_dir() / "runs" / run_id
    files = sorted(p.name for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    if not files:
        return "no local files were written"
    return f"model/checkpoint kept locally: {folder}/ ({', '.join(files[:6])})"


def frame_digest(df: pd.DataFrame) -> str:
    return hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()[:12]


def log_dataset_inputs(manifest: pd.DataFrame, split: pd.DataFrame, source: str | Path, dataset: str,
                       target: str = "has_lesion") -> dict[str, str]:
    """Log train/val/test manifests as MLflow dataset inputs; returns {split: digest}."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    from ichflow.data.splits import subset

    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": both are local paths
        warnings.simplefilter("ignore")
        src = resolve_dataset_source(str(source))
    contexts = {"train": "training", "val": "validation", "test": "testing"}
    digests = {}
    for name, context in contexts.items():
        part = subset(manifest, split, name)
        if part.empty:
            continue
        with warnings.catch_warnings():  # schema-inference hints about int columns: not actionable here
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_pandas(part, source=src, name=f"{dataset}-{name}", targets=target)
            mlflow.log_input(ds, context=context)
        digests[name] = ds.digest
    return digests


def log_params_once(params: dict) -> None:
    """Log params the active run does not have yet.

    ``mlflow run`` already logged the entry point's -P parameters (its own rendering of them, e.g. "''"
    for an empty string); logging them again with another rendering is an error in MLflow.
    A value that differs from the logged one (the default or the preset's value of a field the command line
    left empty) is logged as ``resolved.<name>``, so the run shows what actually ran.
    """
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    fresh = {k: v for k, v in params.items() if k not in existing}
    fresh.update({f"resolved.{k}": v for k, v in params.items()
                  if k in existing and not same_param(existing[k], v) and f"resolved.{k}" not in existing})
    if fresh:
        mlflow.log_params(fresh)


def effective_params(params: dict) -> dict[str, str]:
    """What ran, by plain name, from a run's logged params: ``preset.<name>``, else ``resolved.<name>``, else
    ``<name>`` (MLflow's "''" read as ''). ``mlflow run`` logs '' for a field the command line left to the
    config's default or preset; the value the run used is logged under one of the prefixed names."""
    plain = {k: v for k, v in params.items() if not k.startswith(("preset.", "resolved."))}
    out = {**plain, **_prefixed(params, "resolved."), **_prefixed(params, "preset.")}
    return {k: "" if str(v).strip() in ("''", '""') else v for k, v in out.items()}


def _prefixed(params: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def same_param(logged: str, value) -> bool:
    """Whether MLflow's string of a param (as ``mlflow run`` rendered it) means ``value``."""
    text = str(logged).strip()
    if text in ("''", '""'):
        text = ""
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return text.lower() == str(value).lower()
    try:
        return float(text) == float(value)
    except (TypeError, ValueError):
        return text == str(value)
