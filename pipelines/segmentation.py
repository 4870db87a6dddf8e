"""Entry point ``segmentation``: PHE (edema) segmentation, trained, evaluated and registered in MLflow."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.entrypoints import run_entry_point

if __name__ == "__main__":
    run_entry_point("segmentation")
