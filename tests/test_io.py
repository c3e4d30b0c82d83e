"""The zoo file format: exact round trips, metadata, checked loading, safe writes."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file as st_load
from safetensors.numpy import save_file as st_save

import zoo
import zoo.equinox
import zoo.haiku
from converters.convert import convert, convert_to_file
from converters.verify import inputs
from zoo.checked import ConversionError
from zoo.io import FormatError, read_metadata

from .conftest import cached_random_model, rel_err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(cached_random_model("resnet18").state_dict(), path)
    return path


@pytest.mark.parametrize("fold_bn", [False, True])
@pytest.mark.parametrize("framework", ["haiku", "equinox"])
def test_round_trip_is_exact(tmp_path, checkpoint, framework, fold_bn):
    converted = convert("resnet18", checkpoint, framework, fold_bn=fold_bn)
    out = convert_to_file("resnet18", checkpoint, framework, tmp_path / "m.safetensors", fold_bn=fold_bn)
    stored = st_load(str(out))
    assert set(stored) == set(converted.arrays)
    for k, v in converted.arrays.items():
        np.testing.assert_array_equal(stored[k], v, err_msg=k)
    if framework == "haiku":
        transformed, params, state = zoo.haiku.load(out)
        named = zoo.haiku.named_arrays(params, state)
        assert not fold_bn or state == {}
    else:
        model, state = zoo.equinox.load(out)
        named = zoo.equinox.named_arrays(model, state)
    assert set(named) == set(converted.arrays)
    for k, v in converted.arrays.items():
        np.testing.assert_array_equal(np.asarray(named[k]), v, err_msg=k)


def test_metadata(tmp_path, checkpoint):
    out = convert_to_file("resnet18", checkpoint, "haiku", tmp_path / "m.safetensors", fold_bn=True)
    meta = read_metadata(out)
    assert meta["format"] == "zoo" and meta["format_version"] == "2"
    assert meta["framework"] == "haiku" and meta["arch"] == "resnet18"
    assert meta["bn_folded"] == "true" and meta["num_classes"] == "1000"
    assert "HWIO" in meta["layout"] and meta["zoo_version"] == zoo.__version__
    source = json.loads(meta["source"])
    assert source["kind"] == "file" and source["name"] == "resnet18.pth" and len(source["sha256"]) == 64


def test_zoo_load_predicts_like_pytorch_in_both_frameworks(tmp_path, checkpoint):
    import torch

    x = inputs(2, (65, 79))
    with torch.no_grad():
        ref = cached_random_model("resnet18")(torch.from_numpy(x)).numpy()
    for framework in ("haiku", "equinox"):
        path = convert_to_file("resnet18", checkpoint, framework, tmp_path / f"{framework}.safetensors")
        model = zoo.load(path)
        assert model.framework == framework and model.arch == "resnet18"
        assert rel_err(ref, model.predict(x)) <= 1e-5
        # A file loads into the other framework too (its tensors are re-laid out).
        other = "equinox" if framework == "haiku" else "haiku"
        assert rel_err(ref, zoo.load(path, framework=other).predict(x)) <= 1e-5


def test_num_classes_is_read_from_the_checkpoint(tmp_path):
    from converters.torch_models import random_model

    sd = random_model("resnet18", num_classes=7).state_dict()
    converted = convert("resnet18", sd, "equinox")
    assert converted.loaded.metadata["num_classes"] == "7"
    assert json.loads(converted.loaded.metadata["overrides"]) == {"num_classes": 7}


def test_existing_output_is_not_overwritten(tmp_path, checkpoint):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        convert_to_file("resnet18", checkpoint, "haiku", out)
    assert out.read_bytes() == b"keep me"
    convert_to_file("resnet18", checkpoint, "haiku", out, force=True)
    assert read_metadata(out)["arch"] == "resnet18"


def test_failed_conversion_leaves_no_file(tmp_path, checkpoint):
    out = tmp_path / "m.safetensors"
    with pytest.raises(ConversionError):
        convert_to_file("resnet34", checkpoint, "haiku", out)
    assert list(tmp_path.iterdir()) == []


def test_tampered_file_fails_with_every_problem_listed(tmp_path, checkpoint):
    out = convert_to_file("resnet18", checkpoint, "equinox", tmp_path / "m.safetensors")
    tensors = st_load(str(out))
    meta = read_metadata(out)
    del tensors["layer2.1.conv2.weight"]
    tensors["extra.weight"] = np.zeros(3, np.float32)
    tensors["fc.bias"] = np.zeros(10, np.float32)
    st_save(tensors, str(out), metadata=meta)
    with pytest.raises(ConversionError) as e:
        zoo.equinox.load(out)
    assert e.value.missing == ["layer2.1.conv2.weight"]
    assert e.value.unexpected == ["extra.weight"]
    assert [m[0] for m in e.value.misshaped] == ["fc.bias"]


def test_metadata_mismatch_fails(tmp_path, checkpoint):
    out = convert_to_file("resnet18", checkpoint, "haiku", tmp_path / "m.safetensors")
    tensors, meta = st_load(str(out)), read_metadata(out)
    st_save(tensors, str(tmp_path / "wrong_arch.safetensors"), metadata={**meta, "arch": "resnet34"})
    with pytest.raises(ConversionError, match="does not fit resnet34"):
        zoo.load(tmp_path / "wrong_arch.safetensors")
    st_save(tensors, str(tmp_path / "v9.safetensors"), metadata={**meta, "format_version": "9"})
    with pytest.raises(FormatError, match="version 9"):
        zoo.load(tmp_path / "v9.safetensors")
    st_save(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FormatError, match="not a zoo file"):
        zoo.load(tmp_path / "plain.safetensors")
    st_save(tensors, str(tmp_path / "unknown.safetensors"), metadata={**meta, "arch": "resnet9000"})
    with pytest.raises(FormatError, match="unknown model"):
        zoo.load(tmp_path / "unknown.safetensors")


def test_model_predict_is_jitted_and_batched(tmp_path, checkpoint, monkeypatch):
    path = convert_to_file("resnet18", checkpoint, "equinox", tmp_path / "m.safetensors", fold_bn=True)
    model = zoo.load(path)

    printed = []
    # JAX names a traced callable that has no __code__ by its str() (and swallows errors there):
    # vmapping the module itself pretty-printed the whole Equinox tree on every process's first
    # call (0.1 s for a ResNet-50).
    monkeypatch.setattr(type(model.loaded.objects[0]), "__repr__", lambda self: printed.append(1) or "model")
    out = model.predict(np.zeros((3, 3, 40, 48), np.float32))
    assert not printed
    assert out.shape == (3, 1000) and out.dtype == np.float32
    assert isinstance(out, jax.Array)


def test_haiku_forward_builds_no_module_reprs(tmp_path, checkpoint, monkeypatch):
    """Haiku pretty-prints every module's arguments into a repr as the module is made, in every
    trace (a quarter of tracing a ResNet-50 predict); zoo's forwards turn that off."""
    import haiku._src.utils as hk_utils

    made = []
    real = hk_utils.auto_repr
    monkeypatch.setattr(hk_utils, "auto_repr", lambda *a, **k: made.append(1) or real(*a, **k))
    model = zoo.load(convert_to_file("resnet18", checkpoint, "haiku", tmp_path / "m.safetensors"))
    assert model.predict(np.zeros((1, 3, 32, 40), np.float32)).shape == (1, 1000)
    net = zoo.haiku.create("test_resnet")
    params, state = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), is_training=True)
    net.apply(params, state, None, jnp.zeros((1, 32, 32, 3)), is_training=False)
    assert not made
    import haiku as hk

    hk.transform(lambda x: hk.Linear(2)(x)).init(jax.random.key(0), jnp.zeros((1, 3)))  # the user's own: untouched
    assert made


