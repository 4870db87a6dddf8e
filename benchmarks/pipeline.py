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

        return SegmentationConfig(epochs=2 if quick else 4, steps_per_epoch=4 if quick else 12, patience=10)
    if task == "classification":
        from ichflow.tasks.classification.train import ClassificationConfig

        return ClassificationConfig(epochs=2 if quick else 4, patience=10, n_boot=50 if quick else 200,
                                    gradcam_per_group=1)
    if task == "detection":
        from ichflow.tasks.detection.config import DetectionConfig

        return DetectionConfig(epochs=2 if quick else 4, patience=10, overlays=2)
    if task == "multilabel":
        from ichflow.tasks.multilabel.train import MultilabelConfig

        return MultilabelConfig(n_folds=3, epochs=2 if quick else 3, patience=10)
    raise ValueError(f"unknown task {task!r}")


def train_fn(task: str):
    if task == "segmentation":
        from ichflow.tasks.segmentation import train_segmentation
        return train_segmentation
    if task == "classification":
        from ichflow.tasks.classification.train import train_classification
        return train_classification
    if task == "detection":
        from ichflow.tasks.detection.train import train_detection
        return train_detection
    if task == "multilabel":
        from ichflow.tasks.multilabel.train import train_multilabel
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
def _run_torch(task: str, cfg, quick: bool) -> dict:
    import torch

    from ichflow.engine import trainer as tr

    seen: list[tuple] = []     # (trainer, loader, steps) of every epoch
    epochs: list[dict] = []
    orig = tr.Trainer.train_epoch

    def train_epoch(self, loader, epoch, steps=None):
        out = orig(self, loader, epoch, steps)
        seen.append((self, loader, steps))
        epochs.append({"trainer": id(self), "epoch": epoch, **out})
        return out

    t0 = time.perf_counter()
    with patched(tr.Trainer, "train_epoch", train_epoch), MlflowTimer() as timer:
        result = train_fn(task)(cfg)
    wall = time.perf_counter() - t0

    # per-epoch throughput as the trainer logged it; steady = without each trainer's (fold's) first epoch
    by_trainer: dict[int, list[float]] = {}
    for e in epochs:
        by_trainer.setdefault(e["trainer"], []).append(e["train_images_per_s"])
    all_ips = [v for vals in by_trainer.values() for v in vals]
    steady_ips = [v for vals in by_trainer.values() for v in steady(vals)]

    trainer, loader, steps = seen[-1]
    steps = steps or len(loader)
    trainer.model.to(memory_format=torch.channels_last)  # classification logs a contiguous CPU copy at the end
    pre = []
    for batch in loader:  # batches of the real loader, held in memory (untimed)
        pre.append(batch)
        if len(pre) >= min(8, steps):
            break
    batches = [pre[i % len(pre)] for i in range(steps)]
    trainer.scheduler = None  # schedule stepping is not model work (OneCycle would also overrun its length)
    trainer.progress = True
    reps = 3 if quick else 5
    trainer.train_epoch(batches, epoch=-1, steps=min(steps, 3))  # warm-up
    ceiling = [trainer.train_epoch(batches, epoch=-1, steps=steps)["train_images_per_s"] for _ in range(reps)]

    ds = loader.dataset
    n_items = min(len(ds), 8 * (loader.batch_size or 8))
    t1 = time.perf_counter()
    for i in range(n_items):
        ds[i % len(ds)]
    input_only = n_items / (time.perf_counter() - t1)

    x = pre[0][0]
    real = median(steady_ips)
    ceil = median(ceiling)
    return {
        "task": task, "config": _config_dict(cfg), "run_id": result.get("run_id"),
        "model_uri": result.get("model_uri"), "shape": "×".join(str(d) for d in x.shape),
        "workers": loader.num_workers, "torch_threads": torch.get_num_threads(),
        "real_images_per_s_epochs": all_ips, "real_images_per_s": real,
        "real_images_per_s_incl_first_epoch": median(all_ips),
        "ceiling_images_per_s_reps": ceiling, "ceiling_images_per_s": ceil, "ceiling_threads": torch.get_num_threads(),
        "ratio": ratio(real, ceil), "ratio_incl_first_epoch": ratio(median(all_ips), ceil),
        "input_only_images_per_s": input_only, "steps_per_epoch": steps, "epochs_measured": len(all_ips),
        "wall_seconds": wall, "mlflow_tracking_seconds": timer.tracking_seconds,
        "mlflow_model_seconds": timer.model_seconds, "mlflow": timer.as_dict(),
    }


