"""Training BatchNorm's derivative: JAX's autodiff (`ZOO_BN_GRAD=autodiff`) against the closed
form (zoo's default, `zoo.ops._normalized_with_moments`). Both train steps (optax SGD with
momentum, zoo.training's step) are compiled in one process and then timed alternately, call by
call, so that load on a shared machine falls on both alike; medians. Prints a table and writes JSON.

    python benchmarks/bench_bn_grad.py --archs resnet50 googlenet --sizes 112 224 --batch 8 --rounds 9
    python benchmarks/bench_bn_grad.py --device gpu --dtype bfloat16 --batch 256 --sizes 224   # a lent GPU

`first_s` is each step's first call (tracing and compilation, or a read from zoo's compilation
cache); `first_loss` its loss (the forward is the same in both); `closed_form_traced` whether its
trace went through the closed form. `closed / autodiff` below 1 means the closed form is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zoo.training as zt
from zoo import ops

MODES = ("autodiff", "closed")
_TRACED: list = []
_closed_form = ops._normalized_with_moments
# Which step traced the closed form (recorded per step, so a switch that stopped working shows).
ops._normalized_with_moments = lambda *a: _TRACED.append(1) or _closed_form(*a)


def _steps(arch: str, framework: str, size: int, batch: int, dtype: str, rounds: int, device) -> dict:
    rng = np.random.default_rng(0)
    tx = optax.sgd(0.1, momentum=0.9)
    y = jax.device_put(rng.integers(0, 1000, batch).astype(np.int32), device)
    images = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    if framework == "haiku":
        import zoo.haiku

        net = zoo.haiku.create(arch, dtype=jnp.dtype(dtype))
        x = jax.device_put(images.transpose(0, 2, 3, 1), device)
        params, state = net.init(jax.random.key(0), x, is_training=True)
        model = net
    else:
        import zoo.equinox

        x = jax.device_put(images, device)
        params, state = zoo.equinox.create(arch, key=jax.random.key(0), dtype=jnp.dtype(dtype))
        model = params
    keys = jax.random.split(jax.random.key(1), 2 * rounds + 2)
    runs: dict[str, dict] = {}
    default = ops._BN_GRAD
    for mode in MODES:
        # Read when the step is traced (its first call): each step keeps the form it was traced with.
        ops._BN_GRAD = mode
        _TRACED.clear()
        ops._batch_norm_train.clear_cache()  # a trace cached by the initialisation would skip the spy
        # Copies: a step donates its state, and both start from the same weights.
        ts = zt.TrainState.create(*jax.tree_util.tree_map(jnp.copy, (params, state)), tx)
        step = zt.make_train_step(model, tx)
        t = time.perf_counter()
        ts, metrics = step(ts, x, y, keys[0])
        jax.block_until_ready(metrics["loss"])
        runs[mode] = {"ts": ts, "step": step, "first_s": time.perf_counter() - t, "times_s": [],
                      "closed_form_traced": bool(_TRACED), "first_loss": float(metrics["loss"])}
    ops._BN_GRAD = default
    for r in range(rounds + 1):  # the first round warms both up and is not kept
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            run = runs[mode]
            t = time.perf_counter()
            run["ts"], metrics = run["step"](run["ts"], x, y, keys[1 + r])
            jax.block_until_ready(metrics["loss"])
            if r:
                run["times_s"].append(time.perf_counter() - t)
    out = {mode: {k: run[k] for k in ("first_s", "times_s", "closed_form_traced", "first_loss")}
           | {"median_s": statistics.median(run["times_s"])} for mode, run in runs.items()}
    out["closed_over_autodiff"] = out["closed"]["median_s"] / out["autodiff"]["median_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["resnet50", "googlenet"])
    ap.add_argument("--frameworks", nargs="+", default=["haiku", "equinox"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[112, 224])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--rounds", type=int, default=9, help="timed calls of each step, alternating")
    ap.add_argument("--out", default="benchmarks/results/bn_grad.json")
    args = ap.parse_args()
    device = jax.devices(args.device)[0]
    rows = []
    print("| model | framework | size | autodiff | closed form | closed / autodiff | first call, autodiff / closed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for arch in args.archs:
        for size in args.sizes:
            for framework in args.frameworks:
                with jax.default_device(device):
                    r = _steps(arch, framework, size, args.batch, args.dtype, args.rounds, device)
                rows.append({"arch": arch, "framework": framework, "size": size, **r})
                print(f"| {arch} | {framework} | {size}² | {1e3 * r['autodiff']['median_s']:.1f} ms "
                      f"| {1e3 * r['closed']['median_s']:.1f} ms | {r['closed_over_autodiff']:.3f} "
                      f"| {r['autodiff']['first_s']:.1f} / {r['closed']['first_s']:.1f} s |", flush=True)
    result = {"config": vars(args), "device": device.device_kind, "platform": platform.platform(),
              "jax": jax.__version__, "zoo_env": {k: v for k, v in os.environ.items() if k.startswith("ZOO_")},
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
