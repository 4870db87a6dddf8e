"""What a served model accepts as one scan (``ichflow.engine.scan``) and what it refuses, over REST.

Fast tests: the decoding rules on their own (8-bit tensors, base64 PNG slices, HU, a base64 NIfTI, the compact
mask encodings, every refusal a 400-class ``MlflowException`` saying what to send).

Slow tests: the session's tiny model of each task (conftest ``tiny_model``) made ``@champion`` and served by a
real ``mlflow models serve`` process: base64 PNG slices give the answer of the uint8 tensor, a 0..1 float image
is HTTP 400 with the message, an int16 HU volume gives the answer of its brain-windowed slices, the
segmentation model's ``mask_png`` / ``mask_rle`` decode to its mask; the payload sizes are printed.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from ichflow.data.nifti import read_nifti, write_nifti_volume
from ichflow.data.windows import PRESETS, apply_window, parse_window, to_hu
from ichflow.engine.scan import PayloadError, as_scan, decode_png, decode_rle, encode_png, mask_rle

BRAIN = PRESETS["brain"]
TASKS = ("segmentation", "classification", "detection", "multilabel")


def png_b64(slice_u8: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(slice_u8, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def hu_scan(arr: np.ndarray, air: bool = True) -> np.ndarray:
    """int16 HU whose brain window is ``arr`` (up to rounding); ``air``: black pixels at -1000 HU (a real CT)."""
    hu = np.rint(to_hu(arr, BRAIN)).astype(np.int16)
    if air:
        hu[arr == 0] = -1000
    return hu


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (3, 40, 52), dtype=np.uint8)
    arr[:, :4] = 0                                   # some air
    return arr


# ------------------------------------------------------------------------------------------------ fast
def test_every_8bit_form_decodes_to_the_same_slices(slices):
    pngs = [png_b64(s) for s in slices]
    as_json = json.loads(json.dumps(slices.tolist()))
    for form in (slices, slices.astype(np.int64), slices.astype(np.float32), np.array(as_json, dtype=object),
                 pngs, np.array(pngs, dtype=object), {"slices": slices}, pd.DataFrame({"s": list(slices)}),
                 [f"data:image/png;base64,{p}" for p in pngs], [base64.b64decode(p) for p in pngs]):
        out = as_scan(form, BRAIN)
        assert out.dtype == np.uint8 and np.array_equal(out, slices), type(form)
    assert np.array_equal(as_scan(pngs[1]), slices[1:2])            # one string = one slice
    assert np.array_equal(as_scan(slices[0]), slices[:1])           # one (H, W) slice
    rgb = np.repeat(slices[0][..., None], 3, axis=-1)
    assert np.array_equal(as_scan([png_b64(rgb)]), slices[:1])      # grey RGB PNG -> its luminance


def test_hu_is_windowed_by_the_model_and_the_rule_is_unambiguous(slices):
    hu = hu_scan(slices)
    expected = apply_window(hu, BRAIN)
    assert np.array_equal(as_scan(hu, BRAIN), expected)                                  # auto: -1000 -> HU
    assert np.array_equal(as_scan(np.array(hu.tolist(), dtype=object), BRAIN), expected)  # as JSON integers
    assert np.array_equal(as_scan(hu.astype(np.float32), BRAIN, "hu"), expected)
    subdural = parse_window("subdural")
    assert np.array_equal(as_scan(hu, subdural), apply_window(hu, subdural))     # the model's own window
    # HU without air lies in 0..80: integers 0..255 are 8-bit in auto, HU only when said so
    no_air = hu_scan(slices, air=False)
    assert no_air.min() >= 0 and no_air.max() <= 255
    assert np.array_equal(as_scan(no_air, BRAIN), no_air.astype(np.uint8))
    assert np.array_equal(as_scan(no_air, BRAIN, "HU"), apply_window(no_air, BRAIN))
    with pytest.raises(PayloadError, match="outside 0..255 with intensity=uint8"):
        as_scan(hu, BRAIN, "uint8")
    with pytest.raises(PayloadError, match="no window"):
        as_scan(hu)                                  # internal callers without a window never guess one


@pytest.mark.parametrize("bad, intensity, match", [
    ("unit", "auto", "whole numbers 0..255"),          # 0..1 floats: refused, not cast to black
    ("json_unit", "auto", "whole numbers 0..255"),
    ("float_hu", "auto", "intensity"),                 # HU as floats needs intensity=hu
    ("nan", "hu", "NaN"),
    ("negative_int", "uint8", "outside 0..255"),
    ("ragged", "auto", "different sizes"),
    ("text", "auto", "not base64"),
    ("jpeg", "auto", "not a PNG"),
    ("png16", "auto", "16/32-bit"),
    ("png_sizes", "auto", "different sizes"),
    ("png_hu", "hu", "PNG slices are 8-bit"),
    ("4d", "auto", "shape"),
    ("bool", "auto", "values of type bool"),
    ("unit", "bogus", "intensity must be one of auto, uint8, hu"),
])
def test_refusals_say_what_to_send(slices, bad, intensity, match):
    unit = slices / 255.0
    jpeg = io.BytesIO()
    Image.fromarray(slices[0]).save(jpeg, format="JPEG")
    png16 = io.BytesIO()
    Image.fromarray(slices[0].astype(np.uint16) * 200).save(png16, format="PNG")
    payload = {"unit": unit, "json_unit": np.array(unit.tolist(), dtype=object),
               "float_hu": hu_scan(slices).astype(np.float64), "nan": np.where(unit > 0.5, np.nan, unit),
               "negative_int": -slices.astype(np.int16), "ragged": np.array([[1, 2], [3]], dtype=object),
               "text": ["not an image!"], "jpeg": [base64.b64encode(jpeg.getvalue()).decode()],
               "png16": [base64.b64encode(png16.getvalue()).decode()],
               "png_sizes": [png_b64(slices[0]), png_b64(slices[1][:20])], "png_hu": [png_b64(slices[0])],
               "4d": slices[None, ..., None], "bool": slices > 9}[bad]
    with pytest.raises(PayloadError, match=match) as err:
        as_scan(payload, BRAIN, intensity)
    assert err.value.get_http_status_code() == 400 and isinstance(err.value, MlflowException)
    if bad in ("unit", "json_unit", "float_hu") and intensity == "auto":
        assert "uint8" in err.value.message and "base64 PNG" in err.value.message
        assert "intensity\": \"hu\"" in err.value.message and str(BRAIN) in err.value.message


def test_nifti_string_is_a_hu_volume(slices, tmp_path):
    path = write_nifti_volume(tmp_path / "scan.nii.gz", slices)          # stored LAS, as dcm2niix writes
    b64 = base64.b64encode(path.read_bytes()).decode()
    expected = apply_window(read_nifti(path).hu, BRAIN)
    assert np.array_equal(as_scan(b64, BRAIN), expected)
    assert np.array_equal(as_scan([b64], BRAIN, "hu"), expected)
    assert np.abs(expected.astype(int) - slices).max() <= 2            # the same slices, display orientation
    with pytest.raises(PayloadError, match="ONE base64 NIfTI"):
        as_scan([b64, b64], BRAIN)
    truncated = base64.b64encode(path.read_bytes()[: path.stat().st_size // 2]).decode()
    with pytest.raises(PayloadError, match="NIfTI: ") as err:
        as_scan(truncated, BRAIN)
    assert "ichflow-payload-" not in err.value.message                   # no temp path in the answer


def test_compact_masks_round_trip():
    rng = np.random.default_rng(1)
    for mask in (rng.random((37, 53)) > 0.8, np.zeros((4, 5), bool), np.ones((4, 5), bool)):
        rle = mask_rle(mask)
        assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
        assert np.array_equal(decode_rle(json.loads(json.dumps(rle))), mask)
        png = decode_png(encode_png(mask))
        assert set(np.unique(png)) <= {0, 255} and np.array_equal(png == 255, mask)
    assert mask_rle(np.array([[0, 1, 1], [1, 0, 0]]))["counts"] == [1, 3, 2]     # row-major runs
    assert mask_rle(np.array([[1, 0]]))["counts"] == [0, 1, 1]                    # starts with background


def test_the_scoring_server_answers_400_with_the_message_not_the_payload(tmp_path):
    """The refusal through MLflow's own scoring app (``mlflow models serve``'s, in-process) and a real pyfunc."""
    from fastapi.testclient import TestClient
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import scoring_server
    from mlflow.types.schema import ParamSchema

    from ichflow.engine.scan import input_schema, intensity_param

    class Sums(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return as_scan(model_input, BRAIN, (params or {}).get("intensity") or "auto").sum(axis=(1, 2))

    mlflow.pyfunc.save_model(tmp_path / "model", python_model=Sums(), signature=ModelSignature(
        inputs=input_schema(), params=ParamSchema([intensity_param()])))
    client = TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(tmp_path / "model"))))
    ok = np.full((2, 8, 8), 3, np.uint8)
    for payload in ({"inputs": ok.tolist()}, {"inputs": [png_b64(s) for s in ok]}, {"instances": ok.tolist()}):
        answer = client.post("/invocations", json=payload)
        assert answer.status_code == 200 and answer.json()["predictions"] == [192, 192], payload
    answer = client.post("/invocations", json={"inputs": np.full((2, 300, 300), 0.5).tolist()})
    assert answer.status_code == 400 and len(answer.content) < 2000
    assert "whole numbers 0..255" in answer.json()["message"]
    answer = client.post("/invocations", json={"inputs": [png_b64(s) for s in ok] * 50, "params": {"intensity": "hu"}})
    assert answer.status_code == 400 and "PNG slices are 8-bit" in answer.json()["message"]
    assert len(answer.content) < 2000                 # the base64 payload is not echoed back


# ------------------------------------------------------------------------------------------- served
from test_serving import _scan, _uri, champion, served  # noqa: E402,F401  (the served tiny models of each task)


def _post(port: int, payload: dict) -> tuple[int, bytes, int]:
    """(HTTP status, response body, request bytes)."""
    body = json.dumps(payload).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.read(), len(body)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), len(body)


def _ok(port: int, inputs, **params):
    status, body, _ = _post(port, {"inputs": inputs, **({"params": params} if params else {})})
    assert status == 200, body[:2000]
    return json.loads(body)["predictions"]


def _same(task: str, got, expected) -> None:
    if task == "segmentation":
        np.testing.assert_allclose(np.asarray(got, dtype=np.float32), np.asarray(expected), atol=1e-5)
        return
    got, expected = pd.DataFrame(got), pd.DataFrame(expected)
    assert list(got.columns) == list(expected.columns) and len(got) == len(expected)
    if task == "detection":
        assert len(expected) > 0
    np.testing.assert_allclose(got.to_numpy(np.float64), expected.to_numpy(np.float64), rtol=1e-4, atol=1e-5)


PARAMS = {"detection": {"conf_threshold": 0.001}}   # keep every box: the comparison is real


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_served_payloads(champion, shared_store, task):
    champion(task)
    arr = _scan(task)
    local = mlflow.pyfunc.load_model(_uri(task))
    params = PARAMS.get(task, {})
    assert local.metadata.metadata["window"] == BRAIN.as_dict()
    assert str(local.metadata.signature.inputs) == "[Tensor('object', (-1,))]"
    # in-process: PNG strings and HU give what the uint8 array gives
    expected = local.predict(arr, params=params or None)
    _same(task, local.predict(np.array([png_b64(s) for s in arr], dtype=object), params=params or None), expected)
    hu = hu_scan(arr)
    windowed = local.predict(apply_window(hu, BRAIN), params=params or None)
    _same(task, local.predict(hu, params=params or None), windowed)
    with served(_uri(task), shared_store) as port:
        tensor = _ok(port, arr.tolist(), **params)
        _same(task, tensor, expected)
        _same(task, _ok(port, [png_b64(s) for s in arr], **params), expected)
        # a 0..1 float image: HTTP 400 saying what to send, not a confident answer on a black image
        status, body, _ = _post(port, {"inputs": (arr / 255.0).tolist(), **({"params": params} if params else {})})
        message = json.loads(body)["message"]
        assert status == 400 and len(body) < 2000, body[:2000]
        assert "whole numbers 0..255" in message and "base64 PNG" in message and "\"intensity\": \"hu\"" in message
        # int16 HU: windowed by the model with its recorded (brain) window
        _same(task, _ok(port, hu.tolist(), **params), windowed)
        no_air = hu_scan(arr, air=False)           # all in 0..80 HU: HU only when said so
        _same(task, _ok(port, no_air.tolist(), intensity="hu", **params),
              local.predict(apply_window(no_air, BRAIN), params=params or None))
        if task == "segmentation":
            _segmentation_outputs(port, local, arr, hu)


def _segmentation_outputs(port: int, local, arr: np.ndarray, hu: np.ndarray) -> None:
    mask = local.predict(arr, params={"output": "mask"})
    pngs = _ok(port, arr.tolist(), output="mask_png")
    assert len(pngs) == len(arr) and all(isinstance(p, str) for p in pngs)
    np.testing.assert_array_equal(np.stack([decode_png(p) for p in pngs]) == 255, mask == 1)
    rles = _ok(port, [png_b64(s) for s in arr], output="mask_rle")
    np.testing.assert_array_equal(np.stack([decode_rle(r) for r in rles]), mask)
    # one base64 NIfTI (.nii.gz) string: read in display orientation, windowed
    with contextlib.ExitStack() as stack:
        import tempfile

        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        nii = write_nifti_volume(folder / "scan.nii.gz", arr)
        served_nii = _ok(port, base64.b64encode(nii.read_bytes()).decode(), output="mask")
        np.testing.assert_array_equal(served_nii, local.predict(apply_window(read_nifti(nii).hu, BRAIN),
                                                                params={"output": "mask"}))
    status, body, _ = _post(port, {"inputs": arr.tolist(), "params": {"output": "masks"}})
    assert status == 400 and b"params.output must be one of" in body
    # payload sizes for one 512 x 512 slice
    one = arr[1:2]
    assert one.shape[1:] == (512, 512)
    sizes = {"request_tensor": _post(port, {"inputs": one.tolist()})[2],
             "request_png": _post(port, {"inputs": [png_b64(one[0])]})[2],
             "request_hu_int16": _post(port, {"inputs": hu[1:2].tolist()})[2]}
    for output in ("probability", "mask", "mask_png", "mask_rle"):
        status, body, _ = _post(port, {"inputs": [png_b64(one[0])], "params": {"output": output}})
        assert status == 200
        sizes[f"response_{output}"] = len(body)
    sizes["mask_pixels"] = int(mask[1].sum())
    print("\npayload bytes, one 512x512 phantom slice:", json.dumps(sizes))
    assert sizes["request_png"] < sizes["request_tensor"] / 2
    assert sizes["response_mask_png"] < sizes["response_probability"] / 20
