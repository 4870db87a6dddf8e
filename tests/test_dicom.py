"""DICOM series in, DICOM-SEG out: real files written with pydicom / highdicom into tmp_path, no mocks."""

from __future__ import annotations

import os
import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, JPEGLosslessSV1, MediaStorageDirectoryStorage, SegmentationStorage

from ichflow.data.dicom import is_dicom_folder, read_dicom_series
from ichflow.data.dicom_seg import read_dicom_seg_mask, write_dicom_seg
from ichflow.data.synthetic import PhantomSpec
from ichflow.data.synthetic_dicom import phantom_patient, write_dicom_series, write_phantom_series
from ichflow.data.windows import PRESETS, apply_window
from ichflow.errors import DataError

SPEC = PhantomSpec(n_patients=1, n_slices=8, size=64)
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def phantom():
    """(slices uint8 (N, H, W), edema bool (N, H, W)) of phantom patient 1."""
    return phantom_patient(SPEC, 1)


@pytest.fixture
def series(tmp_path, phantom):
    """A phantom CT series folder and its file paths (slice order)."""
    folder = tmp_path / "series"
    return folder, write_dicom_series(folder, phantom[0])


def _edit(paths, fn):
    """Rewrite each file after ``fn(ds, k)`` changed it (k = its slice index)."""
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        fn(ds, k)
        ds.save_as(path, enforce_file_format=True)


def _set_pixels(ds, pixels):
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()


