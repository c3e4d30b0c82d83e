"""Equinox models: `create` a `(model, state)` pair, `load` a converted file.

    model, state = zoo.equinox.create("resnet50", key=jax.random.key(0))
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    logits, state = batched(images_nchw, state)            # training mode: batch statistics
    logits, _ = jax.vmap(eqx.nn.inference_mode(model), axis_name="batch",
                         in_axes=(0, None), out_axes=(0, None))(images_nchw, state)
    logits, _ = eqx.nn.inference_mode(model)(images_nchw, state)   # the same, in one call

The model takes one CHW image, or an NCHW batch (the vmapped model's outputs, a third of its trace;
in training with a typed key per example, as zoo.training's steps call it). Conv weights are OIHW and Linear weights (out, in), as in PyTorch;
BatchNorm running statistics live in the `eqx.nn.State`.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from .. import _cache, _init, registry
from ..googlenet import GoogLeNetPlan
from ..spec import ResNetPlan
from .googlenet import GoogLeNet
from .layers import BATCH_AXIS, BatchNorm
from .resnet import ResNet

_cache.enable()  # before anything is compiled: see zoo/_cache.py

FRAMEWORK = "equinox"
LAYOUT = "conv OIHW, linear (out, in), CHW activations (as PyTorch)"
_STATE_FIELD = "state_index"
_STATE_LEAVES = ("running_mean", "running_var")

__all__ = ["create", "load", "save", "to_torch", "from_haiku", "named_arrays", "from_named_arrays", "template",
           "with_cross_replica_axis", "BATCH_AXIS"]


def from_torch_layout(a: Any) -> Any:
    return a  # Equinox keeps PyTorch's layouts


# Plan type -> Equinox model class built from it; other families register here.
MODELS: dict[type, type] = {ResNetPlan: ResNet, GoogLeNetPlan: GoogLeNet}


def _build(plan: Any, key: PRNGKeyArray, dtype: Any) -> tuple[eqx.Module, eqx.nn.State]:
    make = eqx.nn.make_with_state(MODELS[type(plan)])
    return _init.one_draw(lambda: make(plan, key=key, dtype=dtype), key)


# Initialising eagerly compiles one random-number kernel per parameter shape (~50 s for a
# ResNet-50 on 2 cores); one jitted program is a few seconds.
_build_jit = eqx.filter_jit(_build)


def build(plan: Any, *, key: PRNGKeyArray, dtype: Any = jnp.float32) -> tuple[eqx.Module, eqx.nn.State]:
    return _build_jit(plan, key, dtype)


def create(name: str, *, key: PRNGKeyArray, dtype: Any = jnp.float32, fold_bn: bool = False,
           cross_replica_axis: Optional[str] = None, **overrides: Any) -> tuple[eqx.Module, eqx.nn.State]:
    """The registered architecture `name`; spec fields may be overridden, among them timm's
    `create_model` options: `num_classes` (0: pooled features; with `global_pool=""` the unpooled
    final map), `in_chans`, `features_only` with `out_indices` (a list of feature maps).

    `dtype` is the compute dtype (bfloat16/float16 for mixed precision); parameters and BatchNorm
    statistics stay float32. `fold_bn=True` builds the inference-only variant whose convs carry
    the folded BatchNorm as a bias (its state is empty). `cross_replica_axis`: see
    `with_cross_replica_axis`.
    """
    model, state = build(registry.get_spec(name, **overrides).plan(fold_bn), key=key, dtype=dtype)
    return with_cross_replica_axis(model, cross_replica_axis), state


def with_cross_replica_axis(model: Any, axis_name: Optional[str]) -> Any:
    """The model whose BatchNorms take training statistics over the vmapped batch *and* the
    device axis `axis_name` of a surrounding `shard_map` or `pmap`, where each device sees only
    its shard (Haiku's `cross_replica_axis`). Not needed with `jit` over sharded arrays, where the
    batch axis is already global. None: the model unchanged."""
    if axis_name is None:
        return model

    def swap(m: Any) -> Any:
        if not isinstance(m, BatchNorm):
            return m
        new = copy.copy(m)
        object.__setattr__(new, "axis_name", (BATCH_AXIS, axis_name))  # a static field
        return new

    return jax.tree_util.tree_map(swap, model, is_leaf=lambda m: isinstance(m, BatchNorm))


def _build_shapes(plan: Any, key: PRNGKeyArray, dtype: Any) -> tuple[eqx.Module, eqx.nn.State]:
    with _init.shapes_only():  # inside the traced function: see zoo/_init.py
        return _build(plan, key, dtype)


def template(plan: Any, dtype: Any = jnp.float32) -> tuple[eqx.Module, eqx.nn.State]:
    """The model and state with shapes for leaves, computing nothing."""
    return eqx.filter_eval_shape(_build_shapes, plan, jax.random.key(0), dtype)


def _is_index(x: Any) -> bool:
    return isinstance(x, eqx.nn.StateIndex)


def _dotted(path: tuple) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        else:
            raise TypeError(f"unexpected tree path element {k!r}")
    return ".".join(parts)


def _is_leaf_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


# Fields that are pytree leaves but no PyTorch tensor: the training/inference mode switch.
_FLAGS = ("inference",)


def named_arrays(model: Any, state: Optional[eqx.nn.State] = None) -> dict[str, Any]:
    """Flatten a model, or any tree shaped like one (gradients, a filtered model, a boolean mask
    from `zoo.training.decay_mask`), and its state to PyTorch-named leaves: tree paths are PyTorch
    names. Every leaf is listed, arrays or not, except the `inference` mode flags; leaves set to
    None (filtered out) are absent. Without `state`, running statistics are left out."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_index)[0]:
        name = _dotted(path)
        if _is_index(leaf):
            if state is not None:
                base = name[: -len(_STATE_FIELD) - 1]
                for leaf_name, value in zip(_STATE_LEAVES, state.get(leaf)):
                    out[f"{base}.{leaf_name}"] = value
        elif not (isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in _FLAGS):
            out[name] = leaf
    return out


def from_named_arrays(model_t: Any, arrays: Mapping[str, Any]) -> tuple[Any, eqx.nn.State]:
    """Fill a model shaped like `model_t` (from `template`) with PyTorch-named arrays, already
    checked by `zoo.checked.checked_merge`; returns (model, state)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(model_t, is_leaf=_is_index)
    leaves = []
    for path, leaf in flat:
        name = _dotted(path)
        if _is_index(leaf):
            base = name[: -len(_STATE_FIELD) - 1]
            index = eqx.nn.StateIndex(tuple(jax.device_put(arrays[f"{base}.{n}"]) for n in _STATE_LEAVES))
            # Keep the template's marker so states from `create` and from files are compatible.
            object.__setattr__(index, "marker", leaf.marker)
            leaf = index
        elif _is_leaf_array(leaf):
            leaf = jax.device_put(arrays[name])
        leaves.append(leaf)
    model = jax.tree_util.tree_unflatten(treedef, leaves)
    state = eqx.nn.State(model)
    return eqx.nn.delete_init_state(model), state


def load(path: str, *, dtype: Any = jnp.float32, num_classes: Optional[int] = None,
         in_chans: Optional[int] = None, features_only: Optional[bool] = None,
         out_indices: Optional[Sequence[int]] = None, global_pool: Optional[str] = None,
         key: Optional[PRNGKeyArray] = None, cross_replica_axis: Optional[str] = None, check: bool = True
         ) -> tuple[Any, eqx.nn.State]:
    """Load a converted `.safetensors` file: (model, state). The metadata and every key are
    checked against the architecture it names.

    Surgery, as timm's `create_model` options: `num_classes` gives a new classifier of that size
    (and new GoogLeNet aux heads) on the loaded backbone, initialised as PyTorch's nn.Linear from
    `key` (needed then), for fine-tuning (timm's `reset_classifier`); 0 gives the pooled
    features, and with `global_pool=""` the unpooled final map. `features_only=True` gives a model
    returning the list of feature maps at `out_indices` (0 the stem, 1-4 the stages; GoogLeNet:
    `zoo.googlenet.FEATURE_TAPS`). `in_chans` adapts the input conv (timm's `adapt_input_conv`).
    `check=False` skips recomputing the content digest (the other checks stay)."""
    from ..io import load_file

    model, state = load_file(path, FRAMEWORK, dtype=dtype, key=key, num_classes=num_classes, in_chans=in_chans,
                             features_only=features_only, out_indices=out_indices,
                             global_pool=global_pool, check=check).objects
    return with_cross_replica_axis(model, cross_replica_axis), state


def to_torch(model: Any, state: Optional[eqx.nn.State] = None) -> dict[str, Any]:
    """A PyTorch state dict (numpy arrays, PyTorch names and layouts; running statistics and
    `num_batches_tracked` from `state`) that the timm / torchvision model loads with
    `strict=True`. `model` may be any tree shaped like the model (gradients from
    `eqx.filter_grad`, where non-arrays are None), with `state` None. A model with BatchNorm
    folded into its convs cannot be exported."""
    from ..io import to_torch as _to_torch

    return _to_torch(FRAMEWORK, named_arrays(model, state))


def from_haiku(params: Mapping, state: Mapping, arch: str, *, dtype: Any = jnp.float32, fold_bn: bool = False,
               **overrides: Any) -> tuple[Any, eqx.nn.State]:
    """Haiku (params, state) of `arch` (with the `overrides` it was created with) as an Equinox
    (model, state), checked name by name and shape by shape as a file load is."""
    from ..io import convert_objects

    return convert_objects((params, state), "haiku", FRAMEWORK, arch, overrides, fold_bn, dtype)


def save(path: str, model: Any, state: eqx.nn.State, *, arch: str, fold_bn: bool = False,
         force: bool = False, **overrides: Any) -> Any:
    """Write (model, state) of `arch` (with the `overrides` it was created or loaded with:
    num_classes, features_only, ...) as a zoo file, checked and described as `zoo convert` does;
    `zoo.load`, `zoo.haiku.load` and `zoo export` read it. Atomic; an existing file needs
    `force=True`."""
    from ..io import save_objects

    return save_objects(path, FRAMEWORK, (model, state), arch, overrides, fold_bn, force)
