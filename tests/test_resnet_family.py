"""timm's ResNet family: every model built on `timm.models.resnet.ResNet`.

Registry coverage against timm's own list, parity of small variants that together exercise every
spec option (both frameworks, BatchNorm folded and not, odd non-square sizes), training mode
against timm's, the training-only parts, the new numerics against timm's layers, and pruned
widths. The registered CI models themselves run in tests/test_parity.py; the whole family runs
in the slow sweep at the end (scripts/sweep_resnets.py).
"""

import copy
import functools
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from timm.layers import BlurPool2d

import zoo.equinox
import zoo.haiku
from converters.convert import consume_fixed_buffers, convert_state_dict, infer_overrides
from converters.state_dict import load_state_dict
from converters.torch_models import randomize_norms
from converters.verify import verify
from zoo import ConversionError, ops, registry
from zoo.spec import BlurSpec, ResNetSpec, eca_kernel_size, make_divisible, timm_pruned_widths

from .conftest import close_to_float64, jax_train_forward, load_script, torch_train_step

ODD = (69, 93)
# Odd and non-square, and even at every stride-2 stage: timm's avg anti-aliasing (AvgPool2d(2))
# and its avg_down shortcut (ceil_mode) give different sizes otherwise, and PyTorch fails.
AA_ODD = (63, 95)
L1 = dict(layers=(1, 1, 1, 1))


def _sweep():
    return load_script("sweep_resnets")


def _family() -> list[str]:
    return [n for n in registry.list_models() if isinstance(registry.get(n).spec, ResNetSpec)]


def _reference(name: str, seed: int = 0, **timm_kwargs):
    """timm's model with random weights and randomised norm statistics, eval mode."""
    torch.manual_seed(seed)
    return randomize_norms(timm.create_model(name, pretrained=False, **timm_kwargs).eval(), seed)


# --- registry coverage ------------------------------------------------------------------------


def test_registry_is_timms_resnet_family():
    """The registry's ResNet family is exactly timm's list (enumerated now, from timm) minus the
    documented exclusions, which are none."""
    sweep = _sweep()
    timm_names = sweep.timm_resnet_names()
    assert len(timm_names) >= 100
    assert sweep.EXCLUDED == {}
    assert sorted(_family()) == sorted(set(timm_names) - set(sweep.EXCLUDED))
    assert all(registry.get(n).timm == n for n in _family())


def test_enumeration_agrees_with_isinstance():
    """The fast enumeration (a probe in timm's builder) agrees with building models and asking
    isinstance, on a sample of families with and without ResNet classes, and hybrids whose
    backbone is a ResNet but which are not."""
    from timm.models.resnet import ResNet

    names = set(_sweep().timm_resnet_names())
    sample = ["resnet18", "skresnet18", "res2net50_14w_8s", "resnest14d", "ecaresnet50d_pruned",
              "resnetv2_50", "vit_small_resnet26d_224", "regnetx_002", "cspresnet50", "legacy_seresnet18"]
    for name in sample:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        assert (name in names) == isinstance(model, ResNet), name


def test_ci_subset_exercises_every_option():
    specs = [registry.get_spec(n) for n in _family() if registry.get(n).ci]
    seen = {
        "stem_type": {s.stem_type for s in specs}, "attn": {s.attn for s in specs}, "aa": {s.aa for s in specs},
        "norm": {s.norm_layer for s in specs}, "blocks": {b for s in specs for b in s.blocks},
        "avg_down": {s.avg_down for s in specs},
    }
    assert seen["stem_type"] >= {"", "deep", "deep_tiered"}
    assert seen["attn"] >= {"", "se", "eca"}
    assert seen["aa"] >= {"", "blur"}  # avg anti-aliasing needs even sizes: AA variants below
    assert seen["norm"] == {"batchnorm", "groupnorm"}
    assert seen["blocks"] == {"basic", "bottleneck", "res2net", "sk_basic", "resnest"}
    assert seen["avg_down"] == {False, True}


# --- parity of option variants ----------------------------------------------------------------

