"""``evaluate``: a registered model on any labelled data folder, with the full metric set of its task.

This is how a hospital checks a model on its own data::

    mlflow run . -e evaluate --env-manager local -P model_uri=models:/ich-segmentation@champion \\
        -P data_dir=/data/our-scans [-P dataset=phe] [-P patients=all|test]

The model's task comes from its MLflow metadata (``metadata.task``). The data folder is read by
:func:`ichflow.prepare.prepare_data` (any supported layout; the subtype task also takes a labels CSV);
``patients=all`` evaluates every patient, ``patients=test`` only the test part of the patient-level split
(default split parameters, so on the training data it is exactly the training run's test split). Each
scan is predicted through the pyfunc (slices of one patient in axial order, as served), and the metrics are
computed by the SAME functions the training run used for its ``test_*`` metrics; they are logged as
``eval_*`` (``test_dice`` -> ``eval_dice``), so a model evaluated on the test split of the data it was trained
on reproduces its training run's test metrics, and registry rules can compare both.

The run (experiment ``ichflow-evaluate`` when run directly) records the model (URI, name, version, the run
that trained it), the task, the data root and split digest, the dataset inputs (the evaluated rows as the
``evaluation`` input) and the task's figures and per-patient tables.

:func:`unseen_comparison` is the promotion hook for a champion trained on another split: it re-evaluates
the candidate and ``@champion`` (child runs of the promotion) on the candidate's validation patients that the
champion did not train on, and returns both metric sets under the rule's ``val_*`` names.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from ichflow.configs import PATIENTS, EvaluateConfig
from ichflow.data.splits import subset
from ichflow.engine.modelio import verified_download
from ichflow.errors import DataError, ParameterError, UserError, check_choice
from ichflow.paths import default_data_dir
from ichflow.prepare import DATASETS, DataConfig, Prepared, log_prepared, prepare_data, validate_data_config
from ichflow.tasks.spec import TASKS, task_spec
from ichflow.tracking import effective_params, log_params_once, task_run

log = logging.getLogger(__name__)

PREFIX = "eval"
_DATA_FIELDS = {f.name: f for f in dataclasses.fields(DataConfig)}


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class LoadedModel:
    uri: str
    pyfunc: object                # mlflow.pyfunc.PyFuncModel
    task: str
    meta: dict                    # the model's MLflow metadata (task, threshold, classes, ...)
    run_id: str                   # the run that logged it ('' when unknown)
    name: str = ""                # registered name, when the URI is a models:/ URI
    version: str = ""
    train_params: dict = dataclasses.field(default_factory=dict)   # what the training run used, if reachable

    def unwrap(self):
        """The ichflow PythonModel behind the pyfunc (None when it cannot be unwrapped)."""
        try:
            return self.pyfunc.unwrap_python_model()
        except Exception:  # noqa: BLE001  (not a python_function model of ours)
            return None


def load_model(model_uri: str) -> LoadedModel:
    """Load an ichflow pyfunc; a clear DataError when the URI is wrong or the model is not ours.

    A registered version is downloaded and its files checked against the SHA-256 recorded at registration
    BEFORE its pickle is loaded (unpickling runs code); a mismatch is refused with one line.
    """
    uri = str(model_uri or "").strip()
    if not uri:
        raise ParameterError("model_uri", "empty; give e.g. models:/ich-segmentation@champion or runs:/<id>/model")
    name, version = _registered_version(uri)
    try:
        verified = verified_download(uri, name, version) if version else None
        model = mlflow.pyfunc.load_model(verified or uri)
    except (MlflowException, OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ParameterError("model_uri", f"cannot load {uri!r}: {first}") from None
    meta = dict(model.metadata.metadata or {})
    task = meta.get("task")
    if task not in TASKS:
        raise ParameterError("model_uri", f"{uri!r} is not an ichflow model: its MLflow metadata has "
                                          f"task={task!r}, expected one of {', '.join(TASKS)}")
    loaded = LoadedModel(uri=uri, pyfunc=model, task=task, meta=meta, run_id=model.metadata.run_id or "",
                         name=name, version=version)
    if loaded.run_id:
        try:
            loaded.train_params = effective_params(mlflow.MlflowClient().get_run(loaded.run_id).data.params)
        except MlflowException:
            log.info("training run %s of %s is not in this tracking store: task defaults are used", loaded.run_id, uri)
    return loaded


def _registered_version(uri: str) -> tuple[str, str]:
    """(name, version) of a models:/name/<version|stage> or models:/name@alias URI ('' when not registered)."""
    m = re.match(r"^models:/([^/@]+)(?:@([^/]+)|/([^/]+))/?$", uri)
    if not m:
        return "", ""
    name, alias, ref = m.groups()
    client = mlflow.MlflowClient()
    try:
        if alias:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        if ref.isdigit():
            return name, ref
        versions = client.search_model_versions(f"name='{name}'")
        return name, str(max(int(v.version) for v in versions)) if versions else ""
    except MlflowException:
        return name, ""


# ------------------------------------------------------------------------------------------------- the data
def load_data(task: str, cfg: DataConfig) -> Prepared:
    """The prepared data a task's model is evaluated on (the subtype task also reads a labels CSV)."""
    if task == "multilabel":
        from ichflow.tasks.multilabel.labels_csv import is_labels_csv, prepare_labels_csv

        if is_labels_csv(cfg.data_dir, cfg.dataset):
            return prepare_labels_csv(cfg)
    return prepare_data(cfg)


