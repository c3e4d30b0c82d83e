"""Equinox layers with PyTorch numerics, on single HWC examples (batch with `jax.vmap`).

Channels-last inside: XLA's convolutions want NHWC, and `jax.vmap` of a CHW layer gives NCHW
convolutions with a transpose around every one of them (CPU and GPU alike). So the layers take
HWC feature maps; the models take and give CHW (PyTorch's layout) and transpose once at the entry
and wherever a map leaves them. Weights keep PyTorch's layouts (conv OIHW): the convolution's
dimension numbers say so, and XLA lays the kernel out as it likes.

The layers (and the models) also take a batch with a leading axis, (N, H, W, C) (the models
(N, C, H, W)), and give what the vmapped model gives: `zoo.Model.predict` and the evaluation steps
call the model so in inference, because tracing through `jax.vmap` cost an Equinox predict's first
call in every process four times Haiku's trace (ResNet-50: 0.27 against 0.07 s; batched 0.10 s;
docs/benchmarks.md), and zoo.training's steps in training, with a key per example (`split_key`,
`per_example`: the vmapped model's random draws), so that BatchNorm's statistics reduce the batch
axis in the call instead of a `psum` over a vmapped one: that is what lets its derivative be the
closed form (`ops._batch_norm_train`), as Haiku's is.

Field names mirror PyTorch (`weight`, `bias`, running statistics in an `eqx.nn.State`), so a
model's tree paths are its PyTorch names. Parameters are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .. import _init, ops
from ..spec import BlurSpec, Conv1dSpec, ConvSpec, LinearSpec, NormSpec

MOMENTUM = 0.1
BATCH_AXIS = "batch"
# Per-example layout inside the models: (H, W, C), after any leading batch axis.
CHANNEL_AXIS = -1
# Activations NHWC under vmap, the kernel as PyTorch stores it.
CONV_DIMS = ("NHWC", "OIHW", "NHWC")


def spatial_axes(x: Float[Array, "*batch H W C"]) -> tuple[int, int]:
    """The (H, W) axes of a map, one example or a batch (counted from the front: zoo's ops index
    shapes and windows by non-negative axes)."""
    return x.ndim - 3, x.ndim - 2


def to_hwc(x: Float[Array, "*batch C H W"]) -> Float[Array, "*batch H W C"]:
    """A model's CHW input, channels-last for the layers (the one transpose at the entry)."""
    return jnp.moveaxis(x, -3, -1)


def to_chw(x: Float[Array, "*batch H W C"]) -> Float[Array, "*batch C H W"]:
    """A feature map leaving a model, back in PyTorch's CHW."""
    return jnp.moveaxis(x, -1, -3)


def _batched(f: Callable[[Array], Array], x: Array, n_axes: int) -> Array:
    """`f` of a batch, given one example of `n_axes` axes or a batch of them: a single example is
    given a batch of one (`lax`, not indexing: `x[None]` is a jitted wrapper that vmap traces
    again at every layer)."""
    if x.ndim > n_axes:
        return f(x)
    return jax.lax.squeeze(f(jax.lax.expand_dims(x, (0,))), (0,))


is_key_batch = ops.is_key_batch


def split_key(key: PRNGKeyArray, n: int) -> list[PRNGKeyArray]:
    """`jax.random.split(key, n)` as a list; for a key per example, each example's key split so
    (the i-th entry holds every example's i-th key), as the vmapped model splits them."""
    if is_key_batch(key):
        keys = jax.vmap(lambda k: jax.random.split(k, n))(key)
        return [keys[:, i] for i in range(n)]
    return list(jax.random.split(key, n))


def per_example(f: Callable[[Array, PRNGKeyArray], Array], x: Array, key: PRNGKeyArray) -> Array:
    """`f(x, key)` on one example; on a batch with a key per example, `f` of each example with its
    own key (the same draws as the vmapped model's)."""
    return jax.vmap(f)(x, key) if is_key_batch(key) else f(x, key)


def _without_batch_axis(axis_name: Union[str, tuple[str, ...]]) -> Union[None, str, tuple[str, ...]]:
    names = tuple(n for n in ((axis_name,) if isinstance(axis_name, str) else axis_name) if n != BATCH_AXIS)
    return None if not names else names[0] if len(names) == 1 else names