# (timm name, timm kwargs, zoo overrides, size): small variants covering what the CI models do not.
VARIANTS = {
    "stem-conv-pool+se0.25": ("resnetrs50", L1, L1, ODD),
    "stem-conv-pool+blur": ("resnet10t", dict(replace_stem_pool=True, aa_layer=BlurPool2d),
                            dict(replace_stem_pool=True, aa="blur"), ODD),
    "stem-conv-pool+avg-aa": ("resnet10t", dict(replace_stem_pool=True, aa_layer=torch.nn.AvgPool2d),
                              dict(replace_stem_pool=True, aa="avg"), AA_ODD),
    "avg-aa-stem+bottleneck": ("resnetaa50d", L1, L1, AA_ODD),
    "blur-bottleneck": ("resnetblur50d", L1, L1, ODD),
    "3x3-down+reduce-first+dilated": ("senet154", dict(L1, output_stride=16), dict(L1, output_stride=16), ODD),
    "blur-dilated-stride1": ("resnetblur18", dict(output_stride=8), dict(output_stride=8), ODD),
    "avg-down-dilated": ("resnet26d", dict(L1, output_stride=8), dict(L1, output_stride=8), ODD),
    "eca-plain-stem-avg-down": ("ecaresnetlight", L1, L1, ODD),
    "res2next": ("res2next50", L1, L1, ODD),
    "resnest-radix4-avd-first": ("resnest50d_4s2x40d", L1, L1, ODD),
    "resnest-radix1": ("resnest50d_1s4x24d", L1, L1, ODD),
    "sk-bottleneck-nosplit": ("skresnext50_32x4d", L1, L1, ODD),
    "pruned": ("ecaresnet50d_pruned", {}, {}, ODD),
}


@functools.lru_cache(maxsize=1)
def _variant_model(key: str):
    name, timm_kwargs, _, _ = VARIANTS[key]
    return _reference(name, **timm_kwargs)


def _alternate(keys):
    """Every key in both frameworks, folded in one of them (alternating), so both frameworks run
    folded and not across the variants at half the cost of all four combinations each."""
    return [pytest.param(k, fw, (i + j) % 2 == 1, id=f"{k}-{fw}-{'folded' if (i + j) % 2 else 'bn'}")
            for i, k in enumerate(keys) for j, fw in enumerate(["haiku", "equinox"])]


@pytest.mark.parametrize("key,framework,fold_bn", _alternate(VARIANTS))
def test_variant_parity(key, framework, fold_bn):
    name, _, overrides, size = VARIANTS[key]
    model = _variant_model(key)
    report = verify(name, model, framework, fold_bn=fold_bn, batch=2, size=size, precision="highest",
                    overrides=overrides, reference=model)
    _assert_parity(name, model, report, overrides)


def _assert_parity(name, model, report, overrides=None):
    """The sweep's bar: within 1e-5 of PyTorch fp32 with the same top-1. A failure says whether
    the port computes a different function (float64 disagrees) or fp32 rounding is the cause."""
    sweep = _sweep()
    if sweep.judge(report.rel, report.top1):
        return
    f64 = sweep.float64_check(name, model, load_state_dict(model), report.framework, fold_bn=report.fold_bn,
                              size=report.size, batch=report.batch, overrides=overrides)
    pytest.fail(f"{report}: {sweep.diagnose(f64)}")


@pytest.mark.parametrize("key,framework,fold_bn", [("resnest-radix4-avd-first", "haiku", False),
                                                   ("sk-bottleneck-nosplit", "equinox", True),
                                                   ("stem-conv-pool+se0.25", "equinox", False)])
def test_float64_parity(key, framework, fold_bn):
    """In float64 (jax_enable_x64) the ports compute timm's function to rounding (~1e-13): the
    sweep's diagnosis of a failure, shown to be that tight."""
    name, _, overrides, size = VARIANTS[key]
    model = _variant_model(key)
    f64 = _sweep().float64_check(name, model, load_state_dict(model), framework, fold_bn=fold_bn, size=size,
                                 overrides=overrides)
    assert f64["f64_rel"] <= 1e-11, f64


