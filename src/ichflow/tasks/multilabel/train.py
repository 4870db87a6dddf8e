"""Task 4: hemorrhage subtypes (IVH / IPH / SAH by default) per slice, multi-label, by patient-level k-fold CV.

Model: a timm CNN with one logit per class, sigmoid + ``BCEWithLogitsLoss(pos_weight)``; ``pos_weight`` per
class from the training prevalence (negatives / positives, under the sampler's distribution when the
balanced sampler is on), times optional per-class multipliers (Optuna tunes those).

Evaluation: the classes are thin (CT-ICH: IVH 24 slices / 5 patients, SAH 18 / 7), so one split says
little. Every patient is held out exactly once in k folds (default 5). Inside fold k the model trains on
k-2 folds; the next fold ((k+1) mod K, patients of the training folds only) is its inner validation for
early stopping, checkpoint and per-class thresholds; the held-out fold is scored once. One nested MLflow run
per fold; the parent run gets mean ± sd over folds (``cv_*``, and ``test_*`` when ``evaluate_test``), the
pooled out-of-fold metrics (``oof_*``), support, figures and the model.

Model logged and registered as ``ich-subtypes``: ``final_model=best_fold`` (default) is the fold model with
the best INNER-validation macro-AUC (its thresholds and normalisation; trained on 60 % of the patients);
``final_model=refit`` trains one more model on all folds but one (inner validation), at the cost of one
more training.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
import torch

from ichflow.engine import figures
from ichflow.engine.device import amp_dtype, resolve_device, seed_everything
from ichflow.engine.trainer import Trainer, adamw, default_loss
from ichflow.prepare import log_prepared, prepare_data
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.common import TrainConfig, apply_preset, log_config, make_loader, run_folder
from ichflow.tasks.multilabel import folds as cvf
from ichflow.tasks.multilabel import metrics as mm
from ichflow.tasks.multilabel.labels_csv import is_labels_csv, prepare_labels_csv
from ichflow.tracking import frame_digest, task_run

log = logging.getLogger(__name__)

REGISTERED_NAME = "ich-subtypes"
FINAL_MODELS = ("best_fold", "refit")
SAMPLERS = ("none", "balanced")

PRESETS = {
    # CT-ICH (82 patients, 2,501 slices): 5 folds sized for about 12 min on 2 CPU cores. The balanced sampler
    # draws half the batch from slices with a bleed of a selected class; an epoch is steps_per_epoch batches.
    "ctich": {"dataset": "ctich", "image_size": 128, "epochs": 6, "patience": 3, "batch_size": 16,
              "steps_per_epoch": 30, "sampler": "balanced", "lr": 1e-3},
}


@dataclass
class MultilabelConfig(TrainConfig):
    """Multi-label subtype classifier (timm CNN, k sigmoid outputs), evaluated by patient-level k-fold CV."""

    dataset: str = "synthetic-ctich"  # also ctich, or csv (data_dir = a labels CSV image,<class>,...)
    synthetic_patients: int = 20      # phantom when no data_dir: 20 patients x 8 slices, each class in 8 patients
    synthetic_slices: int = 8
    classes: str = "IVH,IPH,SAH"      # comma-separated subset of IVH,IPH,SAH,EDH,SDH (or the CSV's columns)
    model: str = "resnet10t"          # any timm model; resnet10t: fast, its 3x3 stem keeps thin SAH lines
    pretrained: str = ""              # '' = from scratch; or the path of a local weights file
    # 128 px: the default run takes ~4 min on 2 CPU cores at macro-AUC >= 0.92 (reports/multilabel_synthetic.md)
    image_size: int = 128
    batch_size: int = 8
    epochs: int = 18
    patience: int = 8
    lr: float = 3e-3
    aug_strength: float = 0.3
    pos_weight: str = "prevalence"    # prevalence (negatives / positives in training) | none
    pos_weight_multipliers: str = ""  # per-class factors on pos_weight, e.g. "1,2,0.5" ('' = all 1)
    sampler: str = "none"             # none | balanced (half of each batch has a bleed of a selected class)
    steps_per_epoch: int = 0          # 0 = one pass over the training slices
    threshold_goal: str = "f1"        # per class on inner validation: f1 | recall (>= target_recall)
    target_recall: float = 0.9
    final_model: str = "best_fold"    # best_fold | refit (see module doc)


def parse_classes(text: str) -> list[str]:
    classes = [c.strip() for c in str(text).split(",") if c.strip()]
    if not classes:
        raise ValueError("classes is empty; e.g. classes=IVH,IPH,SAH")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes has duplicates: {classes}")
    return classes


def parse_multipliers(text: str, n: int) -> np.ndarray:
    if not str(text).strip():
        return np.ones(n, dtype=np.float32)
    try:
        vals = np.array([float(v) for v in str(text).split(",")], dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"pos_weight_multipliers must be comma-separated numbers, got {text!r}") from exc
    if len(vals) != n:
        raise ValueError(f"pos_weight_multipliers has {len(vals)} values for {n} classes")
    if (vals <= 0).any():
        raise ValueError(f"pos_weight_multipliers must be > 0, got {text!r}")
    return vals


def validate(cfg: MultilabelConfig) -> list[str]:
    classes = parse_classes(cfg.classes)
    parse_multipliers(cfg.pos_weight_multipliers, len(classes))
    if cfg.pos_weight not in ("prevalence", "none"):
        raise ValueError(f"pos_weight must be prevalence or none, got {cfg.pos_weight!r}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {cfg.sampler!r}")
    if cfg.final_model not in FINAL_MODELS:
        raise ValueError(f"final_model must be one of {FINAL_MODELS}, got {cfg.final_model!r}")
    if cfg.threshold_goal not in sc.THRESHOLD_GOALS:
        raise ValueError(f"threshold_goal must be one of {sc.THRESHOLD_GOALS}, got {cfg.threshold_goal!r}")
    if cfg.n_folds < 3:
        raise ValueError(f"n_folds must be at least 3 (train / inner validation / held-out), got {cfg.n_folds}")
    if cfg.in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (the slice) or 3 (2.5D), got {cfg.in_channels}")
    if cfg.image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {cfg.image_size}")
    return classes


def load_data(cfg: MultilabelConfig):
    if is_labels_csv(cfg.data_dir, cfg.dataset):
        return prepare_labels_csv(cfg)
    return prepare_data(cfg)


def pos_weight_for(labels: np.ndarray, cfg: MultilabelConfig, mult: np.ndarray, sample_weights=None):
    """Per-class BCE pos_weight (None = plain BCE): prevalence under the sampling distribution x multipliers."""
    if cfg.pos_weight == "none":
        return None if np.allclose(mult, 1) else mult.astype(np.float32)
    return sc.prevalence_pos_weight(labels, mult, sample_weights=sample_weights)


def train_multilabel(cfg: MultilabelConfig, on_epoch_end=None) -> dict:
    """k-fold CV with one child run per fold, aggregated on the parent; log and register the model.

    ``on_epoch_end(step, metrics)`` is called after every epoch of every fold with a global step
    (fold * epochs + epoch) and the inner-validation metrics (``val_macro_auc`` among them).
    Returns ``objective`` (= ``val_macro_auc``, the mean over folds of the inner-validation macro-AUC),
    ``objective_name``, ``run_id``, ``val_*``, ``cv_*`` (held-out folds, mean and ``_sd``), ``test_*``
    (= the ``cv_*`` estimate, when ``evaluate_test``), ``model_uri`` / ``model_version``.
    With ``evaluate_test=False`` (tuning trials) the holdout test patients are left out of the CV entirely
    and no model is logged.
    """
    cfg = apply_preset(cfg, PRESETS)
    classes = validate(cfg)
    mult = parse_multipliers(cfg.pos_weight_multipliers, len(classes))
    t_wall = time.perf_counter()
    seed_everything(cfg.seed)
    with task_run("multilabel") as parent:
        log_config(cfg)
        prep = load_data(cfg)
        missing = [c for c in classes if c not in prep.manifest.columns or prep.manifest[c].isna().all()]
        if missing:
            raise ValueError(f"classes {missing} have no labels in the {prep.dataset} data "
                             f"(PHE-SICH-CT-IDS has no subtype labels; use dataset=ctich, synthetic-ctich or a "
                             f"labels CSV)")
        log_prepared(prep, target=classes[0])
        manifest = prep.manifest.reset_index(drop=True)
        Y = manifest[classes].astype("Float64").fillna(0).to_numpy(dtype=np.float32)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", cvf.FoldWarning)
            folds, fold_source = cvf.cv_folds(manifest, prep.split, classes, cfg.n_folds, seed=cfg.split_seed,
                                              exclude_test=not cfg.evaluate_test)
        fold_warnings = [str(w.message) for w in caught if issubclass(w.category, cvf.FoldWarning)]
        for msg in fold_warnings:
            log.warning(msg)
            warnings.warn(msg, cvf.FoldWarning, stacklevel=2)
        plabels = cvf.patient_labels(manifest, classes)
        table = cvf.fold_table(folds, plabels)
        mlflow.log_text(table.to_csv(index=False), "cv/folds.csv")
        cv_digest = frame_digest(table[["patient_id", "fold"]])
        # candidates are comparable when they were cross-validated on the same folds (registry rule)
        mlflow.set_tags({"ichflow.split_digest": cv_digest, "ichflow.cv_folds": fold_source,
                         "ichflow.prepare_split_digest": prep.split_digest})
        if fold_warnings:
            mlflow.set_tag("ichflow.fold_warnings", " | ".join(fold_warnings)[:5000])

        fold_of = manifest["patient_id"].astype(str).map(folds)   # NaN = not in the CV (test in tuning)
        in_cv = fold_of.notna().to_numpy()
        fold_arr = fold_of.fillna(-1).astype(int).to_numpy()
        sup = mm.support(manifest[in_cv], Y[in_cv], classes)
        mlflow.log_metrics({f"support_{k}": v for k, v in sup.items()})
        data = sc.SliceData.load(manifest, cfg.image_size)
        device = resolve_device(cfg.device)
        amp = amp_dtype(device, cfg.amp)
        mlflow.log_params({"device_used": str(device), "n_classes": len(classes), "cv_patients": len(folds)})

        K = cfg.n_folds
        fold_results = []
        for k in range(K):
            val_fold = (k + 1) % K
            parts = {"train": np.nonzero(in_cv & (fold_arr != k) & (fold_arr != val_fold))[0],
                     "val": np.nonzero(fold_arr == val_fold)[0], "heldout": np.nonzero(fold_arr == k)[0]}
            fold_results.append(_run_fold(f"fold-{k}", k, cfg, classes, mult, data, Y, parts, device, amp,
                                          on_epoch_end, step_offset=k * cfg.epochs))

        # ---- aggregate on the parent
        per_fold_val = [r["val"] for r in fold_results]
        per_fold_held = [r["heldout"] for r in fold_results]
        agg = {f"val_{k}": v for k, v in mm.aggregate(per_fold_val).items()}
        agg.update({f"cv_{k}": v for k, v in mm.aggregate(per_fold_held).items()})
        oof_rows = np.concatenate([r["rows"] for r in fold_results])
        oof_p = np.concatenate([r["probs"] for r in fold_results])
        oof_pred = np.concatenate([r["probs"] >= r["thresholds"][None, :] for r in fold_results])
        oof = _pooled_metrics(Y[oof_rows], oof_p, oof_pred, classes)
        agg.update({f"oof_{k}": v for k, v in oof.items()})
        result = {"run_id": parent.info.run_id, "objective_name": "val_macro_auc", "folds": K,
                  "fold_source": fold_source, **agg}
        if cfg.evaluate_test:
            result.update({f"test_{k[3:]}": v for k, v in agg.items() if k.startswith("cv_")})
        result["objective"] = result.get("val_macro_auc", float("nan"))
        mlflow.log_metrics(sc.finite({k: v for k, v in result.items() if k not in ("run_id", "objective_name")}))
        _log_parent_artifacts(cfg, classes, fold_results, agg, sup, manifest, Y, oof_rows, oof_p, oof_pred)

        # ---- the model
        if cfg.evaluate_test:
            if cfg.final_model == "refit":
                val_fold = K - 1
                parts = {"train": np.nonzero(in_cv & (fold_arr != val_fold))[0],
                         "val": np.nonzero(fold_arr == val_fold)[0], "heldout": np.zeros(0, dtype=int)}
                final = _run_fold("refit", K, cfg, classes, mult, data, Y, parts, device, amp, None, K * cfg.epochs)
                chosen = "refit on all folds but one (inner validation fold %d)" % val_fold
            else:
                scores = np.array([r["val"].get("macro_auc", np.nan) for r in fold_results], dtype=float)
                best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
                final = fold_results[best]
                chosen = f"fold-{best} (best inner-validation macro-AUC {final['val'].get('macro_auc', float('nan')):.3f})"
            mlflow.set_tag("ichflow.final_model", chosen)
            model = sc.build_model(cfg.model, cfg.in_channels, len(classes))
            model.load_state_dict(torch.load(final["checkpoint"], map_location="cpu", weights_only=True))
            config = {"task": "multilabel", "model": cfg.model, "in_channels": cfg.in_channels,
                      "image_size": cfg.image_size, "classes": classes,
                      "thresholds": [float(t) for t in final["thresholds"]], "norm_mean": final["norm"].mean,
                      "norm_std": final["norm"].std, "final_model": chosen, "cv_digest": cv_digest}
            example = sc.example_scan(manifest, np.nonzero(in_cv)[0])
            info = sc.log_slice_model(model, config, run_folder() / "model", example,
                                      REGISTERED_NAME if cfg.register else None,
                                      metadata={"task": "multilabel", "classes": classes, "final_model": chosen})
            result["model_uri"] = info.model_uri
            result["final_model"] = chosen
            if info.registered_model_version is not None:
                result["model_version"] = str(info.registered_model_version)
                mlflow.set_tag("ichflow.registered_model", f"{REGISTERED_NAME}/{info.registered_model_version}")
        result["wall_seconds"] = time.perf_counter() - t_wall
        mlflow.log_metric("wall_seconds", result["wall_seconds"])
        _print_summary(cfg, prep, classes, result, sup, fold_warnings)
        return result


def _run_fold(name, k, cfg, classes, mult, data, Y, parts, device, amp, on_epoch_end, step_offset) -> dict:
    """Train one fold in a nested run: inner validation picks checkpoint and thresholds; score held-out once."""
    with mlflow.start_run(run_name=name, nested=True, tags={"ichflow.task": "multilabel", "ichflow.fold": str(k)}):
        m = data.manifest
        mlflow.log_params({"fold": k, "inner_val_fold": (k + 1) % cfg.n_folds if name != "refit" else cfg.n_folds - 1,
                           "train_patients": m.loc[parts["train"], "patient_id"].nunique(),
                           "val_patients": m.loc[parts["val"], "patient_id"].nunique(),
                           "heldout_patients": m.loc[parts["heldout"], "patient_id"].nunique()})
        for part, rows in parts.items():
            mlflow.log_metrics({f"support_{part}_{kk}": v for kk, v in mm.support(m.loc[rows], Y[rows], classes).items()})
        train_y = Y[parts["train"]]
        if not train_y.any(axis=0).all():
            absent = [c for c, a in zip(classes, train_y.any(axis=0)) if not a]
            log.warning("%s: no training positives of %s", name, absent)
        norm = data.normalizer(parts["train"], seed=cfg.seed)
        seed_everything(cfg.seed + k)
        model = sc.build_model(cfg.model, cfg.in_channels, len(classes), cfg.pretrained).to(device)
        model = model.to(memory_format=torch.channels_last)
        sampler, sample_w = None, None
        n_samples = len(parts["train"])
        if cfg.sampler == "balanced":
            sampler = sc.balanced_sampler(train_y, num_samples=n_samples, seed=cfg.seed + k)
            sample_w = sampler.weights.numpy()
        pw = pos_weight_for(train_y, cfg, mult, sample_w)
        if pw is not None:
            mlflow.log_params({f"pos_weight_{c}": round(float(w), 4) for c, w in zip(classes, pw)})
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.as_tensor(pw, device=device) if pw is not None else None)
        train_ds = sc.SliceDataset(data, parts["train"], Y, cfg.in_channels, norm,
                                   sc.train_augment(cfg.aug_strength, cfg.image_size))
        train_loader = make_loader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                                   seed=cfg.seed + k, drop_last=len(train_ds) > cfg.batch_size, sampler=sampler)
        loaders = {p: make_loader(sc.SliceDataset(data, r, Y, cfg.in_channels, norm), cfg.batch_size * 2,
                                  shuffle=False, num_workers=cfg.num_workers) for p, r in parts.items() if len(r)}
        steps = cfg.steps_per_epoch or len(train_loader)
        optimizer = adamw(model, cfg.lr, cfg.weight_decay)
        trainer = Trainer(model, optimizer, default_loss(loss_fn), device, amp,
                          scheduler=sc.cosine_warmup(optimizer, steps * cfg.epochs))

        def evaluate(mdl):
            probs, loss = sc.predict_probs(mdl, loaders["val"], device, amp)
            met = mm.multilabel_metrics(Y[parts["val"]], probs, [0.5] * len(classes), classes)
            auc = met["macro_auc"] if met["macro_auc"] == met["macro_auc"] else 0.0
            out = {"val_loss": loss, "val_macro_auc": auc, "val_selection": auc - 1e-3 * min(loss, 10.0)}
            out.update({f"val_{c}_roc_auc": met[f"{c}_roc_auc"] for c in classes
                        if met[f"{c}_roc_auc"] == met[f"{c}_roc_auc"]})
            return out

        hook = None
        if on_epoch_end is not None:
            def hook(epoch, metrics):
                on_epoch_end(step_offset + epoch, metrics)

        fit = trainer.fit(train_loader, evaluate, cfg.epochs, monitor="val_selection", mode="max",
                          patience=cfg.patience, checkpoint=run_folder() / "best.pt",
                          steps_per_epoch=cfg.steps_per_epoch or None, on_epoch_end=hook)
        step = fit.epochs_run
        val_p, _ = sc.predict_probs(model, loaders["val"], device, amp)
        thresholds = sc.per_class_thresholds(Y[parts["val"]], val_p, cfg.threshold_goal, cfg.target_recall)
        val_m = mm.multilabel_metrics(Y[parts["val"]], val_p, thresholds, classes)
        out = {"val": val_m, "thresholds": thresholds, "checkpoint": str(run_folder() / "best.pt"), "norm": norm,
               "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run, "rows": parts["heldout"],
               "probs": np.zeros((0, len(classes)), np.float32), "heldout": {}}
        logged = {f"val_{kk}": v for kk, v in val_m.items()}
        logged.update({f"threshold_{c}": t for c, t in zip(classes, thresholds)})
        if len(parts["heldout"]):
            held_p, _ = sc.predict_probs(model, loaders["heldout"], device, amp)
            out["probs"] = held_p
            out["heldout"] = mm.multilabel_metrics(Y[parts["heldout"]], held_p, thresholds, classes)
            logged.update({f"heldout_{kk}": v for kk, v in out["heldout"].items()})
        mlflow.log_metrics(sc.finite({**logged, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
                                      "train_seconds": fit.train_seconds}), step=step)
        fig = figures.curves_figure(fit.history, ["train_loss", "val_loss", "val_macro_auc"], title=f"{name}")
        mlflow.log_figure(fig, "figures/curves.png")
        figures.close(fig)
        if len(parts["heldout"]):
            fig = mm.multilabel_confusion_figure(Y[parts["heldout"]], out["probs"], thresholds, classes,
                                                 title=f"{name}: held-out fold")
            mlflow.log_figure(fig, "figures/heldout_confusion.png")
            figures.close(fig)
        model.cpu()
        return out


def _pooled_metrics(y, p, pred, classes) -> dict:
    """Out-of-fold metrics: every CV patient scored once by the model that did not see it (own thresholds)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y) > 0
    out = {}
    tp = fp = fn = 0
    aucs, f1s = [], []
    for j, c in enumerate(classes):
        t, q = y[:, j], pred[:, j]
        ctp, cfp, cfn = int((t & q).sum()), int((~t & q).sum()), int((t & ~q).sum())
        tp, fp, fn = tp + ctp, fp + cfp, fn + cfn
        out[f"{c}_precision"] = ctp / (ctp + cfp) if ctp + cfp else 0.0
        out[f"{c}_recall"] = ctp / (ctp + cfn) if ctp + cfn else float("nan")
        out[f"{c}_f1"] = 2 * ctp / (2 * ctp + cfp + cfn) if t.any() else float("nan")
        if 0 < t.sum() < len(t):
            out[f"{c}_roc_auc"] = float(roc_auc_score(t, p[:, j]))
            out[f"{c}_pr_auc"] = float(average_precision_score(t, p[:, j]))
            aucs.append(out[f"{c}_roc_auc"])
        if out[f"{c}_f1"] == out[f"{c}_f1"]:
            f1s.append(out[f"{c}_f1"])
    out["macro_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    out["macro_f1"] = float(np.mean(f1s)) if f1s else float("nan")
    out["micro_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return out


def _log_parent_artifacts(cfg, classes, fold_results, agg, sup, manifest, Y, oof_rows, oof_p, oof_pred) -> None:
    rows = []
    for k, r in enumerate(fold_results):
        rows.append({"fold": k, "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"],
                     **{f"val_{kk}": v for kk, v in r["val"].items()},
                     **{f"heldout_{kk}": v for kk, v in r["heldout"].items()},
                     **{f"threshold_{c}": t for c, t in zip(classes, r["thresholds"])}})
    mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), "cv/fold_metrics.csv")
    per_fold_support = []
    for k, r in enumerate(fold_results):
        per_fold_support.append({"fold": k, **mm.support(manifest.loc[r["rows"]], Y[r["rows"]], classes)})
    mlflow.log_text(pd.DataFrame(per_fold_support).to_csv(index=False), "cv/support_per_fold.csv")
    text = ["# Subtype cross-validation", "",
            f"{cfg.n_folds} patient-level folds; held-out metrics mean ± sd over folds (folds where defined).", "",
            mm.summary_markdown(agg, sup, classes, prefix="cv"), "",
            "Inner validation (threshold / checkpoint selection), mean ± sd:", "",
            mm.summary_markdown(agg, sup, classes, prefix="val")]
    mlflow.log_text("\n".join(text), "cv/summary.md")
    pred_frame = manifest.loc[oof_rows, ["patient_id", "slice_index"]].reset_index(drop=True)
    for j, c in enumerate(classes):
        pred_frame[c] = Y[oof_rows, j].astype(int)
        pred_frame[f"{c}_probability"] = oof_p[:, j]
        pred_frame[f"{c}_pred"] = oof_pred[:, j].astype(int)
    mlflow.log_text(pred_frame.to_csv(index=False), "cv/oof_predictions.csv")
    thr = np.full(len(classes), 0.5)
    fig = mm.multilabel_confusion_figure(Y[oof_rows], oof_pred.astype(float), thr, classes,
                                         title="Out-of-fold, each fold's own thresholds")
    mlflow.log_figure(fig, "figures/multilabel_confusion.png")
    figures.close(fig)
    fig = mm.cooccurrence_figure(Y[oof_rows], manifest.loc[oof_rows, "patient_id"].to_numpy(), classes, oof_pred)
    mlflow.log_figure(fig, "figures/cooccurrence.png")
    figures.close(fig)
    for j, c in enumerate(classes):
        t = Y[oof_rows, j] > 0
        if 0 < t.sum() < len(t):
            fig = figures.roc_pr_figure(t, oof_p[:, j], title=f"{c}: out-of-fold")
            mlflow.log_figure(fig, f"figures/oof_roc_pr_{c}.png")
            figures.close(fig)


