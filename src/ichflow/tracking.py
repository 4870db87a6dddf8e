"""MLflow spine shared by every entry point.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else MLflow's own default (``sqlite:///mlflow.db`` in the
working directory, artifacts in ``./mlruns``), which is also what ``mlflow ui`` opens in that folder. We
never call ``set_tracking_uri`` ourselves: inside ``mlflow run`` that would detach the run (MLflow #2649).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import pandas as pd

from ichflow.errors import DataError


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


def mask_text(text: str) -> str:
    """Mask credentials of any URL inside a message (e.g. a driver error quoting the URL)."""
    return re.sub(r"([a-zA-Z][\w+.-]*://[^:/@\s]+:)[^@\s]+@", r"\1***@", str(text))


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
def task_run(task: str, run_name: str | None = None, tags: dict | None = None, nested: bool = False):
    """Start (or, under ``mlflow run``, resume) the run of one entry point.

    Outside ``mlflow run`` the run goes to experiment ``ichflow-<task>`` unless the user chose one with
    ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``.
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
        run = mlflow.start_run(run_name=run_name, nested=nested, tags={"ichflow.task": task, **(tags or {})})
    except Exception as exc:
        kind = _store_kind(exc, uri)
        if kind is None:
            raise
        raise StoreError(kind, uri, f"cannot start the run: {_first_line(exc)}") from exc
    try:
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
    except BaseException:  # KeyboardInterrupt, SystemExit: like mlflow.start_run's context manager
        _end_run("FAILED")
        raise
    else:
        mlflow.end_run()


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
    A value that differs from the logged one (a preset filled in a field the command line left at its
    default) is logged as ``resolved.<name>``, so the run shows what actually ran.
    """
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    fresh = {k: v for k, v in params.items() if k not in existing}
    fresh.update({f"resolved.{k}": v for k, v in params.items()
                  if k in existing and not same_param(existing[k], v) and f"resolved.{k}" not in existing})
    if fresh:
        mlflow.log_params(fresh)


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
