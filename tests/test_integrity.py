"""Files you can trust: a damaged or tampered zoo file never loads by accident, bad metadata is
one clear error naming the field, and `zoo info` checks what it shows. Each case is one that
loaded (or crashed) before these checks existed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from safetensors.numpy import load_file as st_load
from safetensors.numpy import save_file as st_save
from typer.testing import CliRunner

import zoo
import zoo.equinox
from cli import app
from converters.convert import convert_to_file
from zoo import registry
from zoo.checked import ConversionError
from zoo.io import FormatError, read_metadata

from .conftest import cached_random_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("integrity")
    return convert_to_file("resnet18", cached_random_model("resnet18"), "haiku", folder / "good.safetensors")


def _data_offset(path, key: str) -> int:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])[key]["data_offsets"][0]


def _info(path, *args):
    return CliRunner().invoke(app, ["info", str(path), *args])


def test_a_changed_weight_is_refused_naming_the_tensor(good, tmp_path):
    bad = tmp_path / "bad.safetensors"
    raw = bytearray(good.read_bytes())
    off = _data_offset(good, "layer3.1.conv1.weight")
    raw[off:off + 4] = (np.frombuffer(raw[off:off + 4], np.float32) + np.float32(1e-3)).tobytes()
    bad.write_bytes(raw)
    with pytest.raises(FormatError, match="tensor layer3.1.conv1.weight does not match the digest"):
        zoo.load(bad)
    with pytest.raises(FormatError, match="layer3.1.conv1.weight"):
        zoo.equinox.load(bad)
    zoo.equinox.load(bad, check=False)  # the escape, for speed
    result = _info(bad)
    assert result.exit_code == 1 and "does not match the digest" in result.output
    assert _info(bad, "--no-verify-digest").exit_code == 0


def test_zero_filled_and_truncated_files_are_refused(good, tmp_path):
    """What a killed writer leaves: the data zero-filled past some point, or cut short."""
    raw = good.read_bytes()
    zeroed = tmp_path / "zeroed.safetensors"
    cut = int(len(raw) * 0.2)
    zeroed.write_bytes(raw[:cut] + bytes(len(raw) - cut))
    with pytest.raises(FormatError, match="does not match the digest"):
        zoo.load(zeroed)
    assert _info(zeroed).exit_code == 1
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:cut])
    with pytest.raises(FormatError, match="lies outside the file"):
        zoo.load(truncated)
    for junk in (b"", b"\x01", b"\xff" * 8 + b"{}", b"\x04\x00\x00\x00\x00\x00\x00\x00[1]x"):
        (tmp_path / "junk.safetensors").write_bytes(junk)
        with pytest.raises(FormatError):
            zoo.load(tmp_path / "junk.safetensors")


def test_a_header_declaring_more_than_the_file_holds_is_refused_before_reading(good, tmp_path):
    """A few KB whose header declares a 6 GB tensor: refused from the header, in no time."""
    tensors, meta = st_load(str(good)), read_metadata(good)
    lying = tmp_path / "lying.safetensors"
    st_save({"fc.bias": tensors["fc.bias"]}, str(lying), metadata=meta)
    raw = bytearray(lying.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["junk"] = {"dtype": "F32", "shape": [1536, 1024, 1024], "data_offsets": [4000, 4000 + 6 * 2 ** 30]}
    text = json.dumps(header).encode()
    lying.write_bytes(len(text).to_bytes(8, "little") + text + bytes(raw[8 + n:]))
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match="'junk'.*lies outside the file"):
        zoo.load(lying)
    assert time.perf_counter() - t0 < 5
    # Within the file but not the architecture's: named from the header, before any data is read.
    extra = tmp_path / "extra.safetensors"
    st_save({**tensors, "junk": np.zeros(3, np.float32)}, str(extra), metadata=meta)
    with pytest.raises(ConversionError, match="1 unexpected: junk"):
        zoo.load(extra)


@pytest.mark.parametrize("field,value,message", [
    ("bn_folded", "yes", "'bn_folded' is 'yes'"),
    ("overrides", "{not json", "'overrides' is not JSON"),
    ("overrides", "[1, 2]", "'overrides' is not a JSON object"),
    ("overrides", '{"channels": [0, 128, 256, 512]}', "'overrides' does not describe a valid resnet18"),
    ("overrides", '{"num_classes": -3}', "num_classes must be"),
    ("overrides", '{"colour": 1}', "unknown ResNet spec option"),
    ("arch", "resent18", "did you mean: resnet18"),
    ("framework", "pytorch", "'framework' is 'pytorch'"),
    ("layout", "conv OIHW", "'layout' is 'conv OIHW'"),
    ("num_classes", "10", "'num_classes' is '10'"),
    ("source", "{", "'source' is not JSON"),
    ("digest", "{}", "'digest' is malformed"),
    ("format_version", "9", "format version 9 is not supported"),
])
def test_bad_metadata_is_one_error_naming_the_field(good, tmp_path, field, value, message):
    path = tmp_path / "m.safetensors"
    st_save(st_load(str(good)), str(path), metadata={**read_metadata(good), field: value})
    with pytest.raises(FormatError, match=message):
        zoo.load(path)
    result = _info(path)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) <= 2


def test_tensors_must_be_float32(good, tmp_path):
    tensors, meta = st_load(str(good)), read_metadata(good)
    for dtype in (np.float16, np.int64, np.bool_):
        path = tmp_path / "d.safetensors"
        st_save({**tensors, "fc.bias": tensors["fc.bias"].astype(dtype)}, str(path), metadata=meta)
        with pytest.raises(FormatError, match="float32 tensors; 1 are not: fc.bias"):
            zoo.load(path)


def test_version_1_files_without_a_digest_still_load(good, tmp_path):
    meta = {k: v for k, v in read_metadata(good).items() if k != "digest"}
    old = tmp_path / "v1.safetensors"
    st_save(st_load(str(good)), str(old), metadata={**meta, "format_version": "1"})
    zoo.load(old)
    assert json.loads(_info(old, "--json").output)["content_digest"].startswith("none")
    unversioned = tmp_path / "v2_no_digest.safetensors"
    st_save(st_load(str(good)), str(unversioned), metadata=meta)
    with pytest.raises(FormatError, match="lacks the content digest"):
        zoo.load(unversioned)


def test_info_shows_full_digests_and_dtypes(good):
    result = _info(good, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["dtypes"] == {"F32": summary["tensors"]} and summary["digest_checked"] is True
    assert len(summary["content_digest"]) == 64
    assert json.loads(summary["source"])["kind"] == "in-memory" and len(json.loads(summary["source"])["digest"]) == 64
    wide = _info(good)
    assert summary["content_digest"] in wide.output.replace("│", "").replace("\n", "").replace(" ", "")


def test_did_you_mean_uses_edit_distance():
    with pytest.raises(KeyError, match="did you mean: resnet18"):
        registry.get("resent18")
    with pytest.raises(KeyError, match="did you mean: googlenet"):
        registry.get("googlent")


def test_sparse_checkpoint_declaring_a_huge_unexpected_tensor_is_refused_from_its_header(tmp_path):
    """A .safetensors checkpoint of a few KB on disk whose header declares a 6 GB tensor (a sparse
    file: the bytes "exist" as a hole): refused as unexpected from the header, nothing allocated."""
    import tracemalloc

    from converters.convert import convert
    from converters.state_dict import load_state_dict

    sd = load_state_dict(cached_random_model("resnet18"))
    path = tmp_path / "sparse.safetensors"
    header = {k: {"dtype": "F32", "shape": list(v.shape), "data_offsets": [0, 0]} for k, v in sd.items()}
    offset = 0
    for k, v in sd.items():
        header[k]["data_offsets"] = [offset, offset + v.nbytes]
        offset += v.nbytes
    header["junk"] = {"dtype": "F32", "shape": [1536, 1024, 1024], "data_offsets": [offset, offset + 6 * 2 ** 30]}
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for v in sd.values():
            f.write(np.ascontiguousarray(v, np.float32).tobytes())
        f.truncate(8 + len(text) + offset + 6 * 2 ** 30)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ConversionError, match="1 unexpected: junk"):
        convert("resnet18", path, "haiku")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 10 and peak < 200 * 2 ** 20, (time.perf_counter() - t0, peak)


def test_verify_compares_the_recorded_source(tmp_path):
    """`zoo verify --converted f -c other.pth` used to PASS although f records another source."""
    import torch

    sd = cached_random_model("resnet18").state_dict()
    torch.save(sd, tmp_path / "a.pth")
    torch.save({**sd, "fc.bias": sd["fc.bias"] + 1}, tmp_path / "b.pth")
    converted = convert_to_file("resnet18", tmp_path / "a.pth", "equinox", tmp_path / "a.safetensors")
    args = ["verify", "resnet18", "-f", "equinox", "--converted", str(converted), "--size", "33", "35",
            "--batch", "1"]
    result = CliRunner().invoke(app, [*args, "-c", str(tmp_path / "b.pth")])
    assert result.exit_code == 1 and "converted from another checkpoint" in result.output, result.output
    result = CliRunner().invoke(app, [*args, "-c", str(tmp_path / "b.pth"), "--allow-other-source", "--json"])
    assert result.exit_code == 1 and json.loads(result.output)["passed"] is False  # compared, and differs
    result = CliRunner().invoke(app, [*args, "-c", str(tmp_path / "a.pth"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["passed"] is True
    # In memory: the state dict's digest is what is recorded and compared.
    from converters.verify import verify

    memory = convert_to_file("resnet18", sd, "haiku", tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="state-dict digest"):
        verify("resnet18", {**sd, "fc.bias": sd["fc.bias"] + 1}, "haiku", converted_file=str(memory),
               size=(33, 35), batch=1)


@pytest.mark.parametrize("args,message", [
    (["--size", "0", "0"], "--size must be positive"),
    (["--batch", "0"], "--batch and --size must be positive"),
    (["--device", "gpu"], "sees no GPU"),
])
def test_verify_arguments_fail_before_any_work(tmp_path, args, message):
    import jax

    if args[0] == "--device" and any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(app, ["verify", "resnet18", "-f", "haiku", "-c", str(tmp_path / "absent.pth"), *args])
    assert result.exit_code == 1 and message.split()[-1] in result.output and "absent" not in result.output


def test_pretrained_without_network_fails_fast_in_one_line(tmp_path, monkeypatch):
    import converters.pretrained as hub

    monkeypatch.setattr(hub, "_reachable", lambda host, timeout=2.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    __import__("timm"), __import__("torchvision")  # imports are not what is timed: the fetch is

    for arch in ("resnet18", "googlenet"):
        t0 = time.perf_counter()
        result = CliRunner().invoke(app, ["convert", arch, "--pretrained", "-f", "haiku", "-o",
                                          str(tmp_path / "p.safetensors")])
        assert result.exit_code == 1 and "not in the local cache at" in result.output
        assert ("models--timm--" if arch == "resnet18" else "googlenet-") in result.output  # the cache path tried
        assert len(result.output.strip().splitlines()) == 1 and time.perf_counter() - t0 < 10


def test_metadata_that_changes_the_network_is_refused(good, tmp_path):
    """Tensors intact, overrides changed to another valid network (blur-pooled): the digest of
    the fields that define the network catches it."""
    path = tmp_path / "aa.safetensors"
    st_save(st_load(str(good)), str(path), metadata={**read_metadata(good), "overrides": '{"aa": "blur"}'})
    with pytest.raises(FormatError, match="metadata .* was changed"):
        zoo.load(path)
    zoo.load(path, check=False)
