"""Training zoo models, the same way in Haiku and Equinox.

    import optax, zoo.haiku, zoo.training as zt

    net = zoo.haiku.create("resnet50", num_classes=10)              # or zoo.haiku.load(...)
    params, state = net.init(jax.random.key(0), images, is_training=True)
    tx = optax.chain(optax.add_decayed_weights(5e-5, mask=zt.decay_mask),
                     optax.sgd(optax.cosine_decay_schedule(0.1, 1000), momentum=0.9))
    ts = zt.TrainState.create(params, state, tx)
    train_step, eval_step = zt.make_train_step(net, tx, label_smoothing=0.1), zt.make_eval_step(net)
    ts, metrics = train_step(ts, images, labels, key)              # {"loss", "accuracy"}

With Equinox, `TrainState.create(model, state, tx)` and `make_train_step(model, tx)`: the model is
trained as a whole (its float arrays are the parameters). Images are in the framework's layout:
NHWC batches for Haiku, NCHW batches for Equinox (the step calls the model on the whole batch and
gives what the single-example model vmapped over it gives).

What the steps do for you:
- BatchNorm: training mode (batch statistics, PyTorch's running-statistic update) and the updated
  state threaded through; the eval step uses the running statistics.
- Randomness: one `key` per step. Haiku gets it as its rng; for Equinox it is split into one key
  per example, as for a vmapped model, so each example draws its own dropout / drop-path mask
  (passing one unsplit key to a vmapped model with `in_axes=0` is a rank error; with
  `in_axes=None` every example would share one mask). DropBlock still rescales over the whole
  batch, as timm does.
- GoogLeNet's auxiliary heads: loss + `aux_weight` * (aux1 loss + aux2 loss), 0.3 as in the
  GoogLeNet paper and torchvision's reference scripts.
- Loss: optax's softmax cross-entropy on integer labels (or on given probability targets),
  optionally smoothed with `optax.smooth_labels`.
- Buffers: the step donates the `TrainState` it is given (use the returned one); the batch is not
  donated.
- Mixed precision: create the model with `dtype=jnp.bfloat16`; parameters, optimizer state,
  BatchNorm statistics and the loss stay float32. For float16, give `TrainState.create` a
  `DynamicLossScale()`: the loss is scaled, gradients unscaled, and a step whose gradients are
  not finite is skipped (parameters, optimizer and BatchNorm state kept) while the scale adapts.

Data parallel: `data_parallel_mesh()`, `replicate(ts, mesh)`, `shard_batch(batch, mesh)`, then the
same jitted step. XLA partitions it; BatchNorm's batch statistics are reductions over the sharded
batch axis and so come out global, as PyTorch's SyncBatchNorm. For `shard_map`/`pmap` code, create
the model with `cross_replica_axis=` (Haiku's name for it) so the norms also average across devices.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from . import _cache, _jit
from ._xla import jit_options
from .googlenet import GoogLeNetOutputs

_cache.enable()  # before anything is compiled: see zoo/_cache.py

__all__ = ["TrainState", "DynamicLossScale", "decay_mask", "make_train_step", "make_shard_map_train_step", "make_eval_step",
           "classification_loss",
           "data_parallel_mesh", "replicate", "shard_batch"]

AUX_WEIGHT = 0.3


# --- weight decay ------------------------------------------------------------------------------


def _is_float(x: Any) -> bool:
    return (eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)) and jnp.issubdtype(x.dtype, jnp.floating)


def _is_haiku_params(tree: Any) -> bool:
    return isinstance(tree, Mapping) and all(isinstance(v, Mapping) for v in tree.values())


def decay_mask(tree: Any) -> Any:
    """True exactly for the weights of convolutions and linear layers, False for norm scales and
    shifts, biases and non-float leaves: timm's and torchvision's convention (`weight_decay`
    applies to no 1-D parameter). Same structure as `tree`, for `optax.masked`, `add_decayed_weights`
    or `adamw`'s `mask` (which also accept this function itself).

    Haiku params: the kernels are the leaves named `w` (norms hold `scale`/`offset`, biases `b`).
    Equinox models (also when filtered, `eqx.filter(model, eqx.is_array)`): the `weight` of every
    Conv2d, Conv1d and Linear module; a BatchNorm's `weight` is its scale.
    """
    if _is_haiku_params(tree):
        return {m: {leaf: leaf == "w" and _is_float(v) for leaf, v in leaves.items()} for m, leaves in tree.items()}
    if isinstance(tree, eqx.Module):
        from .equinox.layers import KERNEL_MODULES

        def mask_module(x: Any) -> Any:
            if not isinstance(x, KERNEL_MODULES):
                return False
            masked = jax.tree_util.tree_map(lambda _: False, x)
            return eqx.tree_at(lambda m: m.weight, masked, _is_float(x.weight)) if x.weight is not None else masked

        return jax.tree_util.tree_map(mask_module, tree, is_leaf=lambda x: isinstance(x, KERNEL_MODULES))
    raise TypeError(f"decay_mask expects Haiku params or an Equinox model, got {type(tree).__name__}")


# --- the state a step carries --------------------------------------------------------------------


def _trainable(params: Any) -> Any:
    """The leaves gradients are taken for: every float array (all of Haiku's params; an Equinox
    model's weights, not its flags)."""
    return eqx.filter(params, eqx.is_inexact_array)


class DynamicLossScale(eqx.Module):
    """float16 training's loss scale (jmp's DynamicLossScale, as an Equinox module so that it
    travels through `filter_jit` and `partition`): the loss is multiplied by `loss_scale` and the
    gradients divided by it; after `period` steps with finite gradients it grows by `factor`, and
    a step with non-finite gradients shrinks it by `factor` (not below `min_scale`)."""

    loss_scale: Array
    counter: Array
    period: int = eqx.field(static=True)
    factor: float = eqx.field(static=True)
    min_scale: float = eqx.field(static=True)

    def __init__(self, loss_scale: float = 2.0 ** 15, *, period: int = 2000, factor: float = 2.0,
                 min_scale: float = 1.0):
        self.loss_scale = jnp.asarray(loss_scale, jnp.float32)
        self.counter = jnp.zeros((), jnp.int32)
        self.period, self.factor, self.min_scale = period, factor, min_scale

    def scale(self, loss: Array) -> Array:
        return loss * self.loss_scale.astype(loss.dtype)

    def unscale(self, grads: Any) -> Any:
        return jax.tree_util.tree_map(lambda g: g / self.loss_scale.astype(g.dtype), grads)

    def adjust(self, finite: Array) -> "DynamicLossScale":
        grown = self.counter + 1 == self.period
        scale = jnp.where(finite, jnp.where(grown, self.loss_scale * self.factor, self.loss_scale),
                          jnp.maximum(self.loss_scale / self.factor, self.min_scale))
        counter = jnp.where(finite & ~grown, self.counter + 1, 0)
        return eqx.tree_at(lambda s: (s.loss_scale, s.counter), self, (scale, counter.astype(jnp.int32)))


def _all_finite(tree: Any) -> Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


class TrainState(NamedTuple):
    """What a train step reads and returns."""

    params: Any  # Haiku params, or the Equinox model
    state: Any  # BatchNorm running statistics: Haiku state or eqx.nn.State
    opt_state: optax.OptState
    loss_scale: Optional[DynamicLossScale] = None

    @classmethod
    def create(cls, params: Any, state: Any, optimizer: optax.GradientTransformation, *,
               loss_scale: Optional[DynamicLossScale] = None) -> "TrainState":
        """`params`: Haiku params or an Equinox model. `loss_scale`: `DynamicLossScale()` for
        float16 compute; none for float32 and bfloat16."""
        # Jitted: built eagerly, the optimizer's state compiled one small program per parameter
        # shape (a ResNet-50 with momentum: 29, 1.4 s), in every process, since none is long
        # enough for the persistent cache; jitted it is one program, which the cache keeps.
        ts = cls(params, state, eqx.filter_jit(optimizer.init)(_trainable(params)), loss_scale)
        # Committed where they already are (no copy): a step returns committed arrays, and jit
        # keys its cache on committedness, so an uncommitted start compiled the step a second
        # time on the second call whenever the batch was committed (`jax.device_put(x, device)`).
        return jax.tree_util.tree_map(_commit, ts)


def _commit(x: Any) -> Any:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return jax.device_put(x, x.sharding)
    return x


# --- the framework-specific forward ------------------------------------------------------------


Forward = Callable[[Any, Any, Array, Optional[PRNGKeyArray], bool], tuple[Any, Any]]


def _forward(model: Any) -> Forward:
    """forward(params, state, images, key, is_training) -> (outputs, new state), for a Haiku
    transformed model (params: its params) or an Equinox model (params: the model)."""
    if isinstance(model, eqx.Module):

        def forward_eqx(m: Any, state: Any, images: Array, key: Optional[PRNGKeyArray], training: bool):
            m = eqx.nn.inference_mode(m, not training)
            if not training:
                # The batch in one call (the layers take one: `zoo.equinox.layers`), whose trace
                # costs a third of the vmapped model's; nothing random runs.
                return m(images, state)
            # Training on the batch in one call too, with the keys the vmapped model would give
            # each example: BatchNorm then reduces the batch axis itself instead of a psum over a
            # vmapped one, and so takes the closed-form derivative, as Haiku's does
            # (`ops._batch_norm_train`). The state is copied: a state given to a layer that sets
            # it is spent (vmap gave the model a copy), and the caller's stays in use (a skipped
            # fp16 step keeps it).
            keys = None
            if key is not None:
                keys = jax.random.split(key, images.shape[0])
                if not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
                    keys = jax.random.wrap_key_data(keys)  # raw uint32 keys: the same draws, typed
            return m(images, jax.tree.map(lambda leaf: leaf, state), key=keys)

        return forward_eqx
    if hasattr(model, "apply") and hasattr(model, "init"):

        def forward_hk(params: Any, state: Any, images: Array, key: Optional[PRNGKeyArray], training: bool):
            return model.apply(params, state, key, images, is_training=training)

        return forward_hk
    raise TypeError("make_train_step expects a Haiku hk.TransformedWithState or an Equinox model, "
                    f"got {type(model).__name__}")


# --- loss and steps ------------------------------------------------------------------------------


Labels = Union[Int[Array, " N"], Float[Array, "N K"]]


def classification_loss(outputs: Union[Float[Array, "N K"], GoogLeNetOutputs], labels: Labels, *,
                        label_smoothing: float = 0.0, aux_weight: float = AUX_WEIGHT
                        ) -> tuple[Float[Array, ""], Float[Array, "N K"]]:
    """Mean softmax cross-entropy (optax's) and the main logits. `labels` are integer classes (N,)
    or probability targets (N, K). GoogLeNet's training outputs add `aux_weight` times each
    auxiliary head's loss."""
    logits = outputs.logits if isinstance(outputs, GoogLeNetOutputs) else outputs
    k, dtype = logits.shape[-1], jnp.promote_types(logits.dtype, jnp.float32)  # float64 stays
    targets = labels if labels.ndim == 2 else jax.nn.one_hot(labels, k, dtype=dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)

    def ce(z: Array) -> Array:
        z = z.astype(dtype)
        if labels.ndim == 1 and not label_smoothing:
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, labels))
        return jnp.mean(optax.softmax_cross_entropy(z, targets))

    loss = ce(logits)
    if isinstance(outputs, GoogLeNetOutputs) and aux_weight:
        loss = loss + aux_weight * (ce(outputs.aux_logits1) + ce(outputs.aux_logits2))
    return loss, logits


