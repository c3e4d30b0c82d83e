"""dm-haiku models: `create` a `hk.TransformedWithState`, `load` a converted file.

    net = zoo.haiku.create("resnet50")
    params, state = net.init(jax.random.key(0), images_nhwc, is_training=True)
    logits, state = net.apply(params, state, None, images_nhwc, is_training=False)

Conv kernels are HWIO, Linear weights (in, out); BatchNorm running statistics live in the state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from .. import _cache, _init, registry
from ..googlenet import GoogLeNetPlan
from ..naming import HAIKU_LEAVES, haiku_from_torch_layout, torch_module
from ..spec import ResNetPlan
from .googlenet import googlenet_forward
from .layers import cross_replica
from .resnet import resnet_forward

_cache.enable()  # before anything is compiled: see zoo/_cache.py

FRAMEWORK = "haiku"
LAYOUT = "conv HWIO, linear (in, out), NHWC activations"
from_torch_layout = haiku_from_torch_layout

__all__ = ["create", "load", "save", "to_torch", "from_equinox", "named_arrays", "from_named_arrays", "template"]


# Plan type -> function returning the forward to transform; other families register here.
FORWARDS: dict[type, Callable] = {ResNetPlan: resnet_forward, GoogLeNetPlan: googlenet_forward}


def build(plan: Any, dtype: Any = jnp.float32, cross_replica_axis: Optional[str] = None
          ) -> hk.TransformedWithState:
    forward = FORWARDS[type(plan)](plan, dtype)
    if cross_replica_axis is not None:
        unsynced = forward

        @functools.wraps(unsynced)
        def forward(*args: Any, **kwargs: Any) -> Any:
            with cross_replica(cross_replica_axis):
                return unsynced(*args, **kwargs)

    net = hk.transform_with_state(_without_reprs(forward))
    return hk.TransformedWithState(_jitted_init(net.init), net.apply)


def _without_reprs(forward: Callable) -> Callable:
    """`forward` with Haiku's module reprs off: Haiku pretty-prints every module's constructor
    arguments as the module is made, in every trace (a quarter of tracing a ResNet-50 predict under
    the profiler), for a repr that nobody sees of modules living inside the transform."""

    @functools.wraps(forward)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        with hk.config.context(module_auto_repr=False):
            return forward(*args, **kwargs)

    return quiet


def _jitted_init(init: Callable) -> Callable:
    """`init`, jitted. Run eagerly, Haiku's init dispatches every initializer and the forward op
    by op: one small XLA program per distinct shape, each under the persistent cache's minimum
    compile time, so a second process compiled them all again (ResNet-50 on 2 CPU cores: 12.4 s
    in every process; jitted: one program, 5.5 s the first time, 1.7 s with the cache; see
    docs/benchmarks.md). `is_training` is static whether given by keyword or not. Every parameter
    comes from one draw per distribution (`zoo._init.one_draw`)."""
    jitted = jax.jit(lambda rng, x, is_training: _init.one_draw(lambda: init(rng, x, is_training=is_training), rng),
                     static_argnames="is_training")

    @functools.wraps(init)
    def fast_init(rng: Any, x: Any, is_training: bool) -> tuple[hk.Params, hk.State]:
        return jitted(rng, x, is_training=bool(is_training))

    return fast_init


def create(name: str, *, dtype: Any = jnp.float32, fold_bn: bool = False,
           cross_replica_axis: Optional[str] = None, **overrides: Any) -> hk.TransformedWithState:
    """The registered architecture `name`; spec fields may be overridden, among them timm's
    `create_model` options: `num_classes` (0: pooled features; with `global_pool=""` the unpooled
    final map), `in_chans`, `features_only` with `out_indices` (a list of feature maps).

    `dtype` is the compute dtype (bfloat16/float16 for mixed precision); parameters and BatchNorm
    statistics stay float32. `fold_bn=True` builds the inference-only variant whose convs carry
    the folded BatchNorm as a bias. `cross_replica_axis`: the device axis of a surrounding
    `shard_map` or `pmap`, where each device sees only its shard; training-mode BatchNorm then
    averages its statistics over it (as `hk.BatchNorm`'s argument of that name). Not needed with
    `jit` over sharded arrays, where the batch axis is already global.
    """
    return build(registry.get_spec(name, **overrides).plan(fold_bn), dtype, cross_replica_axis)


def template(plan: Any) -> tuple[hk.Params, hk.State]:
    """Parameter and state shapes of the architecture, without computing anything."""
    forward = FORWARDS[type(plan)](plan, jnp.float32)

    def shapes_forward(x: Any, is_training: bool) -> Any:
        with _init.shapes_only():  # inside this template's own transform: see zoo/_init.py
            return forward(x, is_training)

    init = hk.transform_with_state(_without_reprs(shapes_forward)).init
    size = 224
    x = jax.ShapeDtypeStruct((1, size, size, plan.spec.in_chans), jnp.float32)
    return jax.eval_shape(lambda k, x: init(k, x, is_training=False), jax.random.key(0), x)


def named_arrays(params: Mapping, state: Optional[Mapping] = None) -> dict[str, Any]:
    """Flatten Haiku's {module: {leaf: value}} trees (params, or any tree shaped like them:
    gradients, a boolean mask; and the state, if given) to PyTorch-named leaves."""
    out = {}
    for tree in (params, state or {}):
        for module, leaves in tree.items():
            for leaf, value in leaves.items():
                out[f"{torch_module(module)}.{HAIKU_LEAVES[leaf]}"] = value
    return out


def from_named_arrays(params_t: Mapping, state_t: Mapping,
                      arrays: Mapping[str, Any]) -> tuple[hk.Params, hk.State]:
    """Fill the trees shaped like `params_t`/`state_t` with PyTorch-named arrays (already checked
    by `zoo.checked.checked_merge`)."""

    def fill(tree: Mapping) -> dict:
        return {m: {leaf: jax.device_put(arrays[f"{torch_module(m)}.{HAIKU_LEAVES[leaf]}"])
                    for leaf in leaves} for m, leaves in tree.items()}

    return fill(params_t), fill(state_t)


def load(path: str, *, dtype: Any = jnp.float32, num_classes: Optional[int] = None,
         in_chans: Optional[int] = None, features_only: Optional[bool] = None,
         out_indices: Optional[Sequence[int]] = None, global_pool: Optional[str] = None, key: Any = None,
         cross_replica_axis: Optional[str] = None, check: bool = True
         ) -> tuple[hk.TransformedWithState, hk.Params, hk.State]:
    """Load a converted `.safetensors` file: (transformed, params, state). The metadata and every
    key are checked against the architecture it names.

    Surgery, as timm's `create_model` options: `num_classes` gives a new classifier of that size
    (and new GoogLeNet aux heads) on the loaded backbone, initialised as PyTorch's nn.Linear from
    `key` (default `jax.random.key(0)`), for fine-tuning (timm's `reset_classifier`); 0 gives the
    pooled features, and with `global_pool=""` the unpooled final map. `features_only=True` gives
    a network returning the feature maps at `out_indices` (0 the stem, 1-4 the stages; GoogLeNet:
    `zoo.googlenet.FEATURE_TAPS`). `in_chans` adapts the input conv (timm's `adapt_input_conv`).
    `check=False` skips recomputing the content digest (the other checks stay)."""
    from ..io import load_file

    if key is None:
        key = jax.random.key(0)
    loaded = load_file(path, FRAMEWORK, key=key, num_classes=num_classes, in_chans=in_chans,
                       features_only=features_only, out_indices=out_indices, global_pool=global_pool,
                       check=check)
    params, state = loaded.objects
    return build(loaded.plan, dtype, cross_replica_axis), params, state


def to_torch(params: Mapping, state: Optional[Mapping] = None) -> dict[str, Any]:
    """A PyTorch state dict (numpy arrays, PyTorch names and layouts; running statistics and
    `num_batches_tracked` from `state`) that the timm / torchvision model loads with
    `strict=True`. `params` may be any tree shaped like the parameters (gradients, updates), with
    `state` None. A model with BatchNorm folded into its convs cannot be exported."""
    from ..io import to_torch as _to_torch

    return _to_torch(FRAMEWORK, named_arrays(params, state))


def from_equinox(model: Any, state: Any, arch: str, *, fold_bn: bool = False,
                 **overrides: Any) -> tuple[hk.Params, hk.State]:
    """An Equinox (model, state) of `arch` (with the `overrides` it was created with) as Haiku
    (params, state), checked name by name and shape by shape as a file load is."""
    from ..io import convert_objects

    return convert_objects((model, state), "equinox", FRAMEWORK, arch, overrides, fold_bn)


def save(path: str, params: Mapping, state: Mapping, *, arch: str, fold_bn: bool = False,
         force: bool = False, **overrides: Any) -> Any:
    """Write (params, state) of `arch` (with the `overrides` it was created or loaded with:
    num_classes, features_only, ...) as a zoo file, checked and described as `zoo convert` does;
    `zoo.load`, `zoo.equinox.load` and `zoo export` read it. Atomic; an existing file needs
    `force=True`."""
    from ..io import save_objects

    return save_objects(path, FRAMEWORK, (params, state), arch, overrides, fold_bn, force)
