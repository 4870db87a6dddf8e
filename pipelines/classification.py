"""Entry point ``classification``: bleed / no-bleed slice classifier (timm CNN), tracked in MLflow.

Synthetic phantom by default; ``--data_dir ../shared/phe-sich-ct-ids --preset phe`` for PHE-SICH-CT-IDS.
"""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.cli import main_guard
from ichflow.tasks.classification import ClassificationConfig, train_classification

if __name__ == "__main__":
    main_guard(train_classification, ClassificationConfig)
