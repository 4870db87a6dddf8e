"""Segmentation engines: the network family a run trains (``cfg.engine``), behind one small interface.

An engine checks its own parameters and turns the config into a JSON-able model spec (stored with the pyfunc,
tagged with the engine's name). ``smp`` rebuilds its network from that spec (one output channel: PHE logits at
the input's resolution), loads local pretrained weights and shares the task's patches, loss, training loop,
evaluation and serving. ``nnunet`` brings nnU-Net v2's own planning, training loop and predictor
(:mod:`ichflow.tasks.segmentation.nnunet`); evaluation, selection on val and the report are shared.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch

from ichflow.errors import ParameterError
from ichflow.tasks.segmentation import model as smp_model


class Engine(Protocol):
    name: str

    def check(self, cfg) -> None:
        """:class:`~ichflow.errors.ParameterError` for a bad engine parameter (arch, encoder, ...)."""

    def spec(self, cfg) -> dict:
        """The JSON-able description :meth:`build` rebuilds the network from; ``spec["engine"] == name``."""

    def build(self, spec: dict) -> torch.nn.Module:
        """The network, randomly initialised."""

    def load_weights(self, model: torch.nn.Module, path: str) -> int:
        """Load a local weights file; the number of tensors loaded."""


class Smp:
    """segmentation-models-pytorch: Unet / UnetPlusPlus / FPN / Segformer on any smp encoder."""

    name = "smp"

    def check(self, cfg) -> None:
        if cfg.arch.lower() not in smp_model.ARCHS:
            raise ParameterError("arch", f"must be one of {', '.join(smp_model.ARCHS.values())}; got {cfg.arch!r}")
        if cfg.encoder_weights.lower() == "imagenet":
            raise ParameterError("encoder_weights", "no downloads here: must be 'none' or the path of a local "
                                                    "weights file")
        try:
            spec = self.spec(cfg)
            smp_model.decoder_kwargs(spec["arch"], spec["decoder_channels"])
        except ValueError as exc:
            raise ParameterError("decoder_channels", str(exc)) from None
        try:
            self.build(spec)
        except ValueError as exc:
            raise ParameterError("encoder", str(exc)) from None

    def spec(self, cfg) -> dict:
        return {"engine": self.name,
                **smp_model.model_spec(cfg.arch, cfg.encoder, cfg.in_channels, cfg.decoder_channels)}

    def build(self, spec: dict) -> torch.nn.Module:
        return smp_model.build_model(spec)

    def load_weights(self, model: torch.nn.Module, path: str) -> int:
        return smp_model.load_encoder_weights(model, path)


class NnUNet:
    """nnU-Net v2's 2d configuration: its own planning, preprocessing, network, training loop and predictor
    (:mod:`ichflow.tasks.segmentation.nnunet`). Architecture parameters (arch, encoder, patch size,
    channels) are nnU-Net's plan; epochs, steps_per_epoch and time_budget_min set its schedule."""

    name = "nnunet"

    def check(self, cfg) -> None:
        if cfg.n_folds != 1:
            raise ParameterError("n_folds", "engine=nnunet trains one model on the train/val split; use n_folds=1")
        if cfg.encoder_weights.lower() not in ("", "none"):
            raise ParameterError("encoder_weights", "engine=nnunet trains its planned network from scratch; "
                                                    "use encoder_weights=none")
        if importlib.util.find_spec("nnunetv2") is None:
            raise ParameterError("engine", "nnunet needs the nnunetv2 package (pip install nnunetv2)")

    def spec(self, cfg) -> dict:
        return {"engine": self.name, "configuration": "2d"}

    def build(self, spec: dict) -> torch.nn.Module:
        raise ValueError("nnU-Net's network is built from its plans (nnunet.engine.NnUNetNetwork), not a spec")

    def load_weights(self, model: torch.nn.Module, path: str) -> int:
        raise ValueError("engine=nnunet loads no pretrained weights")


ENGINES: dict[str, Engine] = {"smp": Smp(), "nnunet": NnUNet()}


def build_network(spec: dict) -> torch.nn.Module:
    """The network of a stored model spec (specs written before engines existed are smp)."""
    return ENGINES[spec.get("engine", "smp")].build(spec)
