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
# training runs log MLflow's system/* metrics: one sample every 5 s (MLflow's own default is 10 s)
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")
os.environ.setdefault(
    "YOLO_CONFIG_DIR", str(Path(os.environ.get("ICHFLOW_WORK_DIR", "work")).resolve() / "ultralytics")
)


def _credentials_out_of_tracking_uri() -> None:
    """``MLFLOW_TRACKING_URI=https://user:pass@host`` -> the URI without them, plus MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD: MLflow sends them as basic auth all the same, but prints and logs the URI (every
    "View run at ..." line) without the password."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    parts = urlsplit(uri)
    if parts.password is None:
        return
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    host = parts.netloc.rpartition("@")[2]
    os.environ["MLFLOW_TRACKING_URI"] = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


_credentials_out_of_tracking_uri()
