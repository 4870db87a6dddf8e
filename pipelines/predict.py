"""Entry point ``predict``: masks / boxes / overlays and a CSV of slice scores from a registered model."""

import ichflow  # noqa: F401
from ichflow.cli import main_guard
from ichflow.serving import PredictConfig, run_predict

if __name__ == "__main__":
    main_guard(run_predict, PredictConfig)
