"""Equinox models in inference mode called on a whole batch give what the vmapped model gives.

`zoo.Model.predict` (so `zoo verify` and every parity test) and `zoo.training`'s evaluation steps
call the Equinox model on the (N, C, H, W) batch, not through `jax.vmap`: tracing through vmap
tripled the trace that every process pays on its first call. A user's code vmaps the
single-example model. Both must compute the same function, for every kind of block and head."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.equinox
import zoo.training as zt
from zoo import registry
from zoo.equinox import BATCH_AXIS

from .conftest import shallow_ci_models, shallow_overrides

# (arch, overrides) for the other outputs: pooled features, the unpooled map, feature maps.
# (GoogLeNet's leave its trunk through the same `to_chw` and pooling.)
HEADS = [("resnet18", dict(num_classes=0)), ("resnet18", dict(num_classes=0, global_pool="")),
         ("resnet18", dict(features_only=True))]


def _randomised(arch: str, **overrides):
    """A model in inference mode with random kernels and, so that no norm is an identity, random
    norm scales, offsets, biases and running statistics; drawn by NumPy into the model's
    PyTorch-named arrays (a random initialisation compiles a program per architecture)."""
    plan = registry.get_spec(arch, **overrides).plan(False)
    model_t, state_t = zoo.equinox.template(plan)
    rng = np.random.default_rng(0)
    arrays = {}
    for name, leaf in zoo.equinox.named_arrays(model_t, state_t).items():
        shape = leaf.shape
        if len(shape) > 1:  # kernels, fan-in scaled
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif name.endswith(("running_var", "weight")):  # variances and norm scales
            a = rng.uniform(0.5, 1.5, shape)
        else:
            a = 0.2 * rng.standard_normal(shape)
        arrays[name] = a.astype(np.float32)
    model, state = zoo.equinox.from_named_arrays(model_t, arrays)
    return eqx.nn.inference_mode(model), state


def _vmapped(model, state, x):
    return jax.vmap(lambda xi: model(xi, state)[0], axis_name=BATCH_AXIS)(x)


def _assert_same(batched, vmapped):
    b_leaves, v_leaves = jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(vmapped)
    assert jax.tree_util.tree_structure(batched) == jax.tree_util.tree_structure(vmapped)
    for b, v in zip(b_leaves, v_leaves):
        assert b.shape == v.shape
        scale = float(jnp.max(jnp.abs(v)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(b), np.asarray(v), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("arch,overrides", [pytest.param(p.values[0], {}, id=p.id) for p in shallow_ci_models()]
                         + [pytest.param(a, o, id=f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items())}")
                            for a, o in HEADS])
def test_batched_inference_is_the_vmapped_model(arch, overrides):
    model, state = _randomised(arch, **shallow_overrides(arch), **overrides)
    # Odd, non-square, and a batch no other axis has.
    x = jax.random.normal(jax.random.key(2), (3, 3, 45, 61))
    batched = eqx.filter_jit(lambda m, s, x: m(x, s)[0])(model, state, x)
    _assert_same(batched, eqx.filter_jit(_vmapped)(model, state, x))


def test_eval_step_calls_the_batch_and_matches_vmap():
    """`make_eval_step` on an Equinox model: the logits-based metrics of the vmapped model."""
    model, state = _randomised("resnet18", **shallow_overrides("resnet18"), num_classes=7)
    x = jax.random.normal(jax.random.key(2), (4, 3, 33, 47))
    labels = jnp.array([0, 3, 6, 2])
    model = eqx.nn.inference_mode(model, False)  # as a training state holds it
    metrics = zt.make_eval_step(model)((model, state), x, labels)
    logits = eqx.filter_jit(_vmapped)(eqx.nn.inference_mode(model), state, x)
    _assert_same(metrics["logits"], logits)
    loss, _ = zt.classification_loss(logits, labels)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)


def test_training_mode_on_a_batch_normalises_across_it():
    """A batch given to the model in training mode (as zoo.training's steps give it) is normalised
    with the whole batch's statistics, as the vmapped model's BatchNorms do across the vmapped
    axis, not per example: the same outputs and running statistics."""
    model, state = _randomised("resnet18", **shallow_overrides("resnet18"))
    model = eqx.nn.inference_mode(model, False)
    x = jax.random.normal(jax.random.key(4), (3, 3, 33, 47))
    fresh = lambda: jax.tree_util.tree_map(lambda a: a, state)  # noqa: E731  a call spends its state
    batched = eqx.filter_jit(lambda m, s: m(x, s))(model, fresh())
    vmapped = eqx.filter_jit(lambda m, s: jax.vmap(lambda xi: m(xi, s), axis_name=BATCH_AXIS,
                                                   out_axes=(0, None))(x))(model, fresh())
    _assert_same(batched[0], vmapped[0])
    _assert_same(jax.tree_util.tree_leaves(batched[1]), jax.tree_util.tree_leaves(vmapped[1]))
    per_example, _ = eqx.filter_jit(lambda m, s: m(x[:1], s))(model, fresh())
    assert not np.allclose(np.asarray(per_example[0]), np.asarray(batched[0][0]), atol=1e-3)
