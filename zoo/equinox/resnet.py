"""ResNet family in Equinox, wired from a `ResNetPlan`: timm's ResNet with basic, bottleneck,
Res2Net, ResNeSt and selective-kernel blocks, SE/ECA attention, anti-aliasing, DropBlock.

Attribute paths mirror PyTorch's module tree (`model.layer1[0].se.fc1.weight` is
`layer1.0.se.fc1.weight`); Sequentials and ModuleLists are tuples keeping PyTorch's indices, and a
folded norm leaves None in its slot.

The model takes one CHW image but carries its activations channels-last (HWC, so NHWC under
vmap: see `layers`); every block and layer here works on HWC maps, and in inference mode on NHWC
batches too (`layers`).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .. import ops
from ..spec import (ActSpec, AttnSpec, BlockPlan, BlurSpec, ConvSpec, DropBlockSpec, NormSpec, PoolSpec,
                    ResNetPlan)
from .layers import (BATCH_AXIS, CHANNEL_AXIS, BatchNorm, BlurPool, Conv1d, Conv2d, GroupNorm, Linear, ReLU,
                     is_key_batch, make_norm, per_example, spatial_axes, split_key, to_chw, to_hwc)

Norm = Union[BatchNorm, GroupNorm]
State = eqx.nn.State


def _apply_norm(norm: Optional[Norm], x: Array, state: State) -> tuple[Array, State]:
    return (x, state) if norm is None else norm(x, state)


def _norm_or_none(spec: Optional[NormSpec]) -> Optional[Norm]:
    return None if spec is None else make_norm(spec)


def _sequential(layers: Any, x: Array, state: State) -> tuple[Array, State]:
    """Apply a PyTorch-Sequential-like tuple (or one module); None marks a folded norm's slot."""
    for layer in layers if isinstance(layers, tuple) else (layers,):
        if isinstance(layer, Conv2d):
            x = layer(x)
        elif layer is not None:
            x, state = layer(x, state)
    return x, state


def _need_key(key: Optional[PRNGKeyArray]) -> PRNGKeyArray:
    if key is None:
        raise ValueError("training with dropout, drop path or DropBlock needs an explicit `key`")
    return key


def _split(key: Optional[PRNGKeyArray], n: int) -> list[Optional[PRNGKeyArray]]:
    return [None] * n if key is None else split_key(key, n)


def _keys(key: PRNGKeyArray, n: int) -> Iterator[PRNGKeyArray]:
    return iter(jax.random.split(key, n))


class Pool(eqx.Module):
    spec: PoolSpec = eqx.field(static=True)

    def __call__(self, x: Array, state: State) -> tuple[Array, State]:
        return ops.pool(x, self.spec, spatial_axes(x)), state


def _aa_module(spec: Optional[Union[PoolSpec, BlurSpec]]) -> Optional[Union[Pool, BlurPool]]:
    if spec is None:
        return None
    return BlurPool(spec) if isinstance(spec, BlurSpec) else Pool(spec)


def _drop_block(spec: Optional[DropBlockSpec], inference: bool, x: Array,
                key: Optional[PRNGKeyArray]) -> Array:
    if spec is None or inference or spec.rate == 0:
        return x
    # The survivors' rescaling counts the whole batch, as timm's does: the vmapped one, or the one
    # in this call (each example's block centres then drawn with its own key).
    return ops.drop_block(x, rate=spec.rate, block_size=spec.block_size, gamma_scale=spec.gamma_scale,
                          key=_need_key(key), spatial_axes=spatial_axes(x), channel_axis=CHANNEL_AXIS,
                          axis_name=None if is_key_batch(key) else BATCH_AXIS)


def _drop_path(rate: float, inference: bool, x: Array, key: Optional[PRNGKeyArray]) -> Array:
    if inference or rate == 0:
        return x
    return per_example(lambda xi, ki: ops.drop_path(xi, rate, ki, batch_axis=None), x, _need_key(key))


