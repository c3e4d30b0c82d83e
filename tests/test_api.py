"""The Python API: creating models, mixed precision, and a light `import zoo`."""

import functools
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
import zoo.equinox
import zoo.haiku


def test_import_zoo_does_not_import_torch():
    code = ("import sys, zoo, zoo.haiku, zoo.equinox, zoo.io, zoo.model; zoo.list_models(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'haiku' not in sys.modules or 'zoo.haiku' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, zoo; assert 'haiku' not in sys.modules and 'equinox' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_list_models():
    assert {"resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"} <= set(zoo.list_models())
    assert zoo.list_models("resnext*") == sorted(n for n in zoo.list_models() if n.startswith("resnext"))


def test_haiku_create_layouts_and_names():
    net = zoo.haiku.create("resnet50", num_classes=10)
    x = jnp.zeros((2, 64, 72, 3))
    params, state = net.init(jax.random.key(0), x, is_training=True)
    assert params["conv1"]["w"].shape == (7, 7, 3, 64)  # HWIO
    assert params["fc"]["w"].shape == (2048, 10)  # (in, out)
    assert params["layer1_0/downsample_0"]["w"].shape == (1, 1, 64, 256)
    assert set(state["bn1"]) == {"mean", "var"}
    logits, _ = net.apply(params, state, None, x, is_training=False)
    assert logits.shape == (2, 10)


def test_equinox_create_layouts_names_and_modes():
    model, state = zoo.equinox.create("resnet18", key=jax.random.key(0), num_classes=10)
    assert model.conv1.weight.shape == (64, 3, 7, 7)  # OIHW
    assert model.fc.weight.shape == (10, 512)  # (out, in)
    assert model.layer2[0].downsample[0].weight.shape == (128, 64, 1, 1)
    x = jnp.ones((3, 3, 40, 44))
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    _, new_state = batched(x, state)
    idx = model.bn1.state_index
    assert not np.allclose(new_state.get(idx)[0], state.get(idx)[0])  # training updates statistics
    frozen = eqx.nn.inference_mode(model)
    _, same = jax.vmap(frozen, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    np.testing.assert_array_equal(same.get(idx)[0], state.get(idx)[0])


def test_folded_models_have_no_batchnorm():
    net = zoo.haiku.create("resnet18", fold_bn=True)
    params, state = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), is_training=False)
    assert state == {} and not any("bn" in m for m in params)
    assert params["conv1"]["b"].shape == (64,)
    model, state = zoo.equinox.create("resnet18", key=jax.random.key(0), fold_bn=True)
    assert model.bn1 is None and model.conv1.bias is not None


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("framework", ["haiku", "equinox"])
def test_mixed_precision_keeps_float32_parameters(framework, dtype):
    # Jitted, as training runs: eagerly, every operation compiled a program per shape and dtype
    # (22 s a case on 2 cores).
    x = jax.random.normal(jax.random.key(1), (2, 3, 48, 56))
    if framework == "haiku":
        net32 = zoo.haiku.create("resnet18")
        params, state = net32.init(jax.random.key(0), x.transpose(0, 2, 3, 1), is_training=False)
        low = zoo.haiku.create("resnet18", dtype=dtype)
        apply = lambda net, training: jax.jit(functools.partial(net.apply, is_training=training))  # noqa: E731
        ref, _ = apply(net32, False)(params, state, None, x.transpose(0, 2, 3, 1))
        out, new_state = apply(low, True)(params, state, None, x.transpose(0, 2, 3, 1))
        out, _ = apply(low, False)(params, state, None, x.transpose(0, 2, 3, 1))
        leaves = jax.tree_util.tree_leaves((params, new_state))
    else:
        model, state = zoo.equinox.create("resnet18", key=jax.random.key(0))
        low, _ = zoo.equinox.create("resnet18", key=jax.random.key(0), dtype=dtype)
        run = eqx.filter_jit(lambda m: jax.vmap(eqx.nn.inference_mode(m), axis_name="batch", in_axes=(0, None),
                                                out_axes=(0, None))(x, state)[0])
        ref, out = run(model), run(low)
        _, new_state = eqx.filter_jit(lambda m: jax.vmap(m, axis_name="batch", in_axes=(0, None),
                                                         out_axes=(0, None))(x, state))(low)
        leaves = [l for l in jax.tree_util.tree_leaves((low, new_state)) if eqx.is_array(l)]
    assert out.dtype == jnp.float32  # logits come back in float32
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 5e-2


