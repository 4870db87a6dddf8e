"""Packaged ImageNet weights: every tensor converted to timm's names, the same logits as the package's own
model, really loaded by the slice classifiers, cached once and written atomically."""

import os

import pytest
import torch

from ichflow.engine import pretrained
from ichflow.engine.pretrained import convert_efficientnet_lite, packaged_source_file, packaged_weights_file
from ichflow.errors import ParameterError
from ichflow.tasks import slice_classifier as sc

NAME = "efficientnet_lite0_imagenet"
TIMM_MODEL = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def source_state():
    return torch.load(packaged_source_file(NAME), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def converted(source_state):
    return convert_efficientnet_lite(source_state)


def _image() -> torch.Tensor:
    """A smooth deterministic 224x224 RGB pattern in [0, 1], normalised with the ImageNet mean / std."""
    axis = torch.linspace(-1, 1, 224)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    rgb = torch.stack([torch.sin(3 * xx + 2 * yy), torch.cos(4 * xx * yy), xx * yy]) * 0.5 + 0.5
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((rgb - mean) / std)[None]


def test_every_tensor_mapped_with_timm_shapes(source_state, converted):
    import timm

    target = timm.create_model(TIMM_MODEL).state_dict()
    assert len(converted) == len(source_state)
    real = {k for k in target if not k.endswith("num_batches_tracked")}
    assert {k for k in converted if not k.endswith("num_batches_tracked")} == real
    assert all(converted[k].shape == target[k].shape for k in converted)


def test_conversion_refuses_leftovers_gaps_and_shapes(source_state):
    extra = {**source_state, "_blocks.99._bn1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unmapped source keys: _blocks\.99\._bn1\.weight"):
        convert_efficientnet_lite(extra)
    gap = {k: v for k, v in source_state.items() if k != "_blocks.3._project_conv.weight"}
    with pytest.raises(ValueError, match=r"keys without a tensor: blocks\.2\.0\.conv_pwl\.weight"):
        convert_efficientnet_lite(gap)
    wrong = {**source_state, "_fc.bias": torch.zeros(10)}
    with pytest.raises(ValueError, match=r"shape differs: classifier\.bias \(10,\) vs \(1000,\)"):
        convert_efficientnet_lite(wrong)


def test_same_logits_as_the_package_model(source_state, converted):
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(source_state)
    model = timm.create_model(TIMM_MODEL, num_classes=1000, in_chans=3)
    model.load_state_dict(converted)
    x = _image()
    with torch.no_grad():
        expected, got = reference.eval()(x), model.eval()(x)
    diff = (got - expected).abs().max().item()
    print(f"max abs logit difference {diff:.3g} (logits up to {expected.abs().max().item():.3g})")
    assert diff < 1e-3
    assert got.topk(5).indices.tolist() == expected.topk(5).indices.tolist()


def test_build_model_loads_the_packaged_weights(converted):
    model = sc.build_model(TIMM_MODEL, 1, 2, NAME)
    state = model.state_dict()
    assert torch.equal(state["conv_stem.weight"], converted["conv_stem.weight"].sum(dim=1, keepdim=True))
    body = [k for k in converted if not k.startswith(("conv_stem.", "classifier."))]
    assert [k for k in body if not torch.equal(state[k], converted[k])] == []
    assert model.eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 2)


def test_packaged_weights_need_their_architecture():
    with pytest.raises(ParameterError, match="parameter pretrained: .*tf_efficientnet_lite0") as err:
        sc.check_model("resnet18", 3, NAME)
    assert "resnet18" in str(err.value)
    with pytest.raises(ParameterError, match=NAME):
        sc.check_model("resnet18", 3, "imagenet")     # the download request names the offline alternative
    sc.check_model(TIMM_MODEL, 1, NAME)


def test_cache_reused_and_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("ICHFLOW_WORK_DIR", str(tmp_path))
    folder = tmp_path / "cache" / "pretrained"
    real_save = torch.save

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(pretrained.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        packaged_weights_file(NAME)
    assert list(folder.iterdir()) == []                 # nothing half-written left behind

    monkeypatch.setattr(pretrained.torch, "save", real_save)
    first = packaged_weights_file(NAME)
    assert first.parent == folder and first.name.startswith(f"{NAME}-")
    assert os.listdir(folder) == [first.name]
    mtime = first.stat().st_mtime_ns
    assert packaged_weights_file(NAME) == first
    assert first.stat().st_mtime_ns == mtime


def test_entry_points_accept_the_packaged_name_and_refuse_it_for_another_architecture():
    """What `-P pretrained=efficientnet_lite0_imagenet` goes through before any run opens."""
    import subprocess
    import sys
    from pathlib import Path

    from ichflow.tasks.classification import ClassificationConfig
    from ichflow.tasks.classification.train import ClassificationRecipe
    from ichflow.tasks.common import validate_train_config

    cfg = ClassificationConfig(model="tf_efficientnet_lite0", pretrained=NAME)
    validate_train_config(cfg)
    ClassificationRecipe().validate(cfg)
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "pipelines" / "classification.py"), "--pretrained", NAME,
                          "--model", "resnet18"], capture_output=True, text=True, cwd=repo)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [f"error: parameter pretrained: {NAME} needs "
                                               "model=tf_efficientnet_lite0; got model=resnet18"]
