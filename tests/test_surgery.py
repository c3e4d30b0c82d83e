"""Model surgery and the way back, tested by use: new heads, other input channels and feature
maps against timm's (and torchvision's) own models, export to PyTorch with strict loading, the
in-memory path between the frameworks, saving what was fine-tuned, and the bad requests.

Models: a ResNet with a deep stem and attention (ecaresnet26t), a bottleneck ResNet (resnet50)
and GoogLeNet, the ResNets at one block per stage (every layer kind still present), at an odd,
non-square size. Each forward compiles once per framework and option, so each option runs in one
framework and the frameworks alternate over the options (every model sees both in every part).
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load
from typer.testing import CliRunner

import zoo
import zoo.equinox
import zoo.haiku
from cli import app
from converters.convert import convert_state_dict, convert_to_file
from converters.state_dict import load_state_dict
from converters.torch_models import torch_model
from converters.verify import inputs, reference_state_dict
from zoo.checked import ConversionError
from zoo.io import FormatError, read_metadata
from zoo.model import make_predict

from .conftest import cached_random_model, load_script, rel_err

L1 = dict(layers=(1, 1, 1, 1))
MODELS = {"ecaresnet26t": L1, "resnet50": L1, "googlenet": {}}
SIZE = (67, 81)
FRAMEWORKS = ("haiku", "equinox")

# Surgery options (scripts/surgery_parity.py's, which runs them all at full depth in both
# frameworks), each checked against the PyTorch model with the same options; the framework
# alternates with the model so that both frameworks see every option over the three models.
OPTIONS = dict(zip(("features", "features_1_3", "pooled", "unpooled", "gray", "rgbn_head7"),
                   load_script("surgery_parity").OPTIONS.values()))


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> dict[str, np.ndarray]:
    return load_state_dict(cached_random_model_l1(arch))


@functools.lru_cache(maxsize=3)
def cached_random_model_l1(arch: str):
    from converters.torch_models import random_model

    return random_model(arch, **MODELS[arch])


def _outputs(out) -> list:
    return [np.asarray(o) if not isinstance(o, torch.Tensor) else o.numpy()
            for o in (out if isinstance(out, (list, tuple)) else [out])]


def _framework(arch: str, option: str) -> str:
    return FRAMEWORKS[(list(OPTIONS).index(option) + list(MODELS).index(arch)) % 2]


def _full_plan(arch: str):
    from zoo import registry

    return registry.get_spec(arch, **MODELS[arch]).plan()


# GoogLeNet compiles slowly on CPU (5-12 s per option): it runs the options that cover each
# path once (its in_chans and new head together, num_classes=0 through the unpooled map).
CASES = [(arch, option) for arch in MODELS for option in OPTIONS
         if not (arch == "googlenet" and option in ("gray", "pooled"))]


@pytest.mark.parametrize("arch, option", CASES)
def test_surgery_matches_pytorch(arch, option):
    """Converted with the option, the network equals the PyTorch one built with it (timm's
    features_only FeatureListNet, its adapt_input_conv, reset_classifier; for torchvision's
    GoogLeNet the same surgery by hand) at every output."""
    surgery = OPTIONS[option]
    sd = checkpoint(arch)
    loaded = convert_state_dict(arch, sd, _framework(arch, option), overrides={**MODELS[arch], **surgery}).loaded
    reference = torch_model(arch, **MODELS[arch], **surgery)
    ref_sd = reference_state_dict(sd, _full_plan(arch), loaded)
    result = reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ref_sd.items()}, strict=False)
    assert not [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    assert not result.unexpected_keys
    x = inputs(2, SIZE, surgery.get("in_chans", 3))
    with torch.no_grad():
        ref = _outputs(reference(torch.from_numpy(x)))
    out = _outputs(make_predict(loaded)(x))
    assert [r.shape for r in ref] == [o.shape for o in out]
    for r, o in zip(ref, out):
        assert rel_err(r, o) <= 1e-5
    if surgery.get("features_only") and arch != "googlenet":
        # The levels are timm's feature_info: channels and reductions.
        levels = [loaded.plan.feature_info[i] for i in loaded.plan.out_indices]
        assert [f.num_chs for f in levels] == reference.feature_info.channels()
        assert [f.reduction for f in levels] == reference.feature_info.reduction()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each model converted to a zoo file, one per framework."""
    folder = tmp_path_factory.mktemp("surgery")
    return {(arch, fw): convert_to_file(arch, checkpoint(arch), fw, folder / f"{arch}-{fw}.safetensors",
                                        overrides=MODELS[arch])
            for arch in MODELS for fw in FRAMEWORKS}


