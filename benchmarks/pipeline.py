"""Section 1: training images/s of each task's real entry point ÷ the bare model on pre-loaded batches.

Run one task per process (``python -m benchmarks section pipeline --task <task>``): importing Ultralytics
changes torch's thread count for the whole process, and each entry point should start cold, as a user's does.

Real path: ``train_<task>(cfg)`` exactly as the entry point runs it (its own MLflow run, data preparation,
DataLoader workers, augmentation, validation, model logging). The benchmark only *observes*: it wraps
``Trainer.train_epoch`` (torch tasks) or adds Ultralytics callbacks (YOLO) to read the per-epoch images/s
and to keep a handle on the trainer, and times MLflow calls (:class:`benchmarks.core.MlflowTimer`).

Ceiling: right after the run, the same trainer object (model, loss, optimizer, grad clipping, threads) runs
on batches drawn from the same loader beforehand and held in memory; for YOLO the same forward/loss/backward
and optimizer cadence as Ultralytics' loop on pre-processed batches.
"""

from __future__ import annotations

import dataclasses
import os
import time

from benchmarks.core import MlflowTimer, median, patched, ratio, steady


def task_config(task: str, quick: bool):
    """The entry-point config each task is benchmarked with (the task's defaults, sized for the CPU)."""
    if task == "segmentation":
        from ichflow.tasks.segmentation import SegmentationConfig

        return SegmentationConfig(epochs=2 if quick else 3, steps_per_epoch=4 if quick else 10, patience=10)
    if task == "classification":
        from ichflow.tasks.classification import ClassificationConfig

        return ClassificationConfig(epochs=2 if quick else 3, patience=10, n_boot=50 if quick else 200,
                                    gradcam_per_group=1)
    if task == "detection":
        from ichflow.tasks.detection.config import DetectionConfig

        return DetectionConfig(epochs=2 if quick else 3, patience=10, overlays=2)
    if task == "multilabel":
        from ichflow.tasks.multilabel import MultilabelConfig

        return MultilabelConfig(n_folds=3, epochs=2 if quick else 3, patience=10)
    raise ValueError(f"unknown task {task!r}")


def train_fn(task: str):
    if task == "segmentation":
        from ichflow.tasks.segmentation import train_segmentation
        return train_segmentation
    if task == "classification":
        from ichflow.tasks.classification import train_classification
        return train_classification
    if task == "detection":
        from ichflow.tasks.detection.train import train_detection
        return train_detection
    if task == "multilabel":
        from ichflow.tasks.multilabel import train_multilabel
        return train_multilabel
    raise ValueError(task)


def _config_dict(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if not isinstance(v, (list, dict))}


def run(task: str, quick: bool = False, cfg=None) -> dict:
    cfg = cfg or task_config(task, quick)
    if task == "detection":
        return _run_yolo(cfg, quick)
    return _run_torch(task, cfg, quick)


# ------------------------------------------------------------------------------------------ torch tasks
def _preload(dataset, batch_size: int, n_batches: int) -> list:
    """Batches built in this process straight from the dataset (the real loader's stream is not touched)."""
    import torch

    n = len(dataset)
    return [torch.utils.data.default_collate([dataset[(b * batch_size + i) % n] for i in range(batch_size)])
            for b in range(n_batches)]


