"""Bad input -> a DataError naming the file and the problem; nothing half-written."""

import json
import re
import shutil

import pytest

from ichflow.data.ctich import read_ctich
from ichflow.data.phe import read_phe
from ichflow.data.synthetic import PhantomSpec, write_ctich, write_phe
from ichflow.errors import DataError
from ichflow.paths import prepared_dir
from ichflow.prepare import DataConfig, prepare_data


@pytest.fixture()
def phe_copy(tmp_path):
    return write_phe(tmp_path, PhantomSpec(n_patients=2, n_slices=4, size=96))


def test_truncated_png(phe_copy):
    img = next((phe_copy / "set" / "image1").glob("*.png"))
    img.write_bytes(img.read_bytes()[:200])
    with pytest.raises(DataError) as err:
        read_phe(phe_copy)
    assert err.value.path == str(img) and "truncated" in err.value.problem


def test_mask_size_mismatch(phe_copy):
    from PIL import Image

    mask = next((phe_copy / "label" / "label2").glob("*.png"))
    Image.new("L", (50, 60)).save(mask)
    with pytest.raises(DataError, match="mask size 50x60 != image size 96x96") as err:
        read_phe(phe_copy)
    assert err.value.path == str(mask)


def test_malformed_xml(phe_copy):
    xml = sorted((phe_copy / "annotation" / "annotation1").glob("*.xml"))[1]
    xml.write_text("<annotation><object><bndbox>")
    with pytest.raises(DataError, match="malformed XML") as err:
        read_phe(phe_copy)
    assert err.value.path == str(xml)


def test_empty_folder(tmp_path):
    (tmp_path / "set").mkdir()
    with pytest.raises(DataError, match="no CT slices found"):
        read_phe(tmp_path)
    with pytest.raises(DataError, match="no PHE-SICH-CT-IDS layout"):
        read_phe(tmp_path / "set")


def test_non_image_file_with_image_name(phe_copy):
    bad = phe_copy / "set" / "image1" / "0001_02.png"
    bad.write_text("this is not a PNG")
    with pytest.raises(DataError, match="not an image file") as err:
        read_phe(phe_copy)
    assert err.value.path == str(bad)


def test_stray_file_is_only_a_warning(phe_copy):
    (phe_copy / "set" / "image1" / "notes.txt").write_text("scanner notes")
    manifest, report = read_phe(phe_copy)
    assert len(manifest) == 8
    assert [a.kind for a in report.anomalies] == ["unexpected_file"]


def test_wrong_csv_header(tmp_path):
    root = write_ctich(tmp_path, PhantomSpec(n_patients=2, n_slices=3, size=96))
    csv = root / "hemorrhage_diagnosis.csv"
    csv.write_text("Patient,Slice,IVH\n49,1,0\n")
    with pytest.raises(DataError, match="wrong CSV header: missing columns") as err:
        read_ctich(root)
    assert err.value.path == str(csv)


def test_missing_image_row_dropped_with_warning(tmp_path):
    root = write_ctich(tmp_path, PhantomSpec(n_patients=2, n_slices=3, size=96))
    (root / "Patients_CT" / "049" / "brain" / "2.jpg").unlink()
    manifest, report = read_ctich(root)
    assert len(manifest) == 5
    assert [a.kind for a in report.anomalies] == ["missing_image"]


def test_failed_prepare_writes_nothing(tmp_path):
    root = write_phe(tmp_path / "data", PhantomSpec(n_patients=3, n_slices=4, size=96))
    shutil.copy(root / "set" / "image1" / "0001_00.png", root / "set" / "image1" / "0001_01.png")
    img = root / "set" / "image2" / "0002_03.png"
    img.write_bytes(img.read_bytes()[:100])
    before = sorted(prepared_dir().glob("*")) if prepared_dir().exists() else []
    with pytest.raises(DataError):
        prepare_data(DataConfig(data_dir=str(root)))
    after = sorted(prepared_dir().glob("*")) if prepared_dir().exists() else []
    assert before == after


# ------------------------------------------------------------------- never a silent replacement of data
def _drop_warnings(caplog, path):
    """The WARNING lines that name ``path`` (a reader dropping data says so once, naming the file)."""
    return [r for r in caplog.records if r.levelname == "WARNING" and str(path) in r.getMessage()]


def _set_box(xml, coords):
    text = xml.read_text()
    for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), coords):
        text = re.sub(f"<{tag}>[^<]*</{tag}>", f"<{tag}>{value}</{tag}>", text)
    xml.write_text(text)


def test_two_files_for_one_slice_is_an_error_naming_both(phe_copy):
    folder = phe_copy / "set" / "image1"
    shutil.copy(folder / "0001_02.png", folder / "0001_2.png")
    with pytest.raises(DataError, match="0001_02.png; two files for one slice") as err:
        read_phe(phe_copy)
    assert err.value.path == str(folder / "0001_2.png")


