"""ichflow: MLOps platform for head-CT hemorrhage models.

Importing the package first makes every library it uses run offline and quietly:
the workplace (and many hospital networks) has no route to model hubs or telemetry.
"""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

# Set before albumentations / mlflow / ultralytics are imported anywhere.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations queries PyPI on import otherwise
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm/smp would try the Hugging Face hub for weights
os.environ.setdefault(
    "YOLO_CONFIG_DIR", str(Path(os.environ.get("ICHFLOW_WORK_DIR", "work")).resolve() / "ultralytics")
)
