"""torchvision's GoogLeNet: plan, adaptive pooling, inference and training parity in both
frameworks, aux-head conversion rules, and the zoo file round trip."""

import copy
import functools
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import zoo
import zoo.equinox
import zoo.haiku
from converters.convert import convert_state_dict, convert_to_file
from converters.state_dict import load_state_dict
from converters.torch_models import random_model
from converters.verify import compare, verify
from zoo import ops, registry
from zoo.checked import ConversionError
from zoo.frameworks import adapter
from zoo.googlenet import INCEPTION_BLOCKS, GoogLeNetOutputs, GoogLeNetSpec

from .conftest import jax_train_forward, rel_err

ARCH = "googlenet"
FRAMEWORKS = ["haiku", "equinox"]
NO_DROPOUT = {"dropout": 0.0, "dropout_aux": 0.0}


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@functools.lru_cache(maxsize=4)
def calibrated_model(seed: int = 0, **overrides):
    """`random_model`: calibrated, then perturbed, BatchNorm statistics (see `randomize_norms`)."""
    return random_model(ARCH, seed=seed, **overrides)


def torch_outputs(model, x: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return tuple(t.numpy() for t in out) if isinstance(out, tuple) else out.numpy()


@functools.lru_cache(maxsize=2)
def reference_names(aux_logits: bool) -> tuple[str, ...]:
    sd = random_model(ARCH, aux_logits=aux_logits).state_dict()
    return tuple(k for k in sd if not k.endswith("num_batches_tracked"))


# --- spec, plan, names -------------------------------------------------------------------------


def test_spec_fields_are_torchvision_arguments():
    spec = registry.get_spec(ARCH)
    assert spec == GoogLeNetSpec() and spec.aux_logits and not spec.transform_input
    assert spec.to_dict() == {"num_classes": 1000, "aux_logits": True, "transform_input": False,
                              "dropout": 0.2, "dropout_aux": 0.7, "in_chans": 3, "global_pool": "avg",
                              "features_only": False, "out_indices": (0, 1, 2, 3, 4)}
    with pytest.raises(TypeError, match="in_channels"):
        spec.replace(in_channels=4)
    # Every torchvision field is accepted, under its own name, by torchvision's constructor (the
    # surgery options, timm's, are done by hand on it: tests/test_surgery.py).
    model = random_model(ARCH, num_classes=7, aux_logits=True, transform_input=True, dropout=0.1,
                         dropout_aux=0.3)
    assert model.transform_input and model.dropout.p == 0.1 and model.aux1.dropout.p == 0.3
    assert model.fc.out_features == 7


def test_plan_names_and_widths():
    plan = registry.get_spec(ARCH).plan()
    blocks = {layer.name: layer for layer in plan.trunk if layer.name.startswith("inception")}
    assert list(blocks) == list(INCEPTION_BLOCKS)
    b = blocks["inception3a"]
    assert (b.branch2[0].conv.name, b.branch2[0].norm.name) == ("inception3a.branch2.0.conv",
                                                                 "inception3a.branch2.0.bn")
    assert b.branch3[1].conv.kernel == 3  # torchvision's "5x5" branch
    assert b.branch4[0].pool.kernel == 3 and b.branch4[0].pool.ceil_mode and b.branch4[0].pool.padding == 1
    assert [layer.name for layer in plan.trunk if not layer.name.startswith("inception")] == [
        "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "maxpool3", "maxpool4"]
    assert [(a.name, a.tap, a.conv.conv.in_ch) for a in plan.aux] == [("aux1", "inception4a", 512),
                                                                        ("aux2", "inception4d", 528)]
    assert plan.fc.name == "fc" and plan.fc.in_features == 1024
    assert len(plan.norms) == 59 and all(n.eps == 1e-3 for n in plan.norms)
    assert ("aux2.conv.conv", "aux2.conv.bn") in plan.fold_pairs()
    folded = registry.get_spec(ARCH, aux_logits=False).plan(fold_bn=True)
    assert folded.aux == () and len(folded.norms) == 57
    assert folded.trunk[0].norm is None and folded.trunk[0].conv.bias


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn", "folded"])
@pytest.mark.parametrize("aux_logits", [True, False], ids=["aux", "noaux"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_template_names_are_pytorch_names(framework, aux_logits, fold_bn):
    names = set(reference_names(aux_logits))
    if fold_bn:
        bns = {k.rsplit(".", 1)[0] for k in names if k.endswith("running_mean")}
        names = {k for k in names if k.rsplit(".", 1)[0] not in bns}
        names |= {f"{b[:-2]}conv.bias" for b in bns}
    ad = adapter(framework)
    shapes = ad.target_shapes(ad.template(registry.get_spec(ARCH, aux_logits=aux_logits).plan(fold_bn)))
    assert set(shapes) == names


def test_equinox_attribute_paths():
    model, state = zoo.equinox.template(registry.get_spec(ARCH).plan())
    assert model.inception3a.branch2[0].conv.weight.shape == (96, 192, 1, 1)
    assert model.aux2.fc1.weight.shape == (1024, 2048)
    names = zoo.equinox.named_arrays(model, state)
    assert "inception3a.branch2.0.conv.weight" in names and "inception5b.branch4.1.bn.running_var" in names


# --- adaptive average pooling ------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(14, 14), (13, 17), (3, 5)])
def test_adaptive_avg_pool_matches_torch(hw):
    x = np.random.default_rng(0).standard_normal((2, 5, *hw)).astype(np.float32)
    for out_hw in [(4, 4), (1, 1), (3, 2)]:
        ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), out_hw).numpy()
        nhwc = ops.adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), out_hw)
        chw = jax.vmap(lambda a: ops.adaptive_avg_pool(a, out_hw))(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(nhwc).transpose(0, 3, 1, 2), ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(chw), ref, rtol=1e-6, atol=1e-6)