@pytest.mark.parametrize("framework", ["haiku", "equinox"])
def test_predict_inside_grad_jit_and_vmap_matches_pytorch(tmp_path, checkpoint, framework):
    """What a researcher does with `predict` beyond calling it: a saliency map (the gradient of a
    logit with respect to the image) equals PyTorch's input gradient, and predict works inside the
    caller's own `jax.jit` and `jax.vmap`. On a CPU zoo compiles its functions with compiler
    options, which JAX accepts only at the top level: nested, the Haiku predict raised a
    ValueError under `jax.grad` and `jax.jit`."""
    import torch

    model = zoo.load(convert_to_file("resnet18", checkpoint, framework, tmp_path / "m.safetensors"))
    x = inputs(2, (45, 53))
    tx = torch.from_numpy(x).requires_grad_(True)
    reference = cached_random_model("resnet18")
    reference(tx)[:, 7].sum().backward()
    saliency = jax.grad(lambda x: model.predict(x)[:, 7].sum())(jnp.asarray(x))
    assert rel_err(tx.grad.numpy(), saliency) <= 1e-5
    direct = model.predict(x)
    assert rel_err(direct, jax.jit(model.predict)(x)) <= 1e-6
    assert rel_err(direct, jax.vmap(model.predict)(x[:, None])[:, 0]) <= 1e-5


