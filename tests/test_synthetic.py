"""The synthetic phantom: deterministic, consistent labels, read by the normal readers."""

import hashlib
import json

import numpy as np
from PIL import Image

from ichflow.data.ctich import read_ctich
from ichflow.data.phe import read_phe
from ichflow.data.synthetic import PhantomSpec, write_phe


def _tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic(tmp_path):
    spec = PhantomSpec(n_patients=2, n_slices=4, size=128)
    a, b = write_phe(tmp_path / "a", spec), write_phe(tmp_path / "b", spec)
    assert _tree_digest(a) == _tree_digest(b)
    c = write_phe(tmp_path / "c", PhantomSpec(n_patients=2, n_slices=4, size=128, seed=1))
    assert _tree_digest(a) != _tree_digest(c)


def test_phe_phantom_read_by_reader_masks_inside_boxes(synthetic_phe):
    manifest, report = read_phe(synthetic_phe)
    assert manifest["patient_id"].nunique() == 12 and len(manifest) == 12 * 12
    assert not report.anomalies
    assert 0 < manifest["has_lesion"].mean() < 1, "positive and negative slices"
    for _, row in manifest.iterrows():
        mask = np.asarray(Image.open(row["mask_path"])) > 0
        boxes = json.loads(row["boxes"])
        assert bool(boxes) == row["has_lesion"] == mask.any()
        if boxes:
            x1, y1, x2, y2 = boxes[0]
            ys, xs = np.nonzero(mask)
            assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2


def test_ctich_phantom_has_subtypes(synthetic_ctich):
    raw = (synthetic_ctich / "hemorrhage_diagnosis.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw and not raw.endswith(b"\n")
    manifest, report = read_ctich(synthetic_ctich)
    for sub in ("IVH", "IPH", "SAH"):
        assert report.counts[f"{sub}_patients"] >= 3, sub
    assert (~manifest["has_lesion"]).sum() > 0
