"""What the slice-level classification tasks share (binary bleed/no-bleed and multi-label subtypes).

- :func:`build_model`: a timm CNN with ``in_chans`` (1 = the slice, 3 = 2.5D) and ``num_classes`` logits,
  from scratch, from ImageNet weights shipped in a package (``pretrained=efficientnet_lite0_imagenet``, see
  :mod:`~ichflow.engine.pretrained`) or from a LOCAL weights file (nothing is downloaded).
- :class:`SliceData` / :class:`SliceDataset`: the decoded slice cache of a whole manifest (resized once to
  ``image_size``), 2.5D neighbour stacking, normalisation, albumentations augmentation (flip, affine,
  brightness/contrast, random resized crop) from the engine, scaled by ``aug_strength``.
- :func:`loaders`, :func:`bce_loss`, :func:`fit_model`: the training pieces both tasks share (loaders, the
  weighted BCE, AdamW + :func:`~ichflow.engine.schedule.warmup_cosine` on the engine Trainer, checkpoint by
  ``val_selection``).
- :func:`predict_probs`: sigmoid probabilities (and the un-weighted BCE) over a loader.
- :func:`select_threshold`: the decision threshold for a stated goal (max F1, or recall >= a target),
  chosen on validation scores only.
- :func:`binary_metrics`, :func:`patient_level`: slice and patient-level metrics.
- :class:`SliceClassifierModel`: the MLflow pyfunc served for both tasks.

Every model has one logit per class and a sigmoid (``BCEWithLogitsLoss``): the binary task is the k=1 case.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ichflow.engine.augment import Normalizer, build_augment
from ichflow.engine.device import autocast
from ichflow.engine.pretrained import PACKAGED, packaged_source_file, packaged_weights_file
from ichflow.engine.scan import as_scan, intensity_param, input_schema, model_window, neighbours, record_window
from ichflow.engine.schedule import warmup_cosine
from ichflow.engine.slices import neighbour_indices, slice_cache, stack_channels
from ichflow.engine.trainer import FitResult, Trainer, adamw, default_loss
from ichflow.errors import DataError, ParameterError
from ichflow.paths import CHECKPOINT, MODEL_CONFIG

IMBALANCE = ("weighted_loss", "sampler", "none")
THRESHOLD_GOALS = ("f1", "recall")
_NO_WEIGHTS = ("", "false", "none", "0", "no", "off", "scratch")


# --------------------------------------------------------------------------------------------- models
def check_model(name: str, in_chans: int, pretrained: str = "") -> None:
    """ParameterError for a model name timm does not know, in_channels other than 1 / 3, a download request, or
    packaged weights of another architecture (or whose package is missing)."""
    import timm

    if in_chans not in (1, 3):
        raise ParameterError("in_channels", f"must be 1 (the slice) or 3 (2.5D); got {in_chans!r}")
    if not timm.is_model(name):
        raise ParameterError("model", f"{name!r} is not a timm model name (e.g. resnet18, resnet34, "
                                      "efficientnet_b0; see timm.list_models())")
    spec = str(pretrained or "").strip()
    if spec.lower() in ("true", "1", "yes", "imagenet", "on"):
        packaged = ", ".join(f"{n} (with model={w.timm_model})" for n, w in PACKAGED.items())
        raise ParameterError("pretrained", f"nothing is downloaded here; give packaged weights: {packaged}, "
                                           "the path of a local weights file (.pth/.pt/.safetensors state dict "
                                           "of the same timm architecture) or leave it empty")
    if spec in PACKAGED:
        if name != PACKAGED[spec].timm_model:
            raise ParameterError("pretrained", f"{spec} needs model={PACKAGED[spec].timm_model}; got model={name}")
        packaged_source_file(spec)


def build_model(name: str, in_chans: int, num_classes: int, pretrained: str = "") -> torch.nn.Module:
    """A timm classifier. ``pretrained``: '' (from scratch), the name of packaged weights
    (:data:`~ichflow.engine.pretrained.PACKAGED_NAMES`) or the path of a local weights file.

    A local file may come from any timm model of the same architecture (e.g. ImageNet weights saved
    elsewhere): the first conv is adapted to ``in_chans`` and a classifier of another size is dropped.
    """
    import timm

    check_model(name, in_chans, pretrained)
    spec = str(pretrained or "").strip()
    if spec.lower() in _NO_WEIGHTS:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes)
    path = packaged_weights_file(spec) if spec in PACKAGED else Path(spec).expanduser()
    if not path.is_file():
        raise DataError(path, "pretrained weights file not found")
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                 in_chans=in_chans, num_classes=num_classes)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise DataError(path, f"cannot load as {name} weights ({exc})") from exc


def gradcam_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The last feature stage of a timm model (``layer4`` for ResNets, ``blocks.6`` for EfficientNet-B0)."""
    info = getattr(model, "feature_info", None)
    if info:
        return model.get_submodule(info[-1]["module"])
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[-1]


