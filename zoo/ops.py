"""Numerical building blocks with PyTorch semantics, shared by the Haiku and Equinox models.

Every function takes the spatial axes explicitly, so one implementation serves Haiku's NHWC batches
and Equinox's single CHW examples (both have their spatial axes at 1 and 2).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
import os
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .spec import PoolSpec

SPATIAL = (1, 2)

# Where convolutions run as dot products (`conv2d`: 1x1 ones, and those on maps smaller than their
# kernel): "cpu" (compiled for a CPU), "all" or "none". A switch for measuring that lever against
# XLA's convolutions (benchmarks/profile_gpu.py, or ZOO_CONV_AS_DOT in a process's environment),
# read when a function is traced.
_CONV_AS_DOT = os.environ.get("ZOO_CONV_AS_DOT", "cpu")

# The platform a function being traced will run on, where the caller knows it (zoo's own jitted
# functions: `zoo._jit`, the predicts). Unknown, `_by_platform` (`conv2d`, `relu`) stages both
# forms out with `jax.lax.platform_dependent`, whose tracing (a conditional per 1x1 convolution,
# batched again under Equinox's vmap) cost an Equinox GoogLeNet predict 0.2 s of each process's
# first call.
_PLATFORM: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("zoo_platform", default=None)


@contextlib.contextmanager
def tracing_for(platform: Optional[str]):
    """Trace zoo's ops for `platform` ("cpu", "gpu", ...; None: unknown)."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def _by_platform(cpu: Callable[..., Array], default: Callable[..., Array], *args: Array) -> Array:
    """`cpu(*args)` where the traced function will run on a CPU, else `default(*args)`: chosen for
    the platform traced for (`tracing_for`), else when the program is lowered."""
    platform = _PLATFORM.get()
    if platform == "cpu":
        return cpu(*args)
    if platform is not None:
        return default(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


def _relu_select(x: Float[Array, "..."]) -> Float[Array, "..."]:
    # NaN <= 0 is false, so a NaN passes through, and the gradient is PyTorch's (zero where
    # x <= 0, the incoming one elsewhere, NaN included). lax, not jnp.where: that is a jitted
    # wrapper, which Equinox's vmap batches again at every call (an Equinox ResNet-50 predict's
    # trace and lowering: 0.165 s with jnp.where, 0.151 s with lax).
    zero = jax.lax.full_like(x, 0)
    return jax.lax.select(jax.lax.le(x, zero), zero, x)


def relu(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """ReLU that carries NaNs through as PyTorch's does, on a CPU too.

    Why: jaxlib's CPU backend hands reductions, with the elementwise work feeding them, to YNNPACK,
    whose fused maximum drops NaNs. A training step fed one NaN pixel returned a finite loss while
    its gradients made the parameters NaN (ResNet-18, both frameworks), so the one number a
    researcher watches hid the fault. Compiled for a CPU, ReLU is a select instead; elsewhere it
    stays `jax.nn.relu` (a maximum, which XLA's GPU backend propagates NaNs through and may fuse
    into a convolution); see `_by_platform`.
    """
    return _by_platform(_relu_select, jax.nn.relu, x)


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


def _init_value(value: float, dtype) -> np.ndarray:
    """A reduction's init value as a concrete NumPy scalar. `reduce_window` recognises a max or a
    sum (which have derivatives) only from a *known* identity value; a `jnp.array` is a tracer
    under `jit`, and the generic reduction it falls back to cannot be linearised (`jit(grad)`
    failed for every model)."""
    return np.array(value, dtype=dtype)


def _max_pool_window(x: Array, p: PoolSpec, axes: Sequence[int]) -> Array:
    # -inf padding: PyTorch never lets padding win a max, even for all-negative inputs.
    pads = _pool_pads(x.shape, p, axes)
    return jax.lax.reduce_window(x, _init_value(-np.inf, x.dtype), jax.lax.max, _window(x.ndim, axes, p.kernel),
                                 _window(x.ndim, axes, p.stride), pads)


def _strided_view(x: Array, offsets: dict[int, int], out: dict[int, int], stride: int) -> Array:
    """The elements of the padded `x` that one position of a sliding window reads: along each axis
    in `offsets`, `out[axis]` elements from that offset, `stride` apart."""
    start, limit, strides = [0] * x.ndim, list(x.shape), [1] * x.ndim
    for a, o in offsets.items():
        start[a], limit[a], strides[a] = o, o + stride * (out[a] - 1) + 1, stride
    return jax.lax.slice(x, start, limit, strides)


def _first_max(x: Array, axes: Sequence[int], out: dict[int, int], p: PoolSpec) -> Array:
    # PyTorch's scan over the window's views of the padded `x` (along `axes`, row-major): keep a
    # value greater than the maximum so far, or a NaN.
    best = None
    for offsets in itertools.product(range(p.kernel), repeat=len(axes)):
        view = _strided_view(x, dict(zip(axes, offsets)), out, p.stride)
        if best is None:
            best = view
        else:
            best = jax.lax.select(jax.lax.bitwise_or(jax.lax.gt(view, best), jax.lax.ne(view, view)), view, best)
    return best


def _max_pool_scan(x: Array, p: PoolSpec, axes: Sequence[int]) -> Array:
    # PyTorch's kernel scans each window row by row and keeps a value greater than the maximum so
    # far, or a NaN; the same chain of selects over the window's strided views gives its values
    # and, differentiated, its gradient: all of it to the first maximum (ties included, as after a
    # ReLU), with no select-and-scatter. With stride 1 one axis at a time, the last first (the
    # first maximum of each row, then the first row holding the window's: the first in row-major
    # order, and the last NaN, as PyTorch keeps): GoogLeNet's 3x3/1 pools' gradient then took
    # 1.8-4.6 ms instead of 19-40 (the fused gradient recomputes the chain per view: k+k views
    # instead of k*k). Strided pools keep the 2-D chain, whose gradient was 2.5x faster there.
    out = {a: pool_output_size(x.shape[a], p.kernel, p.stride, p.padding, p.ceil_mode) for a in axes}
    x = jax.lax.pad(x, jnp.array(-np.inf, x.dtype), [(lo, hi, 0) for lo, hi in _pool_pads(x.shape, p, axes)])
    if p.stride > 1:
        return _first_max(x, tuple(axes), out, p)
    for a in sorted(axes, reverse=True):
        x = _first_max(x, (a,), out, p)
    return x


def max_pool(x: Array, p: PoolSpec, axes: Sequence[int] = SPATIAL) -> Array:
    """PyTorch's max pooling. Compiled for a CPU, a chain of selects over the window's views:
    XLA:CPU's gradient of `reduce_window` (a select-and-scatter) took 25x PyTorch's time (GoogLeNet's
    pools at batch 8, 224x224: 608 against 24 ms; docs/benchmarks.md). Elsewhere `reduce_window`
    (`_by_platform`)."""
    return _by_platform(functools.partial(_max_pool_scan, p=p, axes=tuple(axes)),
                        functools.partial(_max_pool_window, p=p, axes=tuple(axes)), x)


def avg_pool(x: Array, p: PoolSpec, axes: Sequence[int] = SPATIAL) -> Array:
    pads = _pool_pads(x.shape, p, axes)
    win, strides = _window(x.ndim, axes, p.kernel), _window(x.ndim, axes, p.stride)
    total = jax.lax.reduce_window(x, _init_value(0, x.dtype), jax.lax.add, win, strides, pads)
    # PyTorch's divisor: with count_include_pad the symmetric padding counts, the extra
    # ceil_mode padding never does; without it only real input elements count.
    ones_shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    ones = jnp.ones(ones_shape, x.dtype)
    if p.count_include_pad:
        sym = [(p.padding, p.padding) if a in axes else (0, 0) for a in range(x.ndim)]
        ones = jnp.pad(ones, sym, constant_values=1)
        pads = [(0, hi - lo) for lo, hi in pads]
    counts = jax.lax.reduce_window(ones, _init_value(0, x.dtype), jax.lax.add, win, strides, pads)
    return total / counts


def pool(x: Array, p: PoolSpec, axes: Sequence[int] = SPATIAL) -> Array:
    if p.kind == "avg_same":
        return avg_pool_same(x, p, axes)
    return max_pool(x, p, axes) if p.kind == "max" else avg_pool(x, p, axes)


def global_avg_pool(x: Array, axes: Sequence[int] = SPATIAL) -> Array:
    return jnp.mean(x, axis=tuple(axes))


def runs_as_dot(kernel: tuple[int, int], padding: int, groups: int) -> bool:
    """Whether `conv2d`, compiled for a CPU, computes this convolution (channels-last input) as a
    dot product."""
    return _CONV_AS_DOT != "none" and tuple(kernel) == (1, 1) and padding == 0 and groups == 1


def runs_as_im2col(kernel: tuple[int, int], in_hw: tuple[int, int], out_hw: tuple[int, int], groups: int) -> bool:
    """Whether `conv2d`, compiled for a CPU, computes this convolution (channels-last input) as
    im2col and one dot product: a kernel wider than 1x1, one group, and an input or output map
    narrower than the kernel along an axis (the input gradient convolves the output's map)."""
    return (_CONV_AS_DOT != "none" and groups == 1 and max(kernel) > 1
            and any(n < k for n, k in zip((*in_hw, *out_hw), (*kernel, *kernel))))


def _im2col_dot(x: Array, w: Array, stride: int, padding: int, dilation: int,
                dimension_numbers: tuple[str, str, str]) -> Array:
    # The kh*kw shifted (strided, dilated) views of the zero-padded input, side by side on the
    # channel axis, times the kernel as one matrix: the convolution's sums, in another order.
    lhs, rhs, _ = dimension_numbers
    ha, wa = lhs.index("H"), lhs.index("W")
    kh, kw = w.shape[rhs.index("H")], w.shape[rhs.index("W")]
    pads = [(0, 0, 0)] * x.ndim
    pads[ha] = pads[wa] = (padding, padding, 0)
    xp = jax.lax.pad(x, jnp.array(0, x.dtype), pads)
    out = dict(zip((ha, wa), _conv_out_hw(x.shape, lhs, (kh, kw), stride, padding, dilation)))
    taps = [_strided_view(xp, {ha: i * dilation, wa: j * dilation}, out, stride) for i in range(kh) for j in range(kw)]
    c = x.ndim - 1
    if rhs == "HWIO":
        # The kernel's rows run (h, w, i), as the taps concatenated on the channel axis do.
        patches = jax.lax.concatenate(taps, c)
        w2, w_axis = w.reshape(-1, w.shape[3]), 0
    else:
        # OIHW (Equinox's; any other layout is made so): the kernel as (O, I*kh*kw), read in
        # place (a kernel copy in every call cost Equinox's train step ~20% for 1x1 kernels), and
        # the taps stacked after the channels to match.
        if rhs != "OIHW":
            w = jax.lax.transpose(w, [rhs.index(d) for d in "OIHW"])
        patches = jax.lax.concatenate([jax.lax.expand_dims(t, (c + 1,)) for t in taps], c + 1)
        patches = patches.reshape(*patches.shape[:c], -1)
        w2, w_axis = w.reshape(w.shape[0], -1), 1
    return _channel_matmul(patches, w2, w_axis)


def _pointwise_dot(x: Array, w: Array, stride: int, dimension_numbers: tuple[str, str, str]) -> Array:
    # A 1x1 convolution is a matrix product over channels; stride = taking every s-th pixel.
    lhs, rhs, _ = dimension_numbers
    if stride > 1:
        idx = [slice(None)] * x.ndim
        for d in "HW":
            idx[lhs.index(d)] = slice(None, None, stride)
        x = x[tuple(idx)]
    # The kernel as a matrix in its stored order ((I, O) or (O, I)), contracted on I: no
    # transpose (Equinox's OIHW kernels: an explicit one cost its train step ~20%).
    i_first = rhs.index("I") < rhs.index("O")
    w2 = w.reshape([w.shape[rhs.index(d)] for d in ("IO" if i_first else "OI")])
    return _channel_matmul(x, w2, 0 if i_first else 1)


def _rows_dot(x: Array, w2: Array, w_axis: int) -> Array:
    # x's last (channel) axis times the matrix w2, contracted on w2's axis `w_axis`, with the other
    # axes of x flattened into one: the kernel gradient then contracts one axis. Contracting
    # (N, H, W) as three, XLA:CPU copied the output gradient transposed before the product (HWIO:
    # ResNet-50's 1x1 kernel gradients 1.4x slower; docs/benchmarks.md).
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w2, (((1,), (w_axis,)), ((), ())))
    return y.reshape(*x.shape[:-1], y.shape[-1])


# `_rows_dot` as a primitive of its own, for one reason: its batching rule. vmap of the plain
# function keeps the batch axis apart from the rows (a per-example function cannot merge them), so
# under Equinox's vmap the kernel gradient contracted (N, H*W) as two axes, and XLA:CPU wrote each
# output gradient transposed first: 36 such copies in a ResNet-50 train step, 405 of its 2,873 ms
# of kernel time at batch 8, 224^2 (docs/benchmarks.md). Batched, the primitive takes the batch
# as more rows; its transposes are the plain products on whole arrays, whose rows are then one
# axis. Forward and reverse mode, vmap and jit all work as for the plain function.
def _rows_dot_batched(args: Sequence[Array], dims: Sequence[Optional[int]], *, w_axis: int
                      ) -> tuple[Array, int]:
    (x, w2), (bx, bw) = args, dims
    if bw is None:
        return _channel_matmul(jnp.moveaxis(x, bx, 0), w2, w_axis), 0
    # Batched kernels (an ensemble): the plain product, vmapped.
    return jax.vmap(functools.partial(_rows_dot, w_axis=w_axis), in_axes=(bx, bw))(x, w2), 0


def _rows_dot_t_x(ct: Array, x: Any, w2: Array, *, w_axis: int) -> Array:
    return _rows_dot(ct, w2, 1 - w_axis)


def _rows_dot_t_w(ct: Array, x: Array, w2: Any, *, w_axis: int) -> Array:
    rows = (x.reshape(-1, x.shape[-1]), ct.reshape(-1, ct.shape[-1]))
    if w_axis == 1:
        rows = rows[::-1]
    return jax.lax.dot_general(*rows, (((0,), (0,)), ((), ())))


def _make_rows_dot_p() -> Any:
    # JAX's interfaces for a primitive of one's own; if this JAX lacks one, the plain product.
    try:
        from jax.interpreters import ad, batching, mlir

        try:
            from jax.extend.core import Primitive
        except ImportError:  # jax < 0.4.36
            from jax.core import Primitive
        p = Primitive("zoo_rows_dot")
        p.def_impl(jax.jit(_rows_dot, static_argnames="w_axis"))
        p.def_abstract_eval(lambda x, w2, *, w_axis: x.update(shape=(*x.shape[:-1], w2.shape[1 - w_axis]),
                                                               weak_type=False))
        mlir.register_lowering(p, mlir.lower_fun(_rows_dot, multiple_results=False))
        batching.primitive_batchers[p] = _rows_dot_batched
        ad.defbilinear(p, _rows_dot_t_x, _rows_dot_t_w)
        return p
    except (ImportError, AttributeError):
        return None


_rows_dot_p = _make_rows_dot_p()
_typeof = getattr(jax, "typeof", None) or jax.core.get_aval


def _unsharded(*arrays: Array) -> bool:
    # The primitive's shape rule knows no sharding: inside shard_map (manual axes) or on explicitly
    # sharded arrays zoo runs the plain product.
    for a in arrays:
        aval = _typeof(a)
        sharding = getattr(aval, "sharding", None)
        if sharding is not None and not sharding.mesh.empty:
            return False
        manual = getattr(aval, "manual_axis_type", None)
        if manual is not None and (manual.varying or manual.unreduced or manual.reduced):
            return False
        if getattr(aval, "vma", None):
            return False
    return True


def _channel_matmul(x: Array, w2: Array, w_axis: int) -> Array:
    """`_rows_dot`, through its primitive where it applies (see above)."""
    if _rows_dot_p is not None and _unsharded(x, w2):
        return _rows_dot_p.bind(x, w2, w_axis=w_axis)
    return _rows_dot(x, w2, w_axis)


def _conv_out_hw(shape: Sequence[int], lhs: str, kernel: tuple[int, int], stride: int, padding: int,
                 dilation: int) -> tuple[int, int]:
    return tuple((shape[lhs.index(d)] + 2 * padding - dilation * (k - 1) - 1) // stride + 1
                 for d, k in zip("HW", kernel))


def conv2d(x: Array, w: Array, b: Optional[Array], *, stride: int, padding: int, dilation: int,
           groups: int, dimension_numbers: tuple[str, str, str]) -> Array:
    """Convolution with PyTorch's explicit symmetric padding (JAX's "SAME" pads asymmetrically
    for stride 2, which shifts every feature map of a ported model)."""
    w = w.astype(x.dtype)
    lhs, rhs, out = dimension_numbers
    kernel = (w.shape[rhs.index("H")], w.shape[rhs.index("W")])

    def conv(x: Array, w: Array) -> Array:
        return jax.lax.conv_general_dilated(
            x, w, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
            rhs_dilation=(dilation, dilation), dimension_numbers=dimension_numbers,
            feature_group_count=groups)

    if runs_as_dot(kernel, padding, groups) and lhs == out and lhs[-1] == "C":
        # As a dot, XLA:CPU runs a 1x1 convolution and its two gradients through its GEMM paths (a
        # ResNet-50's 1x1 convolutions, forward and both gradients: 1.7x faster, the kernel gradient
        # most; docs/benchmarks.md). On a GPU the convolution stays: there cuDNN's was as fast or
        # faster (H200, bf16 ResNet-50: inference 3-6% faster, training within 1%) and compiles
        # sooner than the GEMMs XLA autotunes. The compiler sees one of the two (`_by_platform`).
        # The same values up to rounding.
        def dot(x: Array, w: Array) -> Array:
            return _pointwise_dot(x, w, stride, dimension_numbers)

        y = dot(x, w) if _CONV_AS_DOT == "all" else _by_platform(dot, conv, x, w)
    elif (lhs == out and lhs[-1] == "C"
          and runs_as_im2col(kernel, (x.shape[lhs.index("H")], x.shape[lhs.index("W")]),
                             _conv_out_hw(x.shape, lhs, kernel, stride, padding, dilation), groups)):
        # XLA:CPU's convolutions run 10-40x slower, forward and input gradient alike, where a map
        # is narrower than the kernel (a 3x3 convolution on 2x2 maps: a ResNet's last stages at a
        # 32x32 input, CIFAR's size); as im2col and a dot product they run at oneDNN's speed
        # (docs/benchmarks.md). Larger maps keep the convolution, which is faster there. On a GPU
        # cuDNN's stays (`_by_platform`). The same values up to rounding.
        def im2col(x: Array, w: Array) -> Array:
            return _im2col_dot(x, w, stride, padding, dilation, dimension_numbers)

        y = im2col(x, w) if _CONV_AS_DOT == "all" else _by_platform(im2col, conv, x, w)
    else:
        y = conv(x, w)
    if b is not None:
        c_axis = dimension_numbers[2].index("C")
        shape = [1] * y.ndim
        shape[c_axis] = -1
        y = y + b.astype(y.dtype).reshape(shape)
    return y


def bn_moments(x: Float[Array, "..."], axes: Sequence[int], axis_name: Union[None, str, tuple[str, ...]] = None
               ) -> tuple[Array, Array, Array]:
    """Batch mean, biased variance (used to normalise) and unbiased variance (PyTorch's running
    update), in float32 (float64 for float64 inputs). With `axis_name` (one name or several: a
    vmapped batch, a shard_map/pmap device axis), statistics are reduced across those axes too."""
    x = x.astype(stat_dtype(x.dtype))
    axes = tuple(axes)
    # One axis at a time: a vmap axis and a shard_map axis cannot be named in one collective.
    names = () if axis_name is None else (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)

    def total(v: Array) -> Array:
        v = jnp.sum(v, axis=axes, keepdims=True)
        for name in names:
            v = jax.lax.psum(v, name)
        return v

    count = math.prod(x.shape[a] for a in axes)
    for name in names:
        count = count * jax.lax.psum(1, name)
    # Sums first, one division by the whole count after: under vmap the sum over the map and the
    # sum across the batch are then adjacent reductions, which XLA merges into one (as in Haiku's
    # NHWC batch); a mean per example averaged across the batch kept two per statistic (106 more
    # reductions in an Equinox ResNet-50's train step).
    mean = total(x) / count
    var = total(jnp.square(x - mean)) / count
    mean, var = jnp.squeeze(mean, axes), jnp.squeeze(var, axes)
    unbiased = var * (count / jnp.maximum(count - 1, 1))
    return mean, var, unbiased


def stat_dtype(dtype) -> jnp.dtype:
    """The dtype for normalisation statistics: float32 for half precision and float32 compute,
    float64 when computing in float64 (reference runs with jax_enable_x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def normalize(x: Array, mean: Array, var: Array, scale: Array, offset: Array, eps: float,
              channel_axis: int) -> Array:
    """(x - mean) / sqrt(var + eps) * scale + offset, computed in float32 (float64 for float64
    inputs), returned in x's dtype."""
    # `lax`, not `jnp` (the same operations): jnp's arithmetic is jitted wrappers, each traced
    # anew for every shape, and a model's first trace met dozens of BatchNorm shapes (an Equinox
    # GoogLeNet predict: half its trace; docs/benchmarks.md).
    lax = jax.lax
    ct = stat_dtype(x.dtype)
    axis = channel_axis % x.ndim

    def per_channel(v: Array) -> Array:
        return lax.broadcast_in_dim(lax.convert_element_type(v, ct), x.shape, (axis,))

    inv = lax.mul(lax.rsqrt(lax.add(lax.convert_element_type(var, ct), np.array(eps, ct))),
                  lax.convert_element_type(scale, ct))
    # The mean is subtracted first: the fused x * inv + (offset - mean * inv) cancels where
    # |mean| >> std (a nearly constant input, e.g. pooled attention features), and then loses
    # more than PyTorch's own kernel does; this order loses nothing there.
    centred = lax.sub(lax.convert_element_type(x, ct), per_channel(mean))
    y = lax.add(lax.mul(centred, per_channel(inv)), per_channel(offset))
    return lax.convert_element_type(y, x.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "channel_axis"))