def test_file_of_another_patient_is_dropped_with_one_warning(phe_copy, caplog):
    stray = phe_copy / "set" / "image1" / "0002_01.png"
    shutil.copy(phe_copy / "set" / "image2" / "0002_01.png", stray)
    manifest, report = read_phe(phe_copy)
    assert len(manifest) == 8
    own = phe_copy / "set" / "image1" / "0001_01.png"
    assert manifest.loc[(manifest["patient_id"] == "0001") & (manifest["slice_index"] == 1),
                        "image_path"].tolist() == [str(own.resolve())]
    assert not manifest["image_path"].str.endswith("image1/0002_01.png").any()
    assert [a.path for a in report.of_kind("patient_mismatch")] == [str(stray)]
    assert len(_drop_warnings(caplog, stray)) == 1


def test_slice_in_two_formats_keeps_the_png_with_one_warning(phe_copy, caplog):
    from PIL import Image

    png = phe_copy / "set" / "image1" / "0001_01.png"
    jpg = png.with_suffix(".jpg")
    Image.new("L", (96, 96), 200).save(jpg)
    manifest, report = read_phe(phe_copy)
    assert len(manifest) == 8
    row = manifest[(manifest["patient_id"] == "0001") & (manifest["slice_index"] == 1)]
    assert row["image_path"].tolist() == [str(png.resolve())]
    assert [a.path for a in report.of_kind("duplicate_format")] == [str(jpg)]
    assert len(_drop_warnings(caplog, jpg)) == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_box_is_an_error(phe_copy, value):
    xml = phe_copy / "annotation" / "annotation1" / "0001_02.xml"
    _set_box(xml, (value, 38, 71, 54))
    with pytest.raises(DataError, match="not all finite numbers") as err:
        read_phe(phe_copy)
    assert err.value.path == str(xml)


@pytest.mark.parametrize("coords, problem", [((71, 38, 56, 54), "inverted or empty"),
                                             ((56, 54, 71, 54), "inverted or empty"),
                                             ((200, 38, 260, 54), "outside the 96x96 image")])
def test_invalid_only_box_drops_the_slice_with_one_warning(phe_copy, caplog, coords, problem):
    xml = phe_copy / "annotation" / "annotation1" / "0001_02.xml"
    _set_box(xml, coords)
    manifest, report = read_phe(phe_copy)
    assert len(manifest) == 7
    assert not ((manifest["patient_id"] == "0001") & (manifest["slice_index"] == 2)).any()
    assert [a.path for a in report.of_kind("invalid_box")] == [str(xml)]
    assert problem in report.of_kind("invalid_box")[0].detail
    assert len(_drop_warnings(caplog, xml)) == 1


def test_invalid_box_beside_a_valid_one_drops_only_that_box(phe_copy, caplog):
    xml = phe_copy / "annotation" / "annotation1" / "0001_02.xml"
    text = xml.read_text()
    obj = text[text.index("<object>"):text.index("</object>") + len("</object>")]
    bad = obj.replace(obj[obj.index("<bndbox>"):obj.index("</bndbox>")],
                      "<bndbox><xmin>70</xmin><ymin>10</ymin><xmax>20</xmax><ymax>30</ymax>")
    xml.write_text(text.replace("</annotation>", bad + "</annotation>"))
    manifest, report = read_phe(phe_copy)
    row = manifest[(manifest["patient_id"] == "0001") & (manifest["slice_index"] == 2)].iloc[0]
    assert bool(row["has_lesion"]) and len(json.loads(row["boxes"])) == 1
    assert "box dropped" in report.of_kind("invalid_box")[0].detail
    assert len(_drop_warnings(caplog, xml)) == 1


def test_manifest_refuses_two_rows_for_one_slice():
    from ichflow.data.manifest import make_manifest

    row = {"dataset": "phe", "patient_id": "0001", "slice_index": 3, "mask_path": "", "boxes": "[]",
           "has_lesion": False, "has_mask": False, "mask_pixels": -1, "width": 8, "height": 8}
    with pytest.raises(DataError, match="is also /a/0001_03.png: two files for one slice") as err:
        make_manifest([{**row, "image_path": "/a/0001_03.png"}, {**row, "image_path": "/b/0001_3.png"}])
    assert err.value.path == "/b/0001_3.png"


def test_ctich_rows_with_conflicting_labels_are_an_error(tmp_path):
    root = write_ctich(tmp_path, PhantomSpec(n_patients=2, n_slices=3, size=96))
    csv = root / "hemorrhage_diagnosis.csv"
    lines = csv.read_bytes().decode("utf-8-sig").splitlines()
    first = lines[1].split(",")
    flipped = first[:2] + ["1" if v == "0" else "0" for v in first[2:7]] + first[7:]
    csv.write_text("\n".join([*lines, ",".join(flipped)]))
    with pytest.raises(DataError, match=f"patient {int(first[0])} slice {int(first[1])} is listed with "
                                        "different labels on data rows") as err:
        read_ctich(root)
    assert err.value.path == str(csv)


def test_ctich_slice_in_another_format_is_reported(tmp_path, caplog):
    root = write_ctich(tmp_path, PhantomSpec(n_patients=2, n_slices=3, size=96))
    brain = root / "Patients_CT" / "049" / "brain"
    png = brain / "2.png"
    png.write_bytes((brain / "2.jpg").read_bytes())
    manifest, report = read_ctich(root)
    assert len(manifest) == 6
    assert [a.path for a in report.of_kind("duplicate_format")] == [str(png)]
    assert len(_drop_warnings(caplog, png)) == 1
