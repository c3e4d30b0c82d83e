"""torchvision's GoogLeNet in Haiku, wired from a `GoogLeNetPlan`.

Module paths map to PyTorch names through `zoo.naming` (`inception3a/branch2_0/conv` is
`inception3a.branch2.0.conv`).
"""

from __future__ import annotations

from typing import Union

import haiku as hk
import jax.numpy as jnp
from jaxtyping import Array, Float

from .. import ops
from ..googlenet import (FEATURE_TAPS, TRANSFORM_INPUT, AuxPlan, ConvBNPlan, GoogLeNetOutputs, GoogLeNetPlan,
                         InceptionPlan, PoolPlan)
from .layers import Conv2d, Linear, Norm, local_name


class BasicConv2d(hk.Module):
    """conv -> BatchNorm (absent when folded into the conv) -> ReLU."""

    def __init__(self, plan: ConvBNPlan):
        super().__init__(name=local_name(plan.name))
        self.plan = plan

    def __call__(self, x: Float[Array, "N H W C"], is_training: bool) -> Float[Array, "N Ho Wo Co"]:
        x = Conv2d(self.plan.conv)(x)
        if self.plan.norm is not None:
            x = Norm(self.plan.norm)(x, is_training)
        return ops.relu(x)


class Inception(hk.Module):
    def __init__(self, plan: InceptionPlan):
        super().__init__(name=local_name(plan.name))
        self.plan = plan

    def __call__(self, x: Float[Array, "N H W C"], is_training: bool) -> Float[Array, "N H W Co"]:
        p = self.plan
        b1 = BasicConv2d(p.branch1)(x, is_training)
        b2 = x
        for layer in p.branch2:
            b2 = BasicConv2d(layer)(b2, is_training)
        b3 = x
        for layer in p.branch3:
            b3 = BasicConv2d(layer)(b3, is_training)
        pool, proj = p.branch4
        b4 = BasicConv2d(proj)(ops.pool(x, pool.pool), is_training)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(hk.Module):
    def __init__(self, plan: AuxPlan):
        super().__init__(name=local_name(plan.name))
        self.plan = plan

    def __call__(self, x: Float[Array, "N H W C"], is_training: bool) -> Float[Array, "N K"]:
        p = self.plan
        x = ops.adaptive_avg_pool(x, p.pool_hw)
        x = BasicConv2d(p.conv)(x, is_training)
        # fc1's inputs are in PyTorch's flatten order (C, H, W).
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = ops.relu(Linear(p.fc1)(x))
        if is_training and p.dropout > 0:
            x = ops.dropout(x, p.dropout, hk.next_rng_key())
        return Linear(p.fc2)(x).astype(ops.stat_dtype(x.dtype))


def transform_input(x: Float[Array, "N H W 3"]) -> Float[Array, "N H W 3"]:
    """torchvision's `_transform_input`, on channels-last images."""
    return jnp.stack([x[..., c] * scale + shift for c, (scale, shift) in enumerate(TRANSFORM_INPUT)], axis=-1)


def googlenet_forward(plan: GoogLeNetPlan, dtype=jnp.float32):
    """The function to `hk.transform_with_state`: NHWC images -> float32 logits, or in training
    mode with aux heads `GoogLeNetOutputs(logits, aux_logits2, aux_logits1)` as torchvision; with
    `num_classes=0` the pooled features (or the unpooled map, `global_pool=""`), with
    `features_only` the list of maps at the `FEATURE_TAPS` of `out_indices`."""
    aux_at = {a.tap: a for a in plan.aux}
    taps = [FEATURE_TAPS[i] for i in plan.out_indices or ()]
    out_dtype = ops.stat_dtype(dtype)

    def forward(x: Float[Array, "N H W C"], is_training: bool
                ) -> Union[Float[Array, "N K"], GoogLeNetOutputs, Float[Array, "N h w c"], list]:
        if plan.spec.transform_input:
            x = transform_input(x)
        x = x.astype(dtype)
        # The aux heads only run in training, but `init` must create their parameters whatever
        # the mode, so that inference-mode templates still hold every checkpoint tensor.
        run_aux = is_training or hk.running_init()
        aux_out = {}
        features = {}
        for layer in plan.trunk:
            if isinstance(layer, PoolPlan):
                x = ops.pool(x, layer.pool)
            elif isinstance(layer, InceptionPlan):
                x = Inception(layer)(x, is_training)
            else:
                x = BasicConv2d(layer)(x, is_training)
            if run_aux and layer.name in aux_at:
                aux = aux_at[layer.name]
                aux_out[aux.name] = InceptionAux(aux)(x, is_training)
            features[layer.name] = x
        if plan.out_indices is not None:
            return [features[t].astype(out_dtype) for t in taps]
        if plan.global_pool:
            x = ops.global_avg_pool(x)
        if is_training and plan.spec.dropout > 0:
            x = ops.dropout(x, plan.spec.dropout, hk.next_rng_key())
        if plan.fc is None:
            return x.astype(out_dtype)
        logits = Linear(plan.fc)(x).astype(out_dtype)
        if is_training and plan.aux:
            return GoogLeNetOutputs(logits, aux_out["aux2"], aux_out["aux1"])
        return logits

    return forward