def batch_norm_eval(x: Float[Array, "..."], running_mean: Array, running_var: Array, scale: Array, offset: Array,
                    *, eps: float, channel_axis: int) -> Array:
    """Inference-mode BatchNorm (`normalize` with the running statistics), jitted so that its
    trace is cached per shape (see `_batch_norm_train`)."""
    return normalize(x, running_mean, running_var, scale, offset, eps, channel_axis)


# Training BatchNorm's derivative: "closed" (the default; `_normalized_with_moments`: PyTorch's
# closed form, two reductions of the incoming gradient per BatchNorm; BatchNorms without named axes
# only: Haiku's models, and Equinox's in zoo.training's steps, which call them on the batch; see
# `_batch_norm_train`) or "autodiff" (JAX differentiates `bn_moments`
# and `normalize`). ZOO_BN_GRAD in a process's environment, read when a function is traced. Why the
# closed form: on an H200 (bf16, batch 256) it took a Haiku ResNet-50 train step to 0.94x
# autodiff's time, each of its calls faster than each of autodiff's, with a shorter compile; on this
# project's CPUs 0.93-1.03x (docs/benchmarks.md, "Training BatchNorm's derivative in closed form").
_BN_GRAD = os.environ.get("ZOO_BN_GRAD", "closed")


def batch_norm_train(x: Float[Array, "..."], running_mean: Array, running_var: Array, scale: Array, offset: Array,
                     *, axes: tuple[int, ...], axis_name: Union[None, str, tuple[str, ...]], eps: float,
                     channel_axis: int, momentum: float) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm: the map normalised with batch statistics (`bn_moments` across
    `axes` and `axis_name`), and the running mean and variance updated as PyTorch does."""
    if _BN_GRAD not in ("autodiff", "closed"):
        raise ValueError(f"ZOO_BN_GRAD={_BN_GRAD!r}: 'closed' (the default) or 'autodiff'")
    return _batch_norm_train(x, running_mean, running_var, scale, offset, axes=tuple(axes), axis_name=axis_name,
                             eps=eps, channel_axis=channel_axis, momentum=momentum,
                             closed_form=_BN_GRAD == "closed")


@functools.partial(jax.jit, static_argnames=("axes", "axis_name", "eps", "channel_axis", "momentum", "closed_form"))
def _batch_norm_train(x: Array, running_mean: Array, running_var: Array, scale: Array, offset: Array, *,
                      axes: tuple[int, ...], axis_name: Union[None, str, tuple[str, ...]], eps: float,
                      channel_axis: int, momentum: float, closed_form: bool) -> tuple[Array, Array, Array]:
    # One jitted function, so tracing it is cached per shape: a ResNet-50 has 53 BatchNorms of
    # about ten shapes, and vmap, the gradient and lowering then reuse each shape's trace instead
    # of re-tracing every jnp op of every BatchNorm (most of a train step's tracing, which every
    # process pays, compilation cache or not). XLA inlines the call: the same program.
    # Only without named axes (a batch in one call): a custom derivative rule is traced lazily, and
    # under `jax.checkpoint` of a vmapped model outside the vmap's axis names, where its psums fail ("unbound axis name"; tests/test_ops.py). There the
    # closed form would need the reductions written outside a custom rule.
    if closed_form and axis_name is None:
        y, mean, unbiased = _normalized_with_moments(x, scale, offset, axes, eps, channel_axis)
    else:
        mean, var, unbiased = bn_moments(x, axes, axis_name)
        y = normalize(x, mean, var, scale, offset, eps, channel_axis)
    return y, ema_update(running_mean, mean, momentum), ema_update(running_var, unbiased, momentum)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _normalized_with_moments(x: Array, scale: Array, offset: Array, axes: tuple[int, ...], eps: float,
                             channel_axis: int) -> tuple[Array, Array, Array]:
    """`normalize` with the moments over `axes` of x (no named axes), and the moments (mean,
    unbiased variance): the same values as autodiff's path; only the derivative is written out."""
    mean, var, unbiased = bn_moments(x, axes)
    return normalize(x, mean, var, scale, offset, eps, channel_axis), mean, unbiased


