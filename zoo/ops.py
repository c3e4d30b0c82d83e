"""Numerical building blocks with PyTorch semantics, shared by the Haiku and Equinox models.

Every function takes the spatial axes explicitly, so one implementation serves Haiku's NHWC batches
and Equinox's single CHW examples (both have their spatial axes at 1 and 2).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .spec import PoolSpec

SPATIAL = (1, 2)


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size, including its ceil_mode rule that the last window must
    start inside the input or the left padding (never wholly in the right padding)."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_pads(x_shape: Sequence[int], p: PoolSpec, axes: Sequence[int]) -> list[tuple[int, int]]:
    """Per-axis (lo, hi) padding: symmetric `padding`, plus whatever extra right padding
    ceil_mode needs for its last partial window."""
    pads = [(0, 0)] * len(x_shape)
    for a in axes:
        n = x_shape[a]
        out = pool_output_size(n, p.kernel, p.stride, p.padding, p.ceil_mode)
        extra = max((out - 1) * p.stride + p.kernel - (n + 2 * p.padding), 0)
        pads[a] = (p.padding, p.padding + extra)
    return pads


def _window(ndim: int, axes: Sequence[int], value: int) -> tuple[int, ...]:
    return tuple(value if a in axes else 1 for a in range(ndim))


def max_pool(x: Array, p: PoolSpec, axes: Sequence[int] = SPATIAL) -> Array:
    # -inf padding: PyTorch never lets padding win a max, even for all-negative inputs.
    pads = _pool_pads(x.shape, p, axes)
    init = jnp.array(-jnp.inf, x.dtype)
    return jax.lax.reduce_window(x, init, jax.lax.max, _window(x.ndim, axes, p.kernel),
                                 _window(x.ndim, axes, p.stride), pads)


def avg_pool(x: Array, p: PoolSpec, axes: Sequence[int] = SPATIAL) -> Array:
    pads = _pool_pads(x.shape, p, axes)
    win, strides = _window(x.ndim, axes, p.kernel), _window(x.ndim, axes, p.stride)
    total = jax.lax.reduce_window(x, jnp.array(0, x.dtype), jax.lax.add, win, strides, pads)
    # PyTorch's divisor: with count_include_pad the symmetric padding counts, the extra
    # ceil_mode padding never does; without it only real input elements count.
    ones_shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    ones = jnp.ones(ones_shape, x.dtype)
    if p.count_include_pad:
        sym = [(p.padding, p.padding) if a in axes else (0, 0) for a in range(x.ndim)]
        ones = jnp.pad(ones, sym, constant_values=1)
        pads = [(0, hi - lo) for lo, hi in pads]
    counts = jax.lax.reduce_window(ones, jnp.array(0, x.dtype), jax.lax.add, win, strides, pads)
    return total / counts


def pool(x: Array, p: PoolSpec, axes: Sequence[int] = SPATIAL) -> Array:
    return max_pool(x, p, axes) if p.kind == "max" else avg_pool(x, p, axes)


def global_avg_pool(x: Array, axes: Sequence[int] = SPATIAL) -> Array:
    return jnp.mean(x, axis=tuple(axes))


def conv2d(x: Array, w: Array, b: Optional[Array], *, stride: int, padding: int, dilation: int,
           groups: int, dimension_numbers: tuple[str, str, str]) -> Array:
    """Convolution with PyTorch's explicit symmetric padding (JAX's "SAME" pads asymmetrically
    for stride 2, which shifts every feature map of a ported model)."""
    w = w.astype(x.dtype)
    y = jax.lax.conv_general_dilated(
        x, w, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation), dimension_numbers=dimension_numbers,
        feature_group_count=groups)
    if b is not None:
        c_axis = dimension_numbers[2].index("C")
        shape = [1] * y.ndim
        shape[c_axis] = -1
        y = y + b.astype(y.dtype).reshape(shape)
    return y


def bn_moments(x: Float[Array, "..."], axes: Sequence[int], axis_name: Optional[str] = None
               ) -> tuple[Array, Array, Array]:
    """Batch mean, biased variance (used to normalise) and unbiased variance (PyTorch's running
    update), in float32. With `axis_name`, statistics are reduced across a vmapped batch too."""
    x = x.astype(jnp.float32)
    axes = tuple(axes)
    mean = jnp.mean(x, axis=axes, keepdims=True)
    count = math.prod(x.shape[a] for a in axes)
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
        count = count * jax.lax.psum(1, axis_name)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
    mean, var = jnp.squeeze(mean, axes), jnp.squeeze(var, axes)
    unbiased = var * (count / jnp.maximum(count - 1, 1))
    return mean, var, unbiased


def normalize(x: Array, mean: Array, var: Array, scale: Array, offset: Array, eps: float,
              channel_axis: int) -> Array:
    """(x - mean) / sqrt(var + eps) * scale + offset, computed in float32, returned in x's dtype."""
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    inv = jax.lax.rsqrt(var.astype(jnp.float32) + eps) * scale.astype(jnp.float32)
    shift = offset.astype(jnp.float32) - mean.astype(jnp.float32) * inv
    y = x.astype(jnp.float32) * inv.reshape(shape) + shift.reshape(shape)
    return y.astype(x.dtype)


def ema_update(running: Array, batch: Array, momentum: float) -> Array:
    """PyTorch's running-statistic update (no zero-debiasing, unlike Haiku/Equinox EMAs)."""
    return (1.0 - momentum) * running + momentum * batch


def drop_path(x: Array, rate: float, key: Optional[Array], batch_axis: Optional[int]) -> Array:
    """Stochastic depth as timm's DropPath: zero whole samples, rescale survivors by 1/keep."""
    if rate == 0.0 or key is None:
        return x
    keep = 1.0 - rate
    shape = [1] * x.ndim
    if batch_axis is not None:
        shape[batch_axis] = x.shape[batch_axis]
    mask = jax.random.bernoulli(key, keep, tuple(shape))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def dropout(x: Array, rate: float, key: Optional[Array]) -> Array:
    if rate == 0.0 or key is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)
