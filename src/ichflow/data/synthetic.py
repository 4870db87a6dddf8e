"""Deterministic CT-like phantom data, written in the published layouts.

``write_phe``   -> ``SubdatasetC_PNG`` (set/label/annotation) with edema masks and VOC boxes,
                   lesion slices in the middle of each scan, negative slices above and below.
``write_ctich`` -> CT-ICH layout (hemorrhage_diagnosis.csv with its BOM/CRLF quirks + Patients_CT/)
                   with subtype lesions drawn where each subtype lives (IVH in the ventricles,
                   IPH in the parenchyma, SAH along the sulci, EDH lens / SDH crescent at the skull).

The normal readers read what is written here: there is no second code path for synthetic data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SUBTYPE_LONG = {"IVH": "Intraventricular", "IPH": "Intraparenchymal", "SAH": "Subarachnoid",
                "EDH": "Epidural", "SDH": "Subdural"}
# Subtype sets cycled over patients so every class (IVH/IPH/SAH especially) occurs in several patients.
_CTICH_PATTERNS = (("IPH",), ("IVH",), ("SAH",), ("IPH", "IVH"), ("SAH", "IPH"), ("EDH",), ("IVH", "SAH"),
                   ("SDH",), (), ("IPH", "SAH", "IVH"))

BRAIN, SKULL, CSF, BLOOD, EDEMA = 100.0, 235.0, 35.0, 185.0, 68.0


@dataclass(frozen=True)
class PhantomSpec:
    n_patients: int = 12
    n_slices: int = 12
    size: int = 512
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def _grid(size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = dx * c + dy * s, -dx * s + dy * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _head(rng, yy, xx, size, z):
    """Skull ring, brain and ventricles for relative height z in [0, 1] (0.5 = mid-scan)."""
    scale = size / 512
    shrink = 1.0 - 0.9 * (z - 0.5) ** 2
    ry, rx = 225 * scale * shrink, 185 * scale * shrink
    cy, cx = size / 2 + rng.normal(0, 3), size / 2 + rng.normal(0, 3)
    img = np.zeros((size, size), np.float32)
    outer = _ellipse(yy, xx, cy, cx, ry, rx)
    brain = _ellipse(yy, xx, cy, cx, ry - 14 * scale, rx - 14 * scale)
    img[outer] = SKULL
    img[brain] = BRAIN
    vents = np.zeros_like(brain)
    if 0.25 < z < 0.8:
        for side in (-1, 1):
            vents |= _ellipse(yy, xx, cy - 10 * scale, cx + side * 22 * scale, 45 * scale * shrink,
                              12 * scale, angle=side * 0.35)
        img[vents] = CSF
    return img, brain, vents, (cy, cx, ry, rx)


def _finish(img, rng, blur=1.2, noise=7.0):
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    out = np.asarray(pil).astype(np.float32) + rng.normal(0, noise, img.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def _lesion_profile(n_slices, rng):
    """Contiguous lesion slices in mid-scan, with size following a smooth bump."""
    length = max(3, int(round(n_slices * rng.uniform(0.4, 0.6))))
    start = int(rng.integers(1, max(2, n_slices - length)))
    return {s: np.sin(np.pi * (s - start + 0.5) / length) for s in range(start, min(n_slices, start + length))}


def write_phe(out_dir: str | Path, spec: PhantomSpec = PhantomSpec()) -> Path:
    """Write a SubdatasetC_PNG-shaped phantom under ``out_dir``; returns the SubdatasetC_PNG folder."""
    root = Path(out_dir) / "SubdatasetC_PNG"
    yy, xx = _grid(spec.size)
    scale = spec.size / 512
    for p in range(1, spec.n_patients + 1):
        rng = np.random.default_rng([spec.seed, p])
        side = rng.choice([-1, 1])
        ly, lx = spec.size / 2 + rng.normal(0, 15 * scale), spec.size / 2 + side * rng.uniform(55, 85) * scale
        hr_y, hr_x, angle = rng.uniform(22, 40) * scale, rng.uniform(16, 30) * scale, rng.uniform(0, np.pi)
        rim = rng.uniform(7, 11) * scale
        profile = _lesion_profile(spec.n_slices, rng)
        for d in ("set", "label", "annotation"):
            (root / d / f"{d if d != 'set' else 'image'}{p}").mkdir(parents=True, exist_ok=True)
        for s in range(spec.n_slices):
            img, brain, _, _ = _head(rng, yy, xx, spec.size, s / max(1, spec.n_slices - 1))
            mask = np.zeros((spec.size, spec.size), bool)
            boxes = []
            if s in profile:
                k = 0.45 + 0.55 * profile[s]
                blood = _ellipse(yy, xx, ly, lx, hr_y * k, hr_x * k, angle) & brain
                outer = _ellipse(yy, xx, ly, lx, hr_y * k + rim, hr_x * k + rim, angle) & brain
                mask = outer & ~blood
                img[mask] = EDEMA + rng.normal(0, 4)
                img[blood] = BLOOD + rng.normal(0, 6)
                ys, xs = np.nonzero(outer)
                boxes.append([int(xs.min()) - 2, int(ys.min()) - 2, int(xs.max()) + 3, int(ys.max()) + 3])
            stem = f"{p:04d}_{s:02d}"
            Image.fromarray(_finish(img, rng)).save(root / "set" / f"image{p}" / f"{stem}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(root / "label" / f"label{p}" / f"{stem}.png")
            (root / "annotation" / f"annotation{p}" / f"{stem}.xml").write_text(_voc_xml(stem, spec.size, boxes))
    return root


def _voc_xml(stem, size, boxes) -> str:
    objs = "".join(
        f"<object><name>a</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b in boxes)
    return (f"<?xml version='1.0' encoding='us-ascii'?>\n<annotation><folder>VOC2007</folder>"
            f"<filename>{stem}.jpg</filename><size><width>{size}</width><height>{size}</height>"
            f"<depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def _draw_subtype(kind, img, rng, yy, xx, brain, vents, head, scale):
    cy, cx, ry, rx = head
    if kind == "IVH":  # blood layering in the ventricles
        img[vents & (yy > cy - 30 * scale)] = BLOOD
    elif kind == "IPH":  # a round clot in the parenchyma
        ang = rng.uniform(0, 2 * np.pi)
        py, px = cy + 0.45 * ry * np.sin(ang), cx + 0.45 * rx * np.cos(ang)
        img[_ellipse(yy, xx, py, px, rng.uniform(14, 24) * scale, rng.uniform(12, 20) * scale) & brain] = BLOOD
    elif kind == "SAH":  # thin bright lines following the sulci near the cortex
        for _ in range(4):
            a0 = rng.uniform(0, 2 * np.pi)
            t = np.linspace(a0, a0 + 0.5, 60)
            for r in (0.80, 0.84):
                ys = (cy + r * (ry - 14 * scale) * np.sin(t)).astype(int)
                xs = (cx + r * (rx - 14 * scale) * np.cos(t)).astype(int)
                img[np.clip(ys, 0, img.shape[0] - 1), np.clip(xs, 0, img.shape[1] - 1)] = BLOOD + 20
    elif kind in ("EDH", "SDH"):  # lens (EDH) or long thin crescent (SDH) against the inner skull
        a = rng.uniform(0, 2 * np.pi)
        inner = _ellipse(yy, xx, cy, cx, ry - 14 * scale, rx - 14 * scale)
        depth, width = (22, 0.45) if kind == "EDH" else (9, 1.1)
        shrunk = _ellipse(yy, xx, cy, cx, ry - (14 + depth) * scale, rx - (14 + depth) * scale)
        ang = np.arctan2(yy - cy, xx - cx)
        sector = np.abs(np.angle(np.exp(1j * (ang - a)))) < width
        img[inner & ~shrunk & sector] = BLOOD


def write_ctich(out_dir: str | Path, spec: PhantomSpec = PhantomSpec()) -> Path:
    """Write a CT-ICH-shaped phantom (CSV with BOM + CRLF + no final newline, Patients_CT/PPP/brain/S.jpg)."""
    root = Path(out_dir)
    yy, xx = _grid(spec.size)
    scale = spec.size / 512
    lines = ["PatientNumber,SliceNumber," + ",".join(SUBTYPE_LONG.values()) + ",No_Hemorrhage,Fracture_Yes_No"]
    for i in range(spec.n_patients):
        pid = 49 + i  # published numbering starts at 049
        rng = np.random.default_rng([spec.seed, 1000 + pid])
        kinds = _CTICH_PATTERNS[i % len(_CTICH_PATTERNS)]
        profile = _lesion_profile(spec.n_slices, rng)
        brain_dir = root / "Patients_CT" / f"{pid:03d}" / "brain"
        brain_dir.mkdir(parents=True, exist_ok=True)
        for s in range(1, spec.n_slices + 1):
            img, brain, vents, head = _head(rng, yy, xx, spec.size, (s - 1) / max(1, spec.n_slices - 1))
            present = {k: 0 for k in SUBTYPE_LONG}
            if (s - 1) in profile:
                for kind in kinds:
                    if kind == "IVH" and not vents.any():
                        continue
                    _draw_subtype(kind, img, rng, yy, xx, brain, vents, head, scale)
                    present[kind] = 1
            Image.fromarray(_finish(img, rng)).save(brain_dir / f"{s}.jpg", quality=95)
            none = int(not any(present.values()))
            lines.append(f"{pid},{s}," + ",".join(str(present[k]) for k in SUBTYPE_LONG) + f",{none},0")
    (root / "hemorrhage_diagnosis.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    return root


def ensure_synthetic(variant: str = "phe", spec: PhantomSpec = PhantomSpec(), base: str | Path | None = None) -> Path:
    """Generate the phantom once per (variant, spec) under the work dir and return its data folder.

    Written to a temp folder and renamed, so an interrupted generation never leaves a partial dataset.
    Processes starting together (tuning workers) serialise on a lock file: one generates, the others wait
    and reuse it (replacing a finished phantom would pull files from under a process reading it).
    """
    import fcntl

    from ichflow.paths import synthetic_dir

    writers = {"phe": write_phe, "ctich": write_ctich}
    if variant not in writers:
        raise ValueError(f"unknown synthetic variant {variant!r}; choose from {sorted(writers)}")
    base = Path(base) if base else synthetic_dir()
    target = base / f"{variant}-{spec.digest()}"
    if (target / ".complete").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{variant}-{spec.digest()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():  # another process generated it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{variant}-"))
        try:
            writers[variant](tmp, spec)
            (tmp / "spec.json").write_text(json.dumps({"variant": variant, **asdict(spec)}, indent=2))
            (tmp / ".complete").write_text("")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
