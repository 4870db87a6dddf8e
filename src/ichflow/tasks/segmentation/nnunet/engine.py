"""Train nnU-Net v2's ``2d`` configuration on the prepared split; predict whole scans with nnU-Net's predictor.

:func:`train_nnunet` runs nnU-Net's own pipeline inside ``work_folder``: ``raw/`` (the dataset,
:mod:`.dataset`), ``preprocessed/`` (fingerprint, plans, preprocessed 2d data), ``results/`` (the trained
model folder: ``plans.json``, ``dataset.json``, ``dataset_fingerprint.json``, ``fold_0/`` with
``checkpoint_best.pth``, ``checkpoint_final.pth``, the served ``checkpoint_served.pth``, training log and
progress plot). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import pandas as pd
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                  plan_experiment_dataset, preprocess_dataset)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from ichflow.engine.device import default_workers
from ichflow.engine.scan import as_scan
from ichflow.engine.trainer import FitResult
from ichflow.tasks.segmentation.nnunet.dataset import DATASET_ID, DATASET_NAME, LABELS, write_raw_dataset
from ichflow.tasks.segmentation.nnunet.trainer import BudgetedTrainer, StopTraining
from ichflow.tasks.segmentation.data import probability_logits
from ichflow.tasks.segmentation.postprocess import drop_small_components
from ichflow.tracking import log_params_once

CONFIGURATION = "2d"
FOLD = 0
CHECKPOINT_NAME = "checkpoint_best.pth"   # best EMA pseudo-Dice on our val patients (nnU-Net's default: final)
SERVED_CHECKPOINT = "checkpoint_served.pth"   # the best weights and what the predictor reads of it
VAL_ITERATION_SHARE = 0.2                 # nnU-Net's 50 validation per 250 training iterations


def spacing_zyx(cfg) -> tuple[float, float, float]:
    """(slice thickness, pixel, pixel) in mm: nnU-Net's (z, y, x) order of a case."""
    return float(cfg.slice_thickness_mm), float(cfg.pixel_spacing_mm), float(cfg.pixel_spacing_mm)


