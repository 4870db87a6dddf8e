"""The benchmark suite's pure logic: statistics, option parsing, tuning-file reading, report rendering.

No timing is asserted; the report is rendered from measured result dicts (the committed
``reports/benchmarks.json`` when present, and a minimal dict of the same shape).
"""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder of the repo, not part of the ichflow package
    sys.path.insert(0, str(ROOT))

from benchmarks import core  # noqa: E402
from benchmarks.runner import _parse_only  # noqa: E402
from benchmarks.tuning_results import flatten, summarise  # noqa: E402

REPORTS = ROOT / "reports"


def test_median_percentile_ratio():
    assert core.median([3, 1, 2]) == 2
    assert core.median([4, 1, 3, 2]) == 2.5
    assert core.median([1, float("nan"), None, "x", 3]) == 2
    assert math.isnan(core.median([]))
    assert core.percentile([1, 2, 3, 4, 5], 50) == 3
    assert core.percentile([10], 95) == 10
    assert core.percentile([0, 10], 95) == pytest.approx(9.5)
    assert core.ratio(1, 4) == 0.25
    assert math.isnan(core.ratio(1, 0)) and math.isnan(core.ratio(None, 2)) and math.isnan(core.ratio(float("nan"), 2))


def test_steady_and_scaling_exponent():
    assert core.steady([5, 1, 2]) == [1, 2]
    assert core.steady([5]) == [5]  # never empty when there is a value
    assert core.scaling_exponent([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    assert core.scaling_exponent([1, 2, 4], [3, 3, 3]) == pytest.approx(0.0)
    assert core.scaling_exponent([1, 2, 4], [1, 4, 16]) == pytest.approx(2.0)
    assert math.isnan(core.scaling_exponent([1], [2]))


def test_verdict_and_format():
    assert core.verdict(0.85, 0.8, True) == "met"
    assert core.verdict(0.75, 0.8, True) == "NOT met"
    assert core.verdict(0.01, 0.02, False) == "met"
    assert core.verdict(float("nan"), 0.02, False) == "not measured"
    assert core.fmt(None) == "n/a" and core.fmt(float("nan")) == "n/a"
    assert core.fmt(0.85671) == "0.857" and core.fmt(12345.6) == "12346"
    assert core.pct(0.0123, 2) == "1.23 %"
    assert core.size(214600) == "215 kB" and core.size(1004159) == "1 MB" and core.size(36) == "36 B"
    assert core.size(None) == "n/a"


def test_parse_only():
    assert _parse_only("")["pipeline"] == list(core.TASKS)
    assert set(_parse_only("")) == set(core.SECTIONS)
    assert _parse_only("pipeline:detection,tracking") == {"pipeline": ["detection"], "tracking": []}
    with pytest.raises(SystemExit):
        _parse_only("nonsense")
    with pytest.raises(SystemExit):
        _parse_only("pipeline:nosuchtask")


def test_tuning_summary_from_study_shaped_document():
    doc = {"pruning": {"median": {"trial_epochs_saved_by_pruning": 7, "trial_epochs_saved_fraction": 0.35}},
           "workers_1": {"trials_per_hour": 40.0}, "workers_2": {"trials_per_hour": 70.0}}
    assert flatten({"a": [{"b": 1}]}) == {"a.0.b": 1}
    s = summarise(doc)
    assert s["headline"]["pruning.median.trial_epochs_saved_fraction"] == 0.35
    speedup = [v for k, v in s["headline"].items() if k.startswith("trials/hour 2 workers")]
    assert speedup == [pytest.approx(70.0 / 40.0)]


def test_mlflow_timer_counts_calls_and_restores(tmp_path):
    import mlflow

    original = mlflow.log_metric
    mlflow.set_experiment("bench-timer-test")
    with core.MlflowTimer() as timer:
        with mlflow.start_run():
            mlflow.log_metric("x", 1.0)
            mlflow.log_metrics({"y": 2.0}, step=1)
    assert mlflow.log_metric is original
    assert timer.calls["log_metric"] == 1 and timer.calls["log_metrics"] == 1 and timer.calls["start_run"] == 1
    assert timer.tracking_seconds >= 0 and timer.model_seconds == 0


def _inference_task(in_process_p50: float, png_p50: float, integers_p50: float) -> dict:
    """One task of the inference section as benchmarks/inference.py writes it (target filled in by _target)."""
    from benchmarks.inference import _target

    task = {"in_process": {"p50_ms": in_process_p50, "p95_ms": in_process_p50 * 1.1, "scan_slices_per_s": 60.0},
            "served_png": {"payload": "base64 PNG per slice", "params": {}, "p50_ms": png_p50, "p95_ms": png_p50 * 1.2,
                           "scan_slices_per_s": 40.0, "payload_bytes_single": 214600, "payload_bytes_scan": 6636080,
                           "answer_bytes_single": 36, "answer_bytes_scan": 634},
            "served": {"p50_ms": integers_p50, "p95_ms": integers_p50 * 1.2, "scan_slices_per_s": 8.0,
                       "payload_bytes_single": 1004159, "payload_bytes_scan": 31251986, "answer_bytes_single": 36,
                       "answer_bytes_scan": 634, "startup_seconds": 20.0}}
    return {**task, **_target(task)}


def _minimal_results():
    task = {"real_images_per_s": 10.0, "ceiling_images_per_s": 11.0, "ratio": 10 / 11, "ratio_incl_first_epoch": 0.8,
            "input_only_images_per_s": 200.0, "workers": 1, "torch_threads": 2, "shape": "8×3×128×128",
            "wall_seconds": 60.0, "mlflow_tracking_seconds": 0.6, "mlflow_model_seconds": 3.0}
    return {"machine": {"cpu_model": "cpu", "cpu_cores": 2, "git_commit": "abc"},
            "sections": {"pipeline": {"tasks": {"segmentation": task, "detection": {"error": "exit 1: boom"}}},
                         "tracking": {"overhead_timed": 0.004, "overhead_ab": 0.01, "pair_overheads": [0.01],
                                      "off_seconds": 10, "logged_seconds": 10.1, "mlflow_calls": {"log_metrics": 0.03}},
                         "tuning": {"found": False, "note": "reports/tuning_synthetic.json does not exist yet"},
                         "inference": {"tasks": {"segmentation": {"in_process": {"p50_ms": 100, "p95_ms": 120},
                                                                  "served": {"error": "no ping"}},
                                                 "classification": _inference_task(20.0, 26.0, 150.0)}},
                         "scaling": {"prepare": {"points": [{"factor": 1, "slices": 144, "seconds": 1.0},
                                                            {"factor": 2, "slices": 288, "seconds": 1.9}],
                                                 "exponent": 0.93}}}}


def test_render_minimal_results():
    text = core.render_report(_minimal_results())
    assert "## 1. Input pipeline vs model ceiling" in text and "0.909" in text
    assert "exit 1: boom" in text
    assert "**Not measured**" in text and "tuning_synthetic.json" in text
    assert "0.40 %" in text  # timed tracking overhead
    assert "What limits each ratio" in text
    assert "--only" in text
    # inference: the compact (PNG) served p50, its ratio to in-process and the verdict, beside the integer payload
    assert "| classification | 20 | 22 | 26 | 31.2 | **1.3** | met | 150 | 180 |" in text
    assert "| served ÷ in-process p50 per slice, classification (base64 PNG) | ≤ 1.5 | 1.3 | met |" in text
    assert "| served ÷ in-process p50 per slice, segmentation (base64 PNG) | ≤ 1.5 | n/a | not measured |" in text
    assert "215 kB / 1 MB" in text and "6.64 MB / 31.3 MB" in text
    assert "= 1.3 with a base64 PNG" in text and "7.5 with JSON integers" in text


def test_served_png_ratio_is_the_two_p50s_and_the_target_follows_it():
    from benchmarks.inference import _target

    task = _inference_task(20.0, 26.0, 150.0)
    assert task["served_png_p50_ratio"] == pytest.approx(task["served_png"]["p50_ms"] / task["in_process"]["p50_ms"])
    assert core.served_png_ratio(task) == pytest.approx(1.3)
    assert task["target"] == {"max_ratio": core.GOAL_SERVED_RATIO, "met": True}
    assert _inference_task(20.0, 30.0, 150.0)["target"]["met"] is True            # 1.5 is within the goal
    slow = _inference_task(20.0, 31.0, 150.0)
    assert slow["served_png_p50_ratio"] == pytest.approx(1.55) and slow["target"]["met"] is False
    for missing in ({"in_process": {"p50_ms": 20.0}}, {"in_process": {"p50_ms": 20.0}, "served_png": {"error": "x"}},
                    {"error": "boom", "served_png": {"p50_ms": 26.0}}):
        assert math.isnan(core.served_png_ratio(missing))
        assert _target(missing) == {"served_png_p50_ratio": None,
                                    "target": {"max_ratio": core.GOAL_SERVED_RATIO, "met": None}}


def test_benchmark_png_is_what_the_served_model_reads():
    import numpy as np

    from benchmarks.inference import png_b64
    from ichflow.engine.scan import as_scan

    slice_u8 = np.random.default_rng(0).integers(0, 256, (64, 48), dtype=np.uint8)
    assert np.array_equal(as_scan(np.array([png_b64(slice_u8)], dtype=object)), slice_u8[None])


def test_render_committed_results():
    path = REPORTS / "benchmarks.json"
    if not path.exists():
        pytest.skip("no reports/benchmarks.json yet")
    results = json.loads(path.read_text())
    text = core.render_report(results)
    for name in results.get("sections", {}):
        assert core.command(name).split(" --only")[0] in text
    for task, t in results.get("sections", {}).get("pipeline", {}).get("tasks", {}).items():
        if "ratio" in t:
            assert core.fmt(t["ratio"]) in text


def test_tuning_summary_of_tuning_studies_layout():
    from benchmarks.tuning_results import summarise_studies

    doc = {"machine": {"date": "d", "commit": "c"}, "quick": False,
           "studies": [{"task": "segmentation", "trials_new": 12, "trials_complete": 7, "trials_pruned": 5,
                        "trials_failed": 0, "trial_epochs_run": 30, "trial_epochs_saved_by_pruning": 18,
                        "trial_epochs_saved_fraction": 0.375, "study_wall_seconds": 600, "best_value": 0.5,
                        "pruner": "median"}],
           "scaling": [{"n_workers": 1, "trials_per_hour": 30.0, "task": "segmentation", "pruner": "none"},
                       {"n_workers": 2, "trials_per_hour": 45.0, "task": "segmentation", "pruner": "none"}]}
    s = summarise_studies(doc)
    assert s["headline"]["pruning: share of trial-epochs saved, segmentation"] == 0.375
    assert s["headline"]["trials/hour 2 workers ÷ 1 worker"] == pytest.approx(1.5)
    doc["scaling_ratio"] = 1.49
    assert summarise_studies(doc)["headline"]["trials/hour 2 workers ÷ 1 worker"] == 1.49