def _error(folder, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_dicom_series(folder, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_shape_spacing_hu_and_window(series, phantom):
    folder, paths = series
    vol = read_dicom_series(folder)
    slices = phantom[0]
    assert vol.hu.shape == slices.shape and vol.hu.dtype == np.float32
    assert vol.spacing == pytest.approx((5.0, 0.508, 0.508))
    assert vol.kind == "dicom" and vol.path == folder and vol.name == "PHANTOM0001_20240101_1"
    assert [d.SOPInstanceUID for d in vol.datasets] == [pydicom.dcmread(p).SOPInstanceUID for p in paths]
    assert all("PixelData" in d for d in vol.datasets)
    np.testing.assert_array_equal(vol.ornt, [[0, 1], [1, 1], [2, 1]])
    np.testing.assert_array_equal(vol.file_affine, vol.affine)
    assert np.all(vol.hu[slices == 0] == -1000.0)                    # background below the window: air
    head = slices > 80                                                # brain / blood / skull in the phantom
    assert 20 < float(np.median(vol.hu[head])) < 45                   # brain ~31 HU
    diff = apply_window(vol.hu, PRESETS["brain"]).astype(int) - slices
    assert np.abs(diff).max() <= 2 and np.abs(diff).mean() < 1.0      # documented bound of integer HU


def test_fine_rescale_slope_gives_the_phantom_back_within_one_level(tmp_path, phantom):
    write_dicom_series(tmp_path / "fine", phantom[0], rescale_slope=0.25)
    vol = read_dicom_series(tmp_path / "fine")
    diff = apply_window(vol.hu, PRESETS["brain"]).astype(int) - phantom[0]
    assert np.abs(diff).max() <= 1


def test_affine_places_voxels_at_the_dicom_positions(series):
    folder, paths = series
    vol = read_dicom_series(folder)
    first = pydicom.dcmread(paths[0])
    origin = vol.affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(origin[:3], np.asarray(first.ImagePositionPatient, float) * LPS_TO_RAS, atol=1e-6)
    np.testing.assert_allclose(vol.affine @ [0, 0, 1, 1] - origin, [0, 0, 5.0, 0], atol=1e-6)   # superior
    np.testing.assert_allclose(vol.affine @ [1, 0, 0, 1] - origin, [-0.508, 0, 0, 0], atol=1e-6)  # to the left
    np.testing.assert_allclose(vol.affine @ [0, 1, 0, 1] - origin, [0, -0.508, 0, 0], atol=1e-6)  # posterior


def test_shuffled_names_subfolders_and_other_files_still_give_the_sorted_volume(series, phantom):
    folder, paths = series
    reference = read_dicom_series(folder)
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir()
    for i, path in enumerate(rng.permutation(paths)):
        path.rename(folder / ("sub" if i % 2 else ".") / f"x{rng.integers(1e9)}")
    (folder / "README.txt").write_text("not dicom")
    _write_dicomdir_like(folder / "DICOMDIR")
    assert is_dicom_folder(folder)
    vol = read_dicom_series(folder)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_array_equal(vol.affine, reference.affine)


def _write_dicomdir_like(path):
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.FileSetID = "TEST"
    ds.save_as(path, enforce_file_format=True)


def test_slices_stored_superior_to_inferior_come_out_inferior_first(series):
    folder, paths = series
    reference = read_dicom_series(folder)
    n = len(paths)
    _edit(paths, lambda ds, k: setattr(ds, "InstanceNumber", n - k))
    for k, path in enumerate(paths):
        path.rename(folder / f"top{n - k:03d}.dcm")
    vol = read_dicom_series(folder)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_array_equal(vol.affine, reference.affine)
    assert vol.datasets[0].InstanceNumber == n


@pytest.mark.parametrize("flip", ["rows", "columns"])
def test_flipped_in_plane_storage_comes_out_in_display_orientation(series, flip):
    folder, paths = series
    reference = read_dicom_series(folder)

    def flipped(ds, k):
        rows, cols = ds.Rows, ds.Columns
        ipp = [float(v) for v in ds.ImagePositionPatient]
        if flip == "rows":   # first stored row is now the most posterior one
            _set_pixels(ds, ds.pixel_array[::-1])
            ds.ImageOrientationPatient, ipp[1] = [1, 0, 0, 0, -1, 0], ipp[1] + (rows - 1) * 0.508
        else:                # first stored column is now the patient's leftmost one
            _set_pixels(ds, ds.pixel_array[:, ::-1])
            ds.ImageOrientationPatient, ipp[0] = [-1, 0, 0, 0, 1, 0], ipp[0] + (cols - 1) * 0.508
        ds.ImagePositionPatient = ipp

    _edit(paths, flipped)
    vol = read_dicom_series(folder)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_allclose(vol.affine, reference.affine, atol=1e-6)
    assert vol.spacing == pytest.approx(reference.spacing)
    assert [d.SOPInstanceUID for d in vol.datasets] == [d.SOPInstanceUID for d in reference.datasets]
    assert not np.array_equal(vol.ornt, reference.ornt)
    # file order + file_affine describe the stored pixels: stored slice 0 is the top one (normal points down)
    stored = np.asarray(vol.to_file_order(vol.hu)).transpose(2, 1, 0)
    np.testing.assert_array_equal(stored[0], vol.datasets[-1].pixel_array * 1.0 - 1024)
    np.testing.assert_allclose(vol.file_affine @ [0, 0, 0, 1],
                               [*np.asarray(vol.datasets[-1].ImagePositionPatient, float) * LPS_TO_RAS, 1])


def test_positions_missing_everywhere_orders_by_instance_number(series):
    folder, paths = series
    reference = read_dicom_series(folder)
    n = len(paths)

    def strip(ds, k):
        del ds.ImagePositionPatient
        ds.InstanceNumber = k + 1
    _edit(paths, strip)
    for k, path in enumerate(paths):
        path.rename(folder / f"z{n - k:03d}.dcm")
    vol = read_dicom_series(folder)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    assert vol.spacing == pytest.approx((5.0, 0.508, 0.508))


def test_rescale_is_applied_per_slice(series):
    folder, paths = series
    reference = read_dicom_series(folder)

    def rescale(ds, k):
        if k == 3:
            hu = ds.pixel_array.astype(float) - 1024
            _set_pixels(ds, np.rint((hu + 2000) / 0.5).astype(np.int16))
            ds.RescaleSlope, ds.RescaleIntercept = 0.5, -2000
    _edit(paths, rescale)
    np.testing.assert_array_equal(read_dicom_series(folder).hu, reference.hu)


def test_name_is_sanitised(tmp_path, phantom):
    write_dicom_series(tmp_path / "s", phantom[0], patient_id="A/B C:*", series_number=7)
    assert read_dicom_series(tmp_path / "s").name == "A-B-C_20240101_7"


def test_writing_is_deterministic(tmp_path, phantom):
    a = write_dicom_series(tmp_path / "a", phantom[0])
    b = write_dicom_series(tmp_path / "b", phantom[0])
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_compressed_series_with_an_installed_decoder_is_read(series):
    pytest.importorskip("jpeg_ls")
    folder, paths = series
    reference = read_dicom_series(folder)
    _edit(paths, lambda ds, k: ds.compress(JPEGLSLossless))
    vol = read_dicom_series(folder)
    assert vol.datasets[0].file_meta.TransferSyntaxUID == JPEGLSLossless
    np.testing.assert_array_equal(vol.hu, reference.hu)


def test_is_dicom_folder(tmp_path, series):
    assert is_dicom_folder(series[0])
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "a.png").write_bytes(b"\x89PNG" + b"\0" * 200)
    assert not is_dicom_folder(tmp_path / "pngs")
    assert not is_dicom_folder(tmp_path / "missing")
    assert not is_dicom_folder(series[1][0])


# --------------------------------------------------------------------------------------------------- bad input
def test_missing_folder_and_folder_without_dicom(tmp_path):
    assert "folder not found" in _error(tmp_path / "nope")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "notes.txt").write_text("hello")
    message = _error(tmp_path / "txt")
    assert str(tmp_path / "txt") in message and "no DICOM image files" in message