def _data_config(task: str, cfg: EvaluateConfig) -> DataConfig:
    values = {k: getattr(cfg, k) for k in _DATA_FIELDS}
    spec = task_spec(task)
    if spec.synthetic_dataset != "synthetic" and cfg.dataset == "auto" and not (cfg.data_dir or default_data_dir()):
        # no data folder: the phantom the task trains on by default (the subtype task needs subtype labels)
        task_defaults = spec.config_class()()
        values["dataset"] = spec.synthetic_dataset
        for key in ("synthetic_patients", "synthetic_slices"):
            if getattr(cfg, key) == _DATA_FIELDS[key].default:
                values[key] = getattr(task_defaults, key)
    return DataConfig(**values)


def select_patients(prep: Prepared, patients: str) -> pd.DataFrame:
    check_choice("patients", patients, PATIENTS)
    part = prep.manifest if patients == "all" else subset(prep.manifest, prep.split, "test")
    if part.empty:
        raise DataError(prep.data_root, f"no patients to evaluate (patients={patients}): "
                                        + ("the split has no test patients" if patients == "test" else "empty data"))
    return part.reset_index(drop=True)


# ------------------------------------------------------------------------------------------ the evaluation
def evaluate_model_on(model_uri, manifest_part: pd.DataFrame, prefix: str = PREFIX) -> dict:
    """Predict every scan of ``manifest_part`` with the model and compute its task's metrics.

    ``model_uri``: a URI or a :class:`LoadedModel`. Logs the metrics (``<prefix>_<name>``), figures and
    per-patient tables into the ACTIVE run (open one first) and returns the metrics dict with the same
    names (NaN where a metric is undefined on this data; NaNs are not logged).
    """
    model = model_uri if isinstance(model_uri, LoadedModel) else load_model(model_uri)
    if mlflow.active_run() is None:
        raise RuntimeError("evaluate_model_on logs into the active run: start one first")
    part = manifest_part.reset_index(drop=True)
    if part.empty:
        raise DataError("data", "no slices to evaluate")
    return task_spec(model.task).external().evaluate_external(model, part, prefix)  # checks the data first


def _log_evaluated_input(prep: Prepared, part: pd.DataFrame, task: str, patients: str) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # "source can be interpreted in multiple ways"; int-column schema hints
        warnings.simplefilter("ignore")
        src = resolve_dataset_source(str(prep.data_root))
        target = next((c for c in (task_spec(task).label_column, "has_lesion") if c in part.columns), None)
        ds = mlflow.data.from_pandas(part, source=src, name=f"{prep.dataset}-evaluated-{patients}",
                                    targets=target)
        mlflow.log_input(ds, context="evaluation")


