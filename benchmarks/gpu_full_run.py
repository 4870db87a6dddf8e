"""One task of the GPU recipe (benchmarks/gpu_full_run.sh): train it on the packed PHE data, record results.

Runs the task's own ``train_<task>(cfg)`` (the code path of ``mlflow run . -e <task>``) with a GPU-sized
config, then appends what it measured to ``<out>/gpu_results.json``: wall time, epochs, training images/s,
the test metrics (patient-level split, per-patient CIs where the task has them), the split digest.

    python benchmarks/gpu_full_run.py --task segmentation --data /tmp/phe --out $OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import ichflow  # noqa: F401  (offline environment first)
from ichflow.metric_names import mlflow_key, run_metrics

# GPU-sized configs for the half-resolution (256 px) PHE pack; each bounded so that all three fit in
# about 6 minutes of an H100 (the recipe's budget is 8 minutes including set-up).
CONFIGS = {
    "segmentation": dict(dataset="phe", patch_size=128, batch_size=32, steps_per_epoch=150, epochs=14,
                         patience=5, lr=2e-3, eval_batch_size=32, num_workers=8, time_budget_min=2.2,
                         pixel_spacing_mm=1.016),  # half resolution: twice the published 0.508 mm
    "classification": dict(dataset="phe", image_size=256, batch_size=64, epochs=16, patience=6, lr=1e-3,
                           aug_strength=0.5, num_workers=8, n_boot=1000),
    "detection": dict(dataset="phe", imgsz=256, batch_size=32, epochs=40, patience=15, num_workers=8,
                      time_budget_min=2.2, overlays=8),
}


def _task(name: str):
    # not ichflow.tuning.task_parts: that imports optuna, which the GPU image lacks and the wheels don't carry
    if name == "segmentation":
        from ichflow.tasks.segmentation import SegmentationConfig, train_segmentation
        return SegmentationConfig, train_segmentation
    if name == "classification":
        from ichflow.tasks.classification import ClassificationConfig, train_classification
        return ClassificationConfig, train_classification
    if name == "detection":
        from ichflow.tasks.detection import DetectionConfig, train_detection
        return DetectionConfig, train_detection
    raise SystemExit(f"unknown task {name!r}")


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def run_task(name: str, data: str) -> dict:
    import mlflow
    import torch

    config_cls, train = _task(name)
    cfg = config_cls(data_dir=data, **CONFIGS[name])
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient()
    run = client.get_run(result["run_id"])
    speeds = [m.value for m in client.get_metric_history(run.info.run_id, mlflow_key("train_images_per_s"))]
    epoch_secs = [m.value for m in client.get_metric_history(run.info.run_id, mlflow_key("epoch_seconds"))]
    if not speeds and epoch_secs:  # Ultralytics logs epoch time, not images/s: train slices / epoch time
        from ichflow.data.splits import subset
        from ichflow.prepare import prepare_data

        prep = prepare_data(cfg)
        n_train = len(subset(prep.manifest, prep.split, "train"))
        speeds = [n_train / s for s in epoch_secs if s > 0]
    out = {
        "task": name, "wall_seconds": round(wall, 1), "config": CONFIGS[name],
        "amp": str(cfg.amp), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "split_digest": run.data.tags.get("ichflow.split_digest") or run.data.tags.get("ichflow.prepare_split_digest"),
        "train_images_per_s_median": round(statistics.median(speeds), 1) if speeds else None,
        "epoch_seconds_median": round(statistics.median(epoch_secs), 2) if epoch_secs else None,
        "metrics": {k: round(v, 4) for k, v in sorted(run_metrics(run).items())
                    if k.startswith(("test_", "val_", "best_epoch", "epochs_run", "train_seconds", "n_"))},
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    # `timeout` sends SIGTERM: turn it into an exception so the record below is still written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by the task's deadline (SIGTERM)"))
    results_file = Path(args.out) / "gpu_results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"machine": machine(), "tasks": {}}
    try:
        results["tasks"][args.task] = run_task(args.task, args.data)
    except BaseException as exc:  # record the failure (or the deadline) and keep the other tasks' results
        results["tasks"][args.task] = {"task": args.task, "error": f"{type(exc).__name__}: {exc}"}
        raise
    finally:
        results_file.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["tasks"][args.task], indent=1))


if __name__ == "__main__":
    main()