def test_several_series_need_a_series_uid(tmp_path, phantom):
    folder = tmp_path / "study"
    write_dicom_series(folder / "a", phantom[0], series_number=1, series_description="Head axial")
    write_dicom_series(folder / "b", phantom[0][:4], series_number=2, series_description="Head thin")
    before = sorted(p for p in tmp_path.rglob("*"))
    message = _error(folder)
    uid1, uid2 = (pydicom.dcmread(folder / d / "IM0001.dcm").SeriesInstanceUID for d in ("a", "b"))
    assert str(folder) in message and "2 series" in message and "series_uid=" in message
    assert uid1 in message and uid2 in message and "Head thin" in message and "4 file(s)" in message
    assert sorted(p for p in tmp_path.rglob("*")) == before          # nothing written
    assert read_dicom_series(folder, series_uid=uid2).hu.shape[0] == 4
    message = _error(folder, series_uid="1.2.3.4")
    assert "1.2.3.4" in message and "not in this folder" in message and uid1 in message


def test_non_ct_modality(series):
    folder, paths = series
    _edit(paths, lambda ds, k: setattr(ds, "Modality", "MR"))
    message = _error(folder)
    assert str(folder) in message and "Modality MR" in message and "only CT" in message


def test_missing_slice_names_the_gap(series):
    folder, paths = series
    paths[3].unlink()
    message = _error(folder)
    assert str(folder) in message and "missing slices" in message and "10.00 -> 20.00 mm" in message


def test_uneven_slice_steps(series):
    folder, paths = series

    def shift(ds, k):
        if k == 3:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], 15.8]
    _edit(paths, shift)
    message = _error(folder)
    assert "inconsistent slice spacing" in message and paths[2].name in message


def test_duplicate_positions(series):
    folder, paths = series
    shutil.copy(paths[2], folder / "copy.dcm")
    _edit([folder / "copy.dcm"], lambda ds, k: setattr(ds, "SOPInstanceUID", pydicom.uid.generate_uid()))
    assert "same position" in _error(folder)


def test_inconsistent_pixel_spacing(series):
    folder, paths = series
    _edit([paths[5]], lambda ds, k: setattr(ds, "PixelSpacing", [0.6, 0.6]))
    message = _error(folder)
    assert str(paths[5]) in message and "inconsistent pixel spacing" in message


def test_inconsistent_orientation(series):
    folder, paths = series
    tilt = np.radians(10)
    _edit([paths[4]], lambda ds, k: setattr(ds, "ImageOrientationPatient",
                                            [1, 0, 0, 0, float(np.cos(tilt)), float(np.sin(tilt))]))
    message = _error(folder)
    assert str(paths[4]) in message and "inconsistent orientation" in message


def test_different_image_sizes(series, phantom):
    folder, paths = series

    def crop(ds, k):
        _set_pixels(ds, ds.pixel_array[:32])
        ds.Rows = 32
    _edit([paths[1]], crop)
    message = _error(folder)
    assert str(paths[1]) in message and "image size" in message


def test_sagittal_series_is_refused(series):
    folder, paths = series
    _edit(paths, lambda ds, k: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))
    assert "sagittal" in _error(folder)


def test_oblique_series_is_refused(series):
    folder, paths = series
    tilt = np.radians(40)
    _edit(paths, lambda ds, k: setattr(ds, "ImageOrientationPatient",
                                       [1, 0, 0, 0, float(np.cos(tilt)), -float(np.sin(tilt))]))
    assert "oblique" in _error(folder)


def test_compressed_syntax_without_decoder(series):
    folder, paths = series

    def jpeg_lossless(ds, k):
        if k == 2:
            ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
            ds.PixelData = encapsulate([b"\xff\xd8 not really jpeg \xff\xd9"])
    _edit(paths, jpeg_lossless)
    message = _error(folder)
    assert str(paths[2]) in message and "JPEG Lossless" in message and JPEGLosslessSV1 in message
    assert "no decoder" in message and "pylibjpeg" in message and "gdcm" in message


