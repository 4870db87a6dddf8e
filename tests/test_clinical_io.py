"""A clinical scan in, clinical files out: ``predict`` on a DICOM series and a NIfTI volume in HU with a registered
segmentation model (windowed as the model was trained), a NIfTI mask with the input's affine, a DICOM-SEG that
references the source slices, the lesion volume from the scan's own voxel spacing, and bad input refused before
anything is written."""

from __future__ import annotations

import shutil

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from mlflow.exceptions import MlflowException

from ichflow.data.dicom import read_dicom_series
from ichflow.data.dicom_seg import read_dicom_seg_mask
from ichflow.data.nifti import read_nifti, write_nifti_volume
from ichflow.data.synthetic_dicom import phantom_patient, write_phantom_series
from ichflow.data.windows import PRESETS, apply_window
from ichflow.errors import DataError
from ichflow.serving import PredictConfig, run_predict
from ichflow.tasks.spec import TASKS

URI = f"models:/{TASKS['segmentation'].registered_name}@champion"
PIXEL_MM, SLICE_MM = 0.6, 4.0     # not the training data's 0.508 x 5 mm: the volume must come from the file


@pytest.fixture(scope="module")
def champion(shared_store, tiny_model):
    res = tiny_model("segmentation")
    mlflow.MlflowClient().set_registered_model_alias(TASKS["segmentation"].registered_name, "champion",
                                                     str(res["model_version"]))
    return mlflow.pyfunc.load_model(URI)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "PHANTOM0001"
    write_phantom_series(folder, patient=1, pixel_spacing=PIXEL_MM, slice_thickness=SLICE_MM)
    return folder


def _expected_masks(model, hu: np.ndarray) -> np.ndarray:
    """What the model says on the brain-windowed scan, at its own threshold."""
    probs = model.predict(apply_window(hu, PRESETS["brain"]))
    return probs >= float(model.metadata.metadata["threshold"])


@pytest.mark.slow
def test_dicom_series_in_nifti_and_dicom_seg_out(champion, series, tmp_path):
    out = tmp_path / "out"
    table = run_predict(PredictConfig(model_uri=URI, input=str(series), output=str(out)))
    volume = read_dicom_series(series)
    expected = _expected_masks(champion, volume.hu)
    assert len(table) == len(volume.hu) and set(table["scan"]) == {volume.name}
    assert table["lesion_pixels"].tolist() == expected.sum(axis=(1, 2)).tolist()

    summary = pd.read_csv(out / "volumes.csv").iloc[0]
    assert summary["spacing_mm"] == f"{SLICE_MM:g}x{PIXEL_MM:g}x{PIXEL_MM:g}"
    assert "brain" in summary["window"]
    np.testing.assert_allclose(summary["lesion_ml"], expected.sum() * PIXEL_MM ** 2 * SLICE_MM / 1000, rtol=1e-9)

    nifti = nib.load(out / summary["nifti_mask"])
    np.testing.assert_allclose(nifti.affine, volume.file_affine, atol=1e-4)   # NIfTI stores float32
    np.testing.assert_array_equal(np.asarray(nifti.dataobj) != 0, volume.to_file_order(expected))

    seg_path = out / summary["dicom_seg"]
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"       # Segmentation Storage
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_uid
    assert seg.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    np.testing.assert_array_equal(read_dicom_seg_mask(seg_path, volume), expected)
    if expected.any():   # every frame points at a source slice with lesion
        uids = {str(volume.datasets[i].SOPInstanceUID) for i in np.flatnonzero(expected.any(axis=(1, 2)))}
        framed = {str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for item in seg.PerFrameFunctionalGroupsSequence}
        assert framed == uids


