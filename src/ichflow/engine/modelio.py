"""Logging a trained model as an MLflow pyfunc (signature, input example) and registering a version."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import mlflow

import ichflow

# What a served model needs (pinned to what trained it); listing them avoids MLflow's slow inference.
_SERVING_PACKAGES = ("torch", "torchvision", "timm", "segmentation-models-pytorch", "albumentations", "numpy",
                     "pandas", "pillow", "scikit-learn", "mlflow", "ultralytics")


def pip_requirements(packages=_SERVING_PACKAGES) -> list[str]:
    reqs = []
    for pkg in packages:
        try:
            reqs.append(f"{pkg}=={md.version(pkg)}")
        except md.PackageNotFoundError:
            continue
    return reqs


def log_pyfunc(python_model, artifacts: dict[str, str], signature, input_example, registered_model_name: str | None,
               name: str = "model", metadata: dict | None = None):
    """Log ``python_model`` with the ichflow code bundled (the model loads where ichflow is not installed).

    Returns MLflow's ModelInfo; ``registered_model_version`` is set when a name was given.
    """
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=python_model,
        artifacts=artifacts,
        signature=signature,
        input_example=input_example,
        registered_model_name=registered_model_name or None,
        code_paths=[str(Path(ichflow.__file__).parent)],
        pip_requirements=pip_requirements(),
        metadata=metadata,
    )