def _print_summary(cfg, prep, classes, r, sup, fold_warnings) -> None:
    print(f"[multilabel] {prep.dataset} ({prep.source}) {cfg.model} {cfg.image_size}px, classes {','.join(classes)}, "
          f"{cfg.n_folds}-fold patient CV ({r['fold_source']})")
    for c in classes:
        def ms(key):
            m, s = r.get(f"cv_{key}"), r.get(f"cv_{key}_sd")
            return "n/a" if m is None else f"{m:.3f} ± {s:.3f}"
        print(f"  {c}: {sup[f'{c}_slices']} slices / {sup[f'{c}_patients']} patients; held-out AUC "
              f"{ms(c + '_roc_auc')}, F1 {ms(c + '_f1')}")
    print(f"  macro AUC {r.get('cv_macro_auc', float('nan')):.3f} ± {r.get('cv_macro_auc_sd', float('nan')):.3f}, "
          f"macro F1 {r.get('cv_macro_f1', float('nan')):.3f} ± {r.get('cv_macro_f1_sd', float('nan')):.3f}, "
          f"micro F1 {r.get('cv_micro_f1', float('nan')):.3f}; pooled out-of-fold macro AUC "
          f"{r.get('oof_macro_auc', float('nan')):.3f}; inner-val macro AUC {r['objective']:.3f}")
    for w in fold_warnings:
        print(f"  warning: {w}")
    if "model_version" in r:
        print(f"  registered {REGISTERED_NAME} version {r['model_version']}: {r.get('final_model')}")
    print(f"  wall time {r['wall_seconds']:.0f} s, run {r['run_id']}")