def _named(framework: str, objects) -> dict[str, np.ndarray]:
    module = zoo.haiku if framework == "haiku" else zoo.equinox
    return {k: np.asarray(v) for k, v in module.named_arrays(*objects).items()}


@pytest.mark.parametrize("arch", list(MODELS))
def test_load_with_surgery_equals_convert_with_it(files, arch):
    """`load(path, num_classes=..., features_only=..., in_chans=...)` of a full file gives the same
    tensors as converting with those options (same seed for a new head), in either framework,
    from a file of either framework; GoogLeNet's aux heads follow num_classes."""
    cases = [dict(num_classes=10), dict(num_classes=0), dict(features_only=True, out_indices=(0, 2)),
             dict(in_chans=1)]
    for i, surgery in enumerate(cases):
        stored, target = FRAMEWORKS[i % 2], FRAMEWORKS[(i + 1) % 2]
        path = files[(arch, stored)]
        if target == "haiku":
            _, params, state = zoo.haiku.load(path, **surgery)
            got = _named(target, (params, state))
        else:
            got = _named(target, zoo.equinox.load(path, key=jax.random.key(0), **surgery))
        want = convert_state_dict(arch, checkpoint(arch), target, overrides={**MODELS[arch], **surgery}).arrays
        assert set(got) == set(want), surgery
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{surgery} {k}")
        if arch == "googlenet" and surgery.get("num_classes") == 10:
            assert {k for k in got if k.endswith("fc2.weight")} == {"aux1.fc2.weight", "aux2.fc2.weight"}
            assert all(got[k].shape[0 if target == "equinox" else 1] == 10 for k in got if k.endswith("fc2.weight"))


@pytest.mark.parametrize("arch", list(MODELS))
def test_export_round_trip_is_bit_exact(files, tmp_path, arch):
    """torch -> zoo -> torch: the timm / torchvision model loads the export with strict=True and
    holds the checkpoint's tensors bit for bit (num_batches_tracked is 0: zoo counts no steps),
    through .pth and .safetensors, from files of both frameworks; a file made by surgery exports
    what it has, into the PyTorch model built with the same options."""
    sd = checkpoint(arch)
    for fw, suffix in (("haiku", ".pth"), ("equinox", ".safetensors")):
        out = tmp_path / f"{fw}{suffix}"
        runner_result = CliRunner().invoke(app, ["export", str(files[(arch, fw)]), "--out", str(out)])
        assert runner_result.exit_code == 0, runner_result.output
        exported = (torch.load(out, weights_only=True) if suffix == ".pth"
                    else {k: torch.from_numpy(v) for k, v in st_load(str(out)).items()})
        model = torch_model(arch, **MODELS[arch])
        model.load_state_dict(exported, strict=True)
        for k, v in model.state_dict().items():
            if k.endswith("num_batches_tracked"):
                assert int(v) == 0
            else:
                np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)
    # Surgery: a new head and a feature extractor, exported from memory and from a file.
    _, params, state = zoo.haiku.load(files[(arch, "haiku")], num_classes=5)
    torch_model(arch, **MODELS[arch], num_classes=5).load_state_dict(
        {k: torch.from_numpy(v) for k, v in zoo.haiku.to_torch(params, state).items()}, strict=True)
    model, state = zoo.equinox.load(files[(arch, "equinox")], features_only=True, out_indices=(1, 2))
    zoo.equinox.save(tmp_path / "features.safetensors", model, state, arch=arch, **MODELS[arch],
                     features_only=True, out_indices=(1, 2))
    runner_result = CliRunner().invoke(app, ["export", str(tmp_path / "features.safetensors"),
                                             "--out", str(tmp_path / "features.pth")])
    assert runner_result.exit_code == 0, runner_result.output
    torch_model(arch, **MODELS[arch], features_only=True, out_indices=(1, 2)).load_state_dict(
        torch.load(tmp_path / "features.pth", weights_only=True), strict=True)