def normal_init(key: PRNGKeyArray, shape: tuple[int, ...], std: float) -> Array:
    return _init.initial("normal", shape, std, lambda: key)


def uniform_init(key: PRNGKeyArray, shape: tuple[int, ...], bound: float) -> Array:
    return _init.initial("uniform", shape, bound, lambda: key)


class Conv2d(eqx.Module):
    weight: Float[Array, "O I H W"]
    bias: Optional[Float[Array, " O"]]
    kernel_size: int = eqx.field(static=True)
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)
    dilation: int = eqx.field(static=True)
    groups: int = eqx.field(static=True)

    def __init__(self, spec: ConvSpec, *, key: PRNGKeyArray):
        shape = (spec.out_ch, spec.in_ch // spec.groups, spec.kernel, spec.kernel)
        # timm's init: kaiming normal, fan_out, for ReLU.
        std = math.sqrt(2.0 / (spec.out_ch * spec.kernel * spec.kernel))
        self.weight = normal_init(key, shape, std)
        self.bias = jnp.zeros((spec.out_ch,), jnp.float32) if spec.bias else None
        self.kernel_size, self.stride, self.padding = spec.kernel, spec.stride, spec.padding
        self.dilation, self.groups = spec.dilation, spec.groups

    def __call__(self, x: Float[Array, "*batch H W C"]) -> Float[Array, "*batch Ho Wo O"]:
        return self._conv(x, CONV_DIMS)

    def _conv(self, x: Float[Array, "*batch H W C"], dims: tuple[str, str, str]) -> Float[Array, "*batch Ho Wo O"]:
        def conv(xb: Array) -> Array:
            return ops.conv2d(xb, self.weight, self.bias, stride=self.stride, padding=self.padding,
                              dilation=self.dilation, groups=self.groups, dimension_numbers=dims)

        return _batched(conv, x, 3)


class _HWIOConv2d(Conv2d):
    """A Conv2d whose kernel is stored HWIO, the layout XLA's CPU convolutions read, and read in
    place; for a CPU inference function's bound model only (`with_hwio_kernels`), never a user's
    model or a file."""

    weight: Float[Array, "H W I O"]

    def __init__(self, conv: Conv2d, weight: Float[Array, "H W I O"]):
        self.weight, self.bias = weight, conv.bias
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def __call__(self, x: Float[Array, "*batch H W C"]) -> Float[Array, "*batch Ho Wo O"]:
        return self._conv(x, (CONV_DIMS[0], "HWIO", CONV_DIMS[2]))


class BatchNorm(eqx.Module):
    """PyTorch BatchNorm2d: batch statistics across the vmapped `axis_name` in training (or
    across the leading axis of a batch given in one call, and any other axis named), running
    statistics updated with momentum 0.1 and the unbiased variance (no zero-debiasing, unlike
    `eqx.nn.BatchNorm`); running statistics in inference mode."""

    weight: Float[Array, " C"]
    bias: Float[Array, " C"]
    state_index: eqx.nn.StateIndex
    eps: float = eqx.field(static=True)
    # The vmapped batch axis, and a device axis too under shard_map/pmap (`cross_replica_axis`).
    axis_name: Union[str, tuple[str, ...]] = eqx.field(static=True)
    inference: bool

    def __init__(self, spec: NormSpec, *, axis_name: str = BATCH_AXIS, inference: bool = False):
        c = spec.channels
        self.weight = jnp.ones((c,), jnp.float32)
        self.bias = jnp.zeros((c,), jnp.float32)
        self.state_index = eqx.nn.StateIndex((jnp.zeros((c,), jnp.float32), jnp.ones((c,), jnp.float32)))
        self.eps, self.axis_name, self.inference = spec.eps, axis_name, inference

    def __call__(self, x: Float[Array, "*batch H W C"], state: eqx.nn.State
                 ) -> tuple[Float[Array, "*batch H W C"], eqx.nn.State]:
        running_mean, running_var = state.get(self.state_index)
        if self.inference:
            return ops.batch_norm_eval(x, running_mean, running_var, self.weight, self.bias, eps=self.eps,
                                       channel_axis=CHANNEL_AXIS), state
        axes, axis_name = spatial_axes(x), self.axis_name
        if x.ndim > 3:  # a batch in one call: its axis is local, not vmapped
            axes, axis_name = (*range(x.ndim - 3), *axes), _without_batch_axis(axis_name)
        y, new_mean, new_var = ops.batch_norm_train(
            x, running_mean, running_var, self.weight, self.bias, axes=axes, axis_name=axis_name,
            eps=self.eps, channel_axis=CHANNEL_AXIS, momentum=MOMENTUM)
        return y, state.set(self.state_index, (new_mean, new_var))


class GroupNorm(eqx.Module):
    weight: Float[Array, " C"]
    bias: Float[Array, " C"]
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, spec: NormSpec):
        self.weight = jnp.ones((spec.channels,), jnp.float32)
        self.bias = jnp.zeros((spec.channels,), jnp.float32)
        self.groups, self.eps = spec.groups, spec.eps

    def __call__(self, x: Float[Array, "*batch H W C"], state: eqx.nn.State
                 ) -> tuple[Float[Array, "*batch H W C"], eqx.nn.State]:
        return ops.group_norm(x, self.groups, self.weight, self.bias, self.eps, channel_axis=CHANNEL_AXIS,
                              batch_axes=x.ndim - 3), state


