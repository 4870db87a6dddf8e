"""What every served model accepts as one scan, decoded to 8-bit slices (N, H, W) in axial order.

One request = ONE scan. Accepted forms (``model_input`` of every pyfunc, also over REST ``{"inputs": ...}``):

- **8-bit slices**: an (N, H, W) or (H, W) array of whole numbers 0..255 (uint8; over JSON: integers), windowed
  with the model's window as the training images were (its metadata / ``model_config.json`` ``window``).
- **base64 PNG**: a list of base64 strings, one 8-bit (grayscale; colour is reduced to luminance) PNG slice
  each, in axial order; a single string is one slice. A ``data:image/png;base64,`` prefix is allowed.
- **HU**: an integer array (int16, as a DICOM series after RescaleSlope/Intercept) in Hounsfield units; the
  model applies its own window (:func:`~ichflow.data.windows.apply_window`).
- **NIfTI**: ONE base64 string of a ``.nii.gz`` (or ``.nii``) file: a volume in HU, read with
  :func:`~ichflow.data.nifti.read_nifti` (slices inferior -> superior, display orientation) and windowed.

HU or 8-bit is decided by the param ``intensity`` (:data:`INTENSITIES`):

- ``auto`` (default): a uint8 array or PNG is 8-bit; an integer array with any value outside 0..255 is HU, one
  with all values in 0..255 is 8-bit (a real CT has air near -1000 HU; send ``intensity="hu"`` for a crop
  without air); a NIfTI is HU; a float array must hold whole numbers 0..255 (8-bit), anything else (a 0..1
  image, HU as floats) is rejected.
- ``uint8``: the values must be whole numbers 0..255.
- ``hu``: the values are HU (int or float), windowed by the model.

Every refusal is a :class:`PayloadError` (an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring
server answers HTTP 400 with its message), saying what to send instead.

Compact segmentation answers: :func:`encode_png` / :func:`decode_png` (base64 PNG, 0/255) and
:func:`mask_rle` / :func:`decode_rle` (run lengths, see :func:`mask_rle`).
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ichflow.data.windows import DEFAULT, Window, apply_window, from_metadata

INTENSITIES = ("auto", "uint8", "hu")
MAX_SLICE_PIXELS = 4096 * 4096          # a decoded PNG slice larger than this is refused (decompression bombs)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_GZIP_MAGIC = b"\x1f\x8b"
_DATA_URL = "base64,"


class PayloadError(MlflowException, ValueError):
    """A request the model cannot read as one scan; served as HTTP 400 with this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.__dict__["_own"] = self.message

    # The scoring server rewrites the message as "Failed to predict data '<the whole payload>'. Error: <ours>":
    # a 400 answer echoing megabytes of base64. Keep our message, without the payload.
    @property
    def message(self) -> str:
        return self.__dict__.get("_message", "")

    @message.setter
    def message(self, value: str) -> None:
        own = self.__dict__.get("_own")
        if own and value != own and value.endswith(own):
            value = f"Failed to predict: {own}"
        self.__dict__["_message"] = value


# what the served models' signatures say (MLflow checks nothing more: every form above passes, as_scan validates)
INPUT_DOC = ("ONE scan: uint8 (N, H, W) 8-bit slices in axial order windowed with the model's `window`, or a "
             "list of base64 PNG slices, or int16 HU (N, H, W) (windowed by the model; params intensity=hu when no "
             "value is outside 0..255), or one base64 .nii.gz volume; params intensity auto|uint8|hu")


def input_schema():
    """The input schema of every served model: ``Tensor('object', (-1,))``, which MLflow passes through
    unchanged (JSON integer tensors, lists of base64 strings, numpy arrays); :func:`as_scan` validates."""
    from mlflow.types.schema import Schema, TensorSpec

    return Schema([TensorSpec(np.dtype(object), (-1,))])


def intensity_param():
    from mlflow.types.schema import ParamSpec

    return ParamSpec("intensity", "string", "auto")


