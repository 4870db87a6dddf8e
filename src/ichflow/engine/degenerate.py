"""Checks that a model learned something, on its validation predictions (a registry gate, and a run warning).

Each check returns the reasons a set of predictions is degenerate ([] = none found). A model is degenerate when
its scores do not depend on the input (constant or near-constant), when it calls every slice positive while
the data has negatives (or every slice negative while it has positives), when its boxes cover (nearly) the
whole image, or when its masks are empty on every slice although the data has lesions.
"""

from __future__ import annotations

import numpy as np

SCORE_SPREAD = 1e-3        # max - min of the scores below this: the output does not depend on the input
WHOLE_IMAGE = 0.8          # a box covering this share of the image is a whole-image box
WHOLE_IMAGE_SHARE = 0.5    # ... and a detector whose kept boxes are mostly such boxes is degenerate


def score_reasons(truth, scores, threshold: float | None = None, called=None, what: str = "slices") -> list[str]:
    """Binary decisions (``scores >= threshold``, or the given ``called``) against 0/1 ``truth``."""
    truth, scores = np.asarray(truth).astype(bool), np.asarray(scores, float)
    if len(scores) == 0:
        return []
    reasons = []
    spread = float(np.nanmax(scores) - np.nanmin(scores))
    if len(scores) > 1 and spread < SCORE_SPREAD:
        reasons.append(f"near-constant scores on {len(scores)} val {what} (spread {spread:.2g})")
    called = scores >= threshold if called is None else np.asarray(called).astype(bool)
    if called.all() and not truth.all():
        reasons.append(f"every val {what[:-1]} called positive ({int((~truth).sum())} negatives)")
    elif not called.any() and truth.any():
        reasons.append(f"every val {what[:-1]} called negative ({int(truth.sum())} positives)")
    return reasons


def box_reasons(boxes: np.ndarray, image_sizes: np.ndarray) -> list[str]:
    """``boxes`` (K, 4) xyxy kept at the decision threshold; ``image_sizes`` (K, 2) width, height of their slice."""
    boxes, sizes = np.asarray(boxes, float).reshape(-1, 4), np.asarray(image_sizes, float).reshape(-1, 2)
    if len(boxes) == 0:
        return []
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    whole = area >= WHOLE_IMAGE * sizes[:, 0] * sizes[:, 1]
    if whole.mean() >= WHOLE_IMAGE_SHARE:
        return [f"{int(whole.sum())} of {len(boxes)} val boxes cover >= {WHOLE_IMAGE:.0%} of the image"]
    return []


def mask_reasons(truth_pixels, predicted_pixels, slice_pixels: int) -> list[str]:
    """Per val slice: truth and predicted lesion pixel counts at the threshold; ``slice_pixels`` = H * W."""
    truth, pred = np.asarray(truth_pixels), np.asarray(predicted_pixels)
    if len(pred) == 0:
        return []
    if not pred.any() and truth.any():
        return [f"empty masks on all {len(pred)} val slices ({int((truth > 0).sum())} have edema)"]
    if (pred >= 0.5 * slice_pixels).all():
        return [f"masks cover half the image or more on all {len(pred)} val slices"]
    return []