def test_adaptive_avg_pool_windows_overlap():
    # 14 -> 4: windows [0, 4), [3, 7), [7, 11), [10, 14); rows 3 and 10 count twice.
    x = jnp.zeros((1, 14, 1, 1)).at[0, 3, 0, 0].set(4.0)
    out = np.asarray(ops.adaptive_avg_pool(x, (4, 1)))[0, :, 0, 0]
    np.testing.assert_allclose(out, [1.0, 1.0, 0.0, 0.0])


# --- inference parity --------------------------------------------------------------------------

# Every pair of values of (framework, fold_bn, transform_input, size) occurs: each size with both
# frameworks, both fold_bn and both transform_input settings.
PARITY_CASES = [
    ("haiku", False, False, (224, 224)),
    ("equinox", True, True, (224, 224)),
    ("haiku", True, True, (97, 131)),
    ("equinox", False, False, (97, 131)),
    ("haiku", False, True, (225, 229)),
    ("equinox", True, False, (225, 229)),
]


@pytest.mark.parametrize("framework,fold_bn,transform_input,size", PARITY_CASES)
def test_inference_parity(framework, fold_bn, transform_input, size):
    model = calibrated_model()
    report = verify(ARCH, model.state_dict(), framework, fold_bn=fold_bn, batch=2, size=size,
                    overrides={"transform_input": transform_input})
    assert report.rel <= 1e-5, report
    assert report.top1 == 1.0, report


def test_reference_logits_depend_on_the_input():
    """The parity checks above could not fail if the reference ignored its input."""
    x = np.random.default_rng(0).standard_normal((4, 3, 97, 131)).astype(np.float32)
    y = torch_outputs(calibrated_model(), x)
    assert np.linalg.norm(y - y.mean(0)) / np.linalg.norm(y) > 1e-2
    x[:, :, :4, -4:] = 0  # a corner the ceil_mode pools and the padding see
    assert rel_err(y, torch_outputs(calibrated_model(), x)) > 1e-4


