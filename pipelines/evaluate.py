"""Entry point ``evaluate``: a registered model on a labelled data folder, the task's metrics (eval_*) and figures."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.entrypoints import run_entry_point

if __name__ == "__main__":
    run_entry_point("evaluate")