# ------------------------------------------------------------------------------------------------ data
def resize_slices(slices: np.ndarray, size: int) -> np.ndarray:
    """One scan's slices (see :func:`~ichflow.engine.scan.as_scan`) -> (N, size, size) uint8, resized like the
    training cache."""
    arr = as_scan(slices)
    if arr.shape[1:] == (size, size):
        return arr
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in arr])


@dataclass
class SliceData:
    """Decoded slices of a whole manifest (one cache, shared by every split and fold)."""

    manifest: pd.DataFrame
    images: np.ndarray        # (N, S, S) uint8 memmap
    prev_idx: np.ndarray
    next_idx: np.ndarray

    @classmethod
    def load(cls, manifest: pd.DataFrame, size: int) -> "SliceData":
        manifest = manifest.reset_index(drop=True)
        images = slice_cache(manifest["image_path"].astype(str).tolist(), size=size)
        prev_idx, next_idx = neighbour_indices(manifest)
        return cls(manifest, images, prev_idx, next_idx)

    def normalizer(self, rows: np.ndarray, seed: int = 0, max_slices: int = 256) -> Normalizer:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(rows, size=min(max_slices, len(rows)), replace=False))
        return Normalizer.fit(np.asarray(self.images[pick]), max_slices=len(pick), seed=seed)


class SliceDataset(torch.utils.data.Dataset):
    """(C, S, S) float tensor and (k,) float label vector for each selected row."""

    def __init__(self, data: SliceData, rows: np.ndarray, labels: np.ndarray, in_channels: int,
                 normalizer: Normalizer, augment=None):
        self.data, self.rows = data, np.asarray(rows, dtype=int)
        self.labels = np.asarray(labels, dtype=np.float32).reshape(len(data.manifest), -1)
        self.in_channels, self.normalizer, self.augment = in_channels, normalizer, augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        i = int(self.rows[j])
        x = stack_channels(self.data.images, i, self.data.prev_idx, self.data.next_idx, self.in_channels)
        if self.augment is not None:
            x = self.augment(image=np.ascontiguousarray(x))["image"]
        x = self.normalizer(x).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self.labels[i])


def train_augment(aug_strength: float, size: int):
    """Flip + affine + brightness/contrast + random resized crop back to ``size`` (none at strength 0)."""
    return build_augment(aug_strength, resized_crop=size) if aug_strength > 0 else None


def balanced_sampler(labels: np.ndarray, num_samples: int, seed: int = 0):
    """WeightedRandomSampler drawing slices with any positive label and all-negative slices 50/50."""
    pos = np.asarray(labels).reshape(len(labels), -1).max(axis=1) > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        weights = np.ones(len(pos))
    else:
        weights = np.where(pos, 0.5 / n_pos, 0.5 / n_neg)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples,
                                                  replacement=True, generator=gen)


def prevalence_pos_weight(labels: np.ndarray, multipliers=None, cap: float = 100.0,
                          sample_weights=None) -> np.ndarray:
    """BCE ``pos_weight`` per class = negatives / positives in the training labels (x multiplier).

    ``sample_weights``: the sampler's per-slice draw weights; the prevalence is then the one the model sees
    in its batches. A class without positives gets weight 1 (nothing to up-weight); weights are capped at
    ``cap`` before the multipliers.
    """
    y = np.asarray(labels, dtype=float).reshape(len(labels), -1)
    sw = np.ones(len(y)) if sample_weights is None else np.asarray(sample_weights, dtype=float).reshape(-1)
    pos = (sw[:, None] * y).sum(axis=0)
    neg = sw.sum() - pos
    w = np.where(pos > 0, neg / np.where(pos > 0, pos, 1), 1.0)
    w = np.clip(w, 1e-3, cap)
    if multipliers is not None:
        mult = np.asarray(multipliers, dtype=float).reshape(-1)
        if mult.shape != w.shape:
            raise ValueError(f"pos_weight multipliers: {len(mult)} values for {len(w)} classes")
        w = w * mult
    return w.astype(np.float32)