def make_norm(spec: NormSpec):
    return GroupNorm(spec) if spec.kind == "groupnorm" else BatchNorm(spec)


class Linear(eqx.Module):
    weight: Float[Array, "O I"]
    bias: Float[Array, " O"]

    def __init__(self, spec: LinearSpec, *, key: PRNGKeyArray):
        # PyTorch's nn.Linear init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        bound = 1.0 / math.sqrt(spec.in_features)
        wkey, bkey = jax.random.split(key)
        self.weight = uniform_init(wkey, (spec.out_features, spec.in_features), bound)
        self.bias = uniform_init(bkey, (spec.out_features,), bound)

    def __call__(self, x: Float[Array, "*batch I"]) -> Float[Array, "*batch O"]:
        # x's features against the kernel's (out, in) rows, read in place: (..., O) out, with no
        # transpose of the result (vmap of `weight @ x` gave (O, N) and moved it).
        y = jax.lax.dot_general(x, self.weight.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
        return y + self.bias.astype(x.dtype)


class ReLU(eqx.Module):
    """A parameter-free placeholder that keeps PyTorch's Sequential indices (`conv1.2`)."""

    def __call__(self, x: Array, state: eqx.nn.State) -> tuple[Array, eqx.nn.State]:
        return ops.relu(x), state


class Conv1d(eqx.Module):
    """PyTorch Conv1d on one (C, L) example; weight (O, I, W) as PyTorch."""

    weight: Float[Array, "O I W"]
    bias: Optional[Float[Array, " O"]]
    padding: int = eqx.field(static=True)

    def __init__(self, spec: Conv1dSpec, *, key: PRNGKeyArray):
        # PyTorch's Conv1d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(spec.in_ch * spec.kernel)
        wkey, bkey = jax.random.split(key)
        self.weight = uniform_init(wkey, (spec.out_ch, spec.in_ch, spec.kernel), bound)
        self.bias = uniform_init(bkey, (spec.out_ch,), bound) if spec.bias else None
        self.padding = spec.padding

    def __call__(self, x: Float[Array, "*batch C L"]) -> Float[Array, "*batch O L"]:
        return _batched(lambda xb: ops.conv1d(xb, self.weight, self.bias, padding=self.padding,
                                              dimension_numbers=("NCW", "OIW", "NCW")), x, 2)


# The modules whose `weight` is a kernel (decayed in training), unlike a norm's scale.
KERNEL_MODULES = (Conv2d, Conv1d, Linear)


def _is_conv(m: object) -> bool:
    return isinstance(m, Conv2d)


def _convs(model: eqx.Module) -> list[Conv2d]:
    return [m for m in jax.tree_util.tree_leaves(model, is_leaf=_is_conv) if _is_conv(m)]


# One program for all kernels (cached on disk like zoo's others): eager transposes would compile
# one by one, ~0.9 s for a ResNet-50 in a fresh process against 0.08 s from the cache.
_to_hwio = jax.jit(lambda ws: [jnp.transpose(w, (2, 3, 1, 0)) for w in ws])


def with_hwio_kernels(model: eqx.Module, kernels: Optional[list[Array]] = None) -> eqx.Module:
    """The model with every convolution's kernel stored HWIO (Haiku's layout) and read in place:
    the same outputs, for an inference function to bind once on a CPU. `kernels`: the HWIO
    kernels already made (`HWIOKernelCache`), in `_convs` order.

    XLA:CPU's convolutions read HWIO, so a program given OIHW kernels relays every one out in
    every call; and the 1x1 convolutions, which run as dot products there, multiply by an (I, O)
    matrix without a transposed operand, which YNNPACK's fused pipelines run faster at small batch
    (ResNet-50, batch 1: 53-55 ms against 58-60 ms for (O, I), whose standalone dots were as fast).
    The classifier keeps its (out, in) kernel: XLA reads it in place, and an (in, out) one
    transposed back in the program was copied in every call at batch 1."""
    convs = _convs(model)
    weights = _to_hwio([c.weight for c in convs]) if kernels is None else kernels
    return eqx.tree_at(_convs, model, [_HWIOConv2d(c, w) for c, w in zip(convs, weights)])


class HWIOKernelCache:
    """HWIO copies of the convolution kernels of the last model seen on a CPU, kept while that
    model's kernels live: an evaluation step called batch after batch on one model transposes its
    kernels once, not in every call (ResNet-50 at batch 1: 84-87 ms a call with the transposes in
    the program, Haiku 56-58 ms; docs/benchmarks.md). A model is the same one when its kernels are
    the same array objects (JAX arrays are immutable); when they die (a training step replaced
    them) the copies are dropped. Returns None where there is nothing to bind: off a CPU, or
    inside another transformation (tracers must not outlive their trace)."""

    def __init__(self) -> None:
        # (references to the kernels, their copies): one attribute, read once per call and replaced
        # whole, so that a call never returns copies other than those of the references it checked,
        # whatever another thread's call (another model) does meanwhile. Two attributes read apart
        # gave one thread the other's model's kernels (4 calls in 10,000, two threads, two models).
        self._entry: tuple[tuple[weakref.ref, ...], Optional[list[Array]]] = ((), None)

    def __call__(self, model: eqx.Module) -> Optional[list[Array]]:
        kernels = [c.weight for c in _convs(model)]
        if not kernels or not all(isinstance(k, jax.Array) and not isinstance(k, jax.core.Tracer) for k in kernels):
            return None
        if any(d.platform != "cpu" for d in kernels[0].devices()):
            return None
        refs, hwio = self._entry
        if len(kernels) == len(refs) and all(r() is k for r, k in zip(refs, kernels)):
            return hwio
        del refs, hwio
        self._entry = ((), None)  # the previous model's copies go before the new ones are made
        hwio = _to_hwio(kernels)
        self._entry = (tuple(weakref.ref(k, self._forget) for k in kernels), hwio)
        return hwio

    def _forget(self, ref: weakref.ref) -> None:
        # A dead reference compares by identity: only the current model's own references clear it.
        if ref in self._entry[0]:
            self._entry = ((), None)


class BlurPool(eqx.Module):
    """timm's BlurPool2d. Its filter is a constant built on the fly, not a leaf: timm does not
    save it either (a non-persistent buffer)."""

    spec: BlurSpec = eqx.field(static=True)

    def __call__(self, x: Float[Array, "*batch H W C"], state: eqx.nn.State
                 ) -> tuple[Float[Array, "*batch Ho Wo C"], eqx.nn.State]:
        s = self.spec
        return _batched(lambda xb: ops.blur_pool(xb, s.filter(), stride=s.stride, padding=s.padding,
                                                 pad_mode=s.pad_mode, dimension_numbers=CONV_DIMS), x, 3), state