@_normalized_with_moments.defjvp
def _normalized_with_moments_jvp(axes, eps, channel_axis, primals, tangents):
    # With x̂ = (x - mean) · inv, inv = 1/sqrt(var + eps), a = inv · scale, and the per-channel
    # sums s1 = Σ dx, s2 = Σ x̂ · dx over the batch:
    #   dy = a · dx + x̂ · (dscale - a · s2 / n) + (doffset - a · s1 / n).
    # The sums are scaled per channel before they broadcast, so the transposed program (the
    # backward pass) reduces the incoming gradient g twice, Σ g and Σ x̂ · g, which also are the
    # offset's and scale's gradients. Autodiff through the moments left six reductions and five
    # full-size intermediates per BatchNorm (optimized CPU HLO, 8x56x56x64).
    x, scale, offset = primals
    dx, dscale, doffset = tangents
    lax = jax.lax
    ct = stat_dtype(x.dtype)
    axis = channel_axis % x.ndim
    n = math.prod(x.shape[a] for a in axes)
    mean, var, unbiased = bn_moments(x, axes)
    y = normalize(x, mean, var, scale, offset, eps, channel_axis)

    def per_channel(v: Array) -> Array:
        return lax.broadcast_in_dim(v, x.shape, (axis,))

    def channel_sum(v: Array) -> Array:
        return jnp.sum(v, axis=axes)

    inv = lax.rsqrt(var + np.array(eps, ct))
    a = inv * scale.astype(ct)
    xhat = (x.astype(ct) - per_channel(mean)) * per_channel(inv)
    dxc = dx.astype(ct)
    s1, s2 = channel_sum(dxc), channel_sum(xhat * dxc)
    dy = (dxc * per_channel(a) + xhat * per_channel(dscale.astype(ct) - a * s2 / n)
          + per_channel(doffset.astype(ct) - a * s1 / n))
    # d mean = s1 / n; the unbiased variance Σ(x - mean)² / (n - 1) moves by 2 Σ (x - mean) dx / (n - 1),
    # and Σ (x - mean) dx = s2 / inv.
    dunbiased = 2 * s2 / (inv * max(n - 1, 1))
    return (y, mean, unbiased), (dy.astype(y.dtype), s1 / n, dunbiased)


