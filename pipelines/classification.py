"""Entry point ``classification``: bleed / no-bleed slice classifier (timm CNN), tracked in MLflow.

Synthetic phantom by default; ``--data_dir ../shared/phe-sich-ct-ids --preset phe`` for PHE-SICH-CT-IDS.
"""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.entrypoints import run_entry_point

if __name__ == "__main__":
    run_entry_point("classification")