def test_compressed_data_that_does_not_decode(series):
    folder, paths = series

    def bogus(ds, k):
        if k == 1:
            ds.file_meta.TransferSyntaxUID = JPEGLSLossless
            ds.PixelData = encapsulate([b"\xff\xd8 garbage \xff\xd9"])
    _edit(paths, bogus)
    message = _error(folder)
    assert str(paths[1]) in message and "cannot decode" in message


@pytest.mark.parametrize("keep", [300, -1000])
def test_truncated_file(series, keep):
    folder, paths = series
    data = paths[6].read_bytes()
    paths[6].write_bytes(data[:keep])
    message = _error(folder)
    assert str(paths[6]) in message and ("truncated" in message or "corrupt" in message)


def test_single_slice_is_refused(tmp_path, phantom):
    write_dicom_series(tmp_path / "one", phantom[0][:1])
    message = _error(tmp_path / "one")
    assert "single slice" in message and "at least 2" in message


# ------------------------------------------------------------------------------------------------- DICOM-SEG
def _frame_sources(seg) -> list[str]:
    return [str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in seg.PerFrameFunctionalGroupsSequence]


def test_dicom_seg_round_trip(tmp_path, phantom):
    paths, edema = write_phantom_series(tmp_path / "ct", SPEC, patient=1)
    vol = read_dicom_series(tmp_path / "ct")
    assert edema.any() and not edema.all(axis=(1, 2)).any()
    path = write_dicom_seg(vol, edema, tmp_path / "out" / "seg.dcm", algorithm_version="1.2")
    assert not [p for p in path.parent.iterdir() if p != path]           # no temp file left
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == vol.datasets[0].StudyInstanceUID
    desc = seg.SegmentSequence[0]
    assert desc.SegmentLabel == "Perihematomal edema"
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "79654002"
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    algo = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("ichflow", "1.2")
    lesion = np.flatnonzero(edema.any(axis=(1, 2)))
    assert seg.NumberOfFrames == len(lesion)                               # empty slices omitted
    assert sorted(_frame_sources(seg)) == sorted(vol.datasets[i].SOPInstanceUID for i in lesion)
    by_uid = {d.SOPInstanceUID: i for i, d in enumerate(vol.datasets)}
    frames = seg.pixel_array.reshape(-1, *edema.shape[1:])
    for frame, uid in zip(frames, _frame_sources(seg)):
        np.testing.assert_array_equal(frame.astype(bool), edema[by_uid[uid]])
    np.testing.assert_array_equal(read_dicom_seg_mask(path, vol), edema)


def test_dicom_seg_of_a_flipped_series_is_stored_on_the_stored_pixels(series, phantom):
    folder, paths = series
    edema = phantom[1]

    def flip_rows(ds, k):
        _set_pixels(ds, ds.pixel_array[::-1])
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1] + 63 * 0.508,
                                   ds.ImagePositionPatient[2]]
    _edit(paths, flip_rows)
    vol = read_dicom_series(folder)
    path = write_dicom_seg(vol, edema, folder / "seg.dcm")                 # beside the series: not a 2nd series
    seg = pydicom.dcmread(path)
    by_uid = {d.SOPInstanceUID: i for i, d in enumerate(vol.datasets)}
    for frame, uid in zip(seg.pixel_array.reshape(-1, 64, 64), _frame_sources(seg)):
        np.testing.assert_array_equal(frame.astype(bool), edema[by_uid[uid]][::-1])
    np.testing.assert_array_equal(read_dicom_seg_mask(path, read_dicom_series(folder)), edema)


def test_empty_mask_gives_a_valid_seg_with_empty_frames(series):
    folder, _ = series
    vol = read_dicom_series(folder)
    path = write_dicom_seg(vol, np.zeros(vol.hu.shape, bool), folder.parent / "empty.dcm")
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SegmentationStorage and seg.NumberOfFrames == vol.hu.shape[0]
    assert not read_dicom_seg_mask(path, vol).any()


def test_seg_errors(tmp_path, series, phantom):
    folder, paths = series
    vol = read_dicom_series(folder)
    with pytest.raises(DataError, match="not a DICOM-SEG"):
        read_dicom_seg_mask(paths[0], vol)
    path = write_dicom_seg(vol, phantom[1], tmp_path / "seg.dcm")
    other = write_dicom_series(tmp_path / "other", phantom[0], patient_id="OTHER")
    with pytest.raises(DataError, match="not a slice of"):
        read_dicom_seg_mask(path, read_dicom_series(other[0].parent))
    vol.kind, vol.datasets = "nifti", []
    with pytest.raises(DataError, match="needs a DICOM source series"):
        write_dicom_seg(vol, phantom[1], tmp_path / "x.dcm")
    assert not os.path.exists(tmp_path / "x.dcm")
