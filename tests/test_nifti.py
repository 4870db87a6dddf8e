"""NIfTI volumes and the PHE-SICH-CT-IDS SubdatasetA layout, on real files written with nibabel (no mocks)."""

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ichflow.data.images import read_gray
from ichflow.data.nifti import read_nifti, read_nifti_mask, write_nifti_like, write_nifti_volume
from ichflow.data.phe import read_phe
from ichflow.data.phe_nifti import detect, find_root, read_phe_nifti, volume_infos, write_phe_nifti
from ichflow.data.synthetic import PhantomSpec, write_phe
from ichflow.data.windows import PRESETS, apply_window
from ichflow.errors import DataError
from ichflow.prepare import DataConfig, prepare_data

SPACING = (5.0, 0.508, 0.508)
SPEC = PhantomSpec(n_patients=8, n_slices=6, size=64)


def _volume(n=4, h=6, w=5):
    return np.random.default_rng(0).integers(0, 256, (n, h, w)).astype(np.uint8)


def _world(volume, slice_row_col):
    s, r, c = slice_row_col
    return (volume.affine @ [c, r, s, 1])[:3]


# ------------------------------------------------------------------------------------------ orientation
def _marker_file(path, axcodes):
    """A NIfTI stored in ``axcodes`` with one bright voxel at the patient's left-anterior-superior corner."""
    data = np.zeros((5, 6, 4), np.int16)                   # (x, y, z) voxel axes
    ornt = nib.orientations.axcodes2ornt(axcodes)         # no permutation: only flips of R, A, S
    index = [data.shape[axis] - 1 if code in "LAS" else 0 for axis, code in enumerate(axcodes)]
    data[tuple(index)] = 1000
    zooms = np.array([0.5, 0.6, 5.0])
    affine = np.diag([*(zooms * ornt[:, 1]), 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "A", "S"), ("L", "P", "S"), ("R", "P", "I")])
def test_marker_lands_left_anterior_superior(tmp_path, axcodes):
    vol = read_nifti(_marker_file(tmp_path / f"{''.join(axcodes)}.nii.gz", axcodes))
    n, h, w = vol.hu.shape
    # display: slices inferior -> superior, rows anterior -> posterior, columns patient right -> left
    assert np.argwhere(vol.hu == 1000).tolist() == [[n - 1, 0, w - 1]]
    assert vol.spacing == pytest.approx((5.0, 0.6, 0.5))
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    assert vol.name == "".join(axcodes) and vol.kind == "nifti"
    np.testing.assert_array_equal(vol.file_affine, nib.load(vol.path).affine)


@pytest.mark.parametrize("axcodes", [("L", "A", "S"), ("R", "A", "S"), ("L", "P", "S"), ("P", "S", "L")])
def test_phantom_volume_round_trip(tmp_path, axcodes):
    gray = _volume()
    path = write_nifti_volume(tmp_path / "v.nii.gz", gray, SPACING, axcodes)
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine) == axcodes and img.get_data_dtype() == np.int16
    raw = nib.Nifti1Header.from_fileobj(gzip.open(path))
    assert (raw["scl_slope"], raw["scl_inter"], raw["sform_code"], raw["qform_code"]) == (1, 0, 1, 1)
    vol = read_nifti(path)
    assert vol.hu.shape == gray.shape and vol.hu.dtype == np.float32
    assert vol.spacing == pytest.approx(SPACING)
    # integer HU steps are 255/80 grey levels wide in the brain window: rounding moves a level by up to 2
    back = apply_window(vol.hu, PRESETS["brain"]).astype(int)
    assert np.abs(back - gray).max() <= 2 and np.abs(back - gray).mean() < 1
    assert np.array_equal(vol.hu, np.rint(vol.hu)), "HU stored as integers"
    # the same anatomical voxel has the same world position whatever the storage order
    ref = read_nifti(write_nifti_volume(tmp_path / "ref.nii.gz", gray, SPACING, ("L", "P", "S")))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)
    np.testing.assert_array_equal(vol.hu, ref.hu)


def test_singleton_4d_is_squeezed(tmp_path):
    path = tmp_path / "t.nii"
    nib.save(nib.Nifti1Image(np.ones((5, 6, 4, 1), np.int16), np.diag([-0.5, 0.5, 5, 1.0])), path)
    assert read_nifti(path).hu.shape == (4, 6, 5)


# ---------------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("axcodes", [("L", "A", "S"), ("R", "A", "S"), ("P", "S", "L")])
def test_write_like_keeps_affine_and_file_order(tmp_path, axcodes):
    src = write_nifti_volume(tmp_path / "scan.nii.gz", _volume(), SPACING, axcodes)
    vol = read_nifti(src)
    stored = nib.load(src)
    assert np.array_equal(vol.to_file_order(vol.hu), stored.get_fdata())
    mask = (vol.hu > 10).astype(np.uint8)
    out = write_nifti_like(vol, mask, tmp_path / "out" / "mask.nii.gz")
    written = nib.load(out)
    assert np.array_equal(written.affine, stored.affine)
    assert written.shape == stored.shape and written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), vol.to_file_order(mask))
    assert np.array_equal(read_nifti_mask(out, vol), mask.astype(bool))
    assert [p.name for p in out.parent.iterdir()] == ["mask.nii.gz"], "no temp file left"


