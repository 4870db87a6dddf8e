"""The full pipeline behind the ``main`` entry point: every step as a child run of one parent run."""

from __future__ import annotations

from dataclasses import dataclass

from ichflow.prepare import DataConfig, run_prepare
from ichflow.tracking import log_params_once, task_run


@dataclass
class PipelineConfig:
    data_dir: str = ""
    dataset: str = "auto"


def run_pipeline(cfg: PipelineConfig) -> dict:
    results = {}
    with task_run("pipeline", run_name="pipeline"):
        log_params_once({"data_dir": cfg.data_dir, "dataset": cfg.dataset})
        prep = run_prepare(DataConfig(data_dir=cfg.data_dir, dataset=cfg.dataset))
        results["prepare"] = prep.report.counts
    return results
