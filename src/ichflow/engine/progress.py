"""Progress bars drawn on a terminal only: in a log file (stderr not a TTY) a bar is only noise."""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm


def quiet_library_output() -> None:
    """Turn off what libraries print on every run that tells a user nothing.

    Off a terminal, MLflow's artifact-download bar (drawn each time a logged model is read back to verify it)
    is thousands of carriage-return frames on one line; its system-metrics monitor says at INFO that it started,
    stopped and skipped the GPU, around every training run. An explicit ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``
    is kept.
    """
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def progress(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, shown only when stderr is a terminal (and ``disable`` is false)."""
    return tqdm(iterable, disable=True if disable else None, **kwargs)  # tqdm: None = off unless a TTY
