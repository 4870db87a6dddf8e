"""Entry point ``history``: print the promotion log of a registered model."""

import ichflow  # noqa: F401
from ichflow.cli import main_guard
from ichflow.registry import HistoryConfig, run_history

if __name__ == "__main__":
    main_guard(run_history, HistoryConfig)