def _accuracy(logits: Array, labels: Array) -> Array:
    classes = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
    return jnp.mean(jnp.argmax(logits, axis=-1) == classes)


def _select(pred: Array, on_true: Any, on_false: Any) -> Any:
    """`jnp.where` over two trees that also hold non-array leaves (Equinox's flags)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b) if eqx.is_array(a) else a, on_true, on_false)


Batch = tuple[Array, Array, Optional[PRNGKeyArray]]
TrainStep = Callable[..., tuple[TrainState, dict[str, Array]]]


def _step_body(model: Any, optimizer: optax.GradientTransformation, *, label_smoothing: float,
               aux_weight: float, remat: bool, axis_name: Optional[str] = None
               ) -> Callable[[Batch, TrainState], tuple[TrainState, dict[str, Array]]]:
    """One training step, unjitted. With `axis_name` (inside shard_map, each device holding a
    shard of the batch): dropout keys differ per device, and gradients and metrics are averaged
    across devices; BatchNorm averages its statistics itself (`cross_replica_axis`)."""
    forward = _forward(model)

    def step(batch: Batch, ts: TrainState) -> tuple[TrainState, dict[str, Array]]:
        images, labels, key = batch
        if axis_name is not None and key is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        diff, static = eqx.partition(ts.params, eqx.is_inexact_array)

        def loss_fn(diff: Any) -> tuple[Array, tuple[Array, Array, Any]]:
            outputs, new_state = forward(eqx.combine(diff, static), ts.state, images, key, True)
            loss, logits = classification_loss(outputs, labels, label_smoothing=label_smoothing,
                                               aux_weight=aux_weight)
            scaled = loss if ts.loss_scale is None else ts.loss_scale.scale(loss)
            return scaled, (loss, logits, new_state)

        grads, (loss, logits, new_state) = jax.grad(jax.checkpoint(loss_fn) if remat else loss_fn,
                                                    has_aux=True)(diff)
        if ts.loss_scale is not None:
            grads = ts.loss_scale.unscale(grads)
        metrics = {"loss": loss, "accuracy": _accuracy(logits, labels)}
        if axis_name is not None:
            grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
        updates, opt_state = optimizer.update(grads, ts.opt_state, diff)
        new = TrainState(eqx.apply_updates(ts.params, updates), new_state, opt_state, ts.loss_scale)
        if ts.loss_scale is not None:
            # float16: a step with overflowing gradients changes nothing but the scale.
            finite = _all_finite(grads)
            new = _select(finite, new, ts)._replace(loss_scale=ts.loss_scale.adjust(finite))
        return new, metrics

    return step


def _with_batch_first(jitted: Callable) -> TrainStep:
    def train_step(ts: TrainState, images: Float[Array, "N ..."], labels: Labels,
                   key: Optional[PRNGKeyArray] = None) -> tuple[TrainState, dict[str, Array]]:
        return jitted((images, labels, key), ts)

    return train_step


def make_train_step(model: Any, optimizer: optax.GradientTransformation, *, label_smoothing: float = 0.0,
                    aux_weight: float = AUX_WEIGHT, remat: bool = False) -> TrainStep:
    """A jitted training step, `step(ts, images, labels, key=None) -> (ts, {"loss", "accuracy"})`.

    `model`: the Haiku `hk.TransformedWithState`, or an Equinox model (only its kind is read here;
    the parameters travel in the `TrainState`). `optimizer` must be the one the state was created
    with. `key` is needed when the model has dropout, drop path or DropBlock. `remat=True` wraps
    the forward in `jax.checkpoint` (activations recomputed in the backward pass). On sharded
    inputs (`replicate`, `shard_batch`) the same step runs data parallel.
    """
    step = _step_body(model, optimizer, label_smoothing=label_smoothing, aux_weight=aux_weight, remat=remat)
    # The batch first and not donated (callers may reuse it); the state's buffers are donated.
    return _with_batch_first(_jit.jit(step, donate_argnums=(1,)))


def make_shard_map_train_step(model: Any, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, *,
                              label_smoothing: float = 0.0, aux_weight: float = AUX_WEIGHT,
                              remat: bool = False) -> TrainStep:
    """`make_train_step` written with `shard_map` over the mesh's (first) axis: each device runs
    the model on its shard of the batch, as with `pmap`. The model must have been created (or
    loaded) with `cross_replica_axis=` that axis, so that BatchNorm's statistics are the global
    batch's; gradients and metrics are averaged across devices. Give it a replicated state and a
    sharded batch (`replicate`, `shard_batch`).

    `check_vma` is off: a collective over Equinox's vmapped batch axis inside `shard_map` fails
    JAX's varying-axes check (an AssertionError in jax 0.10), and without that check the gradient
    of the replicated parameters is the device average of the local gradients, which this step
    takes.
    """
    from jax.sharding import PartitionSpec as P

    axis = mesh.axis_names[0]
    body = _step_body(model, optimizer, label_smoothing=label_smoothing, aux_weight=aux_weight, remat=remat,
                      axis_name=axis)

    def step(batch: Batch, ts: TrainState) -> tuple[TrainState, dict[str, Array]]:
        # shard_map passes arrays only: Equinox's flags stay outside.
        dynamic, static = eqx.partition(ts, eqx.is_array)

        def per_device(batch: Batch, dynamic: Any) -> tuple[Any, dict[str, Array]]:
            new, metrics = body(batch, eqx.combine(dynamic, static))
            return eqx.filter(new, eqx.is_array), metrics

        mapped = jax.shard_map(per_device, mesh=mesh, in_specs=((P(axis), P(axis), P()), P()),
                               out_specs=(P(), P()), check_vma=False)
        new, metrics = mapped(batch, dynamic)
        return eqx.combine(new, static), metrics

    return _with_batch_first(_jit.jit(step, donate_argnums=(1,)))


def make_eval_step(model: Any, *, label_smoothing: float = 0.0) -> Callable[..., dict[str, Array]]:
    """A jitted inference-mode step (running statistics, no dropout):
    `evaluate(ts, images, labels) -> {"loss", "accuracy", "logits"}`. `ts` may also be a
    `(params_or_model, state)` pair.

    On a CPU an Equinox model's convolutions run on HWIO copies of its kernels, made on the first
    call with that model and kept while its kernels live (`HWIOKernelCache`: evaluating many
    batches with one model transposes them once; memory: one more copy of the kernels)."""
    forward = _forward(model)
    hwio = None
    if isinstance(model, eqx.Module) and jax.default_backend() == "cpu":
        # Only where the copies pay: finding a model's kernels walks its tree (0.5 ms a call for a
        # ResNet-50), host time a GPU would wait for.
        from .equinox.layers import HWIOKernelCache, with_hwio_kernels

        hwio = HWIOKernelCache()

    @functools.partial(_jit.jit, **jit_options())
    def evaluate(params: Any, kernels: Optional[list[Array]], state: Any, images: Array,
                 labels: Array) -> dict[str, Array]:
        if kernels is not None:  # the model's OIHW kernels are then unused inputs, never copied
            params = with_hwio_kernels(params, kernels)
        logits, _ = forward(params, state, images, None, False)
        loss, logits = classification_loss(logits, labels, label_smoothing=label_smoothing)
        return {"loss": loss, "accuracy": _accuracy(logits, labels), "logits": logits}

    def eval_step(ts: Any, images: Array, labels: Array) -> dict[str, Array]:
        params, state = (ts.params, ts.state) if isinstance(ts, TrainState) else ts
        kernels = hwio(params) if hwio is not None and isinstance(params, eqx.Module) else None
        return evaluate(params, kernels, state, images, labels)

    return eval_step


# --- data parallel -------------------------------------------------------------------------------


def data_parallel_mesh(devices: Optional[Sequence[Any]] = None, axis: str = "data") -> jax.sharding.Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (axis,))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Every array of `tree` (a TrainState, params, state) on every device of `mesh`; other leaves
    (Equinox's flags) unchanged."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree)


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Split every array of `batch` along its leading (batch) axis over the mesh's devices. With
    several processes, each passes its own part of the global batch (`jax.distributed`)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
