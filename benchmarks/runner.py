"""Orchestration: one process per section (per task for the pipeline), results merged into one JSON + report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.core import REPO, SECTIONS, TASKS, command, machine_info, now_utc, render_report

BENCH_DIR = REPO / "work" / "benchmarks"
TIMEOUTS = {"pipeline": 900, "tracking": 600, "tuning": 60, "inference": 1200, "scaling": 1200}


def _env(store: Path) -> dict:
    env = dict(os.environ)
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "YOLO_CONFIG_DIR",
                "ICHFLOW_DATA_DIR"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["ICHFLOW_WORK_DIR"] = str(BENCH_DIR / "work")        # phantoms + slice caches, kept between runs
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"  # a fresh store per invocation
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_section(name: str, task: str, quick: bool, models: dict, store: Path) -> dict:
    out = store / f"{name}{'-' + task if task else ''}.json"
    log = store / f"{name}{'-' + task if task else ''}.log"
    cmd = [sys.executable, "-m", "benchmarks", "section", name, "--out", str(out), "--models", json.dumps(models)]
    if task:
        cmd += ["--task", task]
    if quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    print(f"[benchmarks] {name}{':' + task if task else ''} ...", flush=True)
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=store, env=_env(store), stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=TIMEOUTS[name])
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.perf_counter() - t0
    if rc == 0 and out.exists():
        result = json.loads(out.read_text())
    else:
        tail = log.read_text(errors="replace").strip().splitlines()[-6:] if log.exists() else []
        result = {"error": f"exit {rc}: " + " | ".join(tail)[-600:]}
    result["section_seconds"] = seconds
    print(f"[benchmarks] {name}{':' + task if task else ''} done in {seconds:.0f} s"
          + (f" — {result['error']}" if result.get("error") else ""), flush=True)
    return result


def _parse_only(only: str) -> dict[str, list[str]]:
    """'pipeline:segmentation,tracking' -> {'pipeline': ['segmentation'], 'tracking': []}."""
    if not only:
        return {s: list(TASKS) if s == "pipeline" else [] for s in SECTIONS}
    picked: dict[str, list[str]] = {}
    for item in only.split(","):
        name, _, task = item.strip().partition(":")
        if name not in SECTIONS:
            raise SystemExit(f"--only: unknown section {name!r}; choose from {SECTIONS}")
        if task and task not in TASKS:
            raise SystemExit(f"--only: unknown task {task!r}; choose from {TASKS}")
        if name == "pipeline":
            picked.setdefault(name, [])
            picked[name] += [task] if task else list(TASKS)
        else:
            picked[name] = []
    return picked


def run_suite(quick: bool, only: str, models: dict, reports: Path) -> int:
    picked = _parse_only(only)
    reports = reports if reports.is_absolute() else REPO / reports
    reports.mkdir(parents=True, exist_ok=True)
    json_path = reports / "benchmarks.json"
    results = json.loads(json_path.read_text()) if only and json_path.exists() else {}
    results.setdefault("sections", {})
    results["machine"] = machine_info()
    results.pop("notes", None)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    for old in BENCH_DIR.glob("store-*"):
        shutil.rmtree(old, ignore_errors=True)
    store = BENCH_DIR / f"store-{time.strftime('%Y%m%d-%H%M%S')}"
    store.mkdir()
    # create the sqlite schema once, so no section is charged for MLflow's one-time database migration
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()"], cwd=store,
                   env=_env(store), check=True, capture_output=True, timeout=300)
    t_suite = time.perf_counter()
    mode = "quick" if quick else "full"

    def stamp(sec: dict, name: str, arg: str | None = None) -> dict:
        sec.update(measured_at=now_utc(), mode=mode, command=command(arg or name, quick),
                   machine_commit=results["machine"]["git_commit"])
        return sec

    trained = dict(models)
    for name in SECTIONS:
        if name not in picked:
            continue
        if name == "pipeline":
            sec = results["sections"].get("pipeline", {}) if only else {}
            sec.setdefault("tasks", {})
            t0 = time.perf_counter()
            for task in picked[name]:
                res = _run_section("pipeline", task, quick, {}, store)
                res.update(measured_at=now_utc(), command=command(f"pipeline:{task}", quick), mode=mode)
                sec["tasks"][task] = res
                if res.get("model_uri") and task not in models:
                    trained[task] = res["model_uri"]
                results["sections"]["pipeline"] = stamp(sec, "pipeline")
                _write(results, reports)  # after every task too
            sec["section_seconds"] = time.perf_counter() - t0
            results["sections"]["pipeline"] = stamp(sec, "pipeline")
        else:
            res = _run_section(name, "", quick, trained if name == "inference" else {}, store)
            results["sections"][name] = stamp(res, name)
        _write(results, reports)  # after every section: a crash later keeps what was measured
    results["suite_seconds"] = time.perf_counter() - t_suite
    results["mode"] = mode
    _write(results, reports)
    print(f"[benchmarks] wrote {reports / 'BENCHMARKS.md'} and {json_path} "
          f"({results['suite_seconds']:.0f} s)", flush=True)
    return 0


def _write(results: dict, reports: Path) -> None:
    tmp = reports / ".benchmarks.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, reports / "benchmarks.json")
    (reports / "BENCHMARKS.md").write_text(render_report(results))
