"""The full pipeline behind the ``main`` entry point (``mlflow run .``).

prepare -> segmentation, classification, detection, multilabel -> a short tune -> promote each task's model
-> predict with the segmentation champion. Each step is launched the MLflow Projects way
(``mlflow.projects.run`` of this project's own entry point), so every step is a normal run in the
experiment of its task (``ichflow-<task>``) and the pipeline run (experiment ``ichflow-pipeline``) records the
step run ids. It ends with a summary table (each task's champion, its numbers, this job's decision, where to
look), printed and kept as the pipeline run's description and ``summary.md``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from ichflow.configs import PipelineConfig
from ichflow.errors import ParameterError, UserError
from ichflow.metric_names import log_metrics
from ichflow.metric_names import run_metrics
from ichflow.model_pages import value_text
from ichflow.paths import work_dir
from ichflow.tasks.spec import TASKS
from ichflow.tracking import log_params_once, mask_uri, task_run


def project_dir() -> Path:
    """The MLflow project the steps are launched from: the one ``mlflow run`` runs (its entry points start in
    the project folder), else the repository this package lives in (an editable install)."""
    for cand in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (cand / "MLproject").is_file():
            return cand
    raise FileNotFoundError(f"no MLproject in {Path.cwd()} nor beside the ichflow package: run the pipeline from "
                            "the project folder (mlflow run .)")


# Short schedules for the embedded default (quick=true): the whole pipeline in <= 15 min on 2 CPU cores
# (the pipeline run logs each step's wall and CPU seconds; measured figures are in reports/BENCHMARKS.md).
QUICK = {
    "segmentation": {"epochs": 3, "steps_per_epoch": 25},
    "classification": {"epochs": 3, "image_size": 128},
    # YOLO from scratch learns the phantom's lesions at 160 px without mosaic in 16 epochs (test_detection_train)
    "detection": {"epochs": 16, "patience": 16, "imgsz": 160, "mosaic": 0.0},
    "multilabel": {"epochs": 3, "n_folds": 3},
    "tune": {"task": "classification", "n_trials": 3, "overrides": "epochs=2,image_size=64,n_boot=200"},
}
# quick=tiny: every step with the smallest schedule that still logs everything (a few minutes on 2 cores):
# what CI runs to get a store to look at in a browser. The models are not meant to be good.
TINY = {
    "segmentation": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "patch_size": 64},
    "classification": {"epochs": 1, "image_size": 64, "n_boot": 50, "gradcam_per_group": 1},
    "detection": {"epochs": 1, "imgsz": 64},
    "multilabel": {"epochs": 1, "n_folds": 3, "image_size": 64},
    "tune": {"task": "classification", "n_trials": 2, "overrides": "epochs=1,image_size=64,n_boot=50"},
}
PROFILES = {"true": QUICK, "tiny": TINY, "false": {}}


def profile(quick) -> dict:
    key = str(quick).strip().lower()
    key = {"1": "true", "yes": "true", "0": "false", "no": "false"}.get(key, key)
    if key not in PROFILES:
        raise ParameterError("quick", f"must be true, false or tiny; got {quick!r}")
    return PROFILES[key]


def _step(entry: str, params: dict, experiment: str, key: str = "") -> str:
    """Run one entry point of this project (a normal run in ``experiment``); log its wall and CPU seconds."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    try:
        submitted = mlflow.projects.run(str(project_dir()), entry_point=entry, parameters=params,
                                        env_manager="local", experiment_name=experiment, synchronous=True)
    except mlflow.projects.ExecutionException as exc:  # the step printed its own error line above
        raise UserError(f"pipeline step {key or entry} failed ({_first_line(exc)}); its error is printed "
                        "above, this pipeline run is marked FAILED") from None
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    log_metrics({f"step_{key or entry}_seconds": wall, f"step_{key or entry}_cpu_seconds": cpu})
    print(f"[pipeline] {key or entry} finished in {wall:.0f} s, {cpu:.0f} CPU-s (run {submitted.run_id})")
    return submitted.run_id


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (the step and everything it started)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tasks_for_reader(reader: str) -> tuple[str, ...]:
    """The tasks whose labels a data folder read by ``reader`` carries."""
    return tuple(name for name, spec in TASKS.items() if reader in spec.readers)