# ------------------------------------------------------------------------------------------------ YOLO
def _run_yolo(cfg, quick: bool) -> dict:
    import torch

    from ichflow.tasks.detection import yolo as ymod

    state: dict = {"t0": {}, "epochs": [], "acc": {}, "ceiling": None, "input_only": None}
    reps = 3 if quick else 5

    def on_train_start(trainer):
        ds = trainer.train_loader.dataset  # mosaic still on (it closes only in the last epochs)
        n = min(len(ds), 48)
        t = time.perf_counter()
        for i in range(n):
            ds[i]
        state["input_only"] = n / (time.perf_counter() - t)
        state["workers"] = trainer.train_loader.num_workers
        state["threads"] = torch.get_num_threads()

    def on_epoch_start(trainer):
        state["t0"][trainer.epoch] = time.perf_counter()

    def on_batch_start(trainer):
        state["acc"].setdefault(trainer.epoch, []).append(int(trainer.accumulate))

    def on_epoch_end(trainer):
        t = time.perf_counter()
        n = len(trainer.train_loader.dataset)
        state["epochs"].append({"epoch": trainer.epoch, "images": n, "seconds": t - state["t0"][trainer.epoch],
                                "images_per_s": n / (t - state["t0"][trainer.epoch])})

    def on_train_end(trainer):
        # before Ultralytics closes its loaders: pre-load batches, then the bare loop
        it = iter(trainer.train_loader)
        pre = [trainer.preprocess_batch(next(it)) for _ in range(4)]
        bs = int(pre[0]["img"].shape[0])
        measured = [e["epoch"] for e in state["epochs"]]
        acc_seq = [a for ep in steady(measured) for a in state["acc"].get(ep, [])] or [int(trainer.accumulate)]
        steps = max(len(acc_seq), 6)
        model = trainer.model
        model.train()

        def loop(n):
            last = -1
            t = time.perf_counter()
            for ni in range(n):
                loss, _ = model(pre[ni % len(pre)])
                trainer.scaler.scale(loss.sum()).backward()
                if ni - last >= acc_seq[ni % len(acc_seq)]:
                    trainer.optimizer_step()
                    last = ni
            return n * bs / (time.perf_counter() - t)

        threads0 = torch.get_num_threads()
        out = {}
        for threads in sorted({threads0, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            loop(2)
            out[threads] = [loop(steps) for _ in range(reps)]
        torch.set_num_threads(threads0)
        state["ceiling"] = {"by_threads": out, "threads0": threads0, "shape": "×".join(map(str, pre[0]["img"].shape)),
                            "steps": steps}

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

    all_ips = [e["images_per_s"] for e in state["epochs"]]
    real = median(steady(all_ips))
    c = state["ceiling"] or {}
    by = {t: median(v) for t, v in (c.get("by_threads") or {}).items()}
    best_threads = max(by, key=by.get) if by else None
    ceil = by.get(best_threads, float("nan"))
    alt = {t: v for t, v in by.items() if t != best_threads}
    out = {
        "task": "detection", "config": _config_dict(cfg), "run_id": result.get("run_id"),
        "model_uri": result.get("model_uri"), "shape": c.get("shape", ""), "workers": state.get("workers"),
        "torch_threads": state.get("threads"), "real_images_per_s_epochs": all_ips, "real_images_per_s": real,
        "real_images_per_s_incl_first_epoch": median(all_ips), "epochs": state["epochs"],
        "ceiling_images_per_s_reps": (c.get("by_threads") or {}).get(best_threads, []),
        "ceiling_images_per_s": ceil, "ceiling_threads": best_threads,
        "ratio": ratio(real, ceil), "ratio_incl_first_epoch": ratio(median(all_ips), ceil),
        "input_only_images_per_s": state["input_only"], "epochs_measured": len(all_ips),
        "wall_seconds": wall, "mlflow_tracking_seconds": timer.tracking_seconds,
        "mlflow_model_seconds": timer.model_seconds, "mlflow": timer.as_dict(),
        "limit_note": "Ultralytics sets torch to cpu_count-1 thread(s) when imported and runs mosaic + affine "
                      "augmentation in its DataLoader worker(s)",
    }
    if alt:
        t, v = next(iter(alt.items()))
        out["ceiling_alt"] = {"threads": t, "images_per_s": v}
    return out
