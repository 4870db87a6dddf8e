"""Where ichflow reads data and writes what it derives.

Environment variables (all optional):

``ICHFLOW_DATA_DIR``  default data folder when no ``data_dir`` is given (else: synthetic phantom)
``ICHFLOW_WORK_DIR``  root of everything derived; default ``./work``

Fixed layout under the work dir (nothing in it is edited by hand; delete it to rebuild)::

    work/
      synthetic/<variant>-<digest>/        generated phantom data in the published layouts
      prepared/<dataset>-<digest>/         manifest.csv, split.csv, validation_report.{md,json}
      cache/                               decoded slices, YOLO datasets, ... (per task)
      runs/<run_id>/                       checkpoints and scratch of one training run
      ultralytics/                         Ultralytics settings + font (keeps it offline)
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "ICHFLOW_DATA_DIR"
WORK_DIR_ENV = "ICHFLOW_WORK_DIR"


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