# The smallest of the scaled-down residual branches (resnet101: 33 blocks, so branch ends at
# 0.14x) and same-shaped tensors: a mapping that confused them would pass a shape check.
MISROUTED = {
    "neighbouring-blocks": ("layer3.10.conv2.weight", "layer3.11.conv2.weight"),
    "branch-end-stats": ("layer3.20.bn3.running_mean", "layer3.20.bn3.running_var"),
    "branch-end-affine": ("layer3.20.bn3.weight", "layer3.20.bn3.bias"),
    "inner-norm-means": ("layer4.2.bn1.running_mean", "layer4.2.bn2.running_mean"),
}


@functools.lru_cache(maxsize=1)
def _deep_reference():
    """resnet101, its state dict, and the true mapping's report (the control, checked once)."""
    model = _reference("resnet101")
    sd = load_state_dict(model)
    return model, sd, verify("resnet101", sd, "haiku", batch=2, size=ODD, reference=model)


@pytest.mark.parametrize("key", MISROUTED)
def test_misrouted_tensor_fails_parity(key):
    """The randomised references stay sensitive to mapping errors where they are least so, in the
    down-scaled residual branches of a deep model: two swapped tensors move the logits by 100x
    the tolerance or more, while the true mapping passes. A running mean swapped into a variance
    is negative in places, and PyTorch's logits are then NaN; zoo's are NaN too, which counts as
    moved (zoo's CPU programs before the ninth session, and JAX's default ones while ReLU was a
    maximum, gave finite logits there: their YNNPACK fusions did not carry the NaN through)."""
    model, sd, good = _deep_reference()
    a, b = MISROUTED[key]
    assert sd[a].shape == sd[b].shape
    swapped = dict(sd, **{a: sd[b], b: sd[a]})
    bad = verify("resnet101", swapped, "haiku", batch=2, size=ODD, reference=model)
    assert good.passed and good.rel <= 1e-5, good
    assert not bad.passed and not bad.rel < 1e-3, bad  # NaN included


# --- training mode ----------------------------------------------------------------------------


# One small model per option, drop rates 0: (timm name, timm kwargs, zoo overrides).
TRAIN = {
    "se+stem-conv-pool": ("resnetrs50", L1, L1),
    "eca+blur": ("ecaresnet26t", dict(L1, aa_layer=BlurPool2d), dict(L1, aa="blur")),
    "avg-aa": ("resnetaa50d", L1, L1),
    "groupnorm": ("resnet50_gn", L1, L1),
    "res2net": ("res2net50_26w_4s", L1, L1),
    "resnest": ("resnest50d_4s2x40d", L1, L1),
    "sk-basic": ("skresnet18", L1, L1),
    "per-stage-blocks": ("test_resnet", {}, {}),
    "sk-bottleneck": ("skresnext50_32x4d", L1, L1),
    "3x3-down+reduce-first": ("senet154", L1, L1),
    "pruned": ("ecaresnet50d_pruned", {}, {}),
}


@pytest.mark.parametrize("key,framework", [(k, ["haiku", "equinox"][i % 2]) for i, k in enumerate(TRAIN)])
def test_training_forward_matches_timm(key, framework):
    """One option per model, the frameworks alternating (both run the same block code paths in
    the variant parity tests above)."""
    name, timm_kwargs, overrides = TRAIN[key]
    model = _reference(name, seed=1, **timm_kwargs)
    converted = convert_state_dict(name, load_state_dict(model), framework, overrides=overrides)
    x = np.random.default_rng(1).standard_normal((4, 3, *AA_ODD)).astype(np.float32)
    ref32, sd32 = torch_train_step(model, x)
    ref64, sd64 = torch_train_step(copy.deepcopy(model).double(), x)
    out, named = jax_train_forward(converted, framework, x)
    ok, errs = close_to_float64(ref64, ref32, out)
    assert ok, f"logits: ours {errs[0]:.2e} vs PyTorch fp32 {errs[1]:.2e} from float64"
    stats = [k for k in sd64 if k.endswith(("running_mean", "running_var"))]
    assert len(stats) >= (0 if key == "groupnorm" else 10)
    for k in stats:
        ok, errs = close_to_float64(sd64[k], sd32[k], np.asarray(named[k]))
        assert ok, f"{k}: ours {errs[0]:.2e} vs PyTorch fp32 {errs[1]:.2e} from float64"