# GoogLeNet is left out here: its training step takes ~50 s to compile on 2 cores, and its
# training-mode parity (gradients, steps, statistics) is tests/test_training.py's; its export is
# checked bit for bit above.
TRAIN_FRAMEWORK = {"ecaresnet26t": "equinox", "resnet50": "haiku"}


@pytest.mark.parametrize("arch", list(TRAIN_FRAMEWORK))
def test_fine_tuned_model_exports_to_pytorch(files, arch):
    """A new head, a few SGD steps in JAX (batch statistics, running statistics updated), then
    `to_torch`: PyTorch loads it strictly and reproduces the JAX logits in inference."""
    import optax

    import zoo.training as zt

    fw = TRAIN_FRAMEWORK[arch]
    x = inputs(4, SIZE, seed=3)
    labels = jnp.arange(4) % 5
    if fw == "haiku":
        net, params, state = zoo.haiku.load(files[(arch, fw)], num_classes=5)
        model, images = net, jnp.asarray(x.transpose(0, 2, 3, 1))
    else:
        params, state = zoo.equinox.load(files[(arch, fw)], num_classes=5, key=jax.random.key(1))
        model, images = params, jnp.asarray(x)
    tx = optax.sgd(0.05, momentum=0.9)
    step = zt.make_train_step(model, tx)
    ts = zt.TrainState.create(params, state, tx)
    for i in range(3):
        ts, _ = step(ts, images, labels, jax.random.key(i))
    out = np.asarray(zt.make_eval_step(model)(ts, images, labels)["logits"])
    to_torch = zoo.haiku.to_torch if fw == "haiku" else zoo.equinox.to_torch
    exported = to_torch(ts.params, ts.state)
    reference = torch_model(arch, **MODELS[arch], num_classes=5)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    with torch.no_grad():
        ref = reference(torch.from_numpy(x)).numpy()
    assert rel_err(ref, out) <= 1e-5
    before = _named(fw, zoo.haiku.load(files[(arch, fw)], num_classes=5)[1:] if fw == "haiku"
                    else zoo.equinox.load(files[(arch, fw)], num_classes=5, key=jax.random.key(1)))
    assert not np.array_equal(before["fc.weight"], np.asarray(zoo.haiku.named_arrays(ts.params)["fc.weight"]
                                                               if fw == "haiku" else ts.params.fc.weight))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_feature_extractor_trains_like_pytorch(framework):
    """A features_only model in training mode: its gradients (of a loss on every feature map,
    through `to_torch`, name by name) and its updated BatchNorm statistics equal PyTorch's
    FeatureListNet's, computed in float64: each tensor within max(1e-3, 2x PyTorch fp32's own
    distance), test_training's criterion. PyTorch's fp32 run is the bar because one of
    layer1.0.bn2's outputs lies within fp32 rounding of zero, so which side of its ReLU it falls
    on is rounding's choice: PyTorch fp32 puts it on the other side from float64, and its
    layer1.0 gradients are 1.4e-3-2.4e-3 off (float64's are exact); zoo matched float64 or fp32
    as its reductions' order fell (YNNPACK's reductions, a max pool's form)."""
    arch = "ecaresnet26t"
    surgery = dict(features_only=True, out_indices=(0, 2))  # the truncated network: layer1-2
    converted = convert_state_dict(arch, checkpoint(arch), framework, overrides={**MODELS[arch], **surgery})
    x = inputs(4, SIZE, seed=5)
    if framework == "haiku":
        net = zoo.haiku.build(converted.loaded.plan)
        params, state = converted.objects

        def loss(p, s):
            feats, s = net.apply(p, s, None, jnp.asarray(x.transpose(0, 2, 3, 1)), is_training=True)
            return sum(jnp.mean(f ** 2) for f in feats), s

        (value, new_state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, state)
        got = zoo.haiku.to_torch(grads, new_state)
    else:
        model, state = converted.objects

        @eqx.filter_jit
        @functools.partial(eqx.filter_value_and_grad, has_aux=True)
        def loss(m, s):
            feats, s = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(jnp.asarray(x), s)
            return sum(jnp.mean(f ** 2) for f in feats), s

        (value, new_state), grads = loss(model, state)
        got = zoo.equinox.to_torch(grads, new_state)
    weights = reference_state_dict(checkpoint(arch), _full_plan(arch), converted.loaded)

    def torch_run(dtype):
        reference = torch_model(arch, **MODELS[arch], **surgery).to(dtype).train()
        reference.load_state_dict({k: torch.from_numpy(np.array(v, np.float64)).to(dtype) for k, v in weights.items()},
                                  strict=False)
        feats = reference(torch.from_numpy(x).to(dtype))
        sum((f ** 2).mean() for f in feats).backward()
        return {**{k: p.grad.double().numpy() for k, p in reference.named_parameters()},
                **{k: v.double().numpy() for k, v in reference.state_dict().items() if "running" in k}}

    want, fp32 = torch_run(torch.float64), torch_run(torch.float32)
    assert set(want) <= set(got) and not set(got) - set(want) - {k for k in got if "num_batches" in k}
    flat = lambda d: np.concatenate([np.ravel(d[k]) for k in sorted(want)])  # noqa: E731
    assert rel_err(flat(want), flat(got)) <= 1e-5
    bad = [f"{k}: zoo {rel_err(want[k], got[k]):.1e} > {bar:.1e}" for k in want
           if rel_err(want[k], got[k]) > (bar := max(1e-3, 2 * rel_err(want[k], fp32[k])))]
    assert not bad, bad