def model_window(config: dict | None) -> Window:
    """The window a served model applies to HU input: its ``model_config.json`` ``window`` (brain for models
    logged before it was recorded there: they were all trained on brain-windowed slices)."""
    return from_metadata(config)


def record_window(config: dict, metadata: dict | None = None) -> tuple[dict, dict]:
    """(config, metadata) both carrying the same ``window``: the config's, else the metadata's, else brain."""
    meta = dict(metadata or {})
    source = config if config.get("window") else (meta if meta.get("window") else {"window": DEFAULT})
    window = from_metadata(source).as_dict()
    return {**config, "window": window}, {**meta, "window": window}


def what_to_send(window: Window | None) -> str:
    shown = f"the model's window, {window}" if window is not None else "the model's window"
    return ("send ONE scan as uint8 slices (N, H, W) of whole numbers 0..255 (8-bit, windowed with "
            f"{shown}), a list of base64 PNG slices in axial order, or HU values (int16) with "
            "params {\"intensity\": \"hu\"}")


def check_intensity(value) -> str:
    key = str("auto" if value is None else value).strip().lower()
    if key not in INTENSITIES:
        raise PayloadError(f"params.intensity must be one of {', '.join(INTENSITIES)}; got {value!r}")
    return key


def as_scan(model_input, window: Window | None = None, intensity: str = "auto") -> np.ndarray:
    """(N, H, W) uint8 from any accepted form of one scan (see the module doc). ``window``: the model's window,
    needed for HU input (without it HU is refused). Raises :class:`PayloadError`."""
    x = model_input
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and intensity in ("auto", "uint8"):
        return _shape(x)                                     # the common case: nothing to decode
    intensity = check_intensity(intensity)
    if isinstance(x, dict) and len(x) == 1:                  # a named tensor from a serving payload
        x = next(iter(x.values()))
    if isinstance(x, pd.DataFrame):
        if x.shape[1] != 1:
            raise PayloadError(f"got a DataFrame of {x.shape[1]} columns: {what_to_send(window)}")
        x = x.iloc[:, 0].tolist()
    elif isinstance(x, pd.Series):
        x = x.tolist()
    if isinstance(x, (str, bytes)):
        x = [x]
    if isinstance(x, (list, tuple)):
        if x and all(isinstance(v, (str, bytes)) for v in x):
            return _decode_blobs(list(x), window, intensity)
        try:
            x = np.asarray(x)
        except ValueError:
            raise PayloadError(f"slices of different sizes or not numbers: {what_to_send(window)}") from None
    if not isinstance(x, np.ndarray):
        raise PayloadError(f"got {type(x).__name__}: {what_to_send(window)}")
    if x.dtype == object:
        flat = x.ravel()
        if flat.size and all(isinstance(v, (str, bytes)) for v in flat):
            return _decode_blobs(flat.tolist(), window, intensity)
        values, kind = _object_numbers(x, window)
    else:
        values, kind = x, _kind(x, window)
    return _to_uint8(_shape(values), kind, window, intensity, "input")