@pytest.mark.parametrize("framework", ["haiku", "equinox"])
def test_creating_a_model_is_one_program(framework):
    """A fresh model's initialisation compiles one XLA program, which the persistent cache keeps
    for the next process. Haiku's eager init compiled one small program per distinct shape
    instead (ResNet-50: hundreds, 12.5 s on 2 cores in every process, none cached); and
    `is_training` works by keyword or position."""
    x_nhwc = jnp.zeros((2, 29, 33, 3))
    compiles = []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    key = jax.random.key(3)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        if framework == "haiku":
            net = zoo.haiku.create("test_resnet", num_classes=5)
            params, state = net.init(key, x_nhwc, is_training=True)
        else:
            params, state = zoo.equinox.create("test_resnet", key=key, num_classes=5)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert len(compiles) == 1, compiles
    if framework == "haiku":
        again, _ = net.init(key, x_nhwc, True)
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)
        assert all(np.all(np.asarray(s["var"]) == 1.0) for s in state.values() if "var" in s)
        logits, _ = net.apply(params, state, None, x_nhwc, is_training=False)
        assert logits.shape == (2, 5)


@pytest.mark.parametrize("framework", ["haiku", "equinox"])
def test_template_is_the_initialised_model_without_its_random_draws(framework):
    """`template` (what conversion and loading fill) stages zeros where initialisation draws
    random numbers (zoo/_init.py): the same tree, shapes and dtypes as a real initialisation, and
    the shapes-only switch never reaches a real one: a model created after a template is random,
    and the same as one created before it."""
    from zoo import registry

    plan = registry.get_spec("test_resnet", num_classes=5).plan(False)
    key = jax.random.key(4)
    x = jnp.zeros((1, 32, 32, 3))
    if framework == "haiku":
        make = lambda: zoo.haiku.create("test_resnet", num_classes=5).init(key, x, is_training=True)  # noqa: E731
        real = jax.eval_shape(make)
        before = make()
        template = zoo.haiku.template(plan)
        after = make()  # a fresh transform and jit: traced again after the template
    else:
        make = lambda: zoo.equinox.create("test_resnet", key=key, num_classes=5)  # noqa: E731
        real = eqx.filter_eval_shape(make)
        before = make()
        template = zoo.equinox.template(plan)
        after = make()
    shapes = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda a: (a.shape, a.dtype) if hasattr(a, "shape") else a, tree)
    assert jax.tree_util.tree_structure(shapes(template)) == jax.tree_util.tree_structure(shapes(real))
    assert jax.tree_util.tree_leaves(shapes(template)) == jax.tree_util.tree_leaves(shapes(real))
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)) if eqx.is_array(a) else a == b,
                                  before, after)
    assert all(jax.tree_util.tree_leaves(same))
    named = (zoo.haiku if framework == "haiku" else zoo.equinox).named_arrays(*after)
    assert float(np.std(np.asarray(named["conv1.0.weight"]))) > 0.01
    assert float(np.std(np.asarray(named["fc.weight"]))) > 0.01


@pytest.mark.parametrize("framework", ["haiku", "equinox"])
def test_initial_weights_are_timms_distributions_each_drawn_apart(framework):
    """Every parameter is a slice of one normal and one uniform draw (zoo/_init.py `one_draw`): each
    convolution kernel still kaiming-normal (fan_out, ReLU: std sqrt(2 / fan_out)), the classifier
    uniform on +-1/sqrt(in_features) (PyTorch's Linear), norms at one and zero; no two kernels
    share values (a slice handed out twice); another key, other weights."""
    def create(key):
        if framework == "haiku":
            net = zoo.haiku.create("resnet18", num_classes=300)
            return zoo.haiku.named_arrays(*net.init(key, jnp.zeros((1, 32, 32, 3)), is_training=True))
        return zoo.equinox.named_arrays(*zoo.equinox.create("resnet18", key=key, num_classes=300))

    named = {k: np.asarray(v, np.float64) for k, v in create(jax.random.key(5)).items()}
    kernels = {k: v for k, v in named.items() if k.endswith("weight") and v.ndim == 4}
    assert len(kernels) == 20
    for name, w in kernels.items():
        # Haiku's kernels are HWIO, Equinox's OIHW: fan_out is the output channels times the window.
        fan_out = w.size // w.shape[2] if framework == "haiku" else w.size // w.shape[1]
        assert abs(w.std() / np.sqrt(2 / fan_out) - 1) < 0.1 and abs(w.mean()) < 0.1 * w.std(), name
    firsts = [w.reshape(-1)[:8].tobytes() for w in kernels.values()]
    assert len(set(firsts)) == len(firsts)
    bound = 1 / np.sqrt(512)
    for name in ("fc.weight", "fc.bias"):
        w = named[name]
        assert np.all(np.abs(w) <= bound) and abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.15, name
    assert np.all(named["bn1.weight"] == 1) and np.all(named["bn1.bias"] == 0)
    other = create(jax.random.key(6))
    assert not np.array_equal(np.asarray(other["layer1.0.conv1.weight"]), named["layer1.0.conv1.weight"])
    if framework == "haiku":  # no key: Haiku's own error, as before the one draw
        with pytest.raises(ValueError, match="non-None PRNGKey"):
            zoo.haiku.create("resnet18").init(None, jnp.zeros((1, 32, 32, 3)), is_training=True)