def nnunet_settings(work_folder: str | Path, data_workers: int) -> dict[str, str]:
    """nnU-Net's folders inside ``work_folder``, ``data_workers`` augmentation processes (0: in the training
    process) and no torch.compile unless ``nnUNet_compile`` is set."""
    work_folder = Path(work_folder)
    return {"nnUNet_raw": str(work_folder / "raw"), "nnUNet_preprocessed": str(work_folder / "preprocessed"),
            "nnUNet_results": str(work_folder / "results"), "nnUNet_n_proc_DA": str(data_workers),
            "nnUNet_compile": os.environ.get("nnUNet_compile", "f")}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """``values`` set in os.environ (nnU-Net's configuration; spawned workers inherit it), restored after."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def plan_and_preprocess(processes: int, memory_target_gb: float) -> str:
    """Fingerprint, plan (nnU-Net's default planner) and preprocess the 2d configuration; the plans name."""
    extract_fingerprint_dataset(DATASET_ID, num_processes=processes, clean=True, verbose=False,
                                show_progress_bar=False)
    _, plans_name = plan_experiment_dataset(DATASET_ID, gpu_memory_target_in_gb=memory_target_gb)
    preprocess_dataset(DATASET_ID, plans_name, configurations=(CONFIGURATION,), num_processes=(processes,),
                       show_progress_bar=False)
    return plans_name


def in_fresh_process(function: Callable, *args):
    """``function(*args)`` in a freshly spawned interpreter. nnU-Net lists the raw files with a forked Pool
    of 12; a fork of a process whose other threads (MLflow's, torch's) hold locks can hang its children
    for ever, so the forks happen in a process that runs no such threads."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def make_trainer(plans_name: str, cfg, device: torch.device, on_epoch) -> BudgetedTrainer:
    """The trainer of fold 0 (= our train/val split) with the run's schedule: ``cfg.epochs`` epochs of
    ``cfg.steps_per_epoch`` iterations, nnU-Net's share of validation iterations, ``cfg.time_budget_min``."""
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    plans = load_json(str(preprocessed / f"{plans_name}.json"))
    plans["continue_training"] = False   # nnU-Net's entry point adds this key; its trainer pops it
    trainer = BudgetedTrainer(plans=plans, configuration=CONFIGURATION, fold=FOLD,
                              dataset_json=load_json(str(preprocessed / "dataset.json")), device=device)
    trainer.set_schedule(cfg.epochs, cfg.steps_per_epoch, max(1, round(cfg.steps_per_epoch * VAL_ITERATION_SHARE)),
                         cfg.time_budget_min, on_epoch)
    return trainer


def run_training(trainer: BudgetedTrainer) -> FitResult:
    """nnU-Net's training loop until its last epoch or the time budget; the epochs as a FitResult."""
    t_start = time.perf_counter()
    try:
        with matplotlib.rc_context():   # nnU-Net's progress plot restyles matplotlib globally (seaborn)
            trainer.run_training()
    except StopTraining:
        trainer.on_train_end()   # what the loop does after its last epoch: checkpoint_final, loaders stopped
    except BaseException:
        trainer.stop_data_loaders()
        raise
    history = [{"epoch": e, **trainer.epoch_metrics(e)} for e in range(trainer.current_epoch)]
    best = trainer.best_epoch()
    return FitResult(best_epoch=best, best_score=history[best]["val_pseudo_dice_ema"], epochs_run=len(history),
                     history=history, train_seconds=time.perf_counter() - t_start,
                     stopped_by_time_budget=trainer.budget.reached,
                     checkpoint=str(export_weights(Path(trainer.output_folder) / CHECKPOINT_NAME)))


def export_weights(checkpoint: Path) -> Path:
    """``SERVED_CHECKPOINT`` next to ``checkpoint``: the keys nnU-Net's predictor reads (weights, trainer name,
    configuration, mirroring axes), without the optimizer and logger state (half the size, and plain tensors
    and built-ins, so it loads with ``weights_only=True``)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    served = {"network_weights": state["network_weights"], "trainer_name": state["trainer_name"],
              "init_args": {"configuration": state["init_args"]["configuration"], "fold": state["init_args"]["fold"]},
              "inference_allowed_mirroring_axes": tuple(int(a) for a in state["inference_allowed_mirroring_axes"])}
    target = checkpoint.with_name(SERVED_CHECKPOINT)
    torch.save(served, target)
    return target


def log_plan(trainer: BudgetedTrainer) -> None:
    plan = trainer.configuration_manager
    log_params_once({"nnunet_configuration": CONFIGURATION, "nnunet_patch_size": "x".join(map(str, plan.patch_size)),
                     "nnunet_batch_size": plan.batch_size, "nnunet_stages": len(plan.pool_op_kernel_sizes),
                     "nnunet_iterations_per_epoch": trainer.num_iterations_per_epoch,
                     "nnunet_val_iterations_per_epoch": trainer.num_val_iterations_per_epoch})


def train_nnunet(cfg, parts: dict[str, pd.DataFrame], work_folder: str | Path, device: torch.device,
                 on_epoch: Callable[[int, dict], None] | None = None,
                 memory_target_gb: float = 8.0) -> NnUNetNetwork:
    """Train nnU-Net's 2d U-Net on ``parts["train"]`` with ``parts["val"]`` as its validation fold.

    ``cfg``: a SegmentationConfig (epochs, steps_per_epoch, time_budget_min, num_workers, pixel_spacing_mm,
    slice_thickness_mm are used; patch and batch size are nnU-Net's own plan, sized for ``memory_target_gb``
    of accelerator memory, nnU-Net's planner default 8). ``parts``: the prepared manifest's splits as
    :func:`ichflow.data.splits.subset` returns them (a "test" part is ignored: never written, never seen).
    Inside the active MLflow run: logs the plan's params and, per epoch (step = epoch), train_loss, val_loss,
    val_pseudo_dice, val_pseudo_dice_ema, lr, epoch_seconds; then calls ``on_epoch(epoch, metrics)``.
    Returns the network of the best epoch; its ``fit_result`` is the training as a :class:`FitResult`
    (``best_score``: EMA pseudo-Dice; ``checkpoint``: the served weights file).
    ``work_folder`` must be new or empty (FileExistsError otherwise: a previous dataset's cases, plans or
    checkpoints would be mixed in). Call it from code under ``if __name__ == "__main__"``: nnU-Net
    preprocesses in spawned processes, which import the main module.
    """
    work_folder = Path(work_folder)
    if work_folder.is_dir() and any(work_folder.iterdir()):
        raise FileExistsError(f"{work_folder}: the nnU-Net work folder must be new or empty")
    workers = default_workers() if cfg.num_workers < 0 else cfg.num_workers
    # the planner sets torch's threads to nnUNet_n_proc_DA, so 0 (augment in-process) only for training
    with environment(nnunet_settings(work_folder, max(1, workers))):
        write_raw_dataset(parts["train"], parts["val"], os.environ["nnUNet_raw"], spacing_zyx(cfg))
        plans_name = in_fresh_process(plan_and_preprocess, max(1, workers), memory_target_gb)
        with environment({"nnUNet_n_proc_DA": str(workers)}):
            trainer = make_trainer(plans_name, cfg, device, on_epoch)
            log_plan(trainer)
            fit = run_training(trainer)
    network = NnUNetNetwork.load(trainer.output_folder_base, spacing_zyx(cfg), device)
    network.fit_result = fit
    return network


@dataclass
class NnUNetNetwork:
    """A trained nnU-Net model behind nnU-Net's predictor (its preprocessing, sliding window with Gaussian
    weighting, mirroring test-time augmentation, resampling back).

    Called like :class:`ichflow.tasks.segmentation.data.ScanPredictor` (``network(slices)`` -> (probabilities
    post-processed at ``threshold`` / ``min_voxels``, logits of the raw ones); ``models``: the torch network),
    so the smp engine's ``evaluate_split`` / ``predict_split`` and report code take it as it is.
    """

    files: dict[str, Path]                   # plans, dataset (dataset.json), checkpoint (+ fingerprint)
    spacing_zyx: tuple[float, float, float]
    predictor: nnUNetPredictor
    threshold: float = 0.5
    min_voxels: int = 0
    fit_result: FitResult | None = None

    @classmethod
    def load(cls, model_folder: str | Path, spacing_zyx: tuple[float, float, float], device: torch.device,
             mirroring: bool = True) -> NnUNetNetwork:
        """From nnU-Net's model folder (plans.json, dataset.json, fold_0/``SERVED_CHECKPOINT``)."""
        folder = Path(model_folder)
        files = {"plans": folder / "plans.json", "dataset": folder / "dataset.json",
                 "checkpoint": folder / f"fold_{FOLD}" / SERVED_CHECKPOINT}
        network = cls.from_files(files, spacing_zyx, device, mirroring)
        if (folder / "dataset_fingerprint.json").is_file():
            network.files["fingerprint"] = folder / "dataset_fingerprint.json"
        return network

    @classmethod
    def from_files(cls, files: dict[str, str | Path], spacing_zyx: tuple[float, float, float], device: torch.device,
                   mirroring: bool = True, threshold: float = 0.5, min_voxels: int = 0) -> NnUNetNetwork:
        """From ``files["plans"]``, ``files["dataset"]`` and ``files["checkpoint"]`` (an exported one);
        ``spacing_zyx`` in mm."""
        plans_manager = PlansManager(load_json(str(files["plans"])))
        dataset_json = load_json(str(files["dataset"]))
        state = torch.load(files["checkpoint"], map_location="cpu", weights_only=True)
        plan = plans_manager.get_configuration(state["init_args"]["configuration"])
        # nnUNetTrainer's architecture, built without nnU-Net's lookup of the trainer by its class name
        network = nnUNetTrainer.build_network_architecture(
            plans_manager, plan, determine_num_input_channels(plans_manager, plan, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
        network.load_state_dict(state["network_weights"])
        predictor = nnUNetPredictor(use_mirroring=mirroring, device=device, allow_tqdm=False)
        predictor.manual_initialization(network.to(device).eval(), plans_manager, plan, [state["network_weights"]],
                                        dataset_json, state["trainer_name"], state["inference_allowed_mirroring_axes"])
        return cls({k: Path(v) for k, v in files.items()}, tuple(float(s) for s in spacing_zyx), predictor,
                   threshold, min_voxels)

    @property
    def models(self) -> list[torch.nn.Module]:
        return [self.predictor.network]

    @property
    def tta(self) -> str:
        return "mirror" if self.predictor.use_mirroring else "none"

    def spec(self) -> dict:
        """The JSON-able description of the model (the served model's ``model_config.json["model"]``)."""
        plan = self.predictor.configuration_manager
        return {"engine": "nnunet", "configuration": CONFIGURATION,
                "plans_name": self.predictor.plans_manager.plans_name,
                "patch_size": [int(s) for s in plan.patch_size], "nnunetv2": md.version("nnunetv2")}

    def predict_scan(self, slices) -> np.ndarray:
        """float32 (N, H, W) edema probabilities for the 8-bit slices (N, H, W) of ONE scan in axial order."""
        scan = as_scan(slices)
        _, probabilities = self.predictor.predict_single_npy_array(
            scan[None].astype(np.float32), {"spacing": list(self.spacing_zyx)}, None, None, True)
        return np.ascontiguousarray(probabilities[LABELS["edema"]], dtype=np.float32)

    def __call__(self, slices) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities post-processed at ``threshold`` / ``min_voxels``, logits of the raw probabilities)."""
        probs = self.predict_scan(slices)
        return drop_small_components(probs, self.threshold, self.min_voxels), probability_logits(probs)