# -------------------------------------------------------------------------------------------- training
def train_model(cfg, num_classes: int, device: torch.device) -> torch.nn.Module:
    """``build_model`` of ``cfg`` (model, in_channels, pretrained) on ``device``, channels-last."""
    model = build_model(cfg.model, cfg.in_channels, num_classes, cfg.pretrained).to(device)
    return model.to(memory_format=torch.channels_last)


def loaders(data: SliceData, parts: dict[str, np.ndarray], labels: np.ndarray, cfg, norm: Normalizer,
            sampler=None, seed: int = 0):
    """(augmented train loader over ``parts['train']``, {part: plain loader} for every non-empty part)."""
    from ichflow.tasks.common import make_loader

    train_ds = SliceDataset(data, parts["train"], labels, cfg.in_channels, norm,
                            train_augment(cfg.aug_strength, cfg.image_size))
    train = make_loader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, seed=seed,
                        drop_last=len(train_ds) > cfg.batch_size, sampler=sampler)
    plain = {p: make_loader(SliceDataset(data, r, labels, cfg.in_channels, norm), cfg.batch_size * 2,
                            shuffle=False, num_workers=cfg.num_workers) for p, r in parts.items() if len(r)}
    return train, plain


def bce_loss(pos_weight, device: torch.device) -> torch.nn.BCEWithLogitsLoss:
    """``BCEWithLogitsLoss`` with a per-class ``pos_weight`` (None = plain BCE)."""
    return torch.nn.BCEWithLogitsLoss(
        pos_weight=torch.as_tensor(pos_weight, device=device) if pos_weight is not None else None)


def fit_model(model: torch.nn.Module, cfg, loss_fn, device: torch.device, amp, train_loader, evaluate,
              on_epoch_end=None) -> FitResult:
    """AdamW + warm-up/cosine on the engine Trainer; the checkpoint (``run_folder()/CHECKPOINT`` of the active
    run) is chosen by ``val_selection`` and restored at the end."""
    from ichflow.tasks.common import run_folder

    steps = cfg.steps_per_epoch or len(train_loader)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    trainer = Trainer(model, optimizer, default_loss(loss_fn), device, amp,
                      scheduler=warmup_cosine(optimizer, steps * cfg.epochs))
    return trainer.fit(train_loader, evaluate, cfg.epochs, monitor="val_selection", mode="max",
                       patience=cfg.patience, checkpoint=run_folder() / CHECKPOINT,
                       steps_per_epoch=cfg.steps_per_epoch or None, on_epoch_end=on_epoch_end)


def selection_score(auc: float, loss: float) -> float:
    """What checkpoints are chosen by: validation AUC (0 when undefined), ties broken by the lower loss."""
    auc = 0.0 if auc != auc else float(auc)
    return auc - 1e-3 * min(loss, 10.0)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, loader, device: torch.device, amp=None) -> tuple[np.ndarray, float]:
    """(n, k) sigmoid probabilities in loader order, and the mean un-weighted BCE against the labels."""
    model.eval()
    probs, total, count = [], 0.0, 0
    for x, y in loader:
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float().cpu()
        total += torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum").item()
        count += y.numel()
        probs.append(torch.sigmoid(logits).numpy())
    out = np.concatenate(probs) if probs else np.zeros((0, 1), np.float32)
    return out, total / max(count, 1)


# ------------------------------------------------------------------------------------------ scan context
# Per-slice scores averaged over their axial neighbours within one scan: a bleed spans consecutive slices, a
# lone high score between negative neighbours rarely is one (the 2D-CNN-then-sequence idea of the RSNA 2019
# winners, with a fixed kernel instead of a learned sequence model so it cannot overfit a small val split).
SCAN_CONTEXT = {"none": (1.0,), "mean3": (1.0, 1.0, 1.0), "tri5": (1.0, 2.0, 3.0, 2.0, 1.0),
                "mean5": (1.0, 1.0, 1.0, 1.0, 1.0)}
SCAN_CONTEXT_CHOICES = ("auto", *SCAN_CONTEXT)


