"""Entry point ``main``: the whole pipeline on one data folder (default: the synthetic phantom).

Each step runs as a child run of this run, so the MLflow UI shows one pipeline with its steps.
"""


import ichflow  # noqa: F401
from ichflow.cli import main_guard
from ichflow.pipeline import PipelineConfig, run_pipeline

if __name__ == "__main__":
    main_guard(run_pipeline, PipelineConfig)
