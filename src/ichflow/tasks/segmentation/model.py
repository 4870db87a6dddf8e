"""The smp engine's model factory and local encoder weights; the loss and the optimiser schedule of every engine."""

from __future__ import annotations

import logging
from pathlib import Path

import segmentation_models_pytorch as smp
import torch

from ichflow.engine.schedule import warmup_cosine
from ichflow.errors import DataError

log = logging.getLogger(__name__)

ARCHS = {"unet": "Unet", "unetplusplus": "UnetPlusPlus", "fpn": "FPN", "segformer": "Segformer"}
LOSSES = ("dice", "bce", "focal", "tversky", "jaccard", "lovasz")
SCHEDULERS = ("cosine", "onecycle", "constant")


def parse_channels(text: str | tuple | list) -> tuple[int, ...]:
    if isinstance(text, (tuple, list)):
        return tuple(int(v) for v in text)
    try:
        vals = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError as exc:
        raise ValueError(f"decoder_channels must be comma-separated integers, got {text!r}") from exc
    if not vals or min(vals) <= 0:
        raise ValueError(f"decoder_channels must be positive integers, got {text!r}")
    return vals


def model_spec(arch: str, encoder: str, in_channels: int, decoder_channels) -> dict:
    """The JSON-able description :func:`build_model` rebuilds a model from (stored with the pyfunc)."""
    key = str(arch).lower()
    if key not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS.values())}, got {arch!r}")
    if in_channels not in (1, 3, 5):
        raise ValueError(f"in_channels must be 1, 3 or 5 (2.5D), got {in_channels}")
    return {"arch": ARCHS[key], "encoder": encoder, "in_channels": int(in_channels),
            "decoder_channels": list(parse_channels(decoder_channels))}


def decoder_kwargs(arch: str, channels) -> dict:
    """smp keyword arguments for ``decoder_channels``: Unet/UnetPlusPlus take all five; FPN uses the first two as
    pyramid and segmentation channels; Segformer uses the first as its segmentation channels."""
    ch = list(channels)
    if arch in ("Unet", "UnetPlusPlus"):
        if len(ch) != 5:
            raise ValueError(f"decoder_channels for {arch} needs 5 values (one per decoder stage), got {ch}")
        return {"decoder_channels": ch}
    if arch == "FPN":
        return {"decoder_pyramid_channels": ch[0], "decoder_segmentation_channels": ch[1] if len(ch) > 1 else ch[0]}
    if arch == "Segformer":
        return {"decoder_segmentation_channels": ch[0]}
    return {}


def build_model(spec: dict) -> torch.nn.Module:
    """smp model with one output channel (logits of PHE), random init (weights are loaded separately)."""
    kwargs = decoder_kwargs(spec["arch"], spec["decoder_channels"])
    try:
        return smp.create_model(spec["arch"], encoder_name=spec["encoder"], encoder_weights=None,
                                in_channels=spec["in_channels"], classes=1, **kwargs)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"cannot build {spec['arch']} with encoder {spec['encoder']!r}: {exc}") from exc


def load_encoder_weights(model: torch.nn.Module, weights: str) -> int:
    """Load a local weights file into the encoder (or the whole model); returns tensors loaded.

    Accepts a state dict (optionally under ``state_dict``/``model``), keys with or without ``encoder.``/
    ``module.`` prefixes, e.g. a torchvision/timm ResNet checkpoint. A first convolution with another
    number of input channels is adapted (summed to 1 channel, or spread over 3). Nothing is downloaded.
    """
    path = Path(weights).expanduser()
    state = _read_state_dict(path)
    full = model.state_dict()
    if set(state) == set(full) and all(state[k].shape == full[k].shape for k in full):
        model.load_state_dict(state)
        return len(state)
    target = model.encoder.state_dict()
    loaded = {}
    for key, value in state.items():
        name = key
        for prefix in ("module.", "model.", "encoder."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name in target and torch.is_tensor(value):
            value = _adapt_channels(value, target[name])
            if value.shape == target[name].shape:
                loaded[name] = value
    if not loaded:
        raise DataError(path, f"encoder_weights: no tensor matches the {type(model.encoder).__name__} encoder")
    model.encoder.load_state_dict(loaded, strict=False)
    log.info("loaded %d/%d encoder tensors from %s", len(loaded), len(target), path)
    return len(loaded)


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise DataError(path, "encoder_weights: not a file (use 'none' or a local weights file; "
                              "nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file the same way
        raise DataError(path, f"encoder_weights: not a readable torch weights file ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DataError(path, "encoder_weights: expected a state dict")
    return state


def _adapt_channels(value: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """A first convolution trained on another number of input channels: summed to 1, or spread over 3."""
    if value.shape != want.shape and value.dim() == 4 and value.shape[0] == want.shape[0] \
            and value.shape[2:] == want.shape[2:]:
        return value.sum(dim=1, keepdim=True) if want.shape[1] == 1 else \
            value.mean(dim=1, keepdim=True).repeat(1, want.shape[1], 1, 1)
    return value


def build_loss(spec: str):
    """``'dice+bce'`` -> callable(logits, target) summing the named smp losses (binary mode)."""
    names = [n.strip().lower() for n in str(spec).split("+") if n.strip()]
    bad = [n for n in names if n not in LOSSES]
    if not names or bad:
        raise ValueError(f"loss must be '+'-joined names from {LOSSES}, got {spec!r}")
    parts = []
    for n in names:
        if n == "dice":
            parts.append(smp.losses.DiceLoss("binary", from_logits=True))
        elif n == "bce":
            parts.append(smp.losses.SoftBCEWithLogitsLoss())
        elif n == "focal":
            parts.append(smp.losses.FocalLoss("binary"))
        elif n == "tversky":  # alpha (FP) < beta (FN): penalise missed rim pixels more
            parts.append(smp.losses.TverskyLoss("binary", from_logits=True, alpha=0.3, beta=0.7))
        elif n == "jaccard":
            parts.append(smp.losses.JaccardLoss("binary", from_logits=True))
        elif n == "lovasz":
            parts.append(smp.losses.LovaszLoss("binary"))

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(p(logits, target) for p in parts)

    return loss


def build_scheduler(optimizer, name: str, total_steps: int, warmup_fraction: float, lr: float):
    """Per-step schedule: linear warm-up then cosine decay (``cosine``), OneCycle, or constant (None)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    total_steps = max(1, total_steps)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps + 1,
                                                   pct_start=max(0.01, min(0.5, warmup_fraction or 0.3)))
    if name == "constant":
        return None
    return warmup_cosine(optimizer, total_steps, warmup_fraction)
