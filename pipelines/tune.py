"""Entry point ``tune``: an Optuna study over one task, trials as child runs of this run."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.entrypoints import run_entry_point

if __name__ == "__main__":
    run_entry_point("tune")