def _evaluate_in_run(model: LoadedModel, prep: Prepared, part: pd.DataFrame, patients: str,
                     run_name: str) -> tuple[str, dict]:
    try:
        task_spec(model.task).external().check_data(model, part)  # before a run is opened
    except DataError as exc:
        raise DataError(prep.data_root if exc.path == "data" else exc.path, exc.problem) from None
    with task_run("evaluate", run_name=run_name, tags={"ichflow.evaluated_task": model.task}) as run:
        log_params_once({"model_uri": model.uri, "model_name": model.name, "model_version": model.version,
                         "model_run_id": model.run_id, "task": model.task, "patients": patients,
                         "evaluated_patients": int(part["patient_id"].nunique()), "evaluated_slices": len(part)})
        mlflow.set_tags({"ichflow.model_uri": model.uri, "ichflow.model_run_id": model.run_id})
        log_prepared(prep, target=task_spec(model.task).label_column)
        _log_evaluated_input(prep, part, model.task, patients)
        metrics = evaluate_model_on(model, part, PREFIX)
        return run.info.run_id, metrics


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Entry point body: load the model, read the data, evaluate, log; returns run_id, task and eval_* metrics."""
    check_choice("patients", cfg.patients, PATIENTS)
    validate_data_config(cfg, DATASETS + ("csv",))  # before the model is downloaded
    model = load_model(cfg.model_uri)
    prep = load_data(model.task, _data_config(model.task, cfg))
    part = select_patients(prep, cfg.patients)
    label = f"{model.name} v{model.version}" if model.version else model.uri
    run_id, metrics = _evaluate_in_run(model, prep, part, cfg.patients, run_name=f"evaluate-{model.task}")
    _print_summary(model, label, prep, part, cfg.patients, run_id, metrics)
    return {"run_id": run_id, "task": model.task, "model_uri": model.uri, "model_version": model.version,
            "split_digest": prep.split_digest, **metrics}


# ------------------------------------------------------------------------------------------ promotion hook
def _param(params: dict, key: str):
    """A data parameter of a training run (``effective_params``); the default where it was not logged."""
    value = params.get(key)
    if value is None or (value == "" and _DATA_FIELDS[key].default != ""):
        return _DATA_FIELDS[key].default
    value = str(value)
    typ = type(_DATA_FIELDS[key].default)
    return int(float(value)) if typ is int else float(value) if typ is float else value


def data_config_from_run(run) -> DataConfig:
    """The DataConfig a training run read its data with, from its logged params."""
    params = effective_params(run.data.params)
    return DataConfig(**{k: _param(params, k) for k in _DATA_FIELDS})


def rebuilt_split(task: str, run) -> Prepared:
    """The prepared data and split a training run used, rebuilt from its params; checks the split digest."""
    prep = load_data(task, data_config_from_run(run))
    tags = run.data.tags
    expected = tags.get("ichflow.prepare_split_digest") or tags.get("ichflow.split_digest", "")
    if expected and prep.split_digest != expected:
        raise UserError(f"cannot rebuild the split of run {run.info.run_id}: its data parameters now give split "
                        f"digest {prep.split_digest} at {prep.data_root}, the run used {expected} (data changed "
                        "or moved?)")
    return prep


def unseen_patients(task: str, candidate_run, champion_run) -> tuple[Prepared, pd.DataFrame]:
    """(candidate's data, its validation rows of patients the champion did not train on)."""
    from ichflow.registry import NotComparable

    if task_spec(task).cross_validated:
        raise NotComparable("the candidate and the champion were cross-validated on different folds: every "
                            "patient was trained on by some fold of each")
    prep = rebuilt_split(task, candidate_run)
    champ_prep = rebuilt_split(task, champion_run)
    champ_train = set(subset(champ_prep.manifest, champ_prep.split, "train")["patient_id"].astype(str))
    if champ_prep.data_root != prep.data_root:
        champ_train = {f"{champ_prep.data_root}:{p}" for p in champ_train}   # other data: no patient shared
    val = subset(prep.manifest, prep.split, "val")
    keep = ~val["patient_id"].astype(str).isin(champ_train)
    if keep.sum() == 0 or val.loc[keep, "patient_id"].nunique() < 2:
        raise NotComparable(f"of the candidate's {val['patient_id'].nunique()} validation patients, "
                            f"{val.loc[keep, 'patient_id'].nunique()} are not in the champion's training split "
                            "(at least 2 needed)")
    return prep, val[keep].reset_index(drop=True)


def unseen_comparison(task: str, metric_names):
    """``compare(candidate_uri, champion_uri, candidate_run, champion_run)`` for :func:`ichflow.registry.promote`.

    Both models are evaluated (child ``evaluate`` runs of the active run) on the candidate's validation
    patients that the champion did not train on; returns (candidate metrics, champion metrics, description)
    under the rule's ``val_*`` names.
    """
    wanted = set(metric_names)

    def compare(candidate_uri: str, champion_uri: str, candidate_run, champion_run):
        prep, part = unseen_patients(task, candidate_run, champion_run)
        out = []
        for role, uri in (("candidate", candidate_uri), ("champion", champion_uri)):
            model = load_model(uri)
            _, metrics = _evaluate_in_run(model, prep, part, "unseen-val",
                                          run_name=f"evaluate-{role}-v{model.version or '?'}-{task}")
            out.append({f"val_{k[len(PREFIX) + 1:]}": v for k, v in metrics.items()
                        if f"val_{k[len(PREFIX) + 1:]}" in wanted})
        described = (f"{part['patient_id'].nunique()} validation patients of the candidate that the champion did "
                     f"not train on (both models re-evaluated; split {prep.split_digest})")
        print(f"[promote] compared on {described}")
        return out[0], out[1], described

    return compare


# ------------------------------------------------------------------------------------------------- summary
def _print_summary(model: LoadedModel, label: str, prep: Prepared, part: pd.DataFrame, patients: str, run_id: str,
                   metrics: dict) -> None:
    print(f"[evaluate] {model.task} model {label} on {prep.dataset} ({prep.source}) at {prep.data_root}: "
          f"{part['patient_id'].nunique()} patients, {len(part)} slices (patients={patients}, split "
          f"{prep.split_digest})")
    parts = []
    for key in task_spec(model.task).headline:
        v = metrics.get(f"{PREFIX}_{key}")
        if v is None:
            continue
        lo, hi = metrics.get(f"{PREFIX}_{key}_ci_low"), metrics.get(f"{PREFIX}_{key}_ci_high")
        text = "n/a" if v != v else f"{v:.3f}"
        if lo is not None and hi is not None and lo == lo and hi == hi:
            text += f" [{lo:.3f}, {hi:.3f}]"
        parts.append(f"{key} {text}")
    print("  " + ", ".join(parts))
    print(f"  run {run_id}")
