"""Entry point ``main``: the whole pipeline on one data folder (default: the synthetic phantom).

Each step runs as a child run of this run, so the MLflow UI shows one pipeline with its steps.
"""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.entrypoints import run_entry_point

if __name__ == "__main__":
    run_entry_point("main")
