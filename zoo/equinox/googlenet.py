"""torchvision's GoogLeNet in Equinox, wired from a `GoogLeNetPlan`. Attribute paths mirror
PyTorch's module tree (`model.inception3a.branch2[0].conv.weight` is
`inception3a.branch2.0.conv.weight`).

The model takes one CHW image but carries its activations channels-last (HWC, so NHWC under
vmap: see `layers`); the modules here work on HWC maps, and in inference mode on NHWC batches too
(`layers`)."""

from __future__ import annotations

from typing import Any, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .. import ops
from ..googlenet import (FEATURE_TAPS, INCEPTION_BLOCKS, TRANSFORM_INPUT, AuxPlan, ConvBNPlan, GoogLeNetOutputs,
                         GoogLeNetPlan, InceptionPlan, PoolPlan)
from ..spec import PoolSpec
from .layers import (CHANNEL_AXIS, BatchNorm, Conv2d, Linear, make_norm, per_example, spatial_axes, split_key, to_chw,
                     to_hwc)


class BasicConv2d(eqx.Module):
    """conv -> BatchNorm (None when folded into the conv) -> ReLU."""

    conv: Conv2d
    bn: Optional[BatchNorm]

    def __init__(self, plan: ConvBNPlan, *, key: PRNGKeyArray):
        self.conv = Conv2d(plan.conv, key=key)
        self.bn = None if plan.norm is None else make_norm(plan.norm)

    def __call__(self, x: Float[Array, "*batch H W C"], state: eqx.nn.State
                 ) -> tuple[Float[Array, "*batch Ho Wo Co"], eqx.nn.State]:
        x = self.conv(x)
        if self.bn is not None:
            x, state = self.bn(x, state)
        return ops.relu(x), state


class MaxPool(eqx.Module):
    pool: PoolSpec = eqx.field(static=True)

    def __init__(self, plan: PoolPlan):
        self.pool = plan.pool

    def __call__(self, x: Float[Array, "*batch H W C"], state: eqx.nn.State
                 ) -> tuple[Float[Array, "*batch Ho Wo C"], eqx.nn.State]:
        return ops.pool(x, self.pool, spatial_axes(x)), state


def _sequential(layers: tuple, x: Array, state: eqx.nn.State) -> tuple[Array, eqx.nn.State]:
    for layer in layers:
        x, state = layer(x, state)
    return x, state


class Inception(eqx.Module):
    branch1: BasicConv2d
    branch2: tuple[BasicConv2d, BasicConv2d]
    branch3: tuple[BasicConv2d, BasicConv2d]
    branch4: tuple[MaxPool, BasicConv2d]  # PyTorch's indices: the pool is branch4.0

    def __init__(self, plan: InceptionPlan, *, key: PRNGKeyArray):
        k1, k2a, k2b, k3a, k3b, k4 = jax.random.split(key, 6)
        self.branch1 = BasicConv2d(plan.branch1, key=k1)
        self.branch2 = (BasicConv2d(plan.branch2[0], key=k2a), BasicConv2d(plan.branch2[1], key=k2b))
        self.branch3 = (BasicConv2d(plan.branch3[0], key=k3a), BasicConv2d(plan.branch3[1], key=k3b))
        self.branch4 = (MaxPool(plan.branch4[0]), BasicConv2d(plan.branch4[1], key=k4))

    def __call__(self, x: Float[Array, "*batch H W C"], state: eqx.nn.State
                 ) -> tuple[Float[Array, "*batch H W Co"], eqx.nn.State]:
        b1, state = self.branch1(x, state)
        b2, state = _sequential(self.branch2, x, state)
        b3, state = _sequential(self.branch3, x, state)
        b4, state = _sequential(self.branch4, x, state)
        return jnp.concatenate([b1, b2, b3, b4], axis=CHANNEL_AXIS), state


def _need_key(key: Optional[PRNGKeyArray]) -> PRNGKeyArray:
    if key is None:
        raise ValueError("training with dropout needs an explicit `key`")
    return key


class InceptionAux(eqx.Module):
    conv: BasicConv2d
    fc1: Linear
    fc2: Linear
    pool_hw: tuple[int, int] = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: AuxPlan, *, key: PRNGKeyArray):
        kc, k1, k2 = jax.random.split(key, 3)
        self.conv = BasicConv2d(plan.conv, key=kc)
        self.fc1 = Linear(plan.fc1, key=k1)
        self.fc2 = Linear(plan.fc2, key=k2)
        self.pool_hw, self.dropout = plan.pool_hw, plan.dropout
        self.inference = False

    def __call__(self, x: Float[Array, "*batch H W C"], state: eqx.nn.State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Float[Array, "*batch K"], eqx.nn.State]:
        x = ops.adaptive_avg_pool(x, self.pool_hw, spatial_axes(x))
        x, state = self.conv(x, state)
        # fc1's inputs are in PyTorch's flatten order (C, H, W): a small transpose of the 4x4 map.
        x = ops.relu(self.fc1(to_chw(x).reshape(*x.shape[:-3], -1)))
        if not self.inference and self.dropout > 0:
            x = per_example(lambda xi, ki: ops.dropout(xi, self.dropout, ki), x, _need_key(key))
        return self.fc2(x).astype(ops.stat_dtype(x.dtype)), state


