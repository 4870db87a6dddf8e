"""The full pipeline behind the ``main`` entry point (``mlflow run .``).

prepare -> segmentation, classification, detection, multilabel -> a short tune -> promote each task's model
-> predict with the segmentation champion. Each step is launched the MLflow Projects way
(``mlflow.projects.run`` of this project's own entry point), so every step is a normal run in the
experiment of its task (``ichflow-<task>``) and the pipeline run records the step run ids.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow

from ichflow.configs import PipelineConfig
from ichflow.errors import ParameterError, UserError
from ichflow.tasks.spec import TASKS
from ichflow.tracking import log_params_once, task_run


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
    mlflow.log_metrics({f"step_{key or entry}_seconds": wall, f"step_{key or entry}_cpu_seconds": cpu})
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
    with task_run("pipeline", run_name="pipeline") as parent:
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
        predictions = Path("work") / "predictions" / parent.info.run_id
        if "segmentation" in tasks and _champion(TASKS["segmentation"].registered_name) is not None:
            runs["predict"] = _step("predict", {"model_uri": "models:/ich-segmentation@champion",
                                                "input": _first_scan(runs["prepare"]), "output": str(predictions)},
                                    "ichflow-predict")
        mlflow.set_tags({f"ichflow.step.{k}": v for k, v in runs.items()})
        mlflow.log_metrics({"pipeline_seconds": time.perf_counter() - t0, "pipeline_cpu_seconds": _children_cpu() - cpu0})
    print("\n".join(closing_summary(tasks, runs, predictions if "predict" in runs else None)))
    return runs


def _champion(model_name: str):
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(model_name, "champion")
    except mlflow.exceptions.MlflowException:
        return None


def closing_summary(tasks, runs: dict[str, str], predictions: Path | None) -> list[str]:
    """What the job achieved: each task's champion (or why none), its deciding and test numbers, where to look."""
    from ichflow.registry import load_rule
    from ichflow.tasks.recipe import headline_text

    client = mlflow.MlflowClient()
    lines = ["", "[pipeline] summary"]
    for task in tasks:
        spec, rule = TASKS[task], load_rule(task)
        tags = client.get_run(runs[f"promote-{task}"]).data.tags
        champ = _champion(spec.registered_name)
        if champ is None:
            lines.append(f"  {task:14s} {spec.registered_name}: NO @champion — this job's v"
                         f"{tags.get('ichflow.model_version', '?')} {tags.get('ichflow.decision', '?')}: "
                         f"{tags.get('ichflow.reason', '')}")
            continue
        metrics = client.get_run(champ.run_id).data.metrics
        shown = [headline_text(metrics, key, name=key) for key in (rule["primary"], rule["report"][0])]
        mine = tags.get("ichflow.model_version", "?")
        tuned = runs.get(f"promote-tuned-{task}")
        if str(champ.version) == mine:
            verdict = "promoted by this job"
        elif tuned and client.get_run(tuned).data.tags.get("ichflow.model_version") == str(champ.version):
            verdict = f"this job's tuned refit, over its v{mine}"
        else:
            verdict = f"this job's v{mine}: {tags.get('ichflow.decision', '?')}"
        lines.append(f"  {task:14s} {spec.registered_name} v{champ.version} @champion ({verdict}): "
                     + "; ".join(s for s in shown if s))
    if predictions is not None:
        lines.append(f"  predictions of ich-segmentation@champion: {predictions}/ (predictions.csv, masks/, overlays/)")
    lines.append("  look at the runs and models: mlflow ui (in this folder), then http://127.0.0.1:5000")
    return lines


def _first_scan(prepare_run_id: str) -> str:
    """Folder of the first test patient's slices, from the prepare run's manifest and split."""
    import pandas as pd

    path = mlflow.artifacts.download_artifacts(run_id=prepare_run_id, artifact_path="data")
    manifest = pd.read_csv(Path(path) / "manifest.csv", dtype={"patient_id": str})
    split = pd.read_csv(Path(path) / "split.csv", dtype={"patient_id": str})
    patient = sorted(split.loc[split["split"] == "test", "patient_id"])[0]
    return str(Path(manifest.loc[manifest["patient_id"] == patient, "image_path"].iloc[0]).parent)