@pytest.mark.parametrize("arch", list(MODELS))
def test_in_memory_between_frameworks_and_save(files, tmp_path, arch):
    """Haiku params/state to an Equinox model and back without a file, bit-exact and checked;
    `save` writes a zoo file that loads in either framework, with `convert`'s metadata."""
    _, params, state = zoo.haiku.load(files[(arch, "haiku")])
    model, eqx_state = zoo.equinox.from_haiku(params, state, arch, **MODELS[arch])
    want = _named("equinox", zoo.equinox.load(files[(arch, "equinox")]))
    got = _named("equinox", (model, eqx_state))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    back = zoo.haiku.from_equinox(model, eqx_state, arch, **MODELS[arch])
    for k, v in _named("haiku", back).items():
        np.testing.assert_array_equal(v, _named("haiku", (params, state))[k], err_msg=k)
    with pytest.raises(ConversionError, match="do not fit resnet18"):
        zoo.equinox.from_haiku(params, state, "resnet18")

    path = zoo.equinox.save(tmp_path / "tuned.safetensors", model, eqx_state, arch=arch, **MODELS[arch])
    meta = read_metadata(path)
    assert meta["arch"] == arch and meta["framework"] == "equinox" and meta["bn_folded"] == "false"
    _, p2, s2 = zoo.haiku.load(path)
    for k, v in _named("haiku", (p2, s2)).items():
        np.testing.assert_array_equal(v, _named("haiku", (params, state))[k], err_msg=k)
    with pytest.raises(FileExistsError):
        zoo.haiku.save(path, params, state, arch=arch, **MODELS[arch])
    zoo.haiku.save(path, params, state, arch=arch, force=True, **MODELS[arch])
    assert read_metadata(path)["framework"] == "haiku"
    if arch == "resnet50":
        low = zoo.load(path, dtype=jnp.bfloat16)
        ref = zoo.load(path).predict(inputs(2, SIZE))
        assert rel_err(ref, low.predict(inputs(2, SIZE))) < 5e-2


