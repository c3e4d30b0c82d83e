"""Reading checkpoints: file types, wrappers, prefixes, and clear errors."""

import pickle

import numpy as np
import pytest
import torch

from converters.convert import convert
from converters.state_dict import CheckpointError, load_state_dict
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

    from converters import pretrained

    create = timm.create_model

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise ConnectionError("no network")
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(pretrained, "_reachable", lambda host, timeout=2.0: True)
    with pytest.raises(RuntimeError, match="--checkpoint FILE"):
        pretrained.fetch("resnet18")


# --- integrity: damaged files, wrong dtypes, non-finite values, files that are no state dict -----


def _flip_member_bytes(path, member_suffix: str, at: int = 100, n: int = 4) -> str:
    """XOR the low bit of `n` bytes at `at` in the data of the zip member ending in `member_suffix`
    (torch stores members uncompressed): the values stay finite floats, only the CRC tells."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + at
    for i in range(start, start + n):
        data[i] ^= 0x01
    path.write_bytes(bytes(data))
    return info.filename


def test_damaged_zip_member_is_refused(tmp_path):
    path = tmp_path / "damaged.pth"
    torch.save({"conv.weight": torch.randn(64, 64), "conv.bias": torch.randn(64)}, path)
    member = _flip_member_bytes(path, "data/0")
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert "damaged.pth" in msg and member in msg and "CRC" in msg and "\n" not in msg


def test_truncated_zip_is_refused(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.randn(256)}, path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(CheckpointError, match=r"cut\.pth is a truncated or corrupt zip archive"):
        load_state_dict(path)


def test_non_float_tensors_are_refused(tmp_path):
    bad = {f"layer{i}.weight": torch.zeros(2, dtype=torch.int64) for i in range(5)}
    bad["layer5.bias"] = torch.zeros(2, dtype=torch.bool)
    bad["layer6.weight"] = torch.zeros(2, dtype=torch.complex64)
    path = tmp_path / "ints.pth"
    torch.save({**bad, "fc.weight": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(3)}, path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert msg.startswith("ints.pth: 7 tensors must be floating point") and "\n" not in msg
    assert "layer0.weight (int64)" in msg and msg.endswith("and 2 more")
    assert "fc.weight" not in msg and "num_batches_tracked" not in msg
    for dtype, shown in [(torch.bool, "bool"), (torch.complex64, "complex64"), (torch.int8, "int8")]:
        with pytest.raises(CheckpointError, match=rf"tensor must be floating point but is not: w \({shown}\)$"):
            load_state_dict({"w": torch.zeros(2, dtype=dtype)})
    with pytest.raises(CheckpointError, match=r"w \(int32\)"):
        load_state_dict({"w": np.zeros(2, np.int32)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_read_as_float32(dtype):
    loaded = load_state_dict({"w": torch.ones(3, dtype=dtype), "bn.num_batches_tracked": torch.tensor(1)})
    assert set(loaded) == {"w"} and loaded["w"].dtype == np.float32


def test_nonfinite_values_are_refused(tmp_path):
    sd = {"conv.weight": torch.ones(4), "bn.running_var": torch.ones(4), "bn.running_mean": torch.zeros(4),
          "fc.bias": torch.ones(2, dtype=torch.float16)}
    sd["conv.weight"][1:3] = float("nan")
    sd["bn.running_var"][0] = float("inf")
    sd["fc.bias"][0] = float("-inf")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert msg.startswith("nan.pth: non-finite values in 3 tensors") and "\n" not in msg
    assert "conv.weight (2 NaN)" in msg and "bn.running_var (1 Inf)" in msg and "fc.bias (1 Inf)" in msg
    assert "bn.running_mean" not in msg and "allow_nonfinite" in msg
    loaded = load_state_dict(path, allow_nonfinite=True)
    assert np.isnan(loaded["conv.weight"]).sum() == 2
    with pytest.raises(CheckpointError, match="non-finite"):
        load_state_dict({"w": np.array([1.0, np.nan], np.float16)})


def test_nonfinite_checkpoint_through_convert_and_cli(tmp_path, sd):
    from typer.testing import CliRunner

    from cli import app

    broken = dict(sd)
    broken["layer1.0.bn1.running_var"] = sd["layer1.0.bn1.running_var"].clone()
    broken["layer1.0.bn1.running_var"][0] = float("nan")
    with pytest.raises(CheckpointError, match=r"layer1\.0\.bn1\.running_var \(1 NaN\)"):
        convert("resnet18", broken, "haiku")
    assert np.isnan(convert("resnet18", broken, "haiku", allow_nonfinite=True).arrays["layer1.0.bn1.running_var"]).any()

    path = tmp_path / "nan.pth"
    torch.save(broken, path)
    args = ["convert", "resnet18", "-c", str(path), "-f", "equinox", "-o", str(tmp_path / "out.safetensors")]
    runner = CliRunner()
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and refused.output.startswith("error: nan.pth: non-finite values in 1 tensor")
    assert "--allow-nonfinite" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "out.safetensors").exists()
    allowed = runner.invoke(app, [*args, "--allow-nonfinite"])
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "out.safetensors").exists()


def test_empty_file_is_refused(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"^empty\.pth is empty \(0 bytes\)"):
        load_state_dict(path)
    result = CliRunner().invoke(app, ["convert", "resnet18", "-c", str(path), "-f", "haiku",
                                      "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and result.output.startswith("error: empty.pth is empty (0 bytes)")
    assert "list index out of range" not in result.output


@pytest.mark.parametrize("exc, shown", [(EOFError(), "EOFError"), (RuntimeError("  \n "), "RuntimeError"),
                                        (KeyError(""), "KeyError"), (KeyError("unknown model 'x'\nmore"),
                                                                     "unknown model 'x'")])
def test_cli_error_without_a_message_shows_its_type(tmp_path, monkeypatch, exc, shown):
    from typer.testing import CliRunner

    import converters.convert
    from cli import app

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(converters.convert, "convert_to_file", fail)
    (tmp_path / "c.pth").write_bytes(b"x")
    result = CliRunner().invoke(app, ["convert", "resnet18", "-c", str(tmp_path / "c.pth"), "-f", "haiku",
                                      "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and result.output == f"error: {shown}\n"


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n" + bytes(64),  # an image renamed .pth
    pickle.dumps({"a": 1})[:-5],  # a damaged pickle
], ids=["png", "corrupt-pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_files_that_are_no_state_dict_get_no_unsafe_advice(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert msg.startswith("weights.pth is not a PyTorch state dict that can be read safely")
    assert "weights_only=False" not in msg and "weights_only` set to `False`" not in msg
    assert "Re-running" not in msg and "\n" not in msg


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
    _Net,
    lambda: {"model": _Net(), "epoch": 3},
], ids=["torch-module", "custom-module", "module-in-dict"])
def test_pickled_module_says_to_save_its_state_dict(tmp_path, make):
    path = tmp_path / "model.pth"
    torch.save(make(), path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert msg.startswith("model.pth holds a whole pickled model (") and "\n" not in msg
    assert msg.endswith("save it with torch.save(model.state_dict(), path) and convert that file")
    assert "weights_only=False" not in msg