def test_write_like_qform_only_input_keeps_affine(tmp_path):
    rot = nib.eulerangles.euler2mat(0.1, 0.05, 0)          # oblique: the qform is not float32-exact
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.508, 0.508, 5.0])
    affine[:3, 3] = [10.3, -20.1, 30.7]
    img = nib.Nifti1Image(np.zeros((5, 6, 4), np.int16), affine)
    img.set_sform(None, code=0)
    img.set_qform(affine, code=1)
    nib.save(img, tmp_path / "q.nii.gz")
    vol = read_nifti(tmp_path / "q.nii.gz")
    out = write_nifti_like(vol, np.ones(vol.hu.shape, np.uint8), tmp_path / "m.nii.gz")
    assert np.array_equal(nib.load(out).affine, vol.file_affine)


# ------------------------------------------------------------------------------------------- bad inputs
def _expect(path, match, call=read_nifti, *args):
    with pytest.raises(DataError, match=match) as err:
        call(path, *args)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    return err


def test_bad_files_name_the_file(tmp_path):
    _expect(tmp_path / "missing.nii.gz", "not found")
    (tmp_path / "text.nii").write_text("hello, not an image\n" * 40)
    _expect(tmp_path / "text.nii", "NIfTI")
    (tmp_path / "text.nii.gz").write_bytes(b"not gzip at all" * 40)
    _expect(tmp_path / "text.nii.gz", "NIfTI")
    good = write_nifti_volume(tmp_path / "good.nii.gz", np.full((20, 64, 64), 7, np.uint8), SPACING)
    raw = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    _expect(tmp_path / "cut.nii.gz", "truncated or corrupt")
    plain = tmp_path / "short.nii"
    plain.write_bytes(gzip.decompress(raw)[:-1000])
    _expect(plain, "truncated or corrupt")