TrunkModule = Union[BasicConv2d, MaxPool, Inception]


class GoogLeNet(eqx.Module):
    """One CHW image -> float32 logits; in training mode with aux heads,
    `GoogLeNetOutputs(logits, aux_logits2, aux_logits1)` as torchvision; with `num_classes=0` the
    pooled features (or the unpooled map, `global_pool=""`), with `features_only` the list of maps
    at the `FEATURE_TAPS` of `out_indices`. Layers past the last tap asked for are None."""

    conv1: BasicConv2d
    maxpool1: Optional[MaxPool]
    conv2: Optional[BasicConv2d]
    conv3: Optional[BasicConv2d]
    maxpool2: Optional[MaxPool]
    inception3a: Optional[Inception]
    inception3b: Optional[Inception]
    maxpool3: Optional[MaxPool]
    inception4a: Optional[Inception]
    inception4b: Optional[Inception]
    inception4c: Optional[Inception]
    inception4d: Optional[Inception]
    inception4e: Optional[Inception]
    maxpool4: Optional[MaxPool]
    inception5a: Optional[Inception]
    inception5b: Optional[Inception]
    aux1: Optional[InceptionAux]
    aux2: Optional[InceptionAux]
    fc: Optional[Linear]
    trunk: tuple[str, ...] = eqx.field(static=True)  # attribute names in execution order
    taps: tuple[tuple[str, str], ...] = eqx.field(static=True)  # (trunk layer, aux head reading it)
    feature_taps: Optional[tuple[str, ...]] = eqx.field(static=True)  # features_only: layers returned
    global_pool: bool = eqx.field(static=True)
    transform_input: bool = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: GoogLeNetPlan, *, key: PRNGKeyArray, dtype: Any = jnp.float32):
        # Keys as for the full network, so a truncated one starts with the same weights.
        keys = iter(jax.random.split(key, 16 + len(plan.aux) + 1))
        for name in ("maxpool1", "conv2", "conv3", "maxpool2", *INCEPTION_BLOCKS, "maxpool3", "maxpool4"):
            setattr(self, name, None)
        for layer in plan.trunk:
            if isinstance(layer, PoolPlan):
                module: TrunkModule = MaxPool(layer)
            elif isinstance(layer, InceptionPlan):
                module = Inception(layer, key=next(keys))
            else:
                module = BasicConv2d(layer, key=next(keys))
            setattr(self, layer.name, module)
        self.aux1 = self.aux2 = None
        for aux in plan.aux:
            setattr(self, aux.name, InceptionAux(aux, key=next(keys)))
        self.fc = None if plan.fc is None else Linear(plan.fc, key=next(keys))
        self.trunk = tuple(layer.name for layer in plan.trunk)
        self.taps = tuple((aux.tap, aux.name) for aux in plan.aux)
        self.feature_taps = None if plan.out_indices is None else tuple(FEATURE_TAPS[i] for i in plan.out_indices)
        self.global_pool = plan.global_pool
        self.transform_input = plan.spec.transform_input
        self.dropout = plan.spec.dropout
        self.dtype = dtype
        self.inference = False

    def __call__(self, x: Float[Array, "*batch C H W"], state: eqx.nn.State, *,
                 key: Optional[PRNGKeyArray] = None
                 ) -> tuple[Union[Float[Array, "*batch K"], GoogLeNetOutputs, Float[Array, "*batch c h w"], list],
                            eqx.nn.State]:
        out_dtype = ops.stat_dtype(self.dtype)
        if self.transform_input:
            x = jnp.stack([x[..., c, :, :] * scale + shift for c, (scale, shift) in enumerate(TRANSFORM_INPUT)], axis=-3)
        # Channels-last inside: XLA's convolutions want NHWC; vmap of a CHW model gives NCHW and
        # a transpose around every conv. One transpose here, and back wherever a map leaves.
        x = to_hwc(x.astype(self.dtype))
        training_aux = not self.inference and bool(self.taps)
        fc_key, *aux_keys = [None] * 3 if key is None else split_key(key, 3)
        taps = dict(self.taps)
        aux_out = {}
        features = {}
        for name in self.trunk:
            x, state = getattr(self, name)(x, state)
            if training_aux and name in taps:
                aux = taps[name]
                aux_out[aux], state = getattr(self, aux)(x, state, key=aux_keys[len(aux_out)])
            features[name] = x
        if self.feature_taps is not None:
            return [to_chw(features[t]).astype(out_dtype) for t in self.feature_taps], state
        if self.global_pool:
            x = ops.global_avg_pool(x, spatial_axes(x))
        else:
            x = to_chw(x)  # the unpooled map is returned (CHW), dropout's mask drawn over it as before
        if not self.inference and self.dropout > 0:
            x = per_example(lambda xi, ki: ops.dropout(xi, self.dropout, ki), x, _need_key(fc_key))
        if self.fc is None:
            return x.astype(out_dtype), state
        logits = self.fc(x).astype(out_dtype)
        if training_aux:
            return GoogLeNetOutputs(logits, aux_out["aux2"], aux_out["aux1"]), state
        return logits, state
