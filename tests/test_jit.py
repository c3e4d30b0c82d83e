"""zoo's jit wrapper for its steps (`zoo._jit`): eqx.filter_jit's partition with less host work."""

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import _jit


class _Model(eqx.Module):
    w: jax.Array
    n: int  # a non-array leaf: held static, as eqx.filter_jit holds it
    act: Callable


def test_jit_traces_arrays_holds_the_rest_static_and_donates():
    traces = []

    def step(batch, m):
        traces.append(1)
        return _Model(m.w * batch[0] + m.n, m.n, m.act), {"s": m.act(m.w).sum(), "n": m.n}

    jitted = _jit.jit(step, donate_argnums=(1,))
    m = _Model(jnp.array([-1.0, 1.0, 2.0]), 2, jax.nn.relu)
    expected = eqx.filter_jit(step)((np.float32(2.0),), m)
    out, aux = jitted((np.float32(2.0),), m)
    # The result is rebuilt with its static leaves; arrays match eqx.filter_jit's.
    assert out.n == 2 and out.act is jax.nn.relu and aux["n"] == 2
    np.testing.assert_array_equal(out.w, expected[0].w)
    np.testing.assert_array_equal(aux["s"], expected[1]["s"])
    assert m.w.is_deleted()  # the donated argument's buffers

    n_traces = len(traces)
    out2, _ = jitted((np.float32(3.0),), out)  # same structure and static leaves: no new trace
    assert len(traces) == n_traces
    np.testing.assert_array_equal(out2.w, np.asarray([2.0, 14.0, 20.0]))
    jitted((np.float32(3.0),), _Model(jnp.ones(3), 5, jax.nn.relu))  # another static value: traced
    assert len(traces) == n_traces + 1

    hlo = jitted.lower((np.float32(1.0),), _Model(jnp.ones(3), 5, jax.nn.relu)).compile().as_text()
    assert "multiply" in hlo


def test_jit_traces_zoo_s_ops_for_the_platform_of_its_arguments():
    """zoo's 1x1 convolutions are dot products on a CPU and convolutions elsewhere. Through
    `zoo._jit` (zoo's steps) the arguments' platform picks the form while tracing; under a plain
    `jax.jit` both are staged out (`platform_dependent`, one conditional each: slower to trace, most
    of all under Equinox's vmap) and lowering picks one."""
    from zoo import ops

    def f(x, w):
        return ops.conv2d(x, w, None, stride=1, padding=0, dilation=1, groups=1,
                          dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x, w = jnp.ones((1, 4, 5, 3)), jnp.ones((1, 1, 3, 6))
    platform = next(iter(x.devices())).platform
    text = _jit.jit(f).lower(x, w).as_text()
    assert "stablehlo.case" not in text
    assert ("dot_general" in text) == (platform == "cpu") and ("convolution" in text) == (platform != "cpu")
    assert "stablehlo.case" in jax.jit(f).lower(x, w).as_text()
    with ops.tracing_for("gpu"):  # a new function: JAX caches traces per function
        assert "convolution" in jax.jit(lambda x, w: f(x, w)).lower(x, w).as_text()


@pytest.mark.parametrize("framework", ["haiku", "equinox"])
def test_a_train_step_traces_each_batchnorm_shape_once(framework, monkeypatch):
    """Training-mode BatchNorm is one jitted function (`ops.batch_norm_train`), so a gradient's
    trace reuses each shape's BatchNorm trace: a ResNet-18 has 20 BatchNorms and 5 shapes. Traced
    for every BatchNorm, they were most of a train step's tracing (ResNet-50, Haiku: 1.1 s of
    1.45 s with lowering), which every process pays, compilation cache or not. The closed-form
    derivative (Haiku's default) traces its rule once more per shape: its moments twice per shape."""
    from zoo import ops

    per_shape = 2 if framework == "haiku" and ops._BN_GRAD == "closed" else 1
    calls = []
    moments = ops.bn_moments
    monkeypatch.setattr(ops, "bn_moments", lambda *a, **k: calls.append(1) or moments(*a, **k))
    # An input size no other test uses: JAX's trace cache is per process.
    n, h, w = 3, 45, 39
    if framework == "haiku":
        import zoo.haiku

        net = zoo.haiku.create("resnet18")
        # Initialised at another size (the parameters do not depend on it), so that the
        # initialisation's own forward pass does not fill the cache for the step's shapes.
        params, state = jax.eval_shape(lambda k: net.init(k, jnp.zeros((1, 32, 32, 3)), is_training=True),
                                       jax.random.key(0))

        def loss(params, state, x):
            out, _ = net.apply(params, state, None, x, is_training=True)
            return out.sum()

        calls.clear()
        jax.make_jaxpr(jax.grad(loss))(params, state, jax.ShapeDtypeStruct((n, h, w, 3), jnp.float32))
    else:
        import zoo.equinox

        model, state = zoo.equinox.create("resnet18", key=jax.random.key(0))

        def loss(model, state, x):
            out, _ = jax.vmap(model, axis_name=zoo.equinox.BATCH_AXIS, in_axes=(0, None), out_axes=(0, None))(x, state)
            return out.sum()

        calls.clear()
        eqx.filter_make_jaxpr(eqx.filter_grad(loss))(model, state, jax.ShapeDtypeStruct((n, 3, h, w), jnp.float32))
    assert len(calls) == 5 * per_shape