# --- training mode -----------------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_training_forward_matches_pytorch(framework):
    # PyTorch's default conv init (not GoogLeNet's std 0.01) gives batch variances comparable to
    # the running ones, so an error in either shows in the updated statistics.
    model = random_model(ARCH, seed=1, init_weights=False, **NO_DROPOUT)
    # Copies: the arrays would otherwise share memory with the buffers the forward updates.
    sd = {k: v.copy() for k, v in load_state_dict(model).items()}
    converted = convert_state_dict(ARCH, sd, framework, overrides=NO_DROPOUT)
    x = np.random.default_rng(1).standard_normal((2, 3, 97, 131)).astype(np.float32)
    exact = copy.deepcopy(model).double().train()
    model.train()
    ref = torch_outputs(model, x)
    ref64 = torch_outputs(exact, x.astype(np.float64))
    ref_sd = {k: v.numpy() for k, v in model.state_dict().items()}
    model.eval()
    out, named = jax_train_forward(converted, framework, x)
    assert isinstance(out, GoogLeNetOutputs)  # (logits, aux_logits2, aux_logits1), as torchvision
    for name, r, r64, o in zip(GoogLeNetOutputs._fields, ref, ref64, out):
        assert o.shape == r.shape == (2, 1000) and o.dtype == jnp.float32
        # Batch statistics pass every rounding error on undamped: PyTorch's own fp32 result is
        # ~1e-5 from the float64 one here, so 1e-5 between two fp32 runs is not guaranteed. The
        # test: zoo is as close to the exact (float64) result as PyTorch's fp32 is.
        torch_err = rel_err(r64, r)
        assert rel_err(r64, o) <= 1.5 * torch_err + 1e-6, (name, rel_err(r64, o), torch_err)
        assert rel_err(r, o) <= 3e-5, name
    stats = [k for k in ref_sd if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 59
    for k in stats:
        np.testing.assert_allclose(np.asarray(named[k]), ref_sd[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # The update moved the loaded statistics, the aux heads' included.
    for k in ("aux1.conv.bn.running_var", "inception5b.branch1.bn.running_mean"):
        assert not np.allclose(ref_sd[k], sd[k]), k


def test_output_structure_by_mode():
    """Logits only in inference mode or without aux heads; a key is needed for dropout."""
    x = jax.ShapeDtypeStruct((2, 64, 80, 3), jnp.float32)
    for aux in (True, False):
        net = zoo.haiku.create(ARCH, aux_logits=aux)
        params, state = jax.eval_shape(lambda k, x: net.init(k, x, is_training=False), jax.random.key(0), x)
        assert ("aux1/fc1" in params) == aux  # inference-mode init still creates the aux heads
        for training in (True, False):
            out, _ = jax.eval_shape(functools.partial(net.apply, is_training=training),
                                    params, state, jax.random.key(1), x)
            if training and aux:
                assert isinstance(out, GoogLeNetOutputs) and all(o.shape == (2, 1000) for o in out)
            else:
                assert out.shape == (2, 1000)
    with pytest.raises(ValueError, match="PRNGKey"):  # Haiku: dropout in training needs a key
        jax.eval_shape(functools.partial(net.apply, is_training=True), params, state, None, x)

    xc = jax.ShapeDtypeStruct((2, 3, 64, 80), jnp.float32)

    def eqx_outputs(inference: bool, key):
        def run():
            model, state = zoo.equinox.create(ARCH, key=jax.random.key(0))
            model = eqx.nn.inference_mode(model, inference)
            kw = {} if key is None else {"key": jax.random.split(key, 2)}
            batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
            return batched(jnp.zeros(xc.shape, xc.dtype), state, **kw)[0]

        return jax.eval_shape(run)

    out = eqx_outputs(False, jax.random.key(1))
    assert isinstance(out, GoogLeNetOutputs) and out.aux_logits1.shape == (2, 1000)
    assert eqx_outputs(True, None).shape == (2, 1000)
    with pytest.raises(ValueError, match="key"):
        eqx_outputs(False, None)


# --- aux heads in conversion -------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_checkpoint_without_aux_infers_aux_logits_false(framework):
    sd = load_state_dict(calibrated_model(aux_logits=False))
    converted = convert_state_dict(ARCH, sd, framework)
    assert converted.loaded.plan.spec.aux_logits is False
    assert json.loads(converted.loaded.metadata["overrides"]) == {"aux_logits": False}
    assert set(converted.arrays) == set(sd)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_aux_dropped_on_request(framework):
    sd = load_state_dict(calibrated_model())
    assert any(k.startswith("aux1.") for k in sd) and any(k.startswith("aux2.") for k in sd)
    converted = convert_state_dict(ARCH, sd, framework, overrides={"aux_logits": False})
    kept = {k: v for k, v in sd.items() if not k.startswith(("aux1.", "aux2."))}
    assert set(converted.arrays) == set(kept)
    reference = convert_state_dict(ARCH, kept, framework)
    for k, v in reference.arrays.items():
        np.testing.assert_array_equal(converted.arrays[k], v)


def test_unrelated_keys_still_fail_when_aux_dropped():
    sd = load_state_dict(calibrated_model())
    with pytest.raises(ConversionError) as e:
        convert_state_dict(ARCH, {**sd, "fc2.weight": sd["fc.weight"]}, "haiku",
                           overrides={"aux_logits": False})
    assert e.value.unexpected == ["fc2.weight"] and not e.value.missing
    # A checkpoint with only part of the aux heads keeps them, and the gap is reported.
    partial = {k: v for k, v in sd.items() if k != "aux2.fc2.bias"}
    with pytest.raises(ConversionError) as e:
        convert_state_dict(ARCH, partial, "equinox")
    assert e.value.missing == ["aux2.fc2.bias"]


def test_no_aux_checkpoint_parity():
    model = calibrated_model(aux_logits=False)
    report = verify(ARCH, model.state_dict(), "equinox", batch=2, size=(61, 75))
    assert report.rel <= 1e-5 and report.top1 == 1.0, report


# --- zoo file round trip -----------------------------------------------------------------------


def test_file_round_trip(tmp_path):
    overrides = {"transform_input": True}
    model = calibrated_model()
    path = convert_to_file(ARCH, model.state_dict(), "haiku", tmp_path / "googlenet.safetensors",
                           overrides=overrides)
    x = np.random.default_rng(3).standard_normal((2, 3, 61, 75)).astype(np.float32)
    ref_model = random_model(ARCH, **overrides)
    ref_model.load_state_dict(model.state_dict())
    ref = torch_outputs(ref_model.eval(), x)
    for framework in FRAMEWORKS:  # the Haiku file, and the same file read into Equinox
        loaded = zoo.load(str(path), framework=framework)
        assert loaded.loaded.plan.spec.transform_input and loaded.loaded.plan.spec.aux_logits
        assert json.loads(loaded.metadata["overrides"]) == overrides
        result = compare(ref, np.asarray(loaded.predict(x)))
        assert result["rel"] <= 1e-5 and result["top1"] == 1.0, (framework, result)
