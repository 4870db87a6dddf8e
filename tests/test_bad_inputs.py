"""Bad input -> a DataError naming the file and the problem; nothing half-written."""

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
