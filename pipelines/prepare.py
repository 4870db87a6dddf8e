"""Entry point ``prepare``: manifest + validation report + patient split, logged to MLflow."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.entrypoints import run_entry_point

if __name__ == "__main__":
    run_entry_point("prepare")