def test_bad_requests_fail_with_one_clear_line(files, tmp_path):
    arch = "resnet50"
    path = files[(arch, "haiku")]
    with pytest.raises(ValueError, match="out_indices must be"):
        zoo.haiku.load(path, features_only=True, out_indices=(2, 5))
    with pytest.raises(ValueError, match="out_indices must be"):
        zoo.equinox.create(arch, key=jax.random.key(0), features_only=True, out_indices=(-1,))
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
        zoo.equinox.load(path, num_classes=-3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs num_classes=0"):
        zoo.haiku.create(arch, global_pool="")
    with pytest.raises(ValueError, match="needs in_chans=3"):
        zoo.haiku.create("googlenet", transform_input=True, in_chans=1)
    with pytest.raises(ValueError, match="a new classifier needs a `key`"):
        zoo.equinox.load(path, num_classes=3)
    # A features file cannot grow its missing stages back.
    feats = tmp_path / "feats.safetensors"
    convert_to_file(arch, checkpoint(arch), "equinox", feats, overrides={**MODELS[arch], "features_only": True,
                                                                          "out_indices": (1,)})
    with pytest.raises(ConversionError, match="missing: layer2"):
        zoo.haiku.load(feats, features_only=False, num_classes=10)
    # Tensors laid out for Equinox in a file whose metadata says Haiku.
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.numpy import save_file as st_save
    st_save(st_load(str(files[(arch, "equinox")])), str(wrong), metadata={**read_metadata(path)})
    with pytest.raises(FormatError, match="laid out for equinox"):
        zoo.load(wrong)
    # Folded: no PyTorch module tree to export to; one line, no file.
    folded = convert_to_file(arch, checkpoint(arch), "haiku", tmp_path / "folded.safetensors", fold_bn=True,
                             overrides=MODELS[arch])
    result = CliRunner().invoke(app, ["export", str(folded), "--out", str(tmp_path / "folded.pth")])
    assert result.exit_code == 1 and "folded" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "folded.pth").exists()
    _, params, state = zoo.haiku.load(folded)
    with pytest.raises(ValueError, match="folded"):
        zoo.haiku.to_torch(params, state)
    result = CliRunner().invoke(app, ["convert", arch, "-c", "x.pth", "-f", "haiku",
                                      "-o", str(tmp_path / "n.safetensors"), "--num-classes", "-3"])
    assert result.exit_code == 1 and "num_classes must be" in result.output
    assert not (tmp_path / "n.safetensors").exists()


def test_cli_convert_with_a_new_head_and_input_then_verify(tmp_path):
    """`zoo convert --num-classes --in-chans` then `zoo verify --converted`: the PyTorch side is
    the checkpoint's model with timm's adapted input conv and the file's new head."""
    arch = "resnet50"
    ckpt = tmp_path / "r.pth"
    torch.save(cached_random_model_l1(arch).state_dict(), ckpt)
    out = tmp_path / "r.safetensors"
    # The CLI has no --layers: this checkpoint is resnet50 at one block per stage, so go through
    # the API for the architecture option and the CLI for the rest.
    convert_to_file(arch, ckpt, "equinox", out, overrides={**MODELS[arch], "num_classes": 3, "in_chans": 2}, seed=4)
    meta = read_metadata(out)
    assert '"in_chans": 2' in meta["overrides"] and meta["num_classes"] == "3"
    from converters.verify import verify

    report = verify(arch, str(ckpt), "haiku", converted_file=str(out), size=SIZE, batch=2,
                    overrides=MODELS[arch])
    assert report.passed and report.rel <= 1e-5


def test_readme_surgery_snippet_runs(tmp_path, monkeypatch):
    """The README's surgery section, as written, on the file its main command makes."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Model surgery"):]
    section = section[:section.index("\n## ", 5)]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    convert_to_file("resnet50", cached_random_model("resnet50"), "haiku", tmp_path / "resnet50_haiku.safetensors")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert [m.shape for m in scope["maps"]] == [(2, 25, 33, 256), (2, 13, 17, 512), (2, 7, 9, 1024), (2, 4, 5, 2048)]
    assert read_metadata(tmp_path / "r50_maps.safetensors")["framework"] == "equinox"
    maps = zoo.load(tmp_path / "r50_maps.safetensors").predict(np.zeros((1, 3, 97, 129), np.float32))
    assert [m.shape for m in maps] == [(1, 256, 25, 33), (1, 512, 13, 17), (1, 1024, 7, 9), (1, 2048, 4, 5)]