def smooth_along_scan(scores: np.ndarray, context: str) -> np.ndarray:
    """Scores (N,) or (N, K) of ONE scan in axial order, averaged with the ``context`` kernel (ends replicated)."""
    kernel = np.asarray(SCAN_CONTEXT[context], dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if len(kernel) == 1 or len(scores) == 0:
        return scores
    r = len(kernel) // 2
    padded = np.pad(scores, [(r, r)] + [(0, 0)] * (scores.ndim - 1), mode="edge")
    return sum(w * padded[i:i + len(scores)] for i, w in enumerate(kernel / kernel.sum()))


def smooth_rows(manifest: pd.DataFrame, rows: np.ndarray, scores: np.ndarray, context: str) -> np.ndarray:
    """Scores (len(rows),) or (len(rows), K) of manifest ``rows`` (whole scans), smoothed scan by scan in axial
    order and returned in the order of ``rows``."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(SCAN_CONTEXT[context]) == 1:
        return scores
    part = manifest.loc[np.asarray(rows), ["patient_id", "slice_index"]].reset_index(drop=True)
    out = np.empty_like(scores)
    for _, scan in part.groupby("patient_id", sort=False):
        order = scan.sort_values("slice_index", kind="stable").index.to_numpy()
        out[order] = smooth_along_scan(scores[order], context)
    return out


def smooth_frame(frame: pd.DataFrame, context: str, column: str = "score") -> pd.DataFrame:
    """``frame`` (patient_id, slice_index, ``column``; whole scans) with ``column`` smoothed scan by scan."""
    smoothed = smooth_rows(frame.reset_index(drop=True), np.arange(len(frame)), frame[column].to_numpy(), context)
    return frame.assign(**{column: smoothed})


def choose_scan_context(frame: pd.DataFrame, requested: str) -> tuple[str, dict]:
    """(context, val PR-AUC of each candidate): ``requested``, or for ``auto`` the kernel with the best PR-AUC
    on the validation ``frame`` (ties: the narrower kernel, listed first)."""
    from sklearn.metrics import average_precision_score

    if frame["y"].nunique() < 2:
        return ("none" if requested == "auto" else requested), {}
    return best_scan_context(requested, lambda c: float(average_precision_score(
        frame["y"], smooth_frame(frame, c)["score"])))


def best_scan_context(requested: str, score) -> tuple[str, dict]:
    """(context, ``score(context)`` of each candidate): ``requested``, or for ``auto`` the best-scoring kernel
    (NaN scores lose; ties: the narrower kernel, listed first)."""
    candidates = tuple(SCAN_CONTEXT) if requested == "auto" else (requested,)
    scores = {c: score(c) for c in candidates}
    rank = {c: (v if v == v else float("-inf")) for c, v in scores.items()}
    return max(candidates, key=lambda c: (rank[c], -candidates.index(c))), scores


# ------------------------------------------------------------------------------------ thresholds, metrics
def select_threshold(y_true, scores, goal: str = "f1", target_recall: float = 0.95) -> tuple[float, dict]:
    """Decision threshold (predict positive when score >= threshold) chosen on validation scores.

    ``goal='f1'``: maximise F1. ``goal='recall'``: the best precision among thresholds whose recall reaches
    ``target_recall`` (missing a bleed is the costly error). The returned threshold lies halfway between the
    chosen score and the next lower score, so it is not glued to one validation slice. Without both classes
    in ``y_true`` nothing can be chosen: 0.5 is returned with a note.
    """
    if goal not in THRESHOLD_GOALS:
        raise ValueError(f"threshold_goal must be one of {THRESHOLD_GOALS}, got {goal!r}")
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=float).reshape(-1)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        return 0.5, {"note": "validation has a single class; default threshold 0.5 used", "goal": goal}
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp_all, fp_all = np.cumsum(y_sorted), np.cumsum(~y_sorted)
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s) - 1]   # last index of each distinct score
    tp, fp, cand = tp_all[last], fp_all[last], s_sorted[last]
    precision, recall = tp / (tp + fp), tp / n_pos
    f1 = 2 * tp / (tp + fp + n_pos)
    if goal == "f1":
        k = int(np.argmax(f1))                         # first max = highest threshold among ties
    else:
        ok = np.nonzero(recall >= target_recall - 1e-12)[0]
        k = int(ok[np.argmax(precision[ok])])
    lower = s_sorted[last[k] + 1] if last[k] + 1 < len(s) else min(0.0, float(cand[k]))
    thr = float((cand[k] + lower) / 2)
    info = {"goal": goal, "precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k])}
    if goal == "recall":
        info["target_recall"] = float(target_recall)
    return thr, info


def per_class_thresholds(y_true: np.ndarray, scores: np.ndarray, goal: str = "f1",
                         target_recall: float = 0.95) -> np.ndarray:
    """:func:`select_threshold` for each column of (n, k) labels and scores (multi-label)."""
    y = np.asarray(y_true).reshape(len(y_true), -1)
    s = np.asarray(scores, dtype=float).reshape(len(scores), -1)
    return np.array([select_threshold(y[:, j], s[:, j], goal, target_recall)[0] for j in range(y.shape[1])])


def binary_metrics(y_true, scores, threshold: float) -> dict:
    """Accuracy, precision, recall (sensitivity), specificity, F1 at the threshold; ROC-AUC and PR-AUC.

    Threshold-free metrics are NaN when only one class is present.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=float).reshape(-1)
    p = s >= threshold
    tp, fp = int((p & y).sum()), int((p & ~y).sum())
    fn, tn = int((~p & y).sum()), int((~p & ~y).sum())
    out = {
        "accuracy": (tp + tn) / max(len(y), 1),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }
    both = 0 < y.sum() < len(y)
    out["roc_auc"] = float(roc_auc_score(y, s)) if both else float("nan")
    out["pr_auc"] = float(average_precision_score(y, s)) if both else float("nan")
    return out


