"""Training patches with foreground oversampling (nnU-Net style) and whole-scan inference.

Training: random ``patch_size`` patches at native resolution. A fraction ``fg_fraction`` of them is
centred on a random edema pixel of a random slice with edema (before the random crop, which moves the
centre by at most a quarter patch, so the edema stays in view); the rest are centred on a random pixel
of the head (intensity > ``HEAD_LEVEL``) of any training slice, negative slices included.
Inference: whole slices, padded to a multiple of 32, 2.5D stacked within the scan (edge replication).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ichflow.data.images import mask_foreground
from ichflow.engine.augment import Normalizer, build_augment
from ichflow.engine.device import autocast
from ichflow.engine.scan import as_scan, neighbours
from ichflow.engine.slices import stack_channels
from ichflow.tasks.segmentation.postprocess import drop_small_components

HEAD_LEVEL = 15      # 8-bit brain-window intensity above which a pixel counts as head (air is 0)
PAD_MULTIPLE = 32    # encoders downsample 5x by 2


class PatchDataset(torch.utils.data.Dataset):
    """``length`` random (image, mask) patches per epoch from the given slices.

    images/masks: (N, H, W) uint8 arrays (masks 0/255) of the training split; prev_idx/next_idx from
    :func:`ichflow.engine.slices.neighbour_indices`. Items: (C, P, P) float32 z-scores, (1, P, P) 0/1.
    """

    def __init__(self, images, masks, prev_idx, next_idx, channels: int, patch_size: int, fg_fraction: float,
                 aug_strength: float, normalizer: Normalizer, length: int, seed: int = 0):
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        if patch_size < PAD_MULTIPLE or patch_size % PAD_MULTIPLE:
            raise ValueError(f"patch_size must be a positive multiple of {PAD_MULTIPLE}, got {patch_size}")
        self.images, self.masks = images, masks
        self.prev_idx, self.next_idx = prev_idx, next_idx
        self.channels, self.patch = channels, patch_size
        self.fg_fraction = fg_fraction
        self.margin = patch_size // 4
        self.augment = build_augment(aug_strength, crop=patch_size)
        self.normalizer = normalizer
        self.length = length
        self.seed = seed
        fg = np.asarray([np.count_nonzero(masks[i]) for i in range(len(masks))])
        self.fg_rows = np.flatnonzero(fg > 0)
        self._rng = None
        self._pid = None

    def __len__(self) -> int:
        return self.length

    def _generator(self) -> np.random.Generator:
        # one stream per process (main or DataLoader worker), reproducible from the seed, continuing
        # across epochs with persistent workers
        if self._rng is None or self._pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            wid = info.id + 1 if info is not None else 0
            self._rng = np.random.default_rng([self.seed, wid])
            self.augment.set_random_seed(int(self._rng.integers(2**31)))
            self._pid = os.getpid()
        return self._rng

    def sample_centre(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """(row, y, x): an edema pixel with probability fg_fraction, else a head pixel of any slice."""
        if len(self.fg_rows) and rng.random() < self.fg_fraction:
            row = int(rng.choice(self.fg_rows))
            ys, xs = np.nonzero(self.masks[row])
            k = int(rng.integers(len(ys)))
            return row, int(ys[k]), int(xs[k])
        row = int(rng.integers(len(self.images)))
        img = self.images[row]
        h, w = img.shape
        for _ in range(20):
            y, x = int(rng.integers(h)), int(rng.integers(w))
            if img[y, x] > HEAD_LEVEL:
                return row, y, x
        return row, h // 2, w // 2

    def __getitem__(self, idx):
        rng = self._generator()
        row, cy, cx = self.sample_centre(rng)
        size = self.patch + 2 * self.margin
        image = crop_padded(stack_channels(self.images, row, self.prev_idx, self.next_idx, self.channels),
                            cy, cx, size)
        mask = crop_padded(np.asarray(self.masks[row]), cy, cx, size)
        out = self.augment(image=image, mask=mask)
        x = torch.from_numpy(np.ascontiguousarray(self.normalizer(out["image"]).transpose(2, 0, 1)))
        y = torch.from_numpy(mask_foreground(out["mask"]).astype(np.float32))[None]
        return x, y


def crop_padded(arr: np.ndarray, cy: int, cx: int, size: int) -> np.ndarray:
    """``size`` x ``size`` window centred at (cy, cx); outside the image is 0 (air)."""
    h, w = arr.shape[:2]
    y0, x0 = cy - size // 2, cx - size // 2
    out = np.zeros((size, size, *arr.shape[2:]), arr.dtype)
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(h, y0 + size), min(w, x0 + size)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


TTA = ("none", "flip")   # flip: the mean of the scan and its left-right mirror (heads are near-symmetric)


@torch.inference_mode()
def predict_scan(model, slices: np.ndarray, normalizer: Normalizer, channels: int, device: torch.device,
                 batch_size: int = 4, amp_dtype=None, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, logits) float32 (N, H, W) for the 8-bit slices of ONE scan in axial order
    (anything :func:`~ichflow.engine.scan.as_scan` accepts: uint8, or float 0..255, which is rounded).

    ``model``: a network in eval mode, or a list of them (an ensemble: the mean of their probabilities).
    ``tta="flip"`` averages each member's probabilities over the scan and its left-right mirror. The logits
    are those of the mean probability. Slices are padded (bottom/right, with 0) to a multiple of 32.
    """
    members = list(model) if isinstance(model, (list, tuple)) else [model]
    slices = as_scan(slices)
    n, h, w = slices.shape
    ph, pw = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
    prev_idx, next_idx = neighbours(n)
    flips = (False, True) if tta == "flip" else (False,)
    probs = np.zeros((n, h, w), np.float32)
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        batch = np.stack([stack_channels(slices, i, prev_idx, next_idx, channels) for i in rows])
        x = torch.from_numpy(normalizer(batch).transpose(0, 3, 1, 2))
        total = torch.zeros((len(rows), h, w))
        for flip in flips:
            inp = x.flip(-1) if flip else x      # the mirrored scan, padded like any other
            if ph or pw:
                inp = torch.nn.functional.pad(inp, (0, pw, 0, ph), value=float(normalizer(np.zeros(1))[0]))
            inp = inp.to(device).contiguous(memory_format=torch.channels_last)
            for net in members:
                with autocast(device, amp_dtype):
                    out = net(inp).float()[:, 0, :h, :w]
                total += torch.sigmoid(out.flip(-1) if flip else out).cpu()
        probs[start:start + len(rows)] = (total / (len(members) * len(flips))).numpy()
    return probs, probability_logits(probs)


def probability_logits(probs: np.ndarray) -> np.ndarray:
    """Logits of probabilities (clipped off 0 and 1), for losses that take logits."""
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    return np.log(clipped) - np.log1p(-clipped)


@dataclass
class ScanPredictor:
    """One scan in, edema probabilities out: the members (one network, or a fold ensemble), their input
    (normalisation, 2.5D channels), test-time augmentation and post-processing at ``threshold``.

    The training run's evaluation and the served model both predict through this, so they agree exactly.
    """

    models: list
    normalizer: Normalizer
    channels: int
    device: torch.device
    batch_size: int = 4
    amp_dtype: torch.dtype | None = None
    tta: str = "none"
    threshold: float = 0.5
    min_voxels: int = 0

    def __call__(self, slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities after post-processing, logits of the raw mean probability), float32 (N, H, W)."""
        probs, logits = predict_scan(self.models, slices, self.normalizer, self.channels, self.device,
                                     self.batch_size, self.amp_dtype, self.tta)
        return drop_small_components(probs, self.threshold, self.min_voxels), logits