def _sform_only_file(path, affine):
    """A NIfTI whose sform is ``affine`` as given (nibabel refuses to build such an affine itself)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((5, 6, 4))
    hdr.set_data_dtype(np.int16)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[:3]
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 4), np.int16), None, header=hdr), path)
    return path


def test_bad_geometry_and_shapes(tmp_path):
    _expect(_sform_only_file(tmp_path / "nan.nii.gz", np.diag([np.nan, 1, 1, 1.0])), "non-finite")
    _expect(_sform_only_file(tmp_path / "flat.nii.gz", np.diag([0.5, 0.5, 0.0, 1.0])), "singular")
    colinear = np.array([[0.5, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 5, 0], [0, 0, 0, 1.0]])
    _expect(_sform_only_file(tmp_path / "colinear.nii.gz", colinear), "singular")
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 4, 3), np.int16), np.eye(4)), tmp_path / "t4.nii.gz")
    _expect(tmp_path / "t4.nii.gz", "3D volume")
    nib.save(nib.Nifti1Image(np.zeros((5, 6), np.int16), np.eye(4)), tmp_path / "t2.nii.gz")
    _expect(tmp_path / "t2.nii.gz", "3D volume")


def test_mask_grid_mismatch_names_both_files(tmp_path):
    image = read_nifti(write_nifti_volume(tmp_path / "img.nii.gz", _volume(), SPACING))
    small = write_nifti_volume(tmp_path / "small.nii.gz", _volume(4, 6, 4), SPACING, label=True)
    err = _expect(small, "shape", read_nifti_mask, image)
    assert str(image.path) in str(err.value)
    moved = write_nifti_volume(tmp_path / "moved.nii.gz", _volume(), (5.0, 0.508, 0.6), label=True)
    err = _expect(moved, "affine", read_nifti_mask, image)
    assert str(image.path) in str(err.value)


# --------------------------------------------------------------------------------------- SubdatasetA
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    base = tmp_path_factory.mktemp("phantoms")
    return write_phe(base / "png", SPEC), write_phe_nifti(base / "release", SPEC)


def test_layout_found_at_every_published_level(phantoms):
    _, nifti = phantoms
    assert nifti.name == "NIFIT" and nifti.parent.name == "SubdatasetA_NIFIT"
    for folder in (nifti, nifti.parent, nifti.parent.parent):
        assert find_root(folder) == nifti and detect(folder) == nifti
    assert len(list((nifti / "set").glob("*.nii.gz"))) == len(list((nifti / "label").glob("*.nii.gz"))) == 8


def test_reader_matches_png_phantom(phantoms):
    png, nifti = phantoms
    ref, _ = read_phe(png)
    got, report = read_phe_nifti(nifti)
    assert not report.anomalies and report.counts["window"].startswith("brain")
    assert list(got.columns) == list(ref.columns) and (got["dataset"] == "phe_nifti").all()
    assert got[["patient_id", "slice_index"]].equals(ref[["patient_id", "slice_index"]])
    per = {m: d.groupby("patient_id")["has_lesion"].agg(["count", "sum"]) for m, d in (("n", got), ("p", ref))}
    assert per["n"].equals(per["p"])
    assert (got["mask_pixels"] == ref["mask_pixels"]).all()
    for (_, a), (_, b) in zip(got.iterrows(), ref.iterrows()):
        diff = np.abs(read_gray(a["image_path"]).astype(int) - read_gray(b["image_path"]).astype(int))
        assert diff.max() <= 2 and diff.mean() < 1, "integer-HU rounding only"
        assert np.array_equal(np.asarray(Image.open(a["mask_path"])) > 0, np.asarray(Image.open(b["mask_path"])) > 0)
        boxes, published = json.loads(a["boxes"]), json.loads(b["boxes"])
        assert len(boxes) == len(published)
        for (x1, y1, x2, y2), (px1, py1, px2, py2) in zip(boxes, published):
            assert px1 <= x1 < x2 <= px2 and py1 <= y1 < y2 <= py2, "edema boxes lie inside hematoma+edema boxes"
    infos = volume_infos(got)
    assert set(infos) == set(got["patient_id"])
    assert infos["0001"]["spacing_mm"] == pytest.approx(list(SPACING)) and infos["0001"]["window"]["name"] == "brain"


def test_reader_uses_cache_and_reports_unpaired_files(phantoms, tmp_path):
    _, nifti = phantoms
    first, _ = read_phe_nifti(nifti)
    stamp = {p: Path(p).stat().st_mtime_ns for p in first["image_path"]}
    again, _ = read_phe_nifti(nifti)
    assert again.equals(first), "same rows"
    assert all(Path(p).stat().st_mtime_ns == t for p, t in stamp.items()), "second read from the cache"
    bone, _ = read_phe_nifti(nifti, window="bone")
    assert set(bone["image_path"]).isdisjoint(first["image_path"])
    root = tmp_path / "partial"
    (root / "set").mkdir(parents=True)
    (root / "label").mkdir()
    for sub, name in (("set", "0001"), ("set", "0002"), ("label", "0001"), ("label", "0003")):
        (root / sub / f"{name}.nii.gz").write_bytes((nifti / sub / f"{name}.nii.gz").read_bytes())
    manifest, report = read_phe_nifti(root)
    assert sorted(manifest["patient_id"].unique()) == ["0001", "0002"]
    assert [a.kind for a in report.anomalies] == ["orphan_mask", "missing_mask"]
    unlabelled = manifest[manifest["patient_id"] == "0002"]
    assert not unlabelled["has_mask"].any() and not unlabelled["has_lesion"].any()


def test_reader_rejects_mismatched_label(phantoms, tmp_path):
    _, nifti = phantoms
    root = tmp_path / "bad"
    (root / "set").mkdir(parents=True)
    (root / "label").mkdir()
    (root / "set" / "0001.nii.gz").write_bytes((nifti / "set" / "0001.nii.gz").read_bytes())
    other = write_nifti_volume(root / "label" / "0001.nii.gz", np.zeros((6, 64, 60), np.uint8), label=True)
    with pytest.raises(DataError, match="shape") as err:
        read_phe_nifti(root)
    assert str(other) in str(err.value) and str(root / "set" / "0001.nii.gz") in str(err.value)


def test_auto_detection_and_same_split_as_png(phantoms):
    png, nifti = phantoms
    got = prepare_data(DataConfig(data_dir=str(nifti.parent.parent)))
    ref = prepare_data(DataConfig(data_dir=str(png)))
    assert (got.dataset, ref.dataset) == ("phe_nifti", "phe")
    assert prepare_data(DataConfig(data_dir=str(nifti), dataset="phe_nifti")).dataset == "phe_nifti"
    cols = ["patient_id", "split", "fold"]
    assert got.split[cols].reset_index(drop=True).equals(ref.split[cols].reset_index(drop=True))


def test_full_release_reads_png_first(phantoms, tmp_path):
    png, nifti = phantoms
    release = tmp_path / "release"
    release.mkdir()
    (release / "SubdatasetC_PNG").symlink_to(png, target_is_directory=True)
    (release / "SubdatasetA_NIFIT").symlink_to(nifti.parent, target_is_directory=True)
    assert find_root(release) is not None and detect(release) is None
    assert prepare_data(DataConfig(data_dir=str(release))).dataset == "phe"


def test_predict_discovers_nifti_scans(phantoms):
    from ichflow.serving import discover_scans

    png, nifti = phantoms
    scans = discover_scans(nifti.parent)
    assert sorted(scans) == sorted(discover_scans(png)) and all(len(files) == SPEC.n_slices for files in scans.values())
