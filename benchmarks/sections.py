"""Dispatch of one section inside its own process (called by the runner)."""

from __future__ import annotations

import ichflow  # noqa: F401  (offline environment before torch/mlflow/ultralytics are imported)


def run_section(name: str, task: str, quick: bool, models: dict) -> dict:
    if name == "pipeline":
        from benchmarks import pipeline

        return pipeline.run(task, quick)
    if name == "tracking":
        from benchmarks import tracking

        return tracking.run(quick)
    if name == "tuning":
        from benchmarks import tuning_results

        return tuning_results.run()
    if name == "inference":
        from benchmarks import inference

        return inference.run(quick, models)
    if name == "scaling":
        from benchmarks import scaling

        return scaling.run(quick)
    raise ValueError(f"unknown section {name!r}")
