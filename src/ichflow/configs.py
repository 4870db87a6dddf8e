"""The parameters of the entry points that are not a training task, and those every task shares.

One dataclass per entry point; each field becomes a ``--name value`` flag (``ichflow.cli``), and its trailing
``# comment`` is that flag's ``--help``. This module imports nothing heavy (no torch, mlflow, pandas), so
parsing a command line and ``--help`` stay fast; the modules that run an entry point import their config
from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ichflow.cli import choice
from ichflow.tasks.spec import TASKS

DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "bf16", "fp16", "off")
PRUNERS = ("median", "hyperband", "none")
PATIENTS = ("all", "test")
QUICK = ("true", "tiny", "false")


@dataclass
class DataConfig:
    """Which data to read and how to split it by patient."""

    data_dir: str = ""            # data folder; '' = $ICHFLOW_DATA_DIR, else the synthetic phantom
    dataset: str = "auto"         # reader: auto (from data_dir's layout) | phe | phe_nifti | ctich | synthetic |
    #                               synthetic-ctich
    val_fraction: float = 0.15    # share of the patients in the validation split
    test_fraction: float = 0.15   # share of the patients in the test split
    n_folds: int = 5              # patient folds over train + val, for the tasks that cross-validate
    split_seed: int = 42          # seed of the patient-level split (same data + seed = same split)
    synthetic_patients: int = 12  # phantom without data_dir: number of patients
    synthetic_slices: int = 12    # phantom without data_dir: slices per patient


@dataclass
class TrainConfig(DataConfig):
    """Data selection (see DataConfig) plus the knobs every torch task has."""

    preset: str = ""              # named preset: sets every parameter you do not give ('' = none)
    seed: int = 0                 # seed of weights, sampling and augmentation
    device: str = "auto"          # auto | cpu | cuda | cuda:<index> | mps
    amp: str = choice("auto", AMP_MODES)  # mixed precision; auto = on with CUDA only
    epochs: int = 20              # maximum number of epochs
    patience: int = 8             # early stopping: epochs without improvement of the monitored val metric
    lr: float = 1e-3              # AdamW learning rate
    weight_decay: float = 1e-4    # AdamW weight decay
    batch_size: int = 8           # training batch size
    aug_strength: float = 0.5     # 0..1, scales every augmentation (Optuna tunes it)
    in_channels: int = 3          # 1 = the slice, 3 = 2.5D (slice below, slice, slice above)
    num_workers: int = -1         # DataLoader workers, -1 = automatic
    register: bool = True         # register the logged model as a new version in the Model Registry
    evaluate_test: bool = True    # False inside tuning trials: the test split is touched once, for the best


@dataclass
class TuneConfig:
    """An Optuna study over one task."""

    task: str = choice("segmentation", TASKS)  # the task whose parameters are searched
    n_trials: int = 12             # trials to finish in this study (all workers together)
    study_name: str = ""           # '' -> ichflow-<task>; the same name resumes the study
    storage: str = ""              # '' -> journal file work/optuna/<study>.journal; or an RDB URL
    n_workers: int = 1             # trial processes against the same storage
    timeout_min: float = 0.0       # 0 = no time limit (per worker)
    pruner: str = choice("median", PRUNERS)  # stops unpromising trials early by their per-epoch val metric
    space: str = ""                # search-space file; '' -> tuning/<task>.py
    seed: int = 0                  # sampler seed (worker k uses seed + k)
    data_dir: str = ""             # data folder of every trial (see prepare)
    dataset: str = "auto"          # reader of every trial (see prepare)
    overrides: str = ""            # extra fixed task params for every trial: "epochs=3,batch_size=4"
    refit_best: bool = True        # retrain the best params once with the test split + registration
    heartbeat_s: int = 60          # Optuna heartbeat of running trials (stale after 2x); 0 = off


@dataclass
class EvaluateConfig(DataConfig):
    """Evaluate a registered model on a labelled data folder: the task's metrics (eval_*) and figures."""

    model_uri: str = "models:/ich-segmentation@champion"  # registered model (models:/name@alias) or runs:/<id>/model
    patients: str = choice("all", PATIENTS)  # all = every patient | test = the test part of the patient-level split


@dataclass
class PromoteConfig:
    """Promote a candidate (a run, or the refit of a study's best trial) if it beats @champion."""

    task: str = choice("segmentation", TASKS)  # the task whose registered model is promoted
    run_id: str = ""         # the candidate's training run; '' = the refit of the newest tune study's best trial
    study_name: str = ""     # '' with no run_id -> the newest tune run of this task
    rule: str = ""           # rule file; '' -> registry/<task>.py


@dataclass
class HistoryConfig:
    """Print the promotion log of a registered model."""

    task: str = choice("segmentation", TASKS)  # the task whose registered model's decisions are printed


@dataclass
class PipelineConfig:
    """Everything end to end on one data folder (default: the synthetic phantom)."""

    data_dir: str = ""          # data folder of every step (see prepare); '' = the synthetic phantom
    dataset: str = "auto"       # reader of every step (see prepare)
    quick: str = choice("true", QUICK)  # true: short schedules (the embedded default); tiny: smoke-test
    #                                     schedules; false: each entry point's own defaults


@dataclass
class PredictConfig:
    """Predict with a registered model on 8-bit slices or a HU scan (DICOM series, NIfTI): masks/boxes/overlays, a
    CSV of slice scores, and for a HU scan a NIfTI mask, a DICOM-SEG and the lesion volume in mL."""

    model_uri: str = "models:/ich-segmentation@champion"  # registered model (models:/name@alias) or runs:/<id>/model
    input: str = ""          # image, folder of slices, data folder, DICOM series folder or NIfTI (.nii/.nii.gz)
    output: str = "predictions"  # output folder (replaced as a whole when the run succeeds)
    overlays: bool = True    # write overlays/<scan>/<slice>.png where something was found
    series_uid: str = ""     # DICOM folder holding several series: the SeriesInstanceUID to read