# --- training-only parts: drop path, DropBlock, dropout ---------------------------------------


def _timm_drop_modules(model):
    """{block name: (drop path rate, [(drop_prob, block_size, gamma_scale) of its DropBlocks])}."""
    from timm.layers import DropBlock2d, DropPath

    out = {}
    for si in range(1, 5):
        for bi, block in enumerate(getattr(model, f"layer{si}")):
            dp = block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0
            dbs = sorted({(m.drop_prob, m.block_size, m.gamma_scale) for m in block.modules()
                          if isinstance(m, DropBlock2d)})
            out[f"layer{si}.{bi}"] = (dp, dbs)
    return out


@pytest.mark.parametrize("name", ["resnet26", "res2net50_26w_4s", "resnest14d", "skresnet18", "test_resnet"])
def test_drop_rates_placed_as_timm(name):
    """Drop path follows make_blocks' linear rule, DropBlock sits in stages 3 and 4 with timm's
    block sizes and gamma scales (inside the split attention / kernel paths where timm puts it)."""
    rates = dict(drop_path_rate=0.2, drop_block_rate=0.1)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **rates)
    theirs = _timm_drop_modules(model)
    plan = registry.get_spec(name, **rates).plan()
    ours = {b.name: (b.drop_path, [] if b.drop_block is None else
                     [(b.drop_block.rate, b.drop_block.block_size, b.drop_block.gamma_scale)])
            for stage in plan.stages for b in stage}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k][0] == pytest.approx(theirs[k][0], abs=1e-12), k
        assert ours[k][1] == theirs[k][1], k


@pytest.mark.parametrize("even", [False, True], ids=["odd-block", "even-block"])
def test_drop_block_matches_timm(monkeypatch, even):
    """ops.drop_block against timm's drop_block_2d on the same block centres (timm's Bernoulli draw
    replaced by ours), NHWC with a batch and per-example under vmap with a batch axis name."""
    from timm.layers.drop import drop_block_2d

    rng = np.random.default_rng(0)
    h, w = (4, 7) if even else (9, 11)  # 4 < block size 5: an even block, PyTorch's offset case
    x = rng.standard_normal((3, 6, h, w)).astype(np.float32)
    seeds = (rng.random((3, 1, h, w)) < 0.15).astype(np.float32)
    monkeypatch.setattr(torch.Tensor, "bernoulli_", lambda self, p: self.copy_(torch.from_numpy(seeds)))
    ref = drop_block_2d(torch.from_numpy(x), drop_prob=0.2, block_size=5, gamma_scale=0.25).numpy()
    monkeypatch.undo()
    kw = dict(rate=0.2, block_size=5, gamma_scale=0.25, key=None)
    nhwc = ops.drop_block(jnp.asarray(x.transpose(0, 2, 3, 1)), spatial_axes=(1, 2), channel_axis=3,
                          seeds=jnp.asarray(seeds.transpose(0, 2, 3, 1)), **kw)
    np.testing.assert_allclose(np.asarray(nhwc).transpose(0, 3, 1, 2), ref, rtol=1e-6, atol=1e-6)
    per_example = jax.vmap(lambda xi, si: ops.drop_block(xi, spatial_axes=(1, 2), channel_axis=0,
                                                         axis_name="batch", seeds=si, **kw), axis_name="batch")
    np.testing.assert_allclose(np.asarray(per_example(jnp.asarray(x), jnp.asarray(seeds))), ref, rtol=1e-6, atol=1e-6)