class SqueezeExcite(eqx.Module):
    """timm's SEModule: gate = sigmoid(fc2(relu(fc1(mean(x))))), with 1x1 convs."""

    fc1: Conv2d
    fc2: Conv2d

    def __init__(self, spec: AttnSpec, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.fc1, self.fc2 = Conv2d(spec.fc1, key=k1), Conv2d(spec.fc2, key=k2)

    def __call__(self, x: Float[Array, "*batch H W C"]) -> Float[Array, "*batch H W C"]:
        s = jnp.mean(x, axis=spatial_axes(x), keepdims=True)
        return x * jax.nn.sigmoid(self.fc2(ops.relu(self.fc1(s))))


class EcaModule(eqx.Module):
    """timm's EcaModule: a 1-D conv along the channel axis of the pooled features, sigmoid gate."""

    conv: Conv1d

    def __init__(self, spec: AttnSpec, *, key: PRNGKeyArray):
        self.conv = Conv1d(spec.conv, key=key)

    def __call__(self, x: Float[Array, "*batch H W C"]) -> Float[Array, "*batch H W C"]:
        # The pooled channels are the conv's length axis, with one feature: (..., 1, C).
        y = self.conv(jnp.expand_dims(jnp.mean(x, axis=spatial_axes(x)), -2))
        return x * jax.nn.sigmoid(jnp.expand_dims(y, -2))  # (..., 1, 1, C) over the map


def _attn_module(spec: Optional[AttnSpec], key: PRNGKeyArray) -> Optional[Union[SqueezeExcite, EcaModule]]:
    if spec is None:
        return None
    return (SqueezeExcite if spec.kind == "se" else EcaModule)(spec, key=key)


def _add_shortcut(out: Array, x: Array, downsample: Optional[tuple], state: State) -> tuple[Array, State]:
    """relu(branch + shortcut), the shortcut downsampled where the block changes shape."""
    if downsample is not None:
        x, state = _sequential(downsample, x, state)
    return ops.relu(out + x), state


def _apply_attn(attn: Optional[Union[SqueezeExcite, EcaModule]], x: Array) -> Array:
    return x if attn is None else attn(x)


class ConvNormAct(eqx.Module):
    """timm's ConvNormAct (`conv`, then `bn` with its DropBlock and activation inside)."""

    conv: Conv2d
    bn: Optional[Norm]
    act: bool = eqx.field(static=True)
    drop_block: Optional[DropBlockSpec] = eqx.field(static=True)
    inference: bool

    def __init__(self, conv: ConvSpec, norm: Optional[NormSpec], *, act: bool = True,
                 drop_block: Optional[DropBlockSpec] = None, key: PRNGKeyArray):
        self.conv, self.bn = Conv2d(conv, key=key), _norm_or_none(norm)
        self.act, self.drop_block, self.inference = act, drop_block, False

    def __call__(self, x: Float[Array, "*batch H W C"], state: State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Float[Array, "*batch Ho Wo O"], State]:
        x, state = _apply_norm(self.bn, self.conv(x), state)
        x = _drop_block(self.drop_block, self.inference, x, key)
        return (ops.relu(x) if self.act else x), state


class SplitAttn(eqx.Module):
    """ResNeSt's split attention (the block's `conv2`): a conv producing `radix` splits, then
    attention over the splits from their pooled sum."""

    conv: Conv2d
    bn0: Optional[Norm]
    fc1: Conv2d
    bn1: Optional[Norm]
    fc2: Conv2d
    radix: int = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    drop_block: Optional[DropBlockSpec] = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: BlockPlan, *, key: PRNGKeyArray):
        keys = _keys(key, 3)
        self.conv, self.bn0 = Conv2d(plan.conv("conv2.conv"), key=next(keys)), _norm_or_none(plan.norm("conv2.bn0"))
        self.fc1, self.bn1 = Conv2d(plan.conv("conv2.fc1"), key=next(keys)), _norm_or_none(plan.norm("conv2.bn1"))
        self.fc2 = Conv2d(plan.conv("conv2.fc2"), key=next(keys))
        self.radix, self.groups, self.drop_block, self.inference = plan.radix, plan.groups, plan.drop_block, False

    def __call__(self, x: Float[Array, "*batch H W C"], state: State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Float[Array, "*batch Ho Wo C"], State]:
        r = self.radix
        x, state = _apply_norm(self.bn0, self.conv(x), state)
        x = ops.relu(_drop_block(self.drop_block, self.inference, x, key))
        rc = x.shape[-1]
        splits = x.reshape(*x.shape[:-1], r, rc // r)  # PyTorch's (radix, C) channel order
        gap = jnp.sum(splits, axis=-2) if r > 1 else x
        gap, state = _apply_norm(self.bn1, self.fc1(jnp.mean(gap, axis=spatial_axes(x), keepdims=True)), state)
        attn = ops.radix_softmax(self.fc2(ops.relu(gap)), r, self.groups)  # (..., 1, 1, C)
        if r == 1:
            return x * attn, state
        return jnp.sum(splits * attn.reshape(*attn.shape[:-1], r, rc // r), axis=-2), state


class SelectiveKernelAttn(eqx.Module):
    fc_reduce: Conv2d
    bn: Optional[Norm]
    fc_select: Conv2d
    paths: int = eqx.field(static=True)

    def __init__(self, plan: BlockPlan, sk: str, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.fc_reduce = Conv2d(plan.conv(f"{sk}.attn.fc_reduce"), key=k1)
        self.bn = _norm_or_none(plan.norm(f"{sk}.attn.bn"))
        self.fc_select = Conv2d(plan.conv(f"{sk}.attn.fc_select"), key=k2)
        self.paths = plan.sk_paths

    def __call__(self, x: Float[Array, "*batch H W C"], state: State) -> tuple[Float[Array, "*batch 1 1 P C"], State]:
        s, state = _apply_norm(self.bn, self.fc_reduce(jnp.mean(x, axis=spatial_axes(x), keepdims=True)), state)
        s = self.fc_select(ops.relu(s))
        return jax.nn.softmax(s.reshape(*s.shape[:-1], self.paths, -1), axis=-2), state


class SelectiveKernel(eqx.Module):
    """timm's SelectiveKernel: two 3x3 paths (dilation d and 2d), softmax attention across them."""

    paths: tuple[ConvNormAct, ...]
    attn: SelectiveKernelAttn
    split_input: bool = eqx.field(static=True)

    def __init__(self, plan: BlockPlan, sk: str, *, key: PRNGKeyArray):
        keys = _keys(key, plan.sk_paths + 1)
        self.paths = tuple(
            ConvNormAct(plan.conv(f"{sk}.paths.{i}.conv"), plan.norm(f"{sk}.paths.{i}.bn"),
                        drop_block=plan.drop_block, key=next(keys))
            for i in range(plan.sk_paths))
        self.attn = SelectiveKernelAttn(plan, sk, key=next(keys))
        self.split_input = plan.split_input

    def __call__(self, x: Float[Array, "*batch H W C"], state: State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Float[Array, "*batch Ho Wo O"], State]:
        n = len(self.paths)
        inputs = jnp.split(x, n, axis=CHANNEL_AXIS) if self.split_input else [x] * n
        outs = []
        for path, xi, k in zip(self.paths, inputs, _split(key, n)):
            y, state = path(xi, state, key=k)
            outs.append(y)
        stacked = jnp.stack(outs, axis=-2)  # (..., H, W, paths, C)
        attn, state = self.attn(jnp.sum(stacked, axis=-2), state)
        return jnp.sum(stacked * attn, axis=-2), state


def _downsample(plan: BlockPlan, key: PRNGKeyArray) -> Optional[tuple]:
    """PyTorch's `downsample` Sequential, same indices: (conv, norm) or (pool, conv, norm)."""
    if plan.down_conv is None:
        return None
    layers: list = [Conv2d(plan.down_conv, key=key), _norm_or_none(plan.down_norm)]
    if plan.down_conv.name.endswith(".1"):
        # timm's avg_down Sequential keeps slot 0 (an Identity where there is nothing to pool).
        layers.insert(0, None if plan.down_pool is None else Pool(plan.down_pool))
    return tuple(layers)


class Block(eqx.Module):
    """timm's BasicBlock (conv1, conv2) or Bottleneck (conv1, conv2, conv3), with optional
    anti-aliasing `aa`, attention `se` and DropBlock."""

    conv1: Conv2d
    bn1: Optional[Norm]
    conv2: Conv2d
    bn2: Optional[Norm]
    conv3: Optional[Conv2d]
    bn3: Optional[Norm]
    aa: Optional[Union[Pool, BlurPool]]
    se: Optional[Union[SqueezeExcite, EcaModule]]
    downsample: Optional[tuple]
    drop_path: float = eqx.field(static=True)
    drop_block: Optional[DropBlockSpec] = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: BlockPlan, *, key: PRNGKeyArray):
        keys = _keys(key, 5)
        n = 3 if plan.kind == "bottleneck" else 2
        convs = [Conv2d(plan.conv(f"conv{i + 1}"), key=next(keys)) for i in range(n)] + [None]
        norms = [_norm_or_none(plan.norm(f"bn{i + 1}")) for i in range(n)] + [None]
        self.conv1, self.conv2, self.conv3 = convs[:3]
        self.bn1, self.bn2, self.bn3 = norms[:3]
        self.aa = _aa_module(plan.aa)
        self.se = _attn_module(plan.attn, next(keys))
        self.downsample = _downsample(plan, next(keys))
        self.drop_path, self.drop_block, self.inference = plan.drop_path, plan.drop_block, False

    def __call__(self, x: Float[Array, "*batch H W C"], state: State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Float[Array, "*batch Ho Wo O"], State]:
        k_block, k_path = _split(key, 2)
        shortcut = x
        x, state = _apply_norm(self.bn1, self.conv1(x), state)
        if self.conv3 is None:  # basic: DropBlock and anti-aliasing after the first conv
            x = ops.relu(_drop_block(self.drop_block, self.inference, x, k_block))
            x, state = _sequential(self.aa, x, state)
            x, state = _apply_norm(self.bn2, self.conv2(x), state)
        else:  # bottleneck: after the strided 3x3
            x, state = _apply_norm(self.bn2, self.conv2(ops.relu(x)), state)
            x = ops.relu(_drop_block(self.drop_block, self.inference, x, k_block))
            x, state = _sequential(self.aa, x, state)
            x, state = _apply_norm(self.bn3, self.conv3(x), state)
        x = _drop_path(self.drop_path, self.inference, _apply_attn(self.se, x), k_path)
        return _add_shortcut(x, shortcut, self.downsample, state)


class Bottle2neck(eqx.Module):
    """timm's Res2Net block: the 1x1 output split `scale` ways, a hierarchy of 3x3 convs over
    the splits, the last split passed (pooled in a stage's first block), concatenated, 1x1."""

    conv1: Conv2d
    bn1: Optional[Norm]
    convs: tuple[Conv2d, ...]
    bns: tuple[Optional[Norm], ...]
    pool: Optional[Pool]
    conv3: Conv2d
    bn3: Optional[Norm]
    downsample: Optional[tuple]
    scale: int = eqx.field(static=True)
    drop_path: float = eqx.field(static=True)
    drop_block: Optional[DropBlockSpec] = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: BlockPlan, *, key: PRNGKeyArray):
        n = max(1, plan.scale - 1)
        keys = _keys(key, n + 3)
        self.conv1, self.bn1 = Conv2d(plan.conv("conv1"), key=next(keys)), _norm_or_none(plan.norm("bn1"))
        self.convs = tuple(Conv2d(plan.conv(f"convs.{i}"), key=next(keys)) for i in range(n))
        self.bns = tuple(_norm_or_none(plan.norm(f"bns.{i}")) for i in range(n))
        self.pool = None if plan.pool is None else Pool(plan.pool)
        self.conv3, self.bn3 = Conv2d(plan.conv("conv3"), key=next(keys)), _norm_or_none(plan.norm("bn3"))
        self.downsample = _downsample(plan, next(keys))
        self.scale, self.drop_path, self.drop_block, self.inference = plan.scale, plan.drop_path, plan.drop_block, False

    def __call__(self, x: Float[Array, "*batch H W C"], state: State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Float[Array, "*batch Ho Wo O"], State]:
        k_block, k_path = _split(key, 2)
        out, state = _apply_norm(self.bn1, self.conv1(x), state)
        spx = jnp.split(ops.relu(out), self.scale, axis=CHANNEL_AXIS)
        # A stage's first block (the one with the pool) feeds each split alone; later blocks add
        # the previous split's output (the hierarchical residual).
        is_first = self.pool is not None
        spo, sp = [], spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 or is_first else sp + spx[i]
            sp, state = _apply_norm(bn, conv(sp), state)
            sp = ops.relu(sp)
            spo.append(sp)
        if self.scale > 1:
            spo.append(self.pool(spx[-1], state)[0] if is_first else spx[-1])
        out = _drop_block(self.drop_block, self.inference, jnp.concatenate(spo, axis=CHANNEL_AXIS), k_block)
        out, state = _apply_norm(self.bn3, self.conv3(out), state)
        out = _drop_path(self.drop_path, self.inference, out, k_path)
        return _add_shortcut(out, x, self.downsample, state)


class ResNestBottleneck(eqx.Module):
    """timm's ResNeSt block: 1x1, split attention (`conv2`), 1x1, with the strided 3x3 average
    pool ("avd") before or after the split attention."""

    conv1: Conv2d
    bn1: Optional[Norm]
    avd_first: Optional[Pool]
    conv2: SplitAttn
    avd_last: Optional[Pool]
    conv3: Conv2d
    bn3: Optional[Norm]
    downsample: Optional[tuple]
    drop_path: float = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: BlockPlan, *, key: PRNGKeyArray):
        keys = _keys(key, 4)
        self.conv1, self.bn1 = Conv2d(plan.conv("conv1"), key=next(keys)), _norm_or_none(plan.norm("bn1"))
        pool = None if plan.pool is None else Pool(plan.pool)
        self.avd_first, self.avd_last = (pool, None) if plan.avd_first else (None, pool)
        self.conv2 = SplitAttn(plan, key=next(keys))
        self.conv3, self.bn3 = Conv2d(plan.conv("conv3"), key=next(keys)), _norm_or_none(plan.norm("bn3"))
        self.downsample = _downsample(plan, next(keys))
        self.drop_path, self.inference = plan.drop_path, False

    def __call__(self, x: Float[Array, "*batch H W C"], state: State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Float[Array, "*batch Ho Wo O"], State]:
        k_block, k_path = _split(key, 2)
        out, state = _apply_norm(self.bn1, self.conv1(x), state)
        out, state = _sequential(self.avd_first, ops.relu(out), state)
        out, state = self.conv2(out, state, key=k_block)
        out, state = _sequential(self.avd_last, out, state)
        out, state = _apply_norm(self.bn3, self.conv3(out), state)
        if self.downsample is not None:
            # timm's ResNestBottleneck applies drop path to the block input, which only reaches
            # the output through the downsample: mirrored as is.
            x = _drop_path(self.drop_path, self.inference, x, k_path)
        return _add_shortcut(out, x, self.downsample, state)


class SelectiveKernelBasic(eqx.Module):
    conv1: SelectiveKernel
    conv2: ConvNormAct
    se: Optional[Union[SqueezeExcite, EcaModule]]
    downsample: Optional[tuple]
    drop_path: float = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: BlockPlan, *, key: PRNGKeyArray):
        keys = _keys(key, 4)
        self.conv1 = SelectiveKernel(plan, "conv1", key=next(keys))
        self.conv2 = ConvNormAct(plan.conv("conv2.conv"), plan.norm("conv2.bn"), act=False, key=next(keys))
        self.se = _attn_module(plan.attn, next(keys))
        self.downsample = _downsample(plan, next(keys))
        self.drop_path, self.inference = plan.drop_path, False

    def __call__(self, x: Float[Array, "*batch H W C"], state: State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Float[Array, "*batch Ho Wo O"], State]:
        k_block, k_path = _split(key, 2)
        out, state = self.conv1(x, state, key=k_block)
        out, state = self.conv2(out, state)
        out = _drop_path(self.drop_path, self.inference, _apply_attn(self.se, out), k_path)
        return _add_shortcut(out, x, self.downsample, state)


