"""Pretrained weights by name, offline: caches laid out by the test in the hubs' own on-disk formats
(huggingface_hub's `models--timm--NAME/{refs,snapshots}`, torch.hub's `checkpoints/`), holding random
weights with randomised BatchNorm statistics; the recorded preprocessing; `zoo predict` against
the PyTorch model on real photographs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from converters import pretrained as hub
from tests.conftest import cached_random_model
from zoo.io import read_metadata

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hf_cache(root: Path, repo: str, state_dict) -> Path:
    """huggingface_hub's cache layout: refs/main names the snapshot that holds the files."""
    from safetensors.torch import save_file

    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snap / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    from PIL import Image
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    out = []
    for name, suffix in (("chelsea", "jpg"), ("coffee", "png"), ("astronaut", "jpg")):
        path = d / f"{name}.{suffix}"
        Image.fromarray(getattr(data, name)()).save(path)
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory) -> Path:
    """`zoo convert test_resnet.r160_in1k --pretrained` in a fresh process whose only source is a
    hub cache laid out here, with HF_HUB_OFFLINE=1: timm's and huggingface_hub's real lookup."""
    d = tmp_path_factory.mktemp("hf")
    model = cached_random_model("test_resnet")
    cache = _hf_cache(d / "hub", "timm/test_resnet.r160_in1k", model.state_dict())
    out = d / "tr.safetensors"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "ZOO_COMPILATION_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-c", "from cli import app; app()", "convert", "test_resnet.r160_in1k",
                           "--pretrained", "-f", "haiku", "-o", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


def test_timm_tag_from_a_laid_out_hub_cache(timm_file):
    meta = read_metadata(timm_file)
    cfg = json.loads(meta["pretrained_cfg"])
    assert cfg == {"input_size": [3, 160, 160], "interpolation": "bilinear", "crop_pct": 0.95, "crop_mode": "center",
                   "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": 1000,
                   "label_set": "imagenet-1k", "tag": "r160_in1k"}
    source = json.loads(meta["source"])
    assert source["kind"] == "pretrained" and source["name"] == "test_resnet.r160_in1k"
    assert source["hf_hub_id"] == "timm/test_resnet.r160_in1k"


