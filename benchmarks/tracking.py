"""Section 2: the cost of MLflow tracking on training time.

The same training runs twice per pair, interleaved (logged, off, logged, off, ...): the classification
task's own pieces (timm resnet18, 2.5D slices, the train loader with augmentation and workers, validation
every epoch, best-checkpoint saving) through the engine's ``Trainer.fit``. Same seed, same data, same model
init; only tracking differs:

* logged: ``mlflow.start_run`` on a local sqlite store, the config as params, per-epoch metrics
  (``Trainer(log_to_mlflow=True)``), two matplotlib figures logged at the end (the task's curves), end of run;
* off: no run, ``log_to_mlflow=False``, no figures.

Reported: median over pairs of (logged / off − 1), and the time spent inside MLflow calls in the logged
runs (timed per call) ÷ the untracked run time, which does not suffer from run-to-run noise.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from benchmarks.core import MlflowTimer, median, ratio


def run(quick: bool) -> dict:
    import mlflow
    import numpy as np
    import torch

    from ichflow.data.splits import attach_split
    from ichflow.engine import figures
    from ichflow.engine.device import default_workers, seed_everything
    from ichflow.engine.schedule import warmup_cosine
    from ichflow.engine.trainer import Trainer, adamw, default_loss
    from ichflow.paths import CHECKPOINT
    from ichflow.prepare import prepare_data
    from ichflow.tasks import slice_classifier as sc
    from ichflow.tasks.classification.config import LABEL, ClassificationConfig
    from ichflow.tasks.common import make_loader

    # full mode: 6 epochs, the shortest schedule an entry point runs by default (multilabel preset ctich), so the
    # per-run part (start/end, params, figures) weighs as it does in a real run, not as in a 2-epoch toy
    cfg = ClassificationConfig(epochs=2 if quick else 6)
    pairs = 1 if quick else 3
    prep = prepare_data(cfg)
    manifest = attach_split(prep.manifest, prep.split)
    data = sc.SliceData.load(manifest, cfg.image_size)
    y = manifest[LABEL].to_numpy().astype(np.float32)
    rows = {s: np.nonzero((manifest["split"] == s).to_numpy())[0] for s in ("train", "val")}
    norm = data.normalizer(rows["train"], seed=cfg.seed)
    device = torch.device("cpu")
    scratch = Path(tempfile.mkdtemp(prefix="track-"))
    mlflow.set_experiment("benchmark-tracking")

    def fit_once(logged: bool) -> tuple[float, dict, int]:
        seed_everything(cfg.seed)
        model = sc.build_model(cfg.model, cfg.in_channels, 1).to(memory_format=torch.channels_last)
        train_ds = sc.SliceDataset(data, rows["train"], y, cfg.in_channels, norm,
                                   sc.train_augment(cfg.aug_strength, cfg.image_size))
        loader = make_loader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, seed=cfg.seed,
                             drop_last=True)
        val_loader = make_loader(sc.SliceDataset(data, rows["val"], y, cfg.in_channels, norm), cfg.batch_size * 2,
                                 shuffle=False, num_workers=cfg.num_workers)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.as_tensor(sc.prevalence_pos_weight(y[rows["train"]])))
        optimizer = adamw(model, cfg.lr, cfg.weight_decay)
        n_steps = len(loader)
        scheduler = warmup_cosine(optimizer, n_steps * cfg.epochs)

        def evaluate(m):
            probs, loss = sc.predict_probs(m, val_loader, device)
            met = sc.binary_metrics(y[rows["val"]], probs[:, 0], 0.5)
            auc = met["roc_auc"] if met["roc_auc"] == met["roc_auc"] else 0.0
            return {"val_loss": loss, "val_roc_auc": auc, "val_selection": auc - 1e-3 * min(loss, 10.0)}

        timer = MlflowTimer()
        t0 = time.perf_counter()
        with timer:
            if logged:
                mlflow.start_run(run_name="tracking-logged")
                mlflow.log_params(dataclasses.asdict(cfg))
            trainer = Trainer(model, optimizer, default_loss(loss_fn), device, None, scheduler=scheduler,
                              log_to_mlflow=logged)
            fit = trainer.fit(loader, evaluate, cfg.epochs, monitor="val_selection", mode="max", patience=100,
                              checkpoint=scratch / CHECKPOINT)
            if logged:
                for name, keys in (("loss_curves", ["train_loss", "val_loss"]), ("val_curves", ["val_roc_auc"])):
                    fig = figures.curves_figure(fit.history, keys, title=name)
                    mlflow.log_figure(fig, f"figures/{name}.png")
                    figures.close(fig)
                mlflow.end_run()
        seconds = time.perf_counter() - t0
        del loader, val_loader  # stop the persistent workers before the next fit
        return seconds, timer.as_dict(), n_steps

    fit_once(False)  # warm-up: imports, slice cache, allocator
    logged_s, off_s, timed, pair = [], [], [], []
    steps = 0
    for i in range(pairs):
        order = (True, False) if i % 2 == 0 else (False, True)
        got = {}
        for logged in order:
            seconds, calls, steps = fit_once(logged)
            got[logged] = (seconds, calls)
        logged_s.append(got[True][0])
        off_s.append(got[False][0])
        timed.append(got[True][1])
        pair.append(ratio(got[True][0], got[False][0]) - 1)
    mid = sorted(range(pairs), key=lambda k: logged_s[k])[pairs // 2]
    overhead_timed = [ratio(t["tracking_seconds"], o) for t, o in zip(timed, off_s)]
    per_epoch = [ratio(t["seconds_by_call"].get("log_metrics", 0.0), o) for t, o in zip(timed, off_s)]
    fixed = [t["tracking_seconds"] - t["seconds_by_call"].get("log_metrics", 0.0) for t in timed]
    return {
        "task": "classification", "epochs": cfg.epochs, "steps_per_epoch": steps, "pairs": pairs,
        "workers": default_workers() if cfg.num_workers < 0 else cfg.num_workers, "logged_seconds_runs": logged_s, "off_seconds_runs": off_s,
        "logged_seconds": median(logged_s), "off_seconds": median(off_s), "pair_overheads": pair,
        "overhead_ab": median(pair), "overhead_timed_runs": overhead_timed, "overhead_timed": median(overhead_timed),
        "mlflow_seconds_runs": [t["tracking_seconds"] for t in timed],
        "per_epoch_overhead": median(per_epoch), "per_run_fixed_seconds": median(fixed),
        "epoch_seconds_off": median(off_s) / cfg.epochs,
        "mlflow_calls": {k: round(v, 4) for k, v in timed[mid]["seconds_by_call"].items()},
        "mlflow_call_counts": timed[mid]["calls"], "store": "sqlite (local file) + local artifact folder",
    }
