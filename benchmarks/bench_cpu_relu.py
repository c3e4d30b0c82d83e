"""ReLU as a maximum (`jax.nn.relu`, zoo before the tenth session) or as a select (`zoo.ops.relu`
compiled for a CPU, now) in zoo's CPU programs: the predict and a training step (SGD) of each form
compiled in one process, on the same weights and batch, called in alternating blocks; medians in
ms, and whether a batch with one NaN pixel gives a NaN loss (PyTorch's does).

    python benchmarks/bench_cpu_relu.py --archs resnet18 resnet50 --out benchmarks/results/cpu_relu.json

Why the select: jaxlib's CPU backend fuses reductions, with the elementwise work feeding them, into
YNNPACK kernels whose maximum drops NaNs, so a training step fed a NaN returned a finite loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_cpu_ynn import medians_in_alternating_blocks  # noqa: E402 (after the path set-up)

VARIANTS = ("maximum", "select")


@contextlib.contextmanager
def relu_form(name: str):
    """Trace zoo's CPU ReLU as `name` inside the block (the form is fixed when a program is traced)."""
    import jax

    from zoo import ops

    saved = ops._relu_select
    if name == "maximum":
        ops._relu_select = jax.nn.relu
    try:
        yield
    finally:
        ops._relu_select = saved


def measure(arch: str, framework: str, batch: int, size: int, train_batch: int, train_size: int,
            calls: int, blocks: int, folder: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import zoo.haiku
    import zoo.training as zt
    from converters.convert import convert_to_file
    from converters.torch_models import random_model
    from zoo.io import load_file
    from zoo.model import make_predict

    rng = np.random.default_rng(0)
    row: dict = {"arch": arch, "framework": framework}
    path = convert_to_file(arch, random_model(arch), framework, os.path.join(folder, f"{arch}_{framework}.safetensors"))
    loaded = load_file(str(path))

    # Inference: zoo's predict (NCHW batches in both frameworks), traced at its first call.
    x = jnp.asarray(rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    predicts, outs = {}, {}
    for name in VARIANTS:
        predicts[name] = make_predict(loaded)
        with relu_form(name):
            outs[name] = np.asarray(predicts[name](x))
    row["predict_ms"] = medians_in_alternating_blocks(
        {k: (lambda p=p: jax.block_until_ready(p(x))) for k, p in predicts.items()}, max(1, calls // batch), blocks)
    row["predict_max_abs_diff"] = float(np.abs(outs["select"] - outs["maximum"]).max())

    # A training step, SGD, in each form: its own state (the steps donate theirs).
    tx = optax.sgd(0.01, momentum=0.9)
    xt = rng.standard_normal((train_batch, 3, train_size, train_size)).astype(np.float32)
    first, state = loaded.objects
    if framework == "haiku":
        xt = xt.transpose(0, 2, 3, 1)
        target = zoo.haiku.create(arch)
    else:
        target = first
    labels = jnp.asarray(rng.integers(0, 1000, train_batch))
    poisoned = np.array(xt)
    poisoned[(0,) * (poisoned.ndim - 1) + (1,)] = np.nan
    states, steps, nan_loss = {}, {}, {}

    def copy(tree):
        return jax.tree_util.tree_map(lambda a: jnp.array(a) if isinstance(a, jax.Array) else a, tree)

    for name in VARIANTS:
        steps[name] = zt.make_train_step(target, tx)
        states[name] = zt.TrainState.create(copy(first), copy(state), tx)
        with relu_form(name):
            states[name], _ = steps[name](states[name], jnp.asarray(xt), labels, jax.random.key(1))
        spare = zt.TrainState.create(copy(first), copy(state), tx)
        _, metrics = steps[name](spare, jnp.asarray(poisoned), labels, jax.random.key(1))
        nan_loss[name] = bool(np.isnan(float(metrics["loss"])))

    def stepper(name: str):
        def call():
            states[name], metrics = steps[name](states[name], jnp.asarray(xt), labels, jax.random.key(1))
            jax.block_until_ready(metrics["loss"])
        return call

    row["train_ms"] = medians_in_alternating_blocks({k: stepper(k) for k in VARIANTS},
                                                    max(1, 2 * calls // (3 * train_batch)), blocks)
    row["nan_pixel_gives_nan_loss"] = nan_loss
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "googlenet"])
    ap.add_argument("--frameworks", nargs="+", default=["haiku", "equinox"])
    ap.add_argument("--batch", type=int, default=8, help="inference batch")
    ap.add_argument("--size", type=int, default=224, help="inference size")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-size", type=int, default=112)
    ap.add_argument("--calls", type=int, default=24, help="calls per block at batch 1 (divided by the batch)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/cpu_relu.json")
    args = ap.parse_args()

    import jax
    import torch

    if jax.default_backend() != "cpu":
        raise SystemExit("a CPU benchmark: run it where JAX's default backend is the CPU")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arch, fw in [(a, f) for a in args.archs for f in args.frameworks]:
            r = measure(arch, fw, args.batch, args.size, args.train_batch, args.train_size, args.calls,
                        args.blocks, folder)
            rows.append(r)
            print(arch, fw, {k: round(v, 1) for k, v in r["predict_ms"].items()},
                  {k: round(v, 1) for k, v in r["train_ms"].items()}, r["nan_pixel_gives_nan_loss"], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                   "jax": jax.__version__, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"| model | framework | predict, batch {args.batch}, {args.size}²: maximum / select (×) "
          f"| train step, batch {args.train_batch}, {args.train_size}²: maximum / select (×) "
          "| NaN pixel → NaN loss: maximum / select |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        p, t, n = r["predict_ms"], r["train_ms"], r["nan_pixel_gives_nan_loss"]
        print(f"| {r['arch']} | {r['framework']} | {p['maximum']:.1f} / {p['select']:.1f} "
              f"({p['maximum'] / p['select']:.2f}×) | {t['maximum']:.1f} / {t['select']:.1f} "
              f"({t['maximum'] / t['select']:.2f}×) | {n['maximum']} / {n['select']} |")


if __name__ == "__main__":
    main()