# ------------------------------------------------------------------------------------------------ numbers
def _shape(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise PayloadError(f"expected the slices of one scan as (N, H, W) or one slice (H, W), got shape "
                           f"{arr.shape}")
    if 0 in arr.shape:
        raise PayloadError(f"empty scan (shape {arr.shape})")
    return arr


def _kind(arr: np.ndarray, window) -> str:
    if arr.dtype == np.uint8:
        return "uint8"
    if arr.dtype.kind in "iu":
        return "int"
    if arr.dtype.kind == "f":
        return "float"
    raise PayloadError(f"values of type {arr.dtype}: {what_to_send(window)}")


def _object_numbers(arr: np.ndarray, window) -> tuple[np.ndarray, str]:
    """An object array of Python numbers (what MLflow makes of a JSON tensor) -> (values, int | float)."""
    try:
        values = np.array(arr.ravel().tolist()).reshape(arr.shape)   # flat: 3x faster than the nested lists
    except ValueError:
        values = None
    if values is None or values.dtype == object or values.dtype.kind not in "iuf":
        raise PayloadError(f"slices of different sizes or not numbers: {what_to_send(window)}")
    return values, ("int" if values.dtype.kind in "iu" else "float")


def _range(values: np.ndarray) -> tuple[float, float]:
    return float(values.min()), float(values.max())


def _to_uint8(values: np.ndarray, kind: str, window, intensity: str, source: str) -> np.ndarray:
    """8-bit slices from numbers of ``kind`` (uint8 | int | float | hu: a NIfTI's HU) under ``intensity``."""
    if kind == "uint8" and intensity != "hu":
        return values
    if kind in ("float", "hu") and not np.isfinite(values).all():
        raise PayloadError(f"{source}: {int((~np.isfinite(values)).sum())} value(s) are NaN or infinite")
    lo, hi = _range(values)
    as_hu = intensity == "hu" or (intensity == "auto" and (kind == "hu" or (kind == "int" and (lo < 0 or hi > 255))))
    if as_hu:
        if window is None:
            raise PayloadError(f"{source}: HU values ({lo:g}..{hi:g}) but no window to apply; send 8-bit slices")
        return apply_window(values, window)
    whole = kind in ("uint8", "int") or bool(np.all(np.mod(values, 1) == 0))
    if not whole:
        raise PayloadError(f"{source}: float values {lo:g}..{hi:g} that are not whole numbers are not 8-bit "
                           f"slices (a 0..1 image is refused, not cast to black): {what_to_send(window)}")
    if lo < 0 or hi > 255:
        what = "integer" if kind in ("int", "uint8") else "float"
        hint = ("" if kind in ("int", "uint8") else
                "; HU sent as floats need params {\"intensity\": \"hu\"}")
        raise PayloadError(f"{source}: {what} values {lo:g}..{hi:g} outside 0..255 with intensity={intensity}"
                           f"{hint}: {what_to_send(window)}")
    return np.rint(values).astype(np.uint8) if kind == "float" or kind == "hu" else values.astype(np.uint8)


# -------------------------------------------------------------------------------------------------- blobs
def _blob(item, k: int) -> bytes:
    """The file bytes of item ``k``: raw bytes of a PNG/NIfTI, or base64 text (optionally a data URL)."""
    if isinstance(item, bytes) and (item.startswith(_PNG_MAGIC) or item.startswith(_GZIP_MAGIC)
                                    or _is_raw_nifti(item)):
        return item
    text = item.decode("ascii", "replace") if isinstance(item, bytes) else item
    text = text.strip()
    if text.startswith("data:") and _DATA_URL in text[:100]:
        text = text.split(_DATA_URL, 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError(f"item {k}: a string that is not base64 (expected a base64 PNG slice or a base64 "
                           f".nii.gz volume): {what_to_send(None)}") from None


def _is_raw_nifti(data: bytes) -> bool:
    if len(data) < 348:
        return False
    return int.from_bytes(data[:4], "little") in (348, 540) or int.from_bytes(data[:4], "big") in (348, 540)


def _decode_blobs(items: list, window, intensity: str) -> np.ndarray:
    blobs = [_blob(item, k) for k, item in enumerate(items)]
    niftis = [k for k, b in enumerate(blobs) if b.startswith(_GZIP_MAGIC) or _is_raw_nifti(b)]
    if niftis:
        if len(blobs) != 1:
            raise PayloadError(f"{len(blobs)} items with a NIfTI among them (item {niftis[0]}): send ONE base64 "
                               "NIfTI volume per request, or a list of base64 PNG slices")
        return _to_uint8(_read_nifti_bytes(blobs[0]), "hu", window, intensity, "NIfTI")
    if intensity == "hu":
        raise PayloadError("PNG slices are 8-bit, not HU: leave params.intensity at auto (or uint8), or send HU "
                           "numbers / a base64 NIfTI with intensity=hu")
    slices = [_read_png(b, k) for k, b in enumerate(blobs)]
    shapes = sorted({s.shape for s in slices})
    if len(shapes) > 1:
        raise PayloadError(f"PNG slices of different sizes {shapes}: the slices of one scan share one size")
    return np.stack(slices)


def _read_png(data: bytes, k: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not data.startswith(_PNG_MAGIC):
        raise PayloadError(f"item {k}: not a PNG (nor a NIfTI): expected base64 PNG slices")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            if im.width * im.height > MAX_SLICE_PIXELS:
                raise PayloadError(f"item {k}: PNG of {im.width}x{im.height} pixels is larger than a CT slice")
            if im.mode in ("I;16", "I;16B", "I", "F"):
                raise PayloadError(f"item {k}: {im.mode} PNG (16/32-bit): expected an 8-bit windowed slice; send "
                                   "HU as int16 numbers with params {\"intensity\": \"hu\"} instead")
            if im.mode not in ("L", "P", "RGB", "RGBA", "LA", "1"):
                raise PayloadError(f"item {k}: unsupported PNG mode {im.mode!r}")
            im.load()
            return np.asarray(im.convert("L"))
    except PayloadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PayloadError(f"item {k}: unreadable or truncated PNG ({exc})") from None


def _read_nifti_bytes(data: bytes) -> np.ndarray:
    """HU (N, H, W) float32 of a NIfTI file's bytes, display-oriented (slices inferior -> superior)."""
    from ichflow.data.nifti import read_nifti
    from ichflow.errors import DataError

    suffix = ".nii.gz" if data.startswith(_GZIP_MAGIC) else ".nii"
    with tempfile.TemporaryDirectory(prefix="ichflow-payload-") as tmp:
        path = Path(tmp) / f"scan{suffix}"
        path.write_bytes(data)
        try:
            return read_nifti(path).hu
        except DataError as exc:
            raise PayloadError(f"NIfTI: {exc.problem}") from None


# ------------------------------------------------------------------------------------------ compact masks
def encode_png(mask: np.ndarray) -> str:
    """A (H, W) mask as a base64 8-bit grayscale PNG: 255 = lesion, 0 = background."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.where(np.asarray(mask) != 0, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """(H, W) uint8 of a base64 PNG (e.g. a mask of :func:`encode_png`)."""
    return _read_png(_blob(text, 0), 0)


def mask_rle(mask: np.ndarray) -> dict:
    """Run lengths of a (H, W) mask: ``{"size": [H, W], "counts": [c0, c1, ...]}``.

    COCO's uncompressed-RLE layout, but over the pixels in ROW-MAJOR order (row 0 left to right, then row 1..;
    numpy's C order; pycocotools uses column-major): ``c0`` background pixels, then ``c1`` lesion pixels, then
    ``c2`` background, ... (``c0`` is 0 when the first pixel is lesion); the counts sum to H * W. Decode:
    ``np.repeat(np.arange(len(counts)) % 2, counts).reshape(size)`` (:func:`decode_rle`).
    """
    flat = (np.asarray(mask) != 0).ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]]))
    if flat.size and flat[0]:
        counts = np.concatenate([[0], counts])
    return {"size": [int(s) for s in np.asarray(mask).shape], "counts": [int(c) for c in counts]}


def decode_rle(rle: dict) -> np.ndarray:
    """(H, W) uint8 0/1 mask of :func:`mask_rle`'s run lengths."""
    counts = np.asarray(rle["counts"], dtype=np.int64)
    return np.repeat((np.arange(len(counts)) % 2).astype(np.uint8), counts).reshape(rle["size"])


def neighbours(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the slice below and above each of ``n`` slices of one scan (ends replicated)."""
    idx = np.arange(n)
    return np.maximum(idx - 1, 0), np.minimum(idx + 1, n - 1)