def test_drop_block_rate_and_rescaling():
    x = jnp.ones((8, 20, 20, 4))
    y = np.asarray(ops.drop_block(x, rate=0.3, block_size=5, gamma_scale=1.0, key=jax.random.key(0),
                                  spatial_axes=(1, 2), channel_axis=3))
    dropped = float(np.mean(y == 0))
    assert 0.15 < dropped < 0.45
    assert np.all(y[:, :, :, 0] == y[:, :, :, 1])  # one mask for all channels
    assert np.mean(y) == pytest.approx(1.0, rel=1e-4)  # survivors rescaled over the batch


@pytest.mark.parametrize("framework", ["haiku", "equinox"])
def test_drop_rates_train_only_and_keyed(framework):
    """With drop rates set: training needs an explicit key and is stochastic; inference mode is
    the model without them, exactly."""
    rates = dict(drop_rate=0.3, drop_path_rate=0.3, drop_block_rate=0.3)
    x = np.random.default_rng(0).standard_normal((2, 3, 45, 51)).astype(np.float32)
    sd = load_state_dict(_reference("test_resnet"))
    with_rates = convert_state_dict("test_resnet", sd, framework, overrides=rates)
    without = convert_state_dict("test_resnet", sd, framework)
    if framework == "haiku":
        xh = jnp.asarray(x.transpose(0, 2, 3, 1))
        net, net0 = zoo.haiku.build(with_rates.loaded.plan), zoo.haiku.build(without.loaded.plan)
        params, state = with_rates.objects
        with pytest.raises(ValueError):
            net.apply(params, state, None, xh, is_training=True)
        train = jax.jit(functools.partial(net.apply, is_training=True))
        a, _ = train(params, state, jax.random.key(1), xh)
        b, _ = train(params, state, jax.random.key(2), xh)
        c, _ = jax.jit(functools.partial(net.apply, is_training=False))(params, state, jax.random.key(3), xh)
        d, _ = jax.jit(functools.partial(net0.apply, is_training=False))(params, state, None, xh)
    else:
        (model, state), (model0, _) = with_rates.objects, without.objects

        @eqx.filter_jit
        def run(m, key):
            keys = None if key is None else jax.random.split(key, 2)
            fresh = jax.tree_util.tree_map(lambda a: a, state)  # a failed call leaves `state` used
            call = jax.vmap(lambda xi, k: m(xi, fresh, key=k), axis_name="batch",
                            in_axes=(0, None if key is None else 0), out_axes=(0, None))
            return call(jnp.asarray(x), keys)[0]

        with pytest.raises(ValueError):
            run(model, None)
        a, b = run(model, jax.random.key(1)), run(model, jax.random.key(2))
        c, d = run(eqx.nn.inference_mode(model), None), run(eqx.nn.inference_mode(model0), None)
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


