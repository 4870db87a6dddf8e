"""Entry point ``multilabel``: IVH / IPH / SAH subtype classifier, patient-level k-fold CV in nested runs.

Synthetic phantom with subtype labels by default; ``--data_dir ../shared/ct-ich --preset ctich`` for CT-ICH,
``--dataset csv --data_dir labels.csv`` for a labels CSV (image,<class>,...).
"""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.entrypoints import run_entry_point

if __name__ == "__main__":
    run_entry_point("multilabel")
