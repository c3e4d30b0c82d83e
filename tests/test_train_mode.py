"""Training mode: batch statistics and PyTorch's running-statistic update, in both frameworks."""


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.equinox
import zoo.haiku
from converters.convert import convert_state_dict
from converters.state_dict import load_state_dict
from converters.torch_models import random_model

from .conftest import close_to_float64, jax_train_forward, torch_train_step


@pytest.mark.parametrize("framework", ["haiku", "equinox"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_one_training_forward_matches_pytorch(arch, framework):
    model = random_model(arch, seed=1)
    converted = convert_state_dict(arch, load_state_dict(model), framework)
    x = np.random.default_rng(1).standard_normal((4, 3, 61, 75)).astype(np.float32)
    ref32, sd32 = torch_train_step(model, x)
    ref64, sd64 = torch_train_step(model.double(), x)
    model.float()
    out, named = jax_train_forward(converted, framework, x)
    ok, errs = close_to_float64(ref64, ref32, out)
    assert ok, f"logits: ours {errs[0]:.2e} vs PyTorch fp32 {errs[1]:.2e} from float64"
    stats = [k for k in sd64 if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10
    for k in stats:
        ok, errs = close_to_float64(sd64[k], sd32[k], np.asarray(named[k]))
        assert ok, f"{k}: ours {errs[0]:.2e} vs PyTorch fp32 {errs[1]:.2e} from float64"
    # The update really moved the loaded statistics (so the check above is not vacuous).
    loaded = random_model(arch, seed=1).state_dict()["layer1.0.bn1.running_var"].numpy()
    assert not np.allclose(sd32["layer1.0.bn1.running_var"], loaded)


# Eager, op by op, as in a notebook: ~16 s a case on 2 cores whatever the model's size (every
# primitive is compiled on its own; resnet18, test_resnet and resnet18 at one block per stage all
# took 15-17 s). Haiku's case is `-m slow`: the jitted gradients of both frameworks are in
# tests/test_training.py, and eager execution runs the same JAX operations in either framework.
@pytest.mark.parametrize("framework", [pytest.param("haiku", marks=pytest.mark.slow), "equinox"])
def test_gradients_flow_in_training_mode(framework):
    """A fine-tuning step is possible without `jit`: finite, non-zero gradients for every
    parameter."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 45, 51)), jnp.float32)
    labels = jnp.array([1, 3])
    if framework == "haiku":
        net = zoo.haiku.create("resnet18", num_classes=5)
        params, state = net.init(jax.random.key(0), x.transpose(0, 2, 3, 1), is_training=True)

        def loss(p):
            logits, _ = net.apply(p, state, None, x.transpose(0, 2, 3, 1), is_training=True)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

        grads = jax.grad(loss)(params)
    else:
        model, state = zoo.equinox.create("resnet18", key=jax.random.key(0), num_classes=5)

        @eqx.filter_grad
        def grads_fn(m):
            logits, _ = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

        grads = grads_fn(model)
    leaves = [g for g in jax.tree_util.tree_leaves(grads) if eqx.is_array(g)]
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) >= len(leaves) - 1