def run_pipeline(cfg: PipelineConfig) -> dict:
    from ichflow.prepare import DataConfig, resolve_source

    schedules = profile(cfg.quick)  # a bad value fails before any run starts
    resolve_source(DataConfig(data_dir=cfg.data_dir, dataset=cfg.dataset))  # bad data_dir / dataset: same
    runs: dict[str, str] = {}
    t0, cpu0 = time.perf_counter(), _children_cpu()
    launch = default_launch()
    source = {k: v for k, v in launch.data.tags.items() if k.startswith(("mlflow.source", "mlflow.project",
                                                                          "mlflow.git"))} if launch else {}
    with task_run("pipeline", run_name="pipeline", tags=source) as parent:
        if launch is not None:
            mlflow.log_params(launch.data.params)
            point_launch_at(launch, parent)
        log_params_once({"data_dir": cfg.data_dir, "dataset": cfg.dataset, "quick": cfg.quick})
        data = {"data_dir": cfg.data_dir, "dataset": cfg.dataset}
        runs["prepare"] = _step("prepare", data, "ichflow-prepare")
        reader = "phe" if not cfg.data_dir else resolve_source(DataConfig(**data))[0]
        tasks = tuple(TASKS) if not cfg.data_dir else tasks_for_reader(reader)
        for task in tasks:
            params = dict(data)
            if not cfg.data_dir and TASKS[task].synthetic_dataset != "synthetic":  # the subtype phantom
                params["dataset"] = TASKS[task].synthetic_dataset
            params.update(schedules.get(task, {}))
            runs[task] = _step(task, params, f"ichflow-{task}")
        tune = {**data, **schedules.get("tune", {"task": tasks[0]})}
        runs["tune"] = _step("tune", tune, "ichflow-tune")
        for task in tasks:
            runs[f"promote-{task}"] = _step("promote", {"task": task, "run_id": runs[task]}, "ichflow-registry",
                                            f"promote-{task}")
        runs[f"promote-tuned-{tune['task']}"] = _step("promote", {"task": tune["task"]}, "ichflow-registry",
                                                      f"promote-tuned-{tune['task']}")
        predictions = work_dir() / "predictions" / parent.info.run_id
        if "segmentation" in tasks and _champion(TASKS["segmentation"].registered_name) is not None:
            runs["predict"] = _step("predict", {"model_uri": "models:/ich-segmentation@champion",
                                                "input": _first_scan(runs["prepare"]), "output": str(predictions)},
                                    "ichflow-predict")
        mlflow.set_tags({f"ichflow.step.{k}": v for k, v in runs.items()})
        log_metrics({"pipeline_seconds": time.perf_counter() - t0, "pipeline_cpu_seconds": _children_cpu() - cpu0})
        rows = summary_rows(tasks, runs)
        footer = summary_footer(predictions if "predict" in runs else None, mlflow.get_tracking_uri())
        text = summary_markdown(rows, footer)
        mlflow.set_tag(MLFLOW_RUN_NOTE, text)
        mlflow.log_text(text, "summary.md")
    print_summary(rows, footer, text)
    return runs


def default_launch():
    """The run ``mlflow run . -e main`` opened in MLflow's Default experiment (no ``--experiment-name``), or None.

    MLflow opens it before this process starts and cannot move a run, so the pipeline's own run goes to
    ``ichflow-pipeline`` (with this run's params and source tags) and this one is left pointing at it;
    ``mlflow run`` ends it with the job's status."""
    from mlflow.tracking.default_experiment import DEFAULT_EXPERIMENT_ID

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or mlflow.active_run() is not None:
        return None
    run = mlflow.MlflowClient().get_run(run_id)
    if run.info.experiment_id != DEFAULT_EXPERIMENT_ID:
        return None
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(var, None)
    return run


def point_launch_at(launch, pipeline_run) -> None:
    """Name the Default experiment's launch run ``pipeline-launch`` and link it to the pipeline run."""
    run_id, exp_id = pipeline_run.info.run_id, pipeline_run.info.experiment_id
    client = mlflow.MlflowClient()
    client.update_run(launch.info.run_id, name="pipeline-launch")
    client.set_tag(launch.info.run_id, "ichflow.pipeline_run_id", run_id)
    client.set_tag(launch.info.run_id, MLFLOW_RUN_NOTE, f"`mlflow run` opened this run in the Default experiment; "
                   f"the pipeline's run is [{run_id}](#/experiments/{exp_id}/runs/{run_id}) in experiment "
                   "`ichflow-pipeline` (`mlflow run . -e main --experiment-name ichflow-pipeline` puts it there "
                   "directly).")
    print(f"[pipeline] run {run_id} in experiment ichflow-pipeline (MLflow's run {launch.info.run_id} in "
          "Default points at it)")


