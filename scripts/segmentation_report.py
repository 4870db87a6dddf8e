"""Collect segmentation runs from an MLflow store into reports/segmentation_phe.json (the numbers the report
quotes, re-readable by a script).

    python scripts/segmentation_report.py --headline unet \
        --run unet <run_id> sqlite:///a/mlflow.db <time -v file> --run segformer <run_id> sqlite:///b/mlflow.db

Each ``--run LABEL RUN_ID TRACKING_URI [TIME_FILE]``: the run's parameters, val/test metrics (per patient mean, median,
95 % CI, pooled), the inference ablation table, per-patient test rows and, from the ``/usr/bin/time -v``
output of the command that ran it, wall and CPU seconds. The headline run's test metrics are also written
at the top level (``test.dice_mean``, ``test.dice_median``, ``test.dice_pooled``, ``test.hd95_median`` ...).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path

import mlflow
import pandas as pd

from ichflow.metric_names import run_metrics

KEYS = ("dice", "dice_median", "dice_ci_low", "dice_ci_high", "dice_pooled", "iou", "iou_pooled",
        "sensitivity", "sensitivity_pooled", "specificity", "hd95_mm", "hd95_mm_median", "hd95_mm_pooled", "nsd",
        "nsd_median", "nsd_pooled", "slice_precision", "slice_recall", "slice_f1", "volume_abs_err_ml",
        "volume_abs_err_ml_median", "threshold", "n_patients")


def _times(path: str | None) -> dict:
    if not path:
        return {}
    text = Path(path).read_text()
    grab = {name: re.search(rf"{pattern}:\s*([\d.:]+)", text) for name, pattern in
            (("user", r"User time \(seconds\)"), ("system", r"System time \(seconds\)"),
             ("wall", r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\)"))}
    wall = grab["wall"].group(1).split(":") if grab["wall"] else []
    seconds = sum(float(v) * 60 ** i for i, v in enumerate(reversed(wall)))
    return {"wall_seconds": round(seconds, 1),
            "cpu_seconds": round(float(grab["user"].group(1)) + float(grab["system"].group(1)), 1)}


def _csv(run_id: str, path: str) -> list[dict]:
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    except Exception:   # an older run without that table
        return []
    return json.loads(pd.read_csv(local).to_json(orient="records"))


def _split(metrics: dict, split: str) -> dict:
    out = {k: metrics.get(f"{split}_{k}") for k in KEYS}
    out["dice_mean"] = out.pop("dice")
    out["hd95_median"] = out["hd95_mm_median"]   # the name for it
    return out


def collect_run(tracking_uri: str, run_id: str, time_file: str | None) -> dict:
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    m, p = run_metrics(run), run.data.params
    return {"run_id": run_id, "run_name": run.info.run_name, "status": run.info.status,
            "tracking_uri": tracking_uri, "params": {k: p[k] for k in sorted(p) if not k.startswith("norm")},
            "best_epoch": m.get("best_epoch"), "epochs_run": m.get("epochs_run"),
            "train_seconds": m.get("train_seconds"), **_times(time_file),
            "min_component_voxels": m.get("min_component_voxels"), "ensemble_members": m.get("ensemble_members"),
            "val": _split(m, "val"), "test": _split(m, "test"),
            "ablation": _csv(run_id, "eval/inference_ablation.csv"),
            "test_per_patient": _csv(run_id, "eval/test_per_patient.csv")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", nargs="+", required=True,
                    metavar="LABEL RUN_ID TRACKING_URI [TIME_FILE]")
    ap.add_argument("--headline", required=True)
    ap.add_argument("--out", default="reports/segmentation_phe.json")
    ap.add_argument("--machine", default="2-core Intel Xeon CPU, no GPU, 23 GiB RAM; torch 2.14.1")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.run:
        if len(spec) not in (3, 4):
            print(f"error: --run needs LABEL RUN_ID TRACKING_URI [TIME_FILE]; got {' '.join(spec)}", file=sys.stderr)
            return 2
        runs[spec[0]] = collect_run(spec[2], spec[1], spec[3] if len(spec) == 4 else None)
    if args.headline not in runs:
        print(f"error: --headline {args.headline!r} is not one of the --run labels", file=sys.stderr)
        return 2
    report = {"machine": args.machine, "headline": args.headline, "test": runs[args.headline]["test"],
              "val": runs[args.headline]["val"], "runs": runs}
    buf = io.StringIO()
    json.dump(report, buf, indent=1, default=float)
    Path(args.out).write_text(buf.getvalue() + "\n")
    print(f"wrote {args.out}: {', '.join(runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
