"""The readers on the real published data in ../shared, quirks included."""

import json

import pytest

from ichflow.data.ctich import read_ctich
from ichflow.data.phe import read_phe

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def phe(phe_dir):
    return read_phe(phe_dir.parent)  # the dataset root: the reader finds SubdatasetC_PNG itself


def test_phe_counts(phe):
    manifest, report = phe
    assert manifest["patient_id"].nunique() == 96
    assert len(manifest) == 2851
    assert manifest["has_mask"].all()
    assert report.counts["patients"] == 96 and report.counts["slices"] == 2851
    assert set(manifest["width"]) == {512} and set(manifest["height"]) == {512}


def test_phe_three_digit_xml_maps_to_patient_13(phe):
    manifest, report = phe
    p13 = manifest[manifest["patient_id"] == "0013"]
    assert len(p13) == 32
    assert p13["has_lesion"].any(), "patient 13's boxes come from its 013_SS.xml files"
    assert not report.of_kind("missing_annotation"), "every slice found its XML"
    stems = {a.path.rsplit("/", 1)[-1] for a in report.of_kind("nonstandard_stem")}
    assert "013_05.xml" in stems


def test_phe_orphans_reported(phe):
    _, report = phe
    orphans = [a.path for a in report.of_kind("orphan_annotation")]
    assert any(p.endswith("0071_05.xml") for p in orphans)
    assert sum("/annotation70/" in p for p in orphans) == 32
    assert len(orphans) == 33


def test_phe_boxes_are_pixel_xyxy_inside_image(phe):
    manifest, _ = phe
    for boxes in manifest.loc[manifest["has_lesion"], "boxes"].head(200):
        for x1, y1, x2, y2 in json.loads(boxes):
            assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512


def test_ctich_counts_and_subtypes(ctich_dir):
    manifest, report = read_ctich(ctich_dir)
    assert manifest["patient_id"].nunique() == 82
    assert len(manifest) == 2501
    assert int(manifest["has_lesion"].sum()) == 318
    expected = {"IVH": (24, 5), "IPH": (73, 16), "SAH": (18, 7), "EDH": (173, 21), "SDH": (56, 4)}
    for sub, (slices, patients) in expected.items():
        assert report.counts[f"{sub}_slices"] == slices, sub
        assert report.counts[f"{sub}_patients"] == patients, sub
