"""Where ichflow reads data and writes what it derives.

Environment variables (all optional):

``ICHFLOW_DATA_DIR``  default data folder when no ``data_dir`` is given (else: synthetic phantom)
``ICHFLOW_WORK_DIR``  root of everything derived; default ``./work``

Fixed layout under the work dir (nothing in it is edited by hand; delete it to rebuild)::

    work/
      synthetic/<variant>-<digest>/        generated phantom data in the published layouts
      prepared/<dataset>-<digest>/         manifest.csv, split.csv, validation_report.{md,json}
      cache/                               decoded slices, YOLO datasets, ... (per task)
      predictions/<pipeline run_id>/       what the main job's predict step wrote (its closing summary names it)
      runs/<run_id>/                       checkpoints and scratch of one training run
        checkpoint_best.pt                 the best epoch's weights (every torch task)
        model_config.json                  what the logged pyfunc needs besides the weights

Fixed artifact names in every training, evaluate and promote run (``<split>``: train, val, test, oof, eval)::

    eval/<split>_<what>.{csv,json,md,txt}  per-split tables and metric sets (per patient, predictions, ...)
    figures/<split>_<what>.png             per-split figures (confusion, ROC/PR, overlays, ...)
    figures/training_<what>.png            figures about the training as a whole
    data/                                  manifest, split, validation report (``prepare``)
    model/                                 the pyfunc (``mlflow.pyfunc.log_model``)
      ultralytics/                         Ultralytics settings + font (keeps it offline)
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "ICHFLOW_DATA_DIR"
WORK_DIR_ENV = "ICHFLOW_WORK_DIR"


CHECKPOINT = "checkpoint_best.pt"
MODEL_CONFIG = "model_config.json"
FAILURE_TAG = "ichflow.failure"   # run tag: why a run ended FAILED or KILLED (store fault, signal, process gone)


def eval_artifact(split: str, what: str, ext: str = "csv") -> str:
    return f"eval/{split}_{what}.{ext}"


def figure_artifact(split: str, what: str) -> str:
    return f"figures/{split}_{what}.png"


def work_dir() -> Path:
    return Path(os.environ.get(WORK_DIR_ENV, "work")).resolve()


def synthetic_dir() -> Path:
    return work_dir() / "synthetic"


def prepared_dir() -> Path:
    return work_dir() / "prepared"


def cache_dir() -> Path:
    return work_dir() / "cache"


def runs_dir() -> Path:
    return work_dir() / "runs"


def default_data_dir() -> str:
    """The data folder to use when none was given: $ICHFLOW_DATA_DIR or '' (synthetic)."""
    return os.environ.get(DATA_DIR_ENV, "")
