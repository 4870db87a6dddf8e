"""Albumentations pipelines with one ``aug_strength`` knob in [0, 1] (0 = none) for Optuna to tune."""

from __future__ import annotations

import albumentations as A
import numpy as np


def build_augment(strength: float, crop: int | None = None, resized_crop: int | None = None,
                  vertical_flip: bool = False) -> A.Compose:
    """Flip + affine + brightness/contrast, all scaled by ``strength``, then an optional crop.

    ``crop``: random crop of that size (segmentation patches; applied after the geometry).
    ``resized_crop``: random resized crop to that size (classification, scale range widens with strength).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"aug_strength must be in [0, 1], got {strength}")
    s = strength
    ops: list = []
    if s > 0:
        ops += [
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-15 * s, 15 * s), scale=(1 - 0.15 * s, 1 + 0.15 * s),
                     translate_percent=(-0.06 * s, 0.06 * s), p=0.7 * s, border_mode=0),
            A.RandomBrightnessContrast(brightness_limit=0.2 * s, contrast_limit=0.2 * s, p=0.6 * s),
        ]
        if vertical_flip:
            ops.append(A.VerticalFlip(p=0.5))
    if resized_crop:
        ops.append(A.RandomResizedCrop(size=(resized_crop, resized_crop), scale=(1 - 0.35 * s, 1.0),
                                       ratio=(1 - 0.2 * s, 1 + 0.2 * s)))
    if crop:
        ops.append(A.RandomCrop(height=crop, width=crop))
    return A.Compose(ops)


class Normalizer:
    """uint8 CT intensities -> float32 z-scores with dataset mean/std from the training split (logged)."""

    def __init__(self, mean: float, std: float):
        self.mean, self.std = float(mean), float(max(std, 1e-3))

    @classmethod
    def fit(cls, images: np.ndarray, max_slices: int = 256, seed: int = 0) -> "Normalizer":
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(images), size=min(max_slices, len(images)), replace=False)
        sample = np.asarray(images[np.sort(idx)], dtype=np.float32)
        return cls(sample.mean(), sample.std())

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        return (arr.astype(np.float32) - self.mean) / self.std

    def as_params(self) -> dict:
        return {"norm_mean": round(self.mean, 4), "norm_std": round(self.std, 4),
                "normalisation": "z-score of 8-bit windowed CT with train-split mean/std"}
