"""ResNet family in Equinox, wired from a `ResNetPlan`. Attribute paths mirror PyTorch's module
tree (`model.layer1[0].conv1.weight` is `layer1.0.conv1.weight`)."""

from __future__ import annotations

from typing import Any, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .. import ops
from ..spec import BlockPlan, PoolSpec, ResNetPlan
from .layers import BatchNorm, Conv2d, GroupNorm, Linear, ReLU, make_norm

Norm = Union[BatchNorm, GroupNorm]


def _apply_norm(norm: Optional[Norm], x: Array, state: eqx.nn.State) -> tuple[Array, eqx.nn.State]:
    return (x, state) if norm is None else norm(x, state)


def _sequential(layers: Any, x: Array, state: eqx.nn.State) -> tuple[Array, eqx.nn.State]:
    """Apply a PyTorch-Sequential-like tuple (or one conv); None marks a folded norm's slot."""
    for layer in layers if isinstance(layers, tuple) else (layers,):
        if isinstance(layer, Conv2d):
            x = layer(x)
        elif layer is not None:
            x, state = layer(x, state)
    return x, state


class Pool(eqx.Module):
    spec: PoolSpec = eqx.field(static=True)

    def __call__(self, x: Array, state: eqx.nn.State) -> tuple[Array, eqx.nn.State]:
        return ops.pool(x, self.spec), state


class Block(eqx.Module):
    """Basic (conv1, conv2) or bottleneck (conv1, conv2, conv3) residual block."""

    conv1: Conv2d
    bn1: Optional[Norm]
    conv2: Conv2d
    bn2: Optional[Norm]
    conv3: Optional[Conv2d]
    bn3: Optional[Norm]
    # PyTorch's `downsample` Sequential, same indices: (conv, norm) or (pool, conv, norm).
    downsample: Optional[tuple]
    drop_path: float = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: BlockPlan, *, key: PRNGKeyArray):
        keys = jax.random.split(key, 4)
        convs = [Conv2d(c, key=k) for c, k in zip(plan.convs, keys)]
        norms = [make_norm(n) for n in plan.norms] or [None] * len(convs)
        self.conv1, self.conv2 = convs[0], convs[1]
        self.bn1, self.bn2 = norms[0], norms[1]
        self.conv3 = convs[2] if len(convs) > 2 else None
        self.bn3 = norms[2] if len(norms) > 2 else None
        self.downsample = None
        if plan.down_conv is not None:
            layers = [Conv2d(plan.down_conv, key=keys[3])]
            if plan.down_norm is not None:
                layers.append(make_norm(plan.down_norm))
            if plan.down_pool is not None:
                layers.insert(0, Pool(plan.down_pool))
            self.downsample = tuple(layers)
        self.drop_path = plan.drop_path
        self.inference = False

    def __call__(self, x: Float[Array, "C H W"], state: eqx.nn.State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Array, eqx.nn.State]:
        shortcut = x
        pairs = [(self.conv1, self.bn1), (self.conv2, self.bn2)]
        if self.conv3 is not None:
            pairs.append((self.conv3, self.bn3))
        for i, (conv, norm) in enumerate(pairs):
            x, state = _apply_norm(norm, conv(x), state)
            if i < len(pairs) - 1:
                x = jax.nn.relu(x)
        if self.downsample is not None:
            shortcut, state = _sequential(self.downsample, shortcut, state)
        if not self.inference and self.drop_path > 0:
            x = ops.drop_path(x, self.drop_path, _need_key(key), batch_axis=None)
        return jax.nn.relu(x + shortcut), state


def _need_key(key: Optional[PRNGKeyArray]) -> PRNGKeyArray:
    if key is None:
        raise ValueError("training with dropout or drop path needs an explicit `key`")
    return key


class ResNet(eqx.Module):
    conv1: Any  # Conv2d, or the deep stem's tuple with PyTorch's Sequential indices
    bn1: Optional[Norm]
    maxpool: Pool
    layer1: tuple[Block, ...]
    layer2: tuple[Block, ...]
    layer3: tuple[Block, ...]
    layer4: tuple[Block, ...]
    fc: Linear
    drop_rate: float = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: ResNetPlan, *, key: PRNGKeyArray, dtype: Any = jnp.float32):
        if len(plan.stages) != 4:
            raise ValueError("the ResNet module has exactly four stages")
        skey, *bkeys = jax.random.split(key, 2 + sum(len(s) for s in plan.stages))
        stem_keys = jax.random.split(skey, len(plan.stem_convs) + 1)
        convs = [Conv2d(c, key=k) for c, k in zip(plan.stem_convs, stem_keys)]
        norms = [make_norm(n) for n in plan.stem_norms]
        if len(convs) == 1:
            self.conv1 = convs[0]
        else:
            # A folded norm leaves a None in its slot, so the indices stay PyTorch's.
            inner = norms[:-1] if norms else [None, None]
            layers: list = []
            for i, conv in enumerate(convs):
                layers.append(conv)
                if i < len(convs) - 1:
                    layers.extend([inner[i], ReLU()])
            self.conv1 = tuple(layers)
        self.bn1 = norms[-1] if norms else None
        self.maxpool = Pool(plan.stem_pool)
        it = iter(bkeys)
        stages = [tuple(Block(b, key=next(it)) for b in stage) for stage in plan.stages]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = Linear(plan.fc, key=stem_keys[-1])
        self.drop_rate = plan.spec.drop_rate
        self.dtype = dtype
        self.inference = False

    def __call__(self, x: Float[Array, "C H W"], state: eqx.nn.State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Float[Array, " K"], eqx.nn.State]:
        x = x.astype(self.dtype)
        x, state = _sequential(self.conv1, x, state)
        x, state = _apply_norm(self.bn1, x, state)
        x = jax.nn.relu(x)
        x, state = self.maxpool(x, state)
        blocks = [*self.layer1, *self.layer2, *self.layer3, *self.layer4]
        keys = [None] * (len(blocks) + 1) if key is None else list(jax.random.split(key, len(blocks) + 1))
        for block, k in zip(blocks, keys):
            x, state = block(x, state, key=k)
        x = ops.global_avg_pool(x)
        if not self.inference and self.drop_rate > 0:
            x = ops.dropout(x, self.drop_rate, _need_key(keys[-1]))
        return self.fc(x).astype(jnp.float32), state