class SelectiveKernelBottleneck(eqx.Module):
    conv1: ConvNormAct
    conv2: SelectiveKernel
    conv3: ConvNormAct
    se: Optional[Union[SqueezeExcite, EcaModule]]
    downsample: Optional[tuple]
    drop_path: float = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: BlockPlan, *, key: PRNGKeyArray):
        keys = _keys(key, 5)
        self.conv1 = ConvNormAct(plan.conv("conv1.conv"), plan.norm("conv1.bn"), key=next(keys))
        self.conv2 = SelectiveKernel(plan, "conv2", key=next(keys))
        self.conv3 = ConvNormAct(plan.conv("conv3.conv"), plan.norm("conv3.bn"), act=False, key=next(keys))
        self.se = _attn_module(plan.attn, next(keys))
        self.downsample = _downsample(plan, next(keys))
        self.drop_path, self.inference = plan.drop_path, False

    def __call__(self, x: Float[Array, "*batch H W C"], state: State, *,
                 key: Optional[PRNGKeyArray] = None) -> tuple[Float[Array, "*batch Ho Wo O"], State]:
        k_block, k_path = _split(key, 2)
        out, state = self.conv1(x, state)
        out, state = self.conv2(out, state, key=k_block)
        out, state = self.conv3(out, state)
        out = _drop_path(self.drop_path, self.inference, _apply_attn(self.se, out), k_path)
        return _add_shortcut(out, x, self.downsample, state)


