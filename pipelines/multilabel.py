"""Entry point ``multilabel``: IVH / IPH / SAH subtype classifier, patient-level k-fold CV in nested runs.

Synthetic phantom with subtype labels by default; ``--data_dir ../shared/ct-ich --preset ctich`` for CT-ICH,
``--dataset csv --data_dir labels.csv`` for a labels CSV (image,<class>,...).
"""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.cli import main_guard
from ichflow.tasks.multilabel import MultilabelConfig, train_multilabel

if __name__ == "__main__":
    main_guard(train_multilabel, MultilabelConfig)
