"""Entry point ``evaluate``: a registered model on a labelled data folder, the task's metrics (eval_*) and figures."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.cli import main_guard
from ichflow.evaluation import EvaluateConfig, run_evaluate

if __name__ == "__main__":
    main_guard(run_evaluate, EvaluateConfig)