def _champion(model_name: str):
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(model_name, "champion")
    except mlflow.exceptions.MlflowException:
        return None


SUMMARY_COLUMNS = ("task", "@champion", "val (deciding)", "test", "this job's candidate")
DECISIONS = {"promoted": "promoted", "rejected": "rejected (kept as @challenger)", "below_floor": "below floor",
             "degenerate": "degenerate"}


def summary_rows(tasks, runs: dict[str, str]) -> list[tuple[str, ...]]:
    """One row per task (SUMMARY_COLUMNS): the champion's numbers from its training run, this job's decision."""
    from ichflow.registry import load_rule

    client = mlflow.MlflowClient()
    rows = []
    for task in tasks:
        spec, rule = TASKS[task], load_rule(task)
        champ = _champion(spec.registered_name)
        metrics = run_metrics(client.get_run(champ.run_id)) if champ else {}
        val, test = (f"{key} {value_text(metrics, key)}" if champ else "—"
                     for key in (rule["primary"], rule["report"][0]))
        rows.append((task, f"{spec.registered_name} v{champ.version}" if champ else f"{spec.registered_name}: none",
                     val, test, candidate_text(client, runs, task)))
    return rows


def candidate_text(client, runs: dict[str, str], task: str) -> str:
    """``v3 promoted`` (and the tuned refit's, when the job promoted one for this task)."""
    parts = []
    for label, key in (("", f"promote-{task}"), ("tuned refit ", f"promote-tuned-{task}")):
        if key in runs:
            tags = client.get_run(runs[key]).data.tags
            decision = tags.get("ichflow.decision", "?")
            parts.append(f"{label}v{tags.get('ichflow.model_version', '?')} {DECISIONS.get(decision, decision)}")
    return "; ".join(parts)


def summary_footer(predictions: Path | None, tracking_uri: str) -> list[str]:
    """Where the predict step wrote, and how to open the store in a browser."""
    lines = [f"Predictions of ich-segmentation@champion: {predictions}/ (predictions.csv, masks/, overlays/)"
             if predictions is not None else "Predictions: none (the predict step needs PHE data and an "
                                             "ich-segmentation@champion)"]
    if tracking_uri.startswith(("http://", "https://")):
        lines.append(f"Runs and models: open {mask_uri(tracking_uri)}")
    else:
        lines.append(f"Runs and models: mlflow ui --backend-store-uri {absolute_store_uri(tracking_uri)}")
        lines.append("then open http://127.0.0.1:5000")
    return lines


def absolute_store_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` (relative to this folder) -> ``sqlite:////abs/mlflow.db``: usable from anywhere."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return mask_uri(uri)


def summary_markdown(rows, footer: list[str]) -> str:
    """The summary as Markdown: the pipeline run's description and ``summary.md``; the console without a TTY."""
    lines = ["## ichflow pipeline summary", "", "| " + " | ".join(SUMMARY_COLUMNS) + " |",
             "|---" * len(SUMMARY_COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([*lines, "", *footer])


def print_summary(rows, footer: list[str], markdown: str) -> None:
    """A rich table on a terminal; the Markdown text otherwise (a log, a pipe)."""
    if not sys.stdout.isatty():
        print("\n" + markdown)
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="ichflow pipeline summary")
    for i, column in enumerate(SUMMARY_COLUMNS):
        table.add_column(column, no_wrap=i < 2, overflow="fold")   # task and model whole; the rest may wrap
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console = Console()
    console.print(table)
    for line in footer:   # soft_wrap: the command stays one line to copy
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _first_scan(prepare_run_id: str) -> str:
    """Folder of the first test patient's slices, from the prepare run's manifest and split."""
    import pandas as pd

    path = mlflow.artifacts.download_artifacts(run_id=prepare_run_id, artifact_path="data")
    manifest = pd.read_csv(Path(path) / "manifest.csv", dtype={"patient_id": str})
    split = pd.read_csv(Path(path) / "split.csv", dtype={"patient_id": str})
    patient = sorted(split.loc[split["split"] == "test", "patient_id"])[0]
    return str(Path(manifest.loc[manifest["patient_id"] == patient, "image_path"].iloc[0]).parent)