def test_predict_matches_pytorch_on_photos(timm_file, photos):
    """The same top-5 as PyTorch (the file's weights strictly loaded into timm's model, timm's own
    transforms on the same files), probabilities within 1e-5."""
    result = CliRunner().invoke(app, ["predict", str(timm_file), *photos, "--top", "5", "--json", "--reference"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert len(out["images"]) == 3 and out["label_set"] == "imagenet-1k"
    for row in out["images"]:
        assert [t["index"] for t in row["top"]] == [t["index"] for t in row["reference_top"]]
        assert len(row["top"]) == 5 and all(isinstance(t["name"], str) and t["name"] for t in row["top"])
    assert out["reference"]["same_top_all"] and out["reference"]["max_abs_prob_diff"] < 1e-5
    table = CliRunner().invoke(app, ["predict", str(timm_file), photos[0], "--top", "3"])
    assert table.exit_code == 0 and out["images"][0]["top"][0]["name"].split(",")[0] in table.output


def test_predict_uses_the_recorded_preprocessing(timm_file, photos):
    """Its logits are those of the model on zoo's preprocessing of the recorded config (160 px,
    crop 0.95, mean/std 0.5), which equals timm's transform: the file's config is what is used."""
    import torch
    from PIL import Image
    from timm.data import create_transform

    import zoo

    model = zoo.load(timm_file)
    x = model.preprocess(photos[1])
    assert x.shape == (3, 160, 160)
    t = create_transform(input_size=(3, 160, 160), interpolation="bilinear", crop_pct=0.95,
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with Image.open(photos[1]) as im:
        np.testing.assert_array_equal(x, t(im.convert("RGB")).numpy())
    logits = np.asarray(model.predict(x[None]))
    ref = cached_random_model("test_resnet")(torch.from_numpy(x[None])).detach().numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_torchvision_weights_from_a_laid_out_torch_hub_cache(tmp_path, monkeypatch, photos):
    """`--weights IMAGENET1K_V1` through torchvision's loader, from torch.hub's checkpoints folder
    (offline: the cached file is used as torchvision would use a downloaded one); the preset's
    resize 256 / crop 224 and labels are recorded and predict agrees with torchvision's model and
    transforms."""
    import torch
    import torchvision

    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hub, "_reachable", lambda host, timeout=2.0: False)
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(w.url)
    ckpt.parent.mkdir(parents=True)
    model = cached_random_model("resnet18", "torchvision")
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "r18.safetensors"
    result = CliRunner().invoke(app, ["convert", "resnet18", "--weights", "IMAGENET1K_V1", "-f", "equinox",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    cfg = json.loads(read_metadata(out)["pretrained_cfg"])
    assert cfg["resize_size"] == [256] and cfg["input_size"] == [3, 224, 224] and cfg["weights"] == "IMAGENET1K_V1"
    assert cfg["label_set"] == "imagenet-1k" and cfg["interpolation"] == "bilinear"
    result = CliRunner().invoke(app, ["predict", str(out), *photos[:2], "--json", "--reference"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["reference"]["same_top_all"]
    # A missing cache entry offline: one line naming the path tried.
    ckpt.unlink()
    result = CliRunner().invoke(app, ["convert", "resnet18", "--weights", "IMAGENET1K_V1", "-f", "haiku",
                                      "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert ckpt.name in result.output and "not in the local cache" in result.output


def test_names_tags_and_weights_are_checked_before_any_download():
    assert hub.resolve("resnet50.a1_in1k") == ("resnet50", "timm", "a1_in1k")
    assert hub.resolve("resnet50", weights="IMAGENET1K_V2") == ("resnet50", "torchvision", "IMAGENET1K_V2")
    assert hub.resolve("googlenet") == ("googlenet", "torchvision", "DEFAULT")
    with pytest.raises(ValueError, match="tags: .*a1_in1k"):
        hub.resolve("resnet50.zz_in1k")
    with pytest.raises(ValueError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        hub.resolve("resnet50", weights="IMAGENET1K_V9")
    with pytest.raises(KeyError, match="did you mean"):
        hub.resolve("resent50.a1_in1k")
    result = CliRunner().invoke(app, ["convert", "resnet50.a1_in1k", "-c", "x.pth", "-f", "haiku", "-o", "y"])
    assert result.exit_code == 1 and "--pretrained" in result.output


def test_list_pretrained():
    result = CliRunner().invoke(app, ["list", "resnet50", "--pretrained", "--json"])
    rows = json.loads(result.output)
    names = {r["name"] for r in rows}
    assert {"resnet50.a1_in1k", "resnet50.tv2_in1k", "resnet50 --weights IMAGENET1K_V2"} <= names
    assert all(r["model"] == "resnet50" for r in rows)


def test_data_config_for_own_checkpoints(tmp_path):
    """--data-config: a pretrained name's preprocessing, JSON, or a JSON file; recorded, digested
    (a changed config is refused), and kept through load-time surgery without its label set."""
    import torch

    import zoo
    from zoo._format import FormatError

    ckpt = tmp_path / "own.pth"
    torch.save(cached_random_model("test_resnet").state_dict(), ckpt)
    out = tmp_path / "own.safetensors"
    result = CliRunner().invoke(app, ["convert", "test_resnet", "-c", str(ckpt), "-f", "haiku", "-o", str(out),
                                      "--data-config", "resnet50.a1_in1k"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(read_metadata(out)["pretrained_cfg"])
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.95 and cfg["tag"] == "a1_in1k"
    m = zoo.load(out, framework="equinox")
    assert m.preprocess(np.zeros((300, 200, 3), np.uint8)).shape == (3, 224, 224)

    from safetensors.numpy import load_file as st_load, save_file as st_save

    changed = tmp_path / "changed.safetensors"
    meta = read_metadata(out)
    st_save(st_load(str(out)), str(changed), metadata={**meta, "pretrained_cfg": meta["pretrained_cfg"].replace(
        "bicubic", "nearest")})
    with pytest.raises(FormatError, match="pretrained_cfg"):
        zoo.load(changed)

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"input_size": [3, 96, 128], "interpolation": "bilinear", "crop_pct": 1.0}))
    result = CliRunner().invoke(app, ["convert", "test_resnet", "-c", str(ckpt), "-f", "haiku", "-o", str(out),
                                      "--data-config", str(cfg_file), "--num-classes", "7", "--force"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(read_metadata(out)["pretrained_cfg"])
    assert cfg["input_size"] == [3, 96, 128] and cfg["num_classes"] == 7 and "label_set" not in cfg
    bad = CliRunner().invoke(app, ["convert", "test_resnet", "-c", str(ckpt), "-f", "haiku", "-o", str(out),
                                   "--data-config", '{"interpolation": "cubic-ish"}', "--force"])
    assert bad.exit_code == 1 and "interpolation" in bad.output

    # A new 7-class head: no label set, so predict shows class indices at the recorded size.
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.full((50, 70, 3), 128, np.uint8)).save(image)
    result = CliRunner().invoke(app, ["predict", str(out), str(image), "--json", "--top", "3"])
    got = json.loads(result.output)
    assert got["label_set"] is None and [t["name"] for t in got["images"][0]["top"]] == [
        str(t["index"]) for t in got["images"][0]["top"]]
    features = tmp_path / "features.safetensors"
    CliRunner().invoke(app, ["convert", "test_resnet", "-c", str(ckpt), "-f", "haiku", "-o", str(features),
                             "--num-classes", "0"])
    result = CliRunner().invoke(app, ["predict", str(features), str(image)])
    assert result.exit_code == 1 and "not class scores" in result.output
