"""Reading checkpoints: file types, wrappers, prefixes, and clear errors."""

import numpy as np
import pytest
import torch

from converters.convert import convert
from converters.state_dict import CheckpointError, load_state_dict
from converters.torch_models import pretrained_state_dict
from zoo.checked import ConversionError

from .conftest import cached_random_model


@pytest.fixture(scope="module")
def sd():
    return cached_random_model("resnet18").state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_file_types(tmp_path, sd, suffix):
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    loaded = load_state_dict(path)
    assert set(loaded) == {k for k in sd if not k.endswith("num_batches_tracked")}
    np.testing.assert_array_equal(loaded["layer1.0.bn1.running_var"], sd["layer1.0.bn1.running_var"].numpy())


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd, "optimizer": {}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
], ids=["state_dict", "model", "ddp-prefix", "wrapped-and-prefixed", "compiled"])
def test_training_wrappers_are_unwrapped(tmp_path, sd, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(sd), path)
    converted = convert("resnet18", path, "haiku")
    np.testing.assert_array_equal(converted.arrays["fc.bias"], sd["fc.bias"].numpy())


def test_bfloat16_checkpoints_are_read(tmp_path, sd):
    path = tmp_path / "bf16.pth"
    torch.save({k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}, path)
    loaded = load_state_dict(path)
    assert loaded["conv1.weight"].dtype == np.float32


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": _Custom()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(path)


class _Custom:
    pass


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "ckpt.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        load_state_dict(tmp_path / "ckpt.h5")
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.pth")


def test_conversion_error_lists_all_problems(sd):
    broken = {k: v for k, v in sd.items() if k not in ("layer1.0.conv1.weight", "bn1.running_var")}
    broken["head.weight"] = torch.zeros(3)
    broken["fc.weight"] = torch.zeros(1000, 256)
    with pytest.raises(ConversionError) as e:
        convert("resnet18", broken, "haiku")
    err = e.value
    assert err.missing == ["bn1.running_var", "layer1.0.conv1.weight"]
    assert err.unexpected == ["head.weight"]
    assert [m[0] for m in err.misshaped] == ["fc.weight"]
    for name in ("bn1.running_var", "layer1.0.conv1.weight", "head.weight", "fc.weight"):
        assert name in str(err)


def test_wrong_architecture_is_refused(sd):
    with pytest.raises(ConversionError, match="does not fit resnet34"):
        convert("resnet34", sd, "equinox")


def test_unknown_architecture():
    with pytest.raises(KeyError, match="unknown model"):
        convert("resnet9000", {}, "haiku")


def test_pretrained_offline_says_to_pass_a_file(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="--checkpoint FILE"):
        pretrained_state_dict("resnet18")
