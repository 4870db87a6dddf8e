"""Images a user opens next to a scan: a slice with its predicted mask or boxes drawn in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw


def mask_overlay(img: np.ndarray, mask: np.ndarray) -> Image.Image:
    rgb = np.repeat(img[..., None], 3, axis=-1).astype(np.float32)
    rgb[mask > 0] = 0.5 * rgb[mask > 0] + 0.5 * np.array([255, 40, 40])
    return Image.fromarray(rgb.astype(np.uint8))


def boxes_overlay(img: np.ndarray, boxes: pd.DataFrame) -> Image.Image:
    pil = Image.fromarray(img).convert("RGB")
    draw = ImageDraw.Draw(pil)
    for b in boxes.itertuples():
        draw.rectangle([b.x1, b.y1, b.x2, b.y2], outline=(255, 60, 60), width=2)
        draw.text((b.x1 + 2, max(0, b.y1 - 12)), f"{b.score:.2f}", fill=(255, 255, 0))
    return pil


def save_image(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
