"""ResNet family in Haiku, wired from a `ResNetPlan`: timm's ResNet with basic, bottleneck,
Res2Net, ResNeSt and selective-kernel blocks, SE/ECA attention, anti-aliasing, DropBlock.

Module paths are the PyTorch names through `zoo.naming.haiku_module` (`layer1_0/se/fc1`), so
every level of PyTorch's module tree that holds parameters is a Haiku module here too.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import haiku as hk
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .. import ops
from ..spec import (ActSpec, AttnSpec, BlockPlan, BlurSpec, ConvSpec, DropBlockSpec, NormSpec, PoolSpec,
                    ResNetPlan)
from .layers import Conv1d, Conv2d, Linear, Norm, local_name

NHWC = ("NHWC", "HWIO", "NHWC")


def _norm(spec: Optional[NormSpec], x: Array, is_training: bool) -> Array:
    return x if spec is None else Norm(spec)(x, is_training)


def _aa(spec: Optional[Any], x: Array) -> Array:
    if spec is None:
        return x
    if isinstance(spec, BlurSpec):
        return ops.blur_pool(x, spec.filter(), stride=spec.stride, padding=spec.padding,
                             pad_mode=spec.pad_mode, dimension_numbers=NHWC)
    return ops.pool(x, spec)


def _drop_block(spec: Optional[DropBlockSpec], x: Array, is_training: bool) -> Array:
    if spec is None or not is_training or spec.rate == 0:
        return x
    return ops.drop_block(x, rate=spec.rate, block_size=spec.block_size, gamma_scale=spec.gamma_scale,
                          key=hk.next_rng_key(), spatial_axes=(1, 2), channel_axis=3)


def _drop_path(rate: float, x: Array, is_training: bool) -> Array:
    if not is_training or rate == 0:
        return x
    return ops.drop_path(x, rate, hk.next_rng_key(), batch_axis=0)


class SqueezeExcite(hk.Module):
    """timm's SEModule: gate = sigmoid(fc2(relu(fc1(mean(x))))), with 1x1 convs."""

    def __init__(self, spec: AttnSpec):
        super().__init__(name=local_name(spec.name))
        self.spec = spec

    def __call__(self, x: Float[Array, "N H W C"]) -> Float[Array, "N H W C"]:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = ops.relu(Conv2d(self.spec.fc1)(s))
        return x * jax.nn.sigmoid(Conv2d(self.spec.fc2)(s))


class EfficientChannelAttn(hk.Module):
    """timm's EcaModule: a 1-D conv along the channel axis of the pooled features, sigmoid gate."""

    def __init__(self, spec: AttnSpec):
        super().__init__(name=local_name(spec.name))
        self.spec = spec

    def __call__(self, x: Float[Array, "N H W C"]) -> Float[Array, "N H W C"]:
        # Channels become the conv's length axis, with one feature.
        y = jnp.mean(x, axis=(1, 2))[:, :, None]
        y = Conv1d(self.spec.conv)(y)[:, :, 0]
        return x * jax.nn.sigmoid(y)[:, None, None, :]


def _attn(spec: Optional[AttnSpec], x: Array) -> Array:
    if spec is None:
        return x
    return (SqueezeExcite if spec.kind == "se" else EfficientChannelAttn)(spec)(x)


class ConvNormAct(hk.Module):
    """timm's ConvNormAct (`conv`, then `bn` with its DropBlock and activation inside)."""

    def __init__(self, torch_name: str, conv: ConvSpec, norm: Optional[NormSpec]):
        super().__init__(name=local_name(torch_name))
        self.conv, self.norm = conv, norm

    def __call__(self, x: Float[Array, "N H W C"], is_training: bool, *, act: bool = True,
                 drop_block: Optional[DropBlockSpec] = None) -> Float[Array, "N Ho Wo Co"]:
        x = _norm(self.norm, Conv2d(self.conv)(x), is_training)
        x = _drop_block(drop_block, x, is_training)
        return ops.relu(x) if act else x