def patient_level(frame: pd.DataFrame, label: str = "y", score: str = "score") -> pd.DataFrame:
    """One row per patient: positive if any slice is positive; score = the highest slice score.

    With a threshold t, "patient predicted positive" = any slice score >= t = patient score >= t.
    """
    return frame.groupby("patient_id", sort=True).agg(y=(label, "max"), score=(score, "max"),
                                                      slices=(score, "size")).reset_index()


def metrics_with_ci(frame: pd.DataFrame, threshold: float, names=("accuracy", "precision", "recall", "f1",
                                                                    "roc_auc", "pr_auc"),
                    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Metrics of (y, score, patient_id) rows and 95 % CIs from a percentile bootstrap over patients.

    One pass of :func:`ichflow.engine.stats.patient_bootstrap_ci` (whole patients resampled): every
    metric is computed on the same resamples; resamples where a metric is undefined are left out for it.
    """
    from ichflow.engine.stats import patient_bootstrap_ci

    point = binary_metrics(frame["y"], frame["score"], threshold)
    out = dict(point)
    if n_boot <= 0 or frame["patient_id"].nunique() < 2:
        return out
    samples: list[dict] = []

    def stat(f):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples.append(binary_metrics(f["y"], f["score"], threshold))
        return 0.0

    patient_bootstrap_ci(frame, stat, n_boot=n_boot, alpha=alpha, seed=seed)
    for name in names:
        vals = np.array([m[name] for m in samples], dtype=float)
        vals = vals[np.isfinite(vals)]
        if point[name] != point[name] or len(vals) == 0:
            continue
        out[f"{name}_ci_low"] = float(np.quantile(vals, alpha / 2))
        out[f"{name}_ci_high"] = float(np.quantile(vals, 1 - alpha / 2))
    return out


# ------------------------------------------------------------------------------------------------ pyfunc
def _scan_tensor(slices: np.ndarray, size: int, in_channels: int, mean: float, std: float) -> torch.Tensor:
    arr = resize_slices(slices, size)
    prev_idx, next_idx = neighbours(len(arr))
    norm = Normalizer(mean, std)
    xs = [norm(stack_channels(arr, i, prev_idx, next_idx, in_channels)).transpose(2, 0, 1) for i in range(len(arr))]
    return torch.from_numpy(np.ascontiguousarray(np.stack(xs)))


try:
    import mlflow.pyfunc

    _PythonModel = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover
    _PythonModel = object


class SliceClassifierModel(_PythonModel):
    """Slice classifier served by MLflow.

    Input: ONE scan, slices in axial order, any H, W: uint8 slices, base64 PNG slices, HU (int16, windowed with
    the model's recorded window) or one base64 NIfTI; ``params={"intensity": ...}``. The contract and what is
    refused (HTTP 400): :func:`ichflow.engine.scan.as_scan` and docs/serving.md.
    The model resizes each slice to its training size, stacks the slices below/above for 2.5D input (edge slices
    repeated) and normalises with the training statistics.

    Output: a DataFrame with one row per input slice, for each class ``c`` of the model
    ``c_probability`` (sigmoid, 0..1, averaged over axial neighbours when the model's ``scan_context`` says so:
    pass whole scans) and ``c`` (0/1 = probability >= the class threshold chosen on the validation split).
    The binary bleed classifier has the single class ``has_lesion``; the subtype model has one column pair
    per subtype (IVH, IPH, SAH, ...).
    """

    _skip_type_hint_validation = True  # the explicit signature passes the input through; as_scan validates it

    def load_context(self, context):
        with open(context.artifacts["config"]) as fh:
            self.config = json.load(fh)
        cfg = self.config
        self.model = build_model(cfg["model"], cfg["in_channels"], len(cfg["classes"]))
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def predict(self, context, model_input, params=None):
        scan = as_scan(model_input, model_window(self.config), (params or {}).get("intensity") or "auto")
        return predict_scan(self.model, self.config, scan)


def predict_scan(model: torch.nn.Module, cfg: dict, slices: np.ndarray) -> pd.DataFrame:
    """What the pyfunc returns for the slices of one scan (see :class:`SliceClassifierModel`)."""
    x = _scan_tensor(slices, cfg["image_size"], cfg["in_channels"], cfg["norm_mean"], cfg["norm_std"])
    model.eval()
    probs = []
    with torch.no_grad():
        for start in range(0, len(x), 32):
            probs.append(torch.sigmoid(model(x[start:start + 32]).float()).numpy())
    p = smooth_along_scan(np.concatenate(probs), cfg.get("scan_context", "none"))
    out = {}
    for j, name in enumerate(cfg["classes"]):
        out[f"{name}_probability"] = p[:, j].astype(np.float64)
        out[name] = (p[:, j] >= cfg["thresholds"][j]).astype(np.int64)
    return pd.DataFrame(out)


def example_scan(manifest: pd.DataFrame, rows: np.ndarray, n: int = 3, size: int = 128) -> np.ndarray:
    """A small input example: ``n`` consecutive slices of the patient of ``rows[0]``, shrunk to ``size``."""
    from ichflow.data.images import read_gray

    pid = manifest.loc[int(rows[0]), "patient_id"]
    part = manifest[manifest["patient_id"] == pid].sort_values("slice_index")
    mid = max(0, len(part) // 2 - n // 2)
    paths = part["image_path"].iloc[mid:mid + n]
    return resize_slices(np.stack([read_gray(p) for p in paths]), size)


def log_slice_model(model: torch.nn.Module, config: dict, folder: Path, example: np.ndarray,
                    registered_name: str | None, metadata: dict | None = None):
    """Log the pyfunc (weights + config JSON) with signature and input example; register when named.

    ``config``: model, in_channels, image_size, classes, thresholds, norm_mean, norm_std (+ anything else);
    the HU ``window`` of its 8-bit input is added (``config``'s, else ``metadata``'s, else brain) and recorded
    in both model_config.json and the metadata.
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ParamSchema

    from ichflow.engine.modelio import log_pyfunc
    from ichflow.engine.scan import INPUT_DOC

    config, metadata = record_window(config, metadata)
    metadata = {"input": INPUT_DOC, **metadata}
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.pt"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
    cfg_path = folder / MODEL_CONFIG
    cfg_path.write_text(json.dumps(config, indent=2))
    example = np.asarray(example, dtype=np.uint8)
    fresh = build_model(config["model"], config["in_channels"], len(config["classes"]))
    fresh.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    # any accepted form of one scan (Tensor('object', (-1,)) passes them all through; as_scan validates)
    with warnings.catch_warnings():  # the 0/1 label columns are never missing: MLflow's int-column hint is moot
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column", category=UserWarning)
        outputs = infer_signature(example, predict_scan(fresh, config, example)).outputs
    signature = ModelSignature(inputs=input_schema(), outputs=outputs, params=ParamSchema([intensity_param()]))
    return log_pyfunc(SliceClassifierModel(), artifacts={"weights": str(weights), "config": str(cfg_path)},
                      signature=signature,
                      input_example=example, registered_model_name=registered_name, metadata=metadata)
