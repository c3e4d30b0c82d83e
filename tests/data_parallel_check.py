"""Run by tests/test_training.py in a subprocess with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8; the flag must be set before JAX starts).

One SGD step (momentum, so the optimizer's trace after one step is the gradient) on a global batch
of 16, three ways: on one device; `jit` over a batch sharded across the 8 devices; and
`shard_map`, each device seeing 2 examples, with the norms' `cross_replica_axis`. Prints, as JSON,
the largest relative difference from the single-device run of the step's loss, the gradients, the
updated parameters and the updated BatchNorm statistics. (The training-mode logits themselves are
not compared: three more programs to compile, 8-way partitioned, for what the gradients and the
batch statistics already depend on.)"""

import json
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import zoo.equinox
import zoo.haiku
import zoo.training as zt

ARCH, BATCH, CLASSES = "resnet10t", 16, 5
# The initialisation's key. The max pool after the stem routes each window's gradient to its
# largest input; two inputs within fp32 rounding of each other can swap between the one-device and
# the sharded programs, whose forwards differ by ~1e-6, and move the stem's gradients by ~5e-3
# (with one draw per distribution, zoo/_init.py: key 0 in Equinox, key 1 in Haiku). This key has
# no such window in either framework; keys 2 and 3 measured 2.2e-6..2.5e-6 at worst.
SEED = 2


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def worst(a, b) -> float:
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    return max(rel(x, y) for x, y in zip(leaves_a, leaves_b))


def main(framework: str) -> dict:
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 3, 45, 53)).astype(np.float32)
    images = x.transpose(0, 2, 3, 1) if framework == "haiku" else x
    labels = rng.integers(0, CLASSES, BATCH)
    if framework == "haiku":
        model = zoo.haiku.create(ARCH, num_classes=CLASSES)
        synced = zoo.haiku.create(ARCH, num_classes=CLASSES, cross_replica_axis="data")
        params, state = model.init(jax.random.key(SEED), images, is_training=True)
        synced_params = params
    else:
        model, state = zoo.equinox.create(ARCH, key=jax.random.key(SEED), num_classes=CLASSES)
        synced = zoo.equinox.with_cross_replica_axis(model, "data")
        params, synced_params = model, synced
    tx = optax.sgd(0.1, momentum=0.9)
    fresh = lambda t: jax.tree_util.tree_map(lambda a: jnp.array(a) if eqx.is_array(a) else a, t)  # noqa: E731

    def arrays(ts):
        return eqx.filter((ts.params, ts.state, ts.opt_state), eqx.is_array)

    # One device, the whole batch.
    ts1, metrics1 = zt.make_train_step(model, tx)(zt.TrainState.create(fresh(params), fresh(state), tx), images,
                                                  labels)

    # jit over sharded arrays: the same step and forward.
    mesh = zt.data_parallel_mesh()
    ts0 = zt.replicate(zt.TrainState.create(fresh(params), fresh(state), tx), mesh)
    sharded = zt.shard_batch((images, labels), mesh)
    assert len(sharded[0].sharding.device_set) == 8
    ts2, metrics2 = zt.make_train_step(model, tx)(ts0, *sharded)

    # shard_map: each device its 2 examples, the norms synchronised across devices.
    ts0 = zt.replicate(zt.TrainState.create(fresh(synced_params), fresh(state), tx), mesh)
    ts3, metrics3 = zt.make_shard_map_train_step(synced, tx, mesh)(ts0, *sharded)

    out = {}
    for how, ts, metrics in (("jit_sharded", ts2, metrics2), ("shard_map", ts3, metrics3)):
        out[how] = {
            "loss": rel(metrics1["loss"], metrics["loss"]),
            "gradients": worst(ts1.opt_state, ts.opt_state),  # the momentum trace after one step
            "params": worst(eqx.filter(ts1.params, eqx.is_array), eqx.filter(ts.params, eqx.is_array)),
            "running_stats": worst(ts1.state, ts.state),
            "devices": len(jax.tree_util.tree_leaves(arrays(ts))[0].sharding.device_set),
        }
    return out


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    print(json.dumps(main(sys.argv[1])))
