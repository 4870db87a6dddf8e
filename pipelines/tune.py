"""Entry point ``tune``: an Optuna study over one task, trials as child runs of this run."""

import ichflow  # noqa: F401
from ichflow.cli import main_guard
from ichflow.tuning import TuneConfig, run_tune

if __name__ == "__main__":
    main_guard(run_tune, TuneConfig)