def _run_torch(task: str, cfg, quick: bool) -> dict:
    import copy

    import torch

    from ichflow.engine import trainer as tr

    epochs: list[dict] = []
    kits: dict[int, dict] = {}
    orig = tr.Trainer.train_epoch

    def ceiling_rep(kit: dict, steps: int) -> float:
        return orig(kit["trainer"], [kit["batches"][i % len(kit["batches"])] for i in range(steps)],
                    -1, steps)["train_images_per_s"]

    def train_epoch(self, loader, epoch, steps=None):
        out = orig(self, loader, epoch, steps)
        n_steps = steps or len(loader)
        kit = kits.get(id(self))
        if kit is None:  # first epoch of this trainer (fold): a copy of it + batches held in memory
            twin = copy.deepcopy(self)  # model, optimizer state, loss, grad clipping: same work per step
            twin.scheduler = None       # (stepping a schedule is not model work; the copy keeps the real one intact)
            kit = kits[id(self)] = {"trainer": twin, "loader": loader,
                                    "batches": _preload(loader.dataset, loader.batch_size, min(8, n_steps))}
            orig(twin, kit["batches"], -1, min(n_steps, 2))  # warm-up of the copy
        # the paired measurement: right after this real epoch, the same number of steps on the copy
        ceil = ceiling_rep(kit, n_steps)
        epochs.append({"trainer": id(self), "epoch": epoch, "real": out["train_images_per_s"], "ceiling": ceil,
                       "steps": n_steps, "real_seconds": out["epoch_seconds"]})
        return out

    t0 = time.perf_counter()
    with patched(tr.Trainer, "train_epoch", train_epoch), MlflowTimer() as timer:
        result = train_fn(task)(cfg)
    wall = time.perf_counter() - t0

    # steady = without each trainer's (fold's) first epoch (worker start-up, allocator warm-up)
    by_trainer: dict[int, list[dict]] = {}
    for e in epochs:
        by_trainer.setdefault(e["trainer"], []).append(e)
    all_e = [e for es in by_trainer.values() for e in es]
    steady_e = [e for es in by_trainer.values() for e in steady(es)]
    paired = [ratio(e["real"], e["ceiling"]) for e in steady_e]

    kit = list(kits.values())[-1]
    loader = kit["loader"]
    ds = loader.dataset
    n_items = min(len(ds), 8 * (loader.batch_size or 8))
    t1 = time.perf_counter()
    for i in range(n_items):
        ds[i % len(ds)]
    input_only = n_items / (time.perf_counter() - t1)

    x = kit["batches"][0][0]
    return {
        "task": task, "config": _config_dict(cfg), "run_id": result.get("run_id"),
        "model_uri": result.get("model_uri"), "shape": "×".join(str(d) for d in x.shape),
        "workers": loader.num_workers, "torch_threads": torch.get_num_threads(),
        "epochs": [{k: v for k, v in e.items() if k != "trainer"} for e in all_e],
        "real_images_per_s": median([e["real"] for e in steady_e]),
        "ceiling_images_per_s": median([e["ceiling"] for e in steady_e]), "ceiling_threads": torch.get_num_threads(),
        "paired_ratios": paired, "ratio": median(paired),
        "ratio_incl_first_epoch": median([ratio(e["real"], e["ceiling"]) for e in all_e]),
        "input_only_images_per_s": input_only, "epochs_measured": len(steady_e),
        "wall_seconds": wall, "mlflow_tracking_seconds": timer.tracking_seconds,
        "mlflow_model_seconds": timer.model_seconds, "mlflow": timer.as_dict(),
        "method": "paired: after every real epoch the same number of steps on a deep copy of the trainer "
                  "with batches pre-loaded in memory; ratio = median over epochs (each fold's first excluded)",
    }