# --- new numerics against timm's layers -------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_blur_pool_matches_timm(stride):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 13, 18)).astype(np.float32)
    ref = BlurPool2d(5, filt_size=3, stride=stride)(torch.from_numpy(x)).detach().numpy()
    spec = BlurSpec(5, 3, stride, (stride - 1 + 2) // 2)
    nhwc = ops.blur_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), spec.filter(), stride=spec.stride,
                         padding=spec.padding, pad_mode="reflect", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    nchw = ops.blur_pool(jnp.asarray(x), spec.filter(), stride=spec.stride, padding=spec.padding,
                         pad_mode="reflect", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    np.testing.assert_allclose(np.asarray(nhwc).transpose(0, 3, 1, 2), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(nchw), ref, rtol=1e-6, atol=1e-6)
    # The fixed filter is timm's buffer, exactly.
    np.testing.assert_array_equal(np.asarray(spec.filter(), np.float32), BlurPool2d(5).filt[0, 0].numpy())


def test_eca_kernel_size_matches_timm():
    from timm.layers import EcaModule

    for c in [16, 24, 32, 48, 64, 96, 128, 171, 256, 512, 1000, 1024, 2022, 2048, 4096]:
        assert eca_kernel_size(c) == EcaModule(c).conv.kernel_size[0], c


def test_se_and_attention_rounding_match_timm():
    from timm.layers import SEModule, SplitAttn
    from timm.layers import make_divisible as timm_make_divisible

    for c in [64, 72, 96, 100, 128, 171, 256, 520, 1024, 2048]:
        for ratio in (1 / 16, 0.25):
            plan = ResNetSpec("basic", (1, 1, 1, 1), channels=(c, c, c, c), attn="se", se_rd_ratio=ratio).plan()
            assert plan.stages[0][0].attn.fc1.out_ch == SEModule(c, rd_ratio=ratio).fc1.out_channels, (c, ratio)
    for v in np.linspace(1, 300, 157):
        for kw in ({}, dict(divisor=16), dict(divisor=8, min_value=32), dict(round_limit=0.0)):
            assert make_divisible(float(v), **kw) == timm_make_divisible(float(v), **kw), (v, kw)
    for name in ("resnest50d_4s2x40d", "resnest14d", "skresnet18", "skresnext50_32x4d"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        block, ours = model.layer3[0], registry.get_spec(name).plan().stages[2][0]
        if name.startswith("resnest"):
            assert ours.conv("conv2.fc1").out_ch == block.conv2.fc1.out_channels
        else:
            sk = "conv1" if ours.kind == "sk_basic" else "conv2"
            assert ours.conv(f"{sk}.attn.fc_reduce").out_ch == getattr(block, sk).attn.fc_reduce.out_channels
    assert SplitAttn(64, radix=4, groups=2).fc1.out_channels == make_divisible(64 * 4 * 0.25, 8, min_value=32)


def test_radix_softmax_matches_timm():
    from timm.layers.split_attn import RadixSoftmax

    x = np.random.default_rng(0).standard_normal((3, 2 * 4 * 5)).astype(np.float32)
    for radix, groups in [(4, 2), (2, 1), (1, 4)]:
        n = radix * groups * 5
        ref = RadixSoftmax(radix, groups)(torch.from_numpy(x[:, :n])).numpy()
        np.testing.assert_allclose(np.asarray(ops.radix_softmax(jnp.asarray(x[:, :n]), radix, groups)), ref,
                                   rtol=1e-6, atol=1e-7)


# --- pruned widths ----------------------------------------------------------------------------


def test_pruned_widths_come_from_timms_file_and_match_its_model():
    with torch.device("meta"):
        model = timm.create_model("ecaresnet50d_pruned", pretrained=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = registry.get_spec("ecaresnet50d_pruned").plan()
    assert len(timm_pruned_widths("ecaresnet50d_pruned")) == len(plan.all_convs())
    for conv in plan.all_convs():
        assert shapes[f"{conv.name}.weight"] == (conv.out_ch, conv.in_ch // conv.groups, conv.kernel, conv.kernel)
    assert plan.fc.in_features == shapes["fc.weight"][1] == 2022
    # The ECA kernels keep the unpruned widths' sizes, as timm's (unadapted) Conv1d do.
    eca = {b.attn.conv.name: b.attn.conv.kernel for s in plan.stages for b in s}
    assert all(shapes[f"{n}.weight"] == (1, 1, k) for n, k in eca.items())
    assert infer_overrides("ecaresnet50d_pruned", {k: np.zeros(s, np.float32) for k, s in shapes.items()}, {}) == {}


def test_other_prunings_are_read_from_the_checkpoint(tmp_path):
    """A checkpoint pruned differently from timm's file: its widths are inferred, stored in the
    file's overrides, and the conversion is exact; regular specs never infer widths."""
    from timm.models._prune import adapt_model_from_string

    path = Path(timm.__file__).parent / "models" / "_pruned" / "ecaresnet50d_pruned.txt"
    text = path.read_text().strip()
    changes = {"layer1.1.conv1.weight:[52, 19, 1, 1]": "layer1.1.conv1.weight:[40, 19, 1, 1]",
               "layer1.1.bn1.weight:[52]": "layer1.1.bn1.weight:[40]",
               "layer1.1.conv2.weight:[22, 52, 3, 3]": "layer1.1.conv2.weight:[22, 40, 3, 3]"}
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    torch.manual_seed(0)
    base = timm.create_model("ecaresnet50d", pretrained=False)
    model = randomize_norms(adapt_model_from_string(base, text).eval())
    sd = load_state_dict(model)
    overrides = infer_overrides("ecaresnet50d_pruned", sd, {})
    assert dict(overrides["widths"])["layer1.1.conv1"] == 40
    report = verify("ecaresnet50d_pruned", model, "equinox", fold_bn=True, batch=2, size=ODD, reference=model)
    _assert_parity("ecaresnet50d_pruned", model, report)
    from converters.convert import convert_to_file
    from zoo.io import load_file

    out = convert_to_file("ecaresnet50d_pruned", sd, "haiku", tmp_path / "pruned.safetensors")
    loaded = load_file(out, "equinox")
    assert loaded.plan.stages[0][1].conv("conv1").out_ch == 40
    assert json.loads(loaded.metadata["overrides"])["widths"]
    # A regular spec: other widths are an error, not an inferred option.
    assert "widths" not in infer_overrides("ecaresnet50d", sd, {})
    with pytest.raises(ConversionError):
        convert_state_dict("ecaresnet50d", sd, "haiku")


# --- names, layouts, constant buffers ---------------------------------------------------------


def test_parameter_paths_are_pytorch_names():
    model = _reference("resnet26t", layers=(1, 1, 1, 1), block_args=dict(attn_layer="se"))
    sd = load_state_dict(model)
    eq = convert_state_dict("seresnet50t", sd, "equinox", overrides=L1).objects[0]
    np.testing.assert_array_equal(np.asarray(eq.layer1[0].se.fc1.weight), sd["layer1.0.se.fc1.weight"])
    np.testing.assert_array_equal(np.asarray(eq.layer2[0].downsample[1].weight), sd["layer2.0.downsample.1.weight"])
    assert eq.layer1[0].downsample[0] is None  # timm's Identity in slot 0 (stride 1, nothing to pool)
    params, _ = convert_state_dict("seresnet50t", sd, "haiku", overrides=L1).objects
    np.testing.assert_array_equal(np.asarray(params["layer1_0/se/fc1"]["w"])[0, 0],
                                  sd["layer1.0.se.fc1.weight"][:, :, 0, 0].T)
    folded = convert_state_dict("resnetrs50", load_state_dict(_variant_model("stem-conv-pool+se0.25")),
                                "equinox", fold_bn=True, overrides=L1).objects[0]
    assert folded.maxpool[1] is None and folded.maxpool[0].bias is not None  # the folded norm's slot
    eca = convert_state_dict("ecaresnetlight", load_state_dict(_variant_model("eca-plain-stem-avg-down")),
                             "haiku", overrides=L1).objects[0]
    assert eca["layer1_0/se/conv"]["w"].shape == (5, 1, 1)  # 1-D kernels (W, I, O)


def test_blur_filter_buffers_are_checked_and_consumed():
    plan = registry.get_spec("resnetblur18").plan()
    fixed = plan.fixed_buffers()
    assert set(fixed) == {"maxpool.1.filt", "layer2.0.aa.filt", "layer3.0.aa.filt", "layer4.0.aa.filt"}
    timm_filt = BlurPool2d(128, stride=2).filt.numpy()
    np.testing.assert_array_equal(fixed["layer2.0.aa.filt"], timm_filt)
    sd = {"fc.bias": np.zeros(3, np.float32), "layer2.0.aa.filt": timm_filt}
    assert set(consume_fixed_buffers(sd, plan)) == {"fc.bias"}
    with pytest.raises(ConversionError, match="layer2.0.aa.filt"):
        consume_fixed_buffers({"layer2.0.aa.filt": timm_filt * 2}, plan)


# --- the whole family (slow) ------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_every_timm_resnet(tmp_path):
    """The sweep of scripts/sweep_resnets.py over every timm ResNet: all pass."""
    sweep = _sweep()
    rows = sweep.run_sweep(sweep.timm_resnet_names(), tmp_path / "coverage", isolate=True)
    failed = {r["name"]: r["reason"] for r in rows if not r["passed"]}
    assert not failed, failed