BLOCKS: dict[str, type] = {"basic": Block, "bottleneck": Block, "res2net": Bottle2neck,
                           "resnest": ResNestBottleneck, "sk_basic": SelectiveKernelBasic,
                           "sk_bottleneck": SelectiveKernelBottleneck}


def _stem_pool(plan: ResNetPlan, key: PRNGKeyArray) -> Any:
    if not plan.maxpool_seq:
        return Pool(plan.maxpool[0])
    layers: list = []
    for layer in plan.maxpool:
        if isinstance(layer, ConvSpec):
            layers.append(Conv2d(layer, key=key))
        elif isinstance(layer, NormSpec):
            layers.append(make_norm(layer))
        elif isinstance(layer, ActSpec):
            layers.append(ReLU())
        elif isinstance(layer, (PoolSpec, BlurSpec)):
            layers.append(_aa_module(layer))
        else:
            layers.append(None)  # a folded norm's slot
    return tuple(layers)


class ResNet(eqx.Module):
    """One CHW image -> float32 logits; with `num_classes=0` the pooled features (or the unpooled
    map, `global_pool=""`), with `features_only` the list of feature maps at `out_indices`. Stages
    past the last feature level asked for are empty, an absent head is None."""

    conv1: Any  # Conv2d, or the deep stem's tuple with PyTorch's Sequential indices
    bn1: Optional[Norm]
    maxpool: Any  # Pool, or PyTorch's Sequential as a tuple (anti-aliased or conv stem pool)
    layer1: tuple[eqx.Module, ...]
    layer2: tuple[eqx.Module, ...]
    layer3: tuple[eqx.Module, ...]
    layer4: tuple[eqx.Module, ...]
    fc: Optional[Linear]
    drop_rate: float = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    out_indices: Optional[tuple[int, ...]] = eqx.field(static=True)
    global_pool: bool = eqx.field(static=True)
    inference: bool

    def __init__(self, plan: ResNetPlan, *, key: PRNGKeyArray, dtype: Any = jnp.float32):
        if len(plan.spec.layers) != 4:
            raise ValueError("the ResNet module has exactly four stages")
        skey, *bkeys = jax.random.split(key, 2 + sum(len(s) for s in plan.stages))
        stem_keys = jax.random.split(skey, len(plan.stem_convs) + 2)
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
        self.maxpool = _stem_pool(plan, stem_keys[-2]) if plan.maxpool else None
        it = iter(bkeys)
        stages = [tuple(BLOCKS[b.kind](b, key=next(it)) for b in stage) for stage in plan.stages]
        stages += [()] * (4 - len(stages))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = None if plan.fc is None else Linear(plan.fc, key=stem_keys[-1])
        self.drop_rate = plan.spec.drop_rate
        self.dtype = dtype
        self.out_indices = plan.out_indices
        self.global_pool = plan.global_pool
        self.inference = False

    def __call__(self, x: Float[Array, "*batch C H W"], state: State, *,
                 key: Optional[PRNGKeyArray] = None
                 ) -> tuple[Union[Float[Array, "*batch K"], Float[Array, "*batch c h w"],
                                  list[Float[Array, "*batch c h w"]]], State]:
        out_dtype = ops.stat_dtype(self.dtype)
        # Channels-last inside: XLA's convolutions want NHWC; vmap of a CHW model gives NCHW and
        # a transpose around every conv. One transpose here, and back wherever a map leaves.
        x = to_hwc(x.astype(self.dtype))
        x, state = _sequential(self.conv1, x, state)
        x, state = _apply_norm(self.bn1, x, state)
        x = ops.relu(x)
        features = [x]
        if self.maxpool is not None:
            x, state = _sequential(self.maxpool, x, state)
        stages = [s for s in (self.layer1, self.layer2, self.layer3, self.layer4) if s]
        keys = _split(key, sum(len(s) for s in stages) + 1)
        i = 0
        for stage in stages:
            for block in stage:
                x, state = block(x, state, key=keys[i])
                i += 1
            features.append(x)
        if self.out_indices is not None:
            return [to_chw(features[j]).astype(out_dtype) for j in self.out_indices], state
        if self.global_pool:
            x = ops.global_avg_pool(x, spatial_axes(x))
        else:
            x = to_chw(x)  # the unpooled map is returned (CHW), dropout's mask drawn over it as before
        if not self.inference and self.drop_rate > 0:
            x = per_example(lambda xi, ki: ops.dropout(xi, self.drop_rate, ki), x, _need_key(keys[-1]))
        if self.fc is not None:
            x = self.fc(x)
        return x.astype(out_dtype), state
