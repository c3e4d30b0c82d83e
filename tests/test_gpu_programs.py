"""What a GPU compiles from zoo's models, checked on any machine: `jax.export` lowers a program
for CUDA without a GPU, so CI sees the convolutions and transposes that XLA's GPU compiler will be
given, in both frameworks, for every CI model (at most two blocks per stage, one case per distinct
spec).

Why: the layouts of a program decide its speed on a GPU before any kernel runs. Equinox's
per-example CHW models once gave XLA NCHW convolutions with a transpose around each (inference at
0.58x Haiku's speed on an H100), and GroupNorm once moved the channels to the front of every map
and back (two transposes of each map per norm). Neither shows in the numbers on a CPU test machine."""

import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import zoo.equinox
import zoo.haiku
from zoo.equinox import BATCH_AXIS

from .conftest import shallow_ci_models, shallow_overrides

# A batch no kernel has as a dimension, so that a transposed tensor with it is a feature map.
BATCH, H, W = 5, 64, 80
# `[b, 0, 1, f]`: batch, the two spatial axes, then the features: NHWC, what cuDNN runs fastest.
CONV = re.compile(r"stablehlo\.convolution.*? dim_numbers = \[([^]]*)\]x\[[^]]*\]->\[([^]]*)\]")
TRANSPOSE = re.compile(r"stablehlo\.transpose %\S+, dims = \[[^]]*\] : \(tensor<((?:\d+x)+)\w+>\)")


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct))


def _cuda_program(f, *args) -> str:
    return jax.export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()


def _main_output(out):
    return out[0] if isinstance(out, tuple) else out  # GoogLeNet in training: its main logits


def _haiku_program(arch: str, training: bool) -> str:
    """The inference forward, or the training-mode gradient of the summed logits."""
    net = zoo.haiku.create(arch, **shallow_overrides(arch))
    x = jax.ShapeDtypeStruct((BATCH, H, W, 3), jnp.float32)
    params, state = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, is_training=training), x)

    def forward(params, state, x):
        return _main_output(net.apply(params, state, jax.random.key(1), x, is_training=training)[0])

    f = jax.grad(lambda *a: jnp.sum(forward(*a))) if training else forward
    return _cuda_program(f, params, state, x)


def _equinox_program(arch: str, training: bool, batched: bool = False) -> str:
    """As `_haiku_program`, the single-example model vmapped with its batch axis name; `batched`:
    in inference, the model called on the whole batch, as `zoo.Model.predict` and the evaluation
    steps call it."""
    model, state = eqx.filter_eval_shape(zoo.equinox.create, arch, key=jax.random.key(0), **shallow_overrides(arch))
    arrays, static = eqx.partition(model if training else eqx.nn.inference_mode(model), _is_array)
    x = jax.ShapeDtypeStruct((BATCH, 3, H, W), jnp.float32)

    def forward(arrays, state, x):
        m = eqx.combine(arrays, static)
        if batched:
            return m(x, state)[0]
        keys = jax.random.split(jax.random.key(1), BATCH)
        out, _ = jax.vmap(lambda xi, k, s: m(xi, s, key=k), axis_name=BATCH_AXIS, in_axes=(0, 0, None),
                          out_axes=(0, None))(x, keys, state)
        return _main_output(out)

    f = jax.grad(lambda *a: jnp.sum(forward(*a))) if training else forward
    return _cuda_program(f, arrays, state, x)


def _map_transposes(program: str) -> list[tuple[int, ...]]:
    """Shapes of the transposed operands that hold a batch of maps: a batch axis and more than a
    vector per example (2048 values: the widest pooled features). Kernels (regrouped for a grouped
    convolution's gradient) and small per-example vectors (logits, ResNeSt's attention weights)
    are not feature maps."""
    shapes = [tuple(int(d) for d in s.rstrip("x").split("x")) for s in TRANSPOSE.findall(program)]
    return [s for s in shapes if BATCH in s and math.prod(s) > BATCH * 2048]


@pytest.mark.parametrize("arch", shallow_ci_models())
def test_gpu_forward_is_channels_last_without_map_transposes(arch):
    """Both frameworks' inference programs for CUDA: every 2-D convolution reads and writes NHWC,
    the two frameworks have the same convolutions, and no feature map is transposed but Equinox's
    NCHW input at the entry (its one CHW->HWC transpose). Equinox's both ways: vmapped (the
    user's style) and called on the batch (zoo's predict and evaluation steps)."""
    programs = {"haiku": _haiku_program(arch, False), "equinox": _equinox_program(arch, False),
                "equinox batched": _equinox_program(arch, False, batched=True)}
    convs = {name: [c for c in CONV.findall(p) if len(c[0].split(",")) == 4] for name, p in programs.items()}
    assert convs["haiku"], "no 2-D convolution found: the pattern no longer matches JAX's text"
    for name, found in convs.items():
        assert all(c == ("b, 0, 1, f", "b, 0, 1, f") for c in found), (name, sorted(set(found)))
        assert len(found) == len(convs["haiku"]), name
    assert _map_transposes(programs["haiku"]) == []
    assert _map_transposes(programs["equinox"]) == [(BATCH, 3, H, W)]
    assert _map_transposes(programs["equinox batched"]) == [(BATCH, 3, H, W)]


@pytest.mark.parametrize("arch", shallow_ci_models())
def test_gpu_training_gradient_transposes_no_feature_map(arch):
    """The training-mode gradient programs for CUDA: no feature map is transposed but Equinox's
    input (kernels are, for grouped convolutions' gradients); both frameworks have the same
    convolutions."""
    programs = {"haiku": _haiku_program(arch, True), "equinox": _equinox_program(arch, True)}
    assert _map_transposes(programs["haiku"]) == []
    assert _map_transposes(programs["equinox"]) == [(BATCH, 3, H, W)]
    assert len(CONV.findall(programs["haiku"])) == len(CONV.findall(programs["equinox"])) > 0
