"""Entry point ``prepare``: manifest + validation report + patient split, logged to MLflow."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.cli import main_guard
from ichflow.prepare import DataConfig, run_prepare

if __name__ == "__main__":
    main_guard(run_prepare, DataConfig)
