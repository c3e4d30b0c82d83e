"""ResNet family in Haiku, wired from a `ResNetPlan`."""

from __future__ import annotations

from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .. import ops
from ..spec import BlockPlan, NormSpec, ResNetPlan
from .layers import Conv2d, Linear, Norm, local_name


def _norm(spec: Optional[NormSpec], x: Array, is_training: bool) -> Array:
    return x if spec is None else Norm(spec)(x, is_training)


class Block(hk.Module):
    """Basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1) residual block."""

    def __init__(self, plan: BlockPlan):
        super().__init__(name=local_name(plan.name))
        self.plan = plan

    def __call__(self, x: Float[Array, "N H W C"], is_training: bool) -> Float[Array, "N Ho Wo Co"]:
        p = self.plan
        shortcut = x
        last = len(p.convs) - 1
        for i, conv in enumerate(p.convs):
            x = Conv2d(conv)(x)
            x = _norm(p.norms[i] if p.norms else None, x, is_training)
            if i < last:
                x = jax.nn.relu(x)
        if p.down_conv is not None:
            if p.down_pool is not None:
                shortcut = ops.pool(shortcut, p.down_pool)
            shortcut = _norm(p.down_norm, Conv2d(p.down_conv)(shortcut), is_training)
        if is_training and p.drop_path > 0:
            x = ops.drop_path(x, p.drop_path, hk.next_rng_key(), batch_axis=0)
        return jax.nn.relu(x + shortcut)


def resnet_forward(plan: ResNetPlan, dtype=jnp.float32):
    """The function to `hk.transform_with_state`: NHWC images -> float32 logits."""

    def forward(x: Float[Array, "N H W C"], is_training: bool) -> Float[Array, "N K"]:
        x = x.astype(dtype)
        norms = list(plan.stem_norms)
        for i, conv in enumerate(plan.stem_convs):
            x = Conv2d(conv)(x)
            if norms:
                x = Norm(norms[i])(x, is_training)
            x = jax.nn.relu(x)
        x = ops.pool(x, plan.stem_pool)
        for stage in plan.stages:
            for block in stage:
                x = Block(block)(x, is_training)
        x = ops.global_avg_pool(x)
        if is_training and plan.spec.drop_rate > 0:
            x = ops.dropout(x, plan.spec.drop_rate, hk.next_rng_key())
        return Linear(plan.fc)(x).astype(jnp.float32)

    return forward