@pytest.mark.slow
def test_volume_within_the_models_error_and_same_on_nifti(champion, series, tmp_path):
    """The mL from the DICOM series are the model's own answer on the phantom's 8-bit slices, with the real voxel
    size, up to the HU rounding of the written series; a NIfTI of the same scan gives the same mask."""
    slices, _ = phantom_patient(patient=1)
    voxel_ml = PIXEL_MM ** 2 * SLICE_MM / 1000
    probs = champion.predict(slices)
    on_png_ml = (probs >= float(champion.metadata.metadata["threshold"])).sum() * voxel_ml
    dicom = run_predict(PredictConfig(model_uri=URI, input=str(series), output=str(tmp_path / "dicom")))
    dicom_ml = pd.read_csv(tmp_path / "dicom" / "volumes.csv")["lesion_ml"].iloc[0]
    assert on_png_ml > 0 and abs(dicom_ml - on_png_ml) <= 0.01 * on_png_ml

    nii = tmp_path / "PHANTOM0001.nii.gz"
    write_nifti_volume(nii, slices, spacing=(SLICE_MM, PIXEL_MM, PIXEL_MM), axcodes=("L", "A", "S"))
    run_predict(PredictConfig(model_uri=URI, input=str(nii), output=str(tmp_path / "nifti")))
    mask = nib.load(tmp_path / "nifti" / "masks" / "PHANTOM0001.nii.gz")
    assert np.array_equal(mask.affine, nib.load(nii).affine)
    assert not (tmp_path / "nifti" / "masks" / "PHANTOM0001.seg.dcm").exists()
    volume = read_nifti(nii)
    np.testing.assert_array_equal(np.asarray(mask.dataobj) != 0,
                                  volume.to_file_order(_expected_masks(champion, volume.hu)))
    assert dicom["lesion_pixels"].sum() == _expected_masks(champion, volume.hu).sum()


@pytest.mark.slow
def test_bad_scan_is_one_line_and_leaves_the_output_alone(champion, series, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(series, mixed / "a")
    write_phantom_series(mixed / "b", patient=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.csv").write_text("kept\n")
    with pytest.raises(DataError, match="series") as err:
        run_predict(PredictConfig(model_uri=URI, input=str(mixed), output=str(out)))
    assert "series_uid" in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in out.iterdir()] == ["earlier.csv"]
    chosen = read_dicom_series(series).series_uid
    table = run_predict(PredictConfig(model_uri=URI, input=str(mixed), output=str(out), series_uid=chosen))
    assert len(table) == len(read_dicom_series(series).hu)


@pytest.mark.slow
def test_model_records_its_window_and_windows_hu_itself(champion):
    assert champion.metadata.metadata["window"] == {"name": "brain", "level": 40, "width": 80}
    hu = np.full((2, 64, 64), -1000, np.int16)
    hu[:, 16:48, 16:48] = 35
    # int16 HU is windowed by the model with its recorded window, never read as 8-bit slices
    np.testing.assert_array_equal(champion.predict(hu), champion.predict(apply_window(hu, PRESETS["brain"])))
    with pytest.raises(MlflowException, match="intensity"):
        champion.predict(hu.astype(np.float32))     # HU as floats without intensity=hu: refused, not cast
    with pytest.raises(MlflowException, match="whole numbers 0..255"):
        champion.predict(np.full((2, 64, 64), 0.5, np.float32))   # a 0..1 image: refused, not cast to black


@pytest.mark.slow
def test_segmentation_trains_from_the_nifti_layout(tmp_path, store):
    """The published SubdatasetA volumes (the phantom written as NIfTI in HU) train the segmentation task
    unchanged, on the same patient split as the PNG layout of the same phantom."""
    from conftest import TINY
    from ichflow.data.phe_nifti import write_phe_nifti
    from ichflow.data.synthetic import PhantomSpec
    from ichflow.prepare import DataConfig, prepare_data
    from ichflow.tasks.segmentation import SegmentationConfig, train_segmentation

    root = write_phe_nifti(tmp_path / "phe", PhantomSpec())
    res = train_segmentation(SegmentationConfig(data_dir=str(root), register=False, **TINY["segmentation"]))
    params = mlflow.get_run(res.run_id).data.params
    assert params["reader"] == "phe_nifti" and res["val_dice"] == res["val_dice"]   # logged, not NaN
    nifti_split = prepare_data(DataConfig(data_dir=str(root))).split
    png_split = prepare_data(DataConfig()).split
    assert nifti_split.set_index("patient_id")["split"].to_dict() == png_split.set_index("patient_id")["split"].to_dict()