@pytest.mark.parametrize("framework", ["haiku", "equinox"])
def test_zoo_functions_compile_cpu_convolutions_with_xla_s_own_emitter(tmp_path, checkpoint, framework,
                                                                       monkeypatch):
    """On a CPU, jaxlib runs convolutions as YNNPACK fusions by default; zoo's own jitted
    inference functions (predict here, and the eval step) take those away, and YNNPACK's
    reductions, which can take convolutions in (zoo/_xla.py: faster on the benchmark's CPU,
    docs/benchmarks.md). `ZOO_CPU_XLA_CONV=0`, or the
    user's own setting of the option in XLA_FLAGS, keeps JAX's default. The logits agree."""
    from zoo._xla import jit_options
    from zoo.model import make_predict

    if jax.default_backend() != "cpu":
        pytest.skip("a CPU compiler option")
    path = convert_to_file("resnet18", checkpoint, framework, tmp_path / "m.safetensors")
    loaded = zoo.load(path).loaded
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 64, 80)), jnp.float32)

    def ynn_convolutions(predict, x=x) -> int:
        """YNNPACK fusions whose fused computation holds a convolution."""
        compiled = predict.func.lower(*predict.args, x).compile()
        hlo = getattr(compiled, "compiled", compiled).as_text()  # Equinox wraps JAX's
        computations = {m.group(1): block for block in re.split(r"\n(?=\S)", hlo)
                        if (m := re.match(r"(?:ENTRY )?%?([\w.\-]+) ", block))}
        fused = re.findall(r'calls=%([\w.\-]+).*?"kind":"__ynn_fusion"', hlo)
        return sum(" convolution(" in computations.get(name, "") for name in fused)

    zoo_predict = make_predict(loaded)
    monkeypatch.setenv("ZOO_CPU_XLA_CONV", "0")
    default_predict = make_predict(loaded)
    monkeypatch.delenv("ZOO_CPU_XLA_CONV")
    # ResNet-18: 17 convolutions larger than 1x1 (its three 1x1 ones are dot products anyway).
    assert ynn_convolutions(default_predict) >= 10
    assert ynn_convolutions(zoo_predict) == 0
    # At batch 1, 224², a YNNPACK reduction fusion took the classifier's pool and layer4's
    # convolutions with it (half speed) until zoo took YNNPACK's reductions away as well.
    assert ynn_convolutions(zoo_predict, jnp.zeros((1, 3, 224, 224), jnp.float32)) == 0
    assert rel_err(default_predict(x), zoo_predict(x)) < 1e-5
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    assert jit_options() == {}
    monkeypatch.delenv("XLA_FLAGS")
    assert "compiler_options" in jit_options()


def test_equinox_predict_reads_kernels_without_copying_them(tmp_path, checkpoint):
    """Equinox weights are OIHW (PyTorch's layout); XLA's CPU convolutions read HWIO, so a predict
    bound to the model as it is copied every kernel on every call (21 transposes in a ResNet-18,
    halving batch-1 speed for a ResNet-50; docs/benchmarks.md). On a CPU, zoo's predict binds the
    convolution kernels stored HWIO and read in place (those run as dots there, 1x1 ones and those
    on maps narrower than the kernel, as (I, O) matrices: no transposed operand), and the
    classifier's as it is (bound as (in, out), it was copied back at batch 1). At batch 1 and 2 the only relayout is the input's NCHW -> NHWC, as in
    Haiku's program. The logits are the model's own, and the model is left as it was."""
    import equinox as eqx

    from zoo.equinox import BATCH_AXIS

    if jax.default_backend() != "cpu":
        pytest.skip("the kernels are bound as they are on a GPU")
    path = convert_to_file("resnet18", checkpoint, "equinox", tmp_path / "m.safetensors")
    model = zoo.load(path)
    predict = model._predict
    for batch in (1, 2):
        x = jnp.zeros((batch, 3, 61, 80), jnp.float32)
        hlo = predict.func.lower(*predict.args, x).compile().as_text()
        relayouts = re.findall(r"= (\S+) (?:transpose|copy)\(", hlo)
        assert relayouts and all(r.startswith(f"f32[{batch},61,80,3]") for r in relayouts), (batch, relayouts)
        # The convolutions' dots, not the classifier's (1000 outputs): the three 1x1 downsamples,
        # and layer4's four 3x3 convolutions, whose 2x3 maps are narrower than their kernel (im2col).
        dots = re.findall(r"= f32\[([\d,]*)\]\S* dot\(.*?rhs_contracting_dims=\{(\d+)\}", hlo)
        convs = [dim for shape, dim in dots if "1000" not in shape.split(",")]
        assert len(convs) == 3 + 4 and set(convs) == {"0"}, dots
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 61, 80)), jnp.float32)

    eqx_model, state = model.objects
    assert eqx_model.conv1.weight.shape == (64, 3, 7, 7) and eqx_model.fc.weight.shape == (1000, 512)
    direct = eqx.filter_jit(lambda m, s, x: jax.vmap(lambda xi: m(xi, s)[0], axis_name=BATCH_AXIS)(x))
    expected = direct(eqx.nn.inference_mode(eqx_model), state, x)
    assert rel_err(model.predict(x), expected) < 1e-5
