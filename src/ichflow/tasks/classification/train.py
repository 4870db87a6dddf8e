"""Task 1: does a slice show a bleed? A timm CNN on single slices (or 2.5D stacks), tracked in MLflow.

Label ``has_lesion``: PHE-SICH-CT-IDS = the slice has an annotated box, CT-ICH = any hemorrhage subtype.
Honest evaluation: patient-level split from :func:`ichflow.prepare.prepare_data`, checkpoint and decision
threshold chosen on validation only, test touched once, metrics per slice and per patient (a patient is
positive when any slice is) with 95 % bootstrap CIs over patients.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
import torch

from ichflow.data.splits import attach_split
from ichflow.engine import figures
from ichflow.engine.device import amp_dtype, resolve_device, seed_everything
from ichflow.engine.trainer import Trainer, adamw, default_loss
from ichflow.prepare import log_prepared, prepare_data
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.common import TrainConfig, apply_preset, log_config, make_loader, run_folder
from ichflow.tracking import task_run

log = logging.getLogger(__name__)

REGISTERED_NAME = "ich-classification"
LABEL = "has_lesion"
CLASS_NAMES = ["no bleed", "bleed"]

# Values a preset sets for every field left at its default (see tasks.common.apply_preset).
PRESETS = {
    # PHE-SICH-CT-IDS, 96 patients / 2,851 slices: ~20 min of training on 2 free CPU cores (reports/classification_phe.md).
    "phe": {"dataset": "phe", "image_size": 160, "epochs": 7, "patience": 3, "batch_size": 16, "lr": 1e-3,
            "aug_strength": 0.5, "n_boot": 1000},
    # CT-ICH, 82 patients / 2,501 slices (318 with hemorrhage).
    "ctich": {"dataset": "ctich", "image_size": 160, "epochs": 7, "patience": 3, "batch_size": 16, "lr": 1e-3,
              "aug_strength": 0.5, "imbalance": "sampler"},
}


@dataclass
class ClassificationConfig(TrainConfig):
    """Binary bleed / no-bleed slice classifier (timm CNN)."""

    model: str = "resnet18"         # any timm model: resnet18, resnet34, efficientnet_b0, ...
    pretrained: str = ""            # '' = from scratch; or the path of a local weights file (no downloads)
    image_size: int = 160           # slices are resized to image_size x image_size
    batch_size: int = 8
    epochs: int = 20
    patience: int = 8
    lr: float = 3e-3
    imbalance: str = "weighted_loss"  # weighted_loss (BCE pos_weight = neg/pos) | sampler (50/50) | none
    pos_weight: float = 0.0         # > 0: this BCE pos_weight for the bleed class (tuning); 0 = per imbalance
    threshold_goal: str = "f1"      # f1 = maximise F1 on val | recall = best precision with recall >= target
    target_recall: float = 0.95
    steps_per_epoch: int = 0        # 0 = one pass over the training slices per epoch
    gradcam_per_group: int = 2      # Grad-CAM examples per group (TP, FP, FN, TN)
    n_boot: int = 1000              # bootstrap resamples of patients for the 95 % CIs (0 = none)


def validate(cfg: ClassificationConfig) -> None:
    if cfg.imbalance not in sc.IMBALANCE:
        raise ValueError(f"imbalance must be one of {sc.IMBALANCE}, got {cfg.imbalance!r}")
    if cfg.threshold_goal not in sc.THRESHOLD_GOALS:
        raise ValueError(f"threshold_goal must be one of {sc.THRESHOLD_GOALS}, got {cfg.threshold_goal!r}")
    if cfg.pos_weight < 0:
        raise ValueError(f"pos_weight must be >= 0 (0 = automatic), got {cfg.pos_weight}")
    if not 0.0 < cfg.target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {cfg.target_recall}")
    if cfg.image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {cfg.image_size}")
    if cfg.in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (the slice) or 3 (2.5D), got {cfg.in_channels}")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")


def train_classification(cfg: ClassificationConfig, on_epoch_end=None) -> dict:
    """Train, choose the threshold on val, evaluate (val, and test when ``cfg.evaluate_test``), log, register.

    Returns the metrics dict: ``objective`` (= ``val_roc_auc``, slice-level ROC-AUC of the best checkpoint on
    validation; the checkpoint is chosen by it, ties broken by the lower validation loss), ``objective_name``, ``run_id``, ``threshold``, ``val_*``, ``test_*`` (when evaluated),
    ``model_uri`` / ``model_version`` (when logged / registered).
    """
    cfg = apply_preset(cfg, PRESETS)
    validate(cfg)
    t_wall = time.perf_counter()
    seed_everything(cfg.seed)
    with task_run("classification") as run:
        log_config(cfg)
        prep = prepare_data(cfg)
        log_prepared(prep, target=LABEL)
        manifest = attach_split(prep.manifest, prep.split)
        data = sc.SliceData.load(manifest, cfg.image_size)
        y = manifest[LABEL].to_numpy().astype(np.float32)
        rows = {s: np.nonzero((manifest["split"] == s).to_numpy())[0] for s in ("train", "val", "test")}
        _check_rows(rows, y, cfg.evaluate_test)
        mlflow.log_metrics({f"slices_{s}": len(r) for s, r in rows.items()}
                           | {f"positive_slices_{s}": int(y[r].sum()) for s, r in rows.items()})

        device = resolve_device(cfg.device)
        amp = amp_dtype(device, cfg.amp)
        norm = data.normalizer(rows["train"], seed=cfg.seed)
        mlflow.log_params({**norm.as_params(), "device_used": str(device),
                           "amp_used": str(amp).replace("torch.", "") if amp else "fp32"})

        model = sc.build_model(cfg.model, cfg.in_channels, 1, cfg.pretrained).to(device)
        model = model.to(memory_format=torch.channels_last)
        train_ds = sc.SliceDataset(data, rows["train"], y, cfg.in_channels, norm,
                                   sc.train_augment(cfg.aug_strength, cfg.image_size))
        pos_weight = None
        sampler = None
        if cfg.pos_weight > 0:
            pos_weight = np.array([cfg.pos_weight], dtype=np.float32)
        elif cfg.imbalance == "weighted_loss":
            pos_weight = sc.prevalence_pos_weight(y[rows["train"]])
        if cfg.imbalance == "sampler":
            sampler = sc.balanced_sampler(y[rows["train"]], num_samples=len(rows["train"]), seed=cfg.seed)
        mlflow.log_param("pos_weight_used", round(float(pos_weight[0]), 4) if pos_weight is not None else "none")
        loss_fn = torch.nn.BCEWithLogitsLoss(
            pos_weight=torch.as_tensor(pos_weight, device=device) if pos_weight is not None else None)
        train_loader = make_loader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                                   seed=cfg.seed, drop_last=len(train_ds) > cfg.batch_size, sampler=sampler)
        eval_loader = {s: make_loader(sc.SliceDataset(data, r, y, cfg.in_channels, norm), cfg.batch_size * 2,
                                      shuffle=False, num_workers=cfg.num_workers) for s, r in rows.items() if len(r)}

        steps = cfg.steps_per_epoch or len(train_loader)
        optimizer = adamw(model, cfg.lr, cfg.weight_decay)
        scheduler = sc.cosine_warmup(optimizer, steps * cfg.epochs)
        trainer = Trainer(model, optimizer, default_loss(loss_fn), device, amp, scheduler=scheduler)

        def evaluate(m):
            probs, loss = sc.predict_probs(m, eval_loader["val"], device, amp)
            met = sc.binary_metrics(y[rows["val"]], probs[:, 0], 0.5)
            auc = _nan_to(met["roc_auc"], 0.0)
            # checkpoint selection: val ROC-AUC, ties (e.g. a saturated 1.0) broken by the lower val loss
            return {"val_loss": loss, "val_roc_auc": auc, "val_pr_auc": _nan_to(met["pr_auc"], 0.0),
                    "val_f1_at_0.5": _nan_to(met["f1"], 0.0), "val_selection": auc - 1e-3 * min(loss, 10.0)}

        fit = trainer.fit(train_loader, evaluate, cfg.epochs, monitor="val_selection", mode="max",
                          patience=cfg.patience, checkpoint=run_folder() / "best.pt",
                          steps_per_epoch=cfg.steps_per_epoch or None, on_epoch_end=on_epoch_end)
        step = fit.epochs_run  # final (best-checkpoint) values land one step after the last epoch
        mlflow.log_metrics({"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
                            "train_seconds": fit.train_seconds, "stopped_early": int(fit.stopped_early)})
        _log_curves(fit.history)

        # ---- threshold on validation
        preds = {}
        for s in ("val", "test") if cfg.evaluate_test else ("val",):
            if s in eval_loader:
                probs, _ = sc.predict_probs(model, eval_loader[s], device, amp)
                preds[s] = _prediction_frame(manifest, rows[s], y, probs[:, 0])
        thr, thr_info = sc.select_threshold(preds["val"]["y"], preds["val"]["score"], cfg.threshold_goal,
                                            cfg.target_recall)
        mlflow.log_metric("threshold", thr, step=step)
        mlflow.log_dict({"threshold": thr, **thr_info}, "eval/threshold.json")
        result = {"run_id": run.info.run_id, "threshold": thr, "objective_name": "val_roc_auc",
                  "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run, "train_seconds": fit.train_seconds}
        for s, frame in preds.items():
            frame["pred"] = (frame["score"] >= thr).astype(int)
            result.update(_evaluate_split(s, frame, thr, cfg, step))
        result["objective"] = result["val_roc_auc"]
        figures_split = "test" if "test" in preds else "val"
        _log_gradcam(model, data, preds[figures_split], rows, y, cfg, norm, device, figures_split)

        # ---- model
        if cfg.evaluate_test:
            config = {"task": "classification", "model": cfg.model, "in_channels": cfg.in_channels,
                      "image_size": cfg.image_size, "classes": [LABEL], "thresholds": [thr],
                      "norm_mean": norm.mean, "norm_std": norm.std, "threshold_goal": cfg.threshold_goal,
                      "split_digest": prep.split_digest}
            example = sc.example_scan(manifest, rows[figures_split])
            info = sc.log_slice_model(model.cpu().to(memory_format=torch.contiguous_format), config,
                                      run_folder() / "model", example,
                                      REGISTERED_NAME if cfg.register else None,
                                      metadata={"task": "classification", "threshold": thr})
            result["model_uri"] = info.model_uri
            if info.registered_model_version is not None:
                result["model_version"] = str(info.registered_model_version)
                mlflow.set_tag("ichflow.registered_model", f"{REGISTERED_NAME}/{info.registered_model_version}")
        result["wall_seconds"] = time.perf_counter() - t_wall
        mlflow.log_metric("wall_seconds", result["wall_seconds"])
        _print_summary(cfg, prep, result)
        return result


# ----------------------------------------------------------------------------------------------- helpers
def _nan_to(v: float, default: float) -> float:
    return default if v != v else float(v)


def _check_rows(rows: dict, y: np.ndarray, evaluate_test: bool) -> None:
    if len(rows["train"]) == 0 or len(rows["val"]) == 0:
        raise ValueError("the split has no train or no val patients; use more patients or other fractions")
    if evaluate_test and len(rows["test"]) == 0:
        raise ValueError("the split has no test patients (test_fraction=0); set evaluate_test=false or a "
                         "test_fraction > 0")
    yt = y[rows["train"]]
    if yt.min() == yt.max():
        raise ValueError("the training split has a single class: nothing to learn")
    for s in ("val", "test"):
        if len(rows[s]) and y[rows[s]].min() == y[rows[s]].max():
            log.warning("the %s split has a single class: its threshold-free metrics are undefined", s)


def _prediction_frame(manifest: pd.DataFrame, rows: np.ndarray, y: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"row": rows, "patient_id": manifest.loc[rows, "patient_id"].astype(str).to_numpy(),
                         "slice_index": manifest.loc[rows, "slice_index"].to_numpy(),
                         "y": y[rows].astype(int), "score": scores.astype(float)})


def _evaluate_split(split: str, frame: pd.DataFrame, thr: float, cfg: ClassificationConfig, step: int) -> dict:
    """Slice- and patient-level metrics with patient-bootstrap CIs; figures, report and predictions."""
    from sklearn.metrics import classification_report

    slice_m = sc.metrics_with_ci(frame, thr, n_boot=cfg.n_boot, seed=cfg.seed)
    patients = sc.patient_level(frame)
    patient_m = sc.metrics_with_ci(patients, thr, n_boot=cfg.n_boot, seed=cfg.seed)
    out = {f"{split}_{k}": v for k, v in slice_m.items()}
    out.update({f"{split}_patient_{k}": v for k, v in patient_m.items()})
    out[f"{split}_patients"] = len(patients)
    out[f"{split}_positive_patients"] = int(patients["y"].sum())
    mlflow.log_metrics(sc.finite(out), step=step)

    pred = (frame["score"] >= thr).astype(int)
    report = ["Slice level (threshold %.4f, chosen on val for goal %s)" % (thr, cfg.threshold_goal),
              classification_report(frame["y"], pred, labels=[0, 1], target_names=CLASS_NAMES, digits=4,
                                    zero_division=0),
              "Patient level (positive = any slice positive)",
              classification_report(patients["y"], (patients["score"] >= thr).astype(int), labels=[0, 1],
                                    target_names=CLASS_NAMES, digits=4, zero_division=0),
              f"95 % CIs: percentile bootstrap over patients ({cfg.n_boot} resamples)"]
    for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc"):
        for level, m in (("slice", slice_m), ("patient", patient_m)):
            if f"{k}_ci_low" in m:
                report.append(f"  {level:7s} {k:9s} {m[k]:.4f}  [{m[k + '_ci_low']:.4f}, {m[k + '_ci_high']:.4f}]")
    mlflow.log_text("\n".join(report), f"eval/{split}_classification_report.txt")
    mlflow.log_text(frame.assign(pred=pred).drop(columns="row").to_csv(index=False), f"eval/{split}_predictions.csv")

    cm = np.array([[slice_m["tn"], slice_m["fp"]], [slice_m["fn"], slice_m["tp"]]])
    fig = figures.confusion_figure(cm, CLASS_NAMES, title=f"{split}: slices (threshold {thr:.3f})")
    mlflow.log_figure(fig, f"figures/{split}_confusion.png")
    figures.close(fig)
    cmp = np.array([[patient_m["tn"], patient_m["fp"]], [patient_m["fn"], patient_m["tp"]]])
    fig = figures.confusion_figure(cmp, CLASS_NAMES, title=f"{split}: patients (any slice positive)")
    mlflow.log_figure(fig, f"figures/{split}_patient_confusion.png")
    figures.close(fig)
    if 0 < frame["y"].sum() < len(frame):
        fig = figures.roc_pr_figure(frame["y"], frame["score"], title=f"{split}: slice level")
        mlflow.log_figure(fig, f"figures/{split}_roc_pr.png")
        figures.close(fig)
    return out


def _log_curves(history: list[dict]) -> None:
    fig = figures.curves_figure(history, ["train_loss", "val_loss"], title="Loss per epoch")
    mlflow.log_figure(fig, "figures/loss_curves.png")
    figures.close(fig)
    fig = figures.curves_figure(history, ["val_pr_auc", "val_roc_auc", "val_f1_at_0.5"],
                                title="Validation metrics per epoch")
    mlflow.log_figure(fig, "figures/val_curves.png")
    figures.close(fig)


def pick_examples(frame: pd.DataFrame, per_group: int) -> list[tuple[str, int]]:
    """(group, row) for the most confident TP / FP and the most missed FN / clearest TN."""
    picks = []
    groups = {
        "TP": frame[(frame["y"] == 1) & (frame["pred"] == 1)].sort_values("score", ascending=False),
        "FP": frame[(frame["y"] == 0) & (frame["pred"] == 1)].sort_values("score", ascending=False),
        "FN": frame[(frame["y"] == 1) & (frame["pred"] == 0)].sort_values("score"),
        "TN": frame[(frame["y"] == 0) & (frame["pred"] == 0)].sort_values("score"),
    }
    for name, g in groups.items():
        picks += [(name, int(r)) for r in g["row"].head(per_group)]
    return picks


def _log_gradcam(model, data, frame, rows, y, cfg, norm, device, split) -> None:
    """Grad-CAM (pytorch-grad-cam) of the bleed logit on a few TP / FP / FN / TN slices."""
    if cfg.gradcam_per_group <= 0:
        return
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    picks = pick_examples(frame, cfg.gradcam_per_group)
    if not picks:
        return
    ds = sc.SliceDataset(data, np.array([r for _, r in picks]), y, cfg.in_channels, norm)
    x = torch.stack([ds[j][0] for j in range(len(ds))]).to(device)
    model.eval()
    with GradCAM(model=model, target_layers=[sc.gradcam_layer(model)]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * len(x))
    scores = frame.set_index("row")["score"]
    fig, axes = figures.plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 3.0), squeeze=False)
    for ax, (group, r), heat in zip(axes[0], picks, maps):
        ax.imshow(data.images[r], cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.35)
        pid, sl = data.manifest.loc[r, "patient_id"], data.manifest.loc[r, "slice_index"]
        ax.set_title(f"{group} p={scores[r]:.2f}\npt {pid} sl {sl}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"Grad-CAM of the bleed logit ({split}; last stage of {cfg.model})")
    fig.tight_layout()
    mlflow.log_figure(fig, f"figures/{split}_gradcam.png")
    figures.close(fig)


def _print_summary(cfg, prep, r: dict) -> None:
    print(f"[classification] {prep.dataset} ({prep.source}) model {cfg.model} {cfg.image_size}px "
          f"in_channels {cfg.in_channels}: best epoch {r['best_epoch']} of {r['epochs_run']}, "
          f"threshold {r['threshold']:.4f} ({cfg.threshold_goal})")
    for s in ("val", "test"):
        if f"{s}_f1" not in r:
            continue
        parts = []
        for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc"):
            v = r.get(f"{s}_{k}", float("nan"))
            lo, hi = r.get(f"{s}_{k}_ci_low"), r.get(f"{s}_{k}_ci_high")
            parts.append(f"{k} {v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""))
        print(f"  {s} slices: " + ", ".join(parts))
        pparts = [f"{k} {r.get(f'{s}_patient_{k}', float('nan')):.3f}" for k in ("accuracy", "precision",
                                                                                   "recall", "f1", "roc_auc")]
        print(f"  {s} patients ({r[f'{s}_patients']}, {r[f'{s}_positive_patients']} positive): " + ", ".join(pparts))
    if "model_version" in r:
        print(f"  registered {REGISTERED_NAME} version {r['model_version']} ({r['model_uri']})")
    print(f"  wall time {r['wall_seconds']:.0f} s, run {r['run_id']}")


