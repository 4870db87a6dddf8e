"""CT display windows: Hounsfield units (HU) to the 8-bit slices every model is trained on.

A window is (level, width) in HU: ``level - width/2`` maps to 0, ``level + width/2`` to 255, linear between,
clipped outside. Named presets (the usual head-CT windows)::

    brain     40 / 80     parenchyma, hematoma, edema (the default: what PHE-SICH-CT-IDS and CT-ICH ship)
    subdural  80 / 200    thin extra-axial collections next to the skull
    bone      600 / 2800  fractures, skull
    stroke    40 / 40     narrow, early ischaemia

A user window is ``level/width`` (``35/90``). Several windows joined by ``+`` (``brain+subdural+bone``) give a
multi-window input, one window per channel (:func:`apply_windows`).

Every model records the window it was trained with in its MLmodel metadata (``window``) and description, so a
scan in HU (DICOM, NIfTI) is turned into the intensities the model saw (``predict`` does this itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ichflow.errors import ParameterError


@dataclass(frozen=True)
class Window:
    name: str
    level: float
    width: float

    def __str__(self) -> str:
        return f"{self.name} (level {self.level:g} HU, width {self.width:g} HU)"

    def as_dict(self) -> dict:
        return {"name": self.name, "level": self.level, "width": self.width}


PRESETS = {w.name: w for w in (Window("brain", 40, 80), Window("subdural", 80, 200), Window("bone", 600, 2800),
                               Window("stroke", 40, 40))}
DEFAULT = "brain"
_CUSTOM = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")


def parse_window(text: str, param: str = "window") -> Window:
    """One window from a preset name or ``level/width`` (HU); a bad value is a ParameterError naming ``param``."""
    key = str(text).strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    match = _CUSTOM.match(key)
    if match:
        level, width = float(match.group(1)), float(match.group(2))
        if width > 0:
            return Window(f"{level:g}/{width:g}", level, width)
    raise ParameterError(param, f"must be one of {', '.join(PRESETS)} or level/width in HU (e.g. 40/80), or "
                                f"several joined by '+'; got {text!r}")


def parse_windows(text: str, param: str = "window") -> list[Window]:
    """``brain`` -> [brain]; ``brain+subdural+bone`` -> three windows (one per channel)."""
    parts = [p for p in str(text or DEFAULT).split("+")]
    return [parse_window(p, param) for p in parts]


def from_metadata(meta: dict | None) -> Window:
    """The window a model was trained with (its metadata ``window``); models from before it was recorded were
    trained on brain-windowed 8-bit slices."""
    value = (meta or {}).get("window")
    if isinstance(value, dict):
        return Window(str(value.get("name", "custom")), float(value["level"]), float(value["width"]))
    return parse_window(value or DEFAULT)


def apply_window(hu: np.ndarray, window: Window) -> np.ndarray:
    """HU array (any shape) -> uint8 under ``window`` (rounded, clipped)."""
    low = window.level - window.width / 2
    scaled = (np.asarray(hu, dtype=np.float32) - low) * (255.0 / window.width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def apply_windows(hu: np.ndarray, windows: list[Window]) -> np.ndarray:
    """(..., C) uint8, one channel per window (a single window gives C = 1)."""
    return np.stack([apply_window(hu, w) for w in windows], axis=-1)


def to_hu(gray: np.ndarray, window: Window) -> np.ndarray:
    """Inverse of :func:`apply_window` inside the window: 8-bit values -> HU (float32)."""
    return np.asarray(gray, dtype=np.float32) * (window.width / 255.0) + (window.level - window.width / 2)