# ------------------------------------------------------------------------------------------------ YOLO
def _run_yolo(cfg, quick: bool) -> dict:
    import copy

    import torch

    from ichflow.tasks.detection import yolo as ymod

    state: dict = {"t0": {}, "epochs": [], "acc": {}, "kit": None, "input_only": None, "threads": {}}
    reps = 3 if quick else 5

    def ceiling_rep(acc_seq: list[int], steps: int) -> float:
        """Ultralytics' per-batch work on a copy: forward + loss, backward, optimizer_step at its cadence."""
        kit = state["kit"]
        model, opt, ema, batches = kit["model"], kit["optimizer"], kit["ema"], kit["batches"]
        model.train()
        last, images = -1, 0
        t = time.perf_counter()
        for ni in range(steps):
            b = batches[ni % len(batches)]
            loss, _ = model(b)
            loss.sum().backward()
            images += int(b["img"].shape[0])
            if ni - last >= acc_seq[ni % len(acc_seq)]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                opt.step()
                opt.zero_grad()
                if ema:
                    ema.update(model)
                last = ni
        return images / (time.perf_counter() - t)

    def on_train_start(trainer):
        loader = trainer.train_loader
        ds = loader.dataset  # mosaic on (it closes only in the last epochs)
        n = min(len(ds), 48)
        t = time.perf_counter()
        items = [ds[i] for i in range(n)]
        state["input_only"] = n / (time.perf_counter() - t)
        bs = int(trainer.batch_size)
        batches = [trainer.preprocess_batch(loader.collate_fn(items[k * bs:(k + 1) * bs]))
                   for k in range(max(1, n // bs))]
        model, optimizer, ema = copy.deepcopy((trainer.model, trainer.optimizer, trainer.ema))
        state["kit"] = {"model": model, "optimizer": optimizer, "ema": ema, "batches": batches,
                        "shape": "×".join(map(str, batches[0]["img"].shape))}
        state["workers"] = loader.num_workers
        state["threads0"] = torch.get_num_threads()
        ceiling_rep([1], 2)  # warm-up of the copy

    def on_epoch_start(trainer):
        state["t0"][trainer.epoch] = time.perf_counter()

    def on_batch_start(trainer):
        state["acc"].setdefault(trainer.epoch, []).append(max(1, int(trainer.accumulate)))

    def on_epoch_end(trainer):
        t = time.perf_counter()
        ep = trainer.epoch
        n = len(trainer.train_loader.dataset)
        real = n / (t - state["t0"][ep])
        acc = state["acc"].get(ep) or [1]
        ceil = ceiling_rep(acc, len(acc))  # paired: same number of steps, same optimizer cadence
        state["epochs"].append({"epoch": ep, "images": n, "real_seconds": t - state["t0"][ep], "real": real,
                                "ceiling": ceil, "steps": len(acc)})

    def on_train_end(trainer):
        # how the bare model scales with torch threads (Ultralytics pins cpu_count - 1)
        acc = [a for ep in sorted(state["acc"]) for a in state["acc"][ep]][-8:] or [1]
        steps = max(len(acc), 6)
        threads0 = torch.get_num_threads()
        for threads in sorted({threads0, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            ceiling_rep(acc, 2)
            state["threads"][threads] = median([ceiling_rep(acc, steps) for _ in range(reps)])
        torch.set_num_threads(threads0)

    orig = ymod.load_yolo

    def load_yolo(spec):
        model = orig(spec)
        for event, fn in (("on_train_start", on_train_start), ("on_train_epoch_start", on_epoch_start),
                          ("on_train_batch_start", on_batch_start), ("on_train_epoch_end", on_epoch_end),
                          ("on_train_end", on_train_end)):
            model.add_callback(event, fn)
        return model

    t0 = time.perf_counter()
    with patched(ymod, "load_yolo", load_yolo), MlflowTimer() as timer:
        result = train_fn("detection")(cfg)
    wall = time.perf_counter() - t0

    eps = state["epochs"]
    steady_e = steady(eps)
    paired = [ratio(e["real"], e["ceiling"]) for e in steady_e]
    threads0 = state.get("threads0")
    by = state["threads"]
    best = max(by, key=by.get) if by else threads0
    factor = ratio(by.get(best), by.get(threads0)) if by else 1.0
    out = {
        "task": "detection", "config": _config_dict(cfg), "run_id": result.get("run_id"),
        "model_uri": result.get("model_uri"), "shape": (state["kit"] or {}).get("shape", ""),
        "workers": state.get("workers"), "torch_threads": threads0, "epochs": eps,
        "real_images_per_s": median([e["real"] for e in steady_e]),
        "ceiling_images_per_s_same_threads": median([e["ceiling"] for e in steady_e]),
        "paired_ratios": paired, "ratio_same_threads": median(paired),
        "ceiling_by_threads": by, "thread_factor": factor, "ceiling_threads": best,
        "ceiling_images_per_s": median([e["ceiling"] for e in steady_e]) * max(1.0, factor),
        "ratio": median(paired) / max(1.0, factor),
        "ratio_incl_first_epoch": median([ratio(e["real"], e["ceiling"]) for e in eps]) / max(1.0, factor),
        "input_only_images_per_s": state["input_only"], "epochs_measured": len(steady_e),
        "wall_seconds": wall, "mlflow_tracking_seconds": timer.tracking_seconds,
        "mlflow_model_seconds": timer.model_seconds, "mlflow": timer.as_dict(),
        "method": "paired per epoch at the process's threads (a deep copy of model/optimizer/EMA on batches "
                  "pre-loaded from the same dataset), then divided by how much faster the bare model runs with "
                  "all cores (measured at the end of the run)",
        "limit_note": "On CPU Ultralytics sets workers=0 (its trainer: 'time dominated by inference, not "
                      "dataloading'), so mosaic + affine augmentation runs in the training process between steps; "
                      "its select_device would also pin torch to cpu_count-1 thread(s), which our trainer undoes "
                      "(1 of 2 cores halved the model's speed)",
    }
    if by and len(by) > 1:
        out["ceiling_alt"] = {"threads": threads0, "images_per_s": out["ceiling_images_per_s_same_threads"]}
    return out