class SplitAttn(hk.Module):
    """ResNeSt's split attention (as the block's `conv2`): a conv producing `radix` splits, then
    attention over the splits from their pooled sum."""

    def __init__(self, plan: BlockPlan):
        super().__init__(name=local_name(f"{plan.name}.conv2"))
        self.plan = plan

    def __call__(self, x: Float[Array, "N H W C"], is_training: bool) -> Float[Array, "N Ho Wo C"]:
        p, r = self.plan, self.plan.radix
        x = _norm(p.norm("conv2.bn0"), Conv2d(p.conv("conv2.conv"))(x), is_training)
        x = ops.relu(_drop_block(p.drop_block, x, is_training))
        n, h, w, rc = x.shape
        splits = x.reshape(n, h, w, r, rc // r)  # PyTorch's (radix, C) channel order
        gap = jnp.sum(splits, axis=3) if r > 1 else x
        gap = jnp.mean(gap, axis=(1, 2), keepdims=True)
        gap = ops.relu(_norm(p.norm("conv2.bn1"), Conv2d(p.conv("conv2.fc1"))(gap), is_training))
        attn = ops.radix_softmax(Conv2d(p.conv("conv2.fc2"))(gap), r, p.groups)
        if r == 1:
            return x * attn
        return jnp.sum(splits * attn.reshape(n, 1, 1, r, rc // r), axis=3)


class SelectiveKernel(hk.Module):
    """timm's SelectiveKernel: two 3x3 paths (dilation d and 2d), softmax attention across them."""

    def __init__(self, plan: BlockPlan, local: str):
        super().__init__(name=local_name(f"{plan.name}.{local}"))
        self.plan, self.local = plan, local

    def __call__(self, x: Float[Array, "N H W C"], is_training: bool) -> Float[Array, "N Ho Wo Co"]:
        p, pre = self.plan, self.local
        inputs = jnp.split(x, p.sk_paths, axis=-1) if p.split_input else [x] * p.sk_paths
        paths = [ConvNormAct(f"{p.name}.{pre}.paths.{i}", p.conv(f"{pre}.paths.{i}.conv"),
                             p.norm(f"{pre}.paths.{i}.bn"))(xi, is_training, drop_block=p.drop_block)
                 for i, xi in enumerate(inputs)]
        stacked = jnp.stack(paths, axis=3)  # (N, H, W, paths, C)
        attn = _SelectiveKernelAttn(p, pre)(jnp.sum(stacked, axis=3), is_training)
        return jnp.sum(stacked * attn, axis=3)


class _SelectiveKernelAttn(hk.Module):
    def __init__(self, plan: BlockPlan, sk: str):
        super().__init__(name="attn")
        self.plan, self.sk = plan, sk

    def __call__(self, x: Float[Array, "N H W C"], is_training: bool) -> Float[Array, "N 1 1 P C"]:
        p, pre = self.plan, f"{self.sk}.attn"
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = ops.relu(_norm(p.norm(f"{pre}.bn"), Conv2d(p.conv(f"{pre}.fc_reduce"))(s), is_training))
        s = Conv2d(p.conv(f"{pre}.fc_select"))(s)
        n, c = s.shape[0], s.shape[-1] // p.sk_paths
        return jax.nn.softmax(s.reshape(n, 1, 1, p.sk_paths, c), axis=3)


class Block(hk.Module):
    """One residual block of any kind in `spec.BLOCK_KINDS`, as its timm class computes it."""

    def __init__(self, plan: BlockPlan):
        super().__init__(name=local_name(plan.name))
        self.plan = plan

    def __call__(self, x: Float[Array, "N H W C"], is_training: bool) -> Float[Array, "N Ho Wo Co"]:
        # The wiring lives in plain functions: Haiku gives a module's other methods name scopes
        # of their own, which would add levels that PyTorch's names do not have.
        return _BLOCKS[self.plan.kind](self.plan, x, is_training)


def _conv_norm(p: BlockPlan, conv: str, norm: str, x: Array, is_training: bool) -> Array:
    return _norm(p.norm(norm), Conv2d(p.conv(conv))(x), is_training)


def _shortcut(p: BlockPlan, x: Array, is_training: bool) -> Array:
    if p.down_conv is None:
        return x
    if p.down_pool is not None:
        x = ops.pool(x, p.down_pool)
    return _norm(p.down_norm, Conv2d(p.down_conv)(x), is_training)


def _finish(p: BlockPlan, x: Array, shortcut: Array, is_training: bool) -> Array:
    x = _drop_path(p.drop_path, _attn(p.attn, x), is_training)
    return ops.relu(x + _shortcut(p, shortcut, is_training))


def _basic(p: BlockPlan, x: Array, is_training: bool) -> Array:
    out = _conv_norm(p, "conv1", "bn1", x, is_training)
    out = _aa(p.aa, ops.relu(_drop_block(p.drop_block, out, is_training)))
    out = _conv_norm(p, "conv2", "bn2", out, is_training)
    return _finish(p, out, x, is_training)


def _bottleneck(p: BlockPlan, x: Array, is_training: bool) -> Array:
    out = ops.relu(_conv_norm(p, "conv1", "bn1", x, is_training))
    out = _conv_norm(p, "conv2", "bn2", out, is_training)
    out = _aa(p.aa, ops.relu(_drop_block(p.drop_block, out, is_training)))
    out = _conv_norm(p, "conv3", "bn3", out, is_training)
    return _finish(p, out, x, is_training)


def _res2net(p: BlockPlan, x: Array, is_training: bool) -> Array:
    out = ops.relu(_conv_norm(p, "conv1", "bn1", x, is_training))
    spx = jnp.split(out, p.scale, axis=-1)
    # A stage's first block (the one with the pool) feeds each split alone; later blocks add the
    # previous split's output (the hierarchical residual).
    is_first = p.pool is not None
    spo, sp = [], spx[0]
    for i in range(max(1, p.scale - 1)):
        sp = spx[i] if i == 0 or is_first else sp + spx[i]
        sp = ops.relu(_conv_norm(p, f"convs.{i}", f"bns.{i}", sp, is_training))
        spo.append(sp)
    if p.scale > 1:
        spo.append(ops.pool(spx[-1], p.pool) if is_first else spx[-1])
    out = _drop_block(p.drop_block, jnp.concatenate(spo, axis=-1), is_training)
    out = _conv_norm(p, "conv3", "bn3", out, is_training)
    return _finish(p, out, x, is_training)


def _resnest(p: BlockPlan, x: Array, is_training: bool) -> Array:
    out = ops.relu(_conv_norm(p, "conv1", "bn1", x, is_training))
    if p.pool is not None and p.avd_first:
        out = ops.pool(out, p.pool)
    out = SplitAttn(p)(out, is_training)
    if p.pool is not None and not p.avd_first:
        out = ops.pool(out, p.pool)
    out = _conv_norm(p, "conv3", "bn3", out, is_training)
    if p.down_conv is None:
        return ops.relu(out + x)
    # timm's ResNestBottleneck applies drop path to the block input, which only reaches the
    # output through the downsample: mirrored as is.
    return ops.relu(out + _shortcut(p, _drop_path(p.drop_path, x, is_training), is_training))


def _sk_basic(p: BlockPlan, x: Array, is_training: bool) -> Array:
    out = SelectiveKernel(p, "conv1")(x, is_training)
    out = ConvNormAct(f"{p.name}.conv2", p.conv("conv2.conv"), p.norm("conv2.bn"))(out, is_training, act=False)
    return _finish(p, out, x, is_training)


def _sk_bottleneck(p: BlockPlan, x: Array, is_training: bool) -> Array:
    out = ConvNormAct(f"{p.name}.conv1", p.conv("conv1.conv"), p.norm("conv1.bn"))(x, is_training)
    out = SelectiveKernel(p, "conv2")(out, is_training)
    out = ConvNormAct(f"{p.name}.conv3", p.conv("conv3.conv"), p.norm("conv3.bn"))(out, is_training, act=False)
    return _finish(p, out, x, is_training)


_BLOCKS = {"basic": _basic, "bottleneck": _bottleneck, "res2net": _res2net, "resnest": _resnest,
           "sk_basic": _sk_basic, "sk_bottleneck": _sk_bottleneck}


def _maxpool(plan: ResNetPlan, x: Array, is_training: bool) -> Array:
    if not plan.maxpool_seq:
        return ops.pool(x, plan.maxpool[0])
    for layer in plan.maxpool:
        if isinstance(layer, ConvSpec):
            x = Conv2d(layer)(x)
        elif isinstance(layer, NormSpec):
            x = Norm(layer)(x, is_training)
        elif isinstance(layer, ActSpec):
            x = ops.relu(x)
        elif isinstance(layer, (PoolSpec, BlurSpec)):
            x = _aa(layer, x)
    return x


def resnet_forward(plan: ResNetPlan, dtype=jnp.float32):
    """The function to `hk.transform_with_state`: NHWC images -> float32 logits (float64 when
    computing in float64); with `num_classes=0` the pooled features (N, C), or the unpooled map
    (N, H, W, C) with `global_pool=""`; with `features_only` the list of feature maps."""
    out_dtype = ops.stat_dtype(dtype)

    def forward(x: Float[Array, "N H W C"], is_training: bool
                ) -> Union[Float[Array, "N K"], Float[Array, "N h w c"], list[Float[Array, "N h w c"]]]:
        x = x.astype(dtype)
        norms = list(plan.stem_norms)
        for i, conv in enumerate(plan.stem_convs):
            x = Conv2d(conv)(x)
            if norms:
                x = Norm(norms[i])(x, is_training)
            x = ops.relu(x)
        features = [x]
        if plan.maxpool:
            x = _maxpool(plan, x, is_training)
        for stage in plan.stages:
            for block in stage:
                x = Block(block)(x, is_training)
            features.append(x)
        if plan.out_indices is not None:
            return [features[i].astype(out_dtype) for i in plan.out_indices]
        if plan.global_pool:
            x = ops.global_avg_pool(x)
        if is_training and plan.spec.drop_rate > 0:
            x = ops.dropout(x, plan.spec.drop_rate, hk.next_rng_key())
        if plan.fc is not None:
            x = Linear(plan.fc)(x)
        return x.astype(out_dtype)

    return forward