def group_norm(x: Float[Array, "..."], groups: int, scale: Array, offset: Array, eps: float,
               channel_axis: int, batch_axes: int = 0) -> Array:
    """PyTorch's GroupNorm of one example (vmap it over a batch), or of a batch whose examples
    are the `batch_axes` leading axes: statistics over each group of channels and every other
    axis, biased variance, computed in float32 (float64 for float64 inputs), returned in x's
    dtype."""
    ct = stat_dtype(x.dtype)
    # Channels last, split as (groups, channels per group): the statistics then reduce every axis
    # but the group's, and the map is never transposed. Moved to the front instead, the channels
    # cost two transposes of the map per GroupNorm (in a GPU program too) and ran 1.6-3.2x slower
    # forward, 1.7-4.5x in the gradient, on a CPU (docs/benchmarks.md).
    g = jnp.moveaxis(x.astype(ct), channel_axis, -1)
    shape = g.shape
    g = g.reshape(*shape[:-1], groups, shape[-1] // groups)
    axes = (*range(batch_axes, g.ndim - 2), g.ndim - 1)
    mean = jnp.mean(g, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(shape) * scale.astype(ct) + offset.astype(ct)
    return jnp.moveaxis(y, -1, channel_axis).astype(x.dtype)


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


def adaptive_avg_pool(x: Array, out_hw: Sequence[int], axes: Sequence[int] = SPATIAL) -> Array:
    """PyTorch's adaptive average pooling: output cell i of an axis of length n averages inputs
    floor(i*n/out) .. ceil((i+1)*n/out) - 1, so windows are uneven and overlap when `out` does
    not divide n (14 -> 4 gives 0-3, 3-6, 7-10, 10-13). The windows are rectangles, so pooling
    one axis after the other gives the same means as PyTorch's 2-D windows."""
    for axis, out in zip(axes, out_hw):
        n = x.shape[axis]
        cells = [jnp.mean(jax.lax.slice_in_dim(x, (i * n) // out, -(-((i + 1) * n) // out), axis=axis),
                          axis=axis, keepdims=True) for i in range(out)]
        x = jnp.concatenate(cells, axis=axis)
    return x


# --- ResNet-family extras (attention, anti-aliasing, DropBlock) -------------------------------


def conv1d(x: Array, w: Array, b: Optional[Array], *, padding: int,
           dimension_numbers: tuple[str, str, str]) -> Array:
    """1-D convolution with PyTorch's symmetric zero padding (ECA's conv across channels)."""
    y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(1,), padding=((padding, padding),),
                                     dimension_numbers=dimension_numbers)
    if b is not None:
        shape = [1] * y.ndim
        shape[dimension_numbers[2].index("C")] = -1
        y = y + b.astype(y.dtype).reshape(shape)
    return y


def blur_pool(x: Array, filt: Sequence[Sequence[float]], *, stride: int, padding: int, pad_mode: str,
              dimension_numbers: tuple[str, str, str]) -> Array:
    """timm's BlurPool2d: pad (reflect by default, which never repeats the edge), then a depthwise
    strided conv with the same fixed filter for every channel. `dimension_numbers` is
    ("NHWC", "HWIO", "NHWC") or ("NCHW", "OIHW", "NCHW")."""
    lhs, rhs, _ = dimension_numbers
    pads = [(padding, padding) if d in "HW" else (0, 0) for d in lhs]
    x = jnp.pad(x, pads, mode="reflect" if pad_mode == "reflect" else "constant")
    c = x.shape[lhs.index("C")]
    f = jnp.asarray(filt, jnp.float32)
    w = jnp.tile(f[:, :, None, None], (1, 1, 1, c)) if rhs == "HWIO" else jnp.tile(f[None, None], (c, 1, 1, 1))
    return conv2d(x, w, None, stride=stride, padding=0, dilation=1, groups=c, dimension_numbers=dimension_numbers)


def is_key_batch(key: Optional[Array]) -> bool:
    """A key per example (a typed key array with a leading axis), as an Equinox model on a batch
    is given in training. A single example's key is a scalar typed key or a raw (2,) uint32 one."""
    return key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def drop_block(x: Array, *, rate: float, block_size: int, gamma_scale: float, key: Array,
               spatial_axes: Sequence[int] = SPATIAL, channel_axis: int = -1,
               axis_name: Optional[str] = None, seeds: Optional[Array] = None) -> Array:
    """timm's DropBlock2d (couple_channels, scale_by_keep): block centres drawn with probability
    gamma, grown to block_size squares by a stride-1 max pool, survivors rescaled by
    (mask size / kept count) over the whole batch. With `axis_name` (a vmapped batch of single
    examples) that rescaling sums over the batch too. `key`: one key, or a typed key per example
    of the leading axis (each example's centres drawn with its own, as under vmap). `seeds`
    replaces the random draw (tests)."""
    h, w = (x.shape[a] for a in spatial_axes)
    kh, kw = min(block_size, h), min(block_size, w)
    gamma = float(gamma_scale * rate * h * w) / float(kh * kw) / float((h - kh + 1) * (w - kw + 1))
    shape = list(x.shape)
    shape[channel_axis % x.ndim] = 1
    if seeds is None and is_key_batch(key):
        seeds = jax.vmap(lambda k: jax.random.bernoulli(k, gamma, tuple(shape[1:])))(key)
    elif seeds is None:
        seeds = jax.random.bernoulli(key, gamma, tuple(shape))
    seeds = seeds.astype(jnp.float32)
    ha, wa = spatial_axes
    window = [1] * x.ndim
    window[ha], window[wa] = kh, kw
    pads = [(0, 0)] * x.ndim
    pads[ha], pads[wa] = (kh // 2, kh // 2), (kw // 2, kw // 2)
    block = jax.lax.reduce_window(seeds, _init_value(-np.inf, seeds.dtype), jax.lax.max, tuple(window), (1,) * x.ndim, pads)
    # An even block makes the pooled mask one larger; PyTorch drops its first row / column.
    block = jax.lax.slice_in_dim(block, (kh + 1) % 2, None, axis=ha)
    block = jax.lax.slice_in_dim(block, (kw + 1) % 2, None, axis=wa)
    keep = 1.0 - block
    count, kept = keep.size, jnp.sum(keep)
    if axis_name is not None:
        count = count * jax.lax.psum(1, axis_name)
        kept = jax.lax.psum(kept, axis_name)
    keep = keep * (count / (kept + 1e-7))
    return x * keep.astype(x.dtype)


def radix_softmax(x: Array, radix: int, groups: int) -> Array:
    """ResNeSt's RadixSoftmax over the last axis, laid out (groups, radix, rest): softmax across
    the radix splits of each group, returned laid out (radix, groups, rest); sigmoid for radix 1."""
    if radix == 1:
        return jax.nn.sigmoid(x)
    lead = x.shape[:-1]
    x = x.reshape(*lead, groups, radix, -1)
    x = jax.nn.softmax(x, axis=-2)
    return jnp.swapaxes(x, -3, -2).reshape(*lead, -1)


def avg_pool_same(x: Array, p: PoolSpec, axes: Sequence[int] = SPATIAL) -> Array:
    """timm's AvgPool2dSame: TensorFlow "SAME" zero padding (the extra one on the right/bottom),
    then average pooling in which the padded zeros count, since they are input by then."""
    pads = [(0, 0)] * x.ndim
    for a in axes:
        n = x.shape[a]
        total = max((-(-n // p.stride) - 1) * p.stride + p.kernel - n, 0)
        pads[a] = (total // 2, total - total // 2)
    x = jnp.pad(x, pads)
    return avg_pool(x, PoolSpec("avg", p.kernel, p.stride, 0, p.ceil_mode, count_include_pad=True), axes)
