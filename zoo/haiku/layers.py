"""Haiku layers with PyTorch numerics. Parameters are float32 whatever the compute dtype."""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Optional

import haiku as hk
import jax.numpy as jnp
from jaxtyping import Array, Float

from .. import _init, ops
from ..naming import haiku_module
from ..spec import Conv1dSpec, ConvSpec, LinearSpec, NormSpec

MOMENTUM = 0.1  # PyTorch's BatchNorm default, which every model here uses

# The device axis training-mode BatchNorm also averages over (see `zoo.haiku.create`). Set around
# a forward pass rather than passed to every Norm: the wiring code need not thread it through.
_CROSS_REPLICA_AXIS: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("cross_replica_axis",
                                                                                    default=None)


@contextlib.contextmanager
def cross_replica(axis_name: Optional[str]) -> Iterator[None]:
    token = _CROSS_REPLICA_AXIS.set(axis_name)
    try:
        yield
    finally:
        _CROSS_REPLICA_AXIS.reset(token)


def local_name(torch_name: str) -> str:
    """The last component of the Haiku module path for a PyTorch module name (the parent
    module supplies the rest)."""
    return haiku_module(torch_name).split("/")[-1]


def _normal(std: float):
    def init(shape, dtype):
        return _init.initial("normal", tuple(shape), std, hk.next_rng_key).astype(dtype)

    return init


def _uniform(bound: float):
    def init(shape, dtype):
        return _init.initial("uniform", tuple(shape), bound, hk.next_rng_key).astype(dtype)

    return init


class Conv2d(hk.Module):
    def __init__(self, spec: ConvSpec):
        super().__init__(name=local_name(spec.name))
        self.spec = spec

    def __call__(self, x: Float[Array, "N H W Cin"]) -> Float[Array, "N Ho Wo Cout"]:
        s = self.spec
        # timm's init: kaiming normal, fan_out, for ReLU.
        w_init = _normal(math.sqrt(2.0 / (s.out_ch * s.kernel * s.kernel)))
        w = hk.get_parameter("w", (s.kernel, s.kernel, s.in_ch // s.groups, s.out_ch), jnp.float32, w_init)
        b = hk.get_parameter("b", (s.out_ch,), jnp.float32, jnp.zeros) if s.bias else None
        return ops.conv2d(x, w, b, stride=s.stride, padding=s.padding, dilation=s.dilation,
                          groups=s.groups, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Norm(hk.Module):
    """BatchNorm with PyTorch semantics (batch statistics in training, running statistics updated
    with momentum 0.1 and the unbiased variance, no zero-debiasing), or GroupNorm."""

    def __init__(self, spec: NormSpec):
        super().__init__(name=local_name(spec.name))
        self.spec = spec

    def __call__(self, x: Float[Array, "N H W C"], is_training: bool) -> Float[Array, "N H W C"]:
        s = self.spec
        scale = hk.get_parameter("scale", (s.channels,), jnp.float32, jnp.ones)
        offset = hk.get_parameter("offset", (s.channels,), jnp.float32, jnp.zeros)
        if s.kind == "groupnorm":
            return ops.group_norm(x, s.groups, scale, offset, s.eps, channel_axis=-1, batch_axes=1)
        running_mean = hk.get_state("mean", (s.channels,), jnp.float32, jnp.zeros)
        running_var = hk.get_state("var", (s.channels,), jnp.float32, jnp.ones)
        if is_training:
            y, new_mean, new_var = ops.batch_norm_train(
                x, running_mean, running_var, scale, offset, axes=(0, 1, 2), axis_name=_CROSS_REPLICA_AXIS.get(),
                eps=s.eps, channel_axis=-1, momentum=MOMENTUM)
            hk.set_state("mean", new_mean)
            hk.set_state("var", new_var)
            return y
        return ops.batch_norm_eval(x, running_mean, running_var, scale, offset, eps=s.eps, channel_axis=-1)


class Linear(hk.Module):
    def __init__(self, spec: LinearSpec):
        super().__init__(name=local_name(spec.name))
        self.spec = spec

    def __call__(self, x: Float[Array, "N Cin"]) -> Float[Array, "N Cout"]:
        s = self.spec
        # PyTorch's nn.Linear init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        bound = 1.0 / math.sqrt(s.in_features)
        init = _uniform(bound)
        w = hk.get_parameter("w", (s.in_features, s.out_features), jnp.float32, init)
        b = hk.get_parameter("b", (s.out_features,), jnp.float32, init)
        return jnp.dot(x, w.astype(x.dtype)) + b.astype(x.dtype)


class Conv1d(hk.Module):
    """PyTorch Conv1d on (N, L, C) inputs; kernel (W, I, O) as `naming.haiku_from_torch_layout`."""

    def __init__(self, spec: Conv1dSpec):
        super().__init__(name=local_name(spec.name))
        self.spec = spec

    def __call__(self, x: Float[Array, "N L Cin"]) -> Float[Array, "N L Cout"]:
        s = self.spec
        # PyTorch's Conv1d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(s.in_ch * s.kernel)
        init = _uniform(bound)
        w = hk.get_parameter("w", (s.kernel, s.in_ch, s.out_ch), jnp.float32, init)
        b = hk.get_parameter("b", (s.out_ch,), jnp.float32, init) if s.bias else None
        return ops.conv1d(x, w, b, padding=s.padding, dimension_numbers=("NWC", "WIO", "NWC"))
