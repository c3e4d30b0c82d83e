"""Training throughput in bfloat16: zoo's jitted train step (Haiku, Equinox) beside PyTorch eager
channels_last and torch.compile, both with autocast bfloat16, measured in the same run. Prints a
table and writes JSON.

    python benchmarks/bench_training.py --archs resnet50 googlenet --batch 256 --size 224 \
        --out benchmarks/results/training_gpu.json

One step is forward, loss (GoogLeNet: main + 0.3 x each aux head), backward and an SGD update
with momentum and decoupled weight decay, on a batch already on the device. zoo computes in
bfloat16 (`create(..., dtype=jnp.bfloat16)`) with float32 parameters, optimizer state and
BatchNorm statistics; PyTorch keeps float32 parameters and runs under `torch.autocast(bfloat16)`.
Times are medians of `--steps` timed steps after `--warmup` steps (each step synchronised); the
first step of each (compilation for JAX and torch.compile) is reported apart. Ratios are against
PyTorch eager channels_last from the same run: these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

# JAX preallocates most of the GPU; PyTorch runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import numpy as np

LR, MOMENTUM, WEIGHT_DECAY, AUX_WEIGHT = 0.1, 0.9, 5e-5, 0.3


def _time_steps(step: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, steps: int) -> dict:
    t0 = time.perf_counter()
    sync(step())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        sync(step())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
    return {"first_step_s": first, "median_s": statistics.median(times), "times_s": times}


def _torch_rows(arch: str, images: np.ndarray, labels: np.ndarray, args, modes: list[str], rows: list[dict],
                save: Callable[[list[dict]], None]) -> None:
    import torch

    from converters.torch_models import torch_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(images).to(dev).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels).to(dev)
    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    for mode in [m for m in modes if m in args.torch_modes]:
        torch.manual_seed(0)
        model = torch_model(arch).to(dev).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

        def step_fn(x, y):
            with torch.autocast(device_type=dev, dtype=torch.bfloat16):
                out = model(x)
                if hasattr(out, "aux_logits1"):
                    ce = torch.nn.functional.cross_entropy
                    loss = ce(out.logits, y) + AUX_WEIGHT * (ce(out.aux_logits1, y) + ce(out.aux_logits2, y))
                else:
                    loss = torch.nn.functional.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(step_fn) if mode == "compile" else step_fn
        try:
            r = _time_steps(lambda: fn(x, y), sync, args.warmup, args.steps)
        except Exception as e:  # a failed torch.compile is a result to report, not a crash
            rows.append({"arch": arch, "impl": f"PyTorch {mode}", "error": f"{type(e).__name__}: {e}"[:300]})
            save(rows)
            continue
        name = "PyTorch eager channels_last" if mode == "eager" else "PyTorch torch.compile channels_last"
        rows.append({"arch": arch, "impl": name + ", autocast bf16", **r})
        save(rows)
        del model, opt, fn
        if dev == "cuda":
            torch.cuda.empty_cache()


def _zoo_rows(arch: str, images: np.ndarray, labels: np.ndarray, args, rows: list[dict],
              save: Callable[[list[dict]], None]) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import zoo.equinox
    import zoo.haiku
    import zoo.training as zt

    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY, mask=zt.decay_mask),
                     optax.sgd(LR, momentum=MOMENTUM))
    y = jnp.asarray(labels)
    for framework in args.frameworks:
        if framework == "haiku":
            x = jnp.asarray(images.transpose(0, 2, 3, 1), jnp.bfloat16)
            net = zoo.haiku.create(arch, dtype=jnp.bfloat16)
            params, state = net.init(jax.random.key(0), x[:1], is_training=True)
            ts = zt.TrainState.create(params, state, tx)
            step = zt.make_train_step(net, tx, remat=args.remat)
        else:
            x = jnp.asarray(images, jnp.bfloat16)
            model, state = zoo.equinox.create(arch, dtype=jnp.bfloat16, key=jax.random.key(0))
            ts = zt.TrainState.create(model, state, tx)
            step = zt.make_train_step(model, tx, remat=args.remat)
        holder = {"ts": ts}
        keys = iter(jax.random.split(jax.random.key(1), 1 + args.warmup + args.steps))

        def one() -> Any:
            holder["ts"], metrics = step(holder["ts"], x, y, next(keys))
            return metrics["loss"]

        r = _time_steps(one, lambda v: v.block_until_ready(), args.warmup, args.steps)
        rows.append({"arch": arch, "impl": f"zoo {framework.capitalize()}, jit, bf16 compute", **r})
        save(rows)
        del holder, ts, step
        jax.clear_caches()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["resnet50", "googlenet"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--frameworks", nargs="+", default=["haiku", "equinox"])
    ap.add_argument("--torch-modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    ap.add_argument("--remat", action="store_true", help="jax.checkpoint the zoo forward")
    ap.add_argument("--out", default="benchmarks/results/training.json")
    args = ap.parse_args()

    import jax
    import torch

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    labels = rng.integers(0, 1000, args.batch).astype(np.int64)
    result = {
        "config": vars(args),
        "platform": platform.platform(),
        "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "rows": [],
    }
    def save(partial: list[dict]) -> None:  # after each row: a timeout keeps what was measured
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**result, "rows": result["rows"] + partial}, f, indent=1)

    for arch in args.archs:
        rows: list[dict] = []
        # torch.compile last: its compilation is the longest, and a time limit then cuts it first.
        _torch_rows(arch, images, labels, args, ["eager"], rows, save)
        _zoo_rows(arch, images, labels.astype(np.int32), args, rows, save)
        _torch_rows(arch, images, labels, args, ["compile"], rows, save)
        base = next((r["median_s"] for r in rows if r.get("impl", "").startswith("PyTorch eager") and "median_s" in r), None)
        for r in rows:
            if "median_s" in r:
                r["images_per_s"] = args.batch / r["median_s"]
                r["vs_torch_eager"] = base / r["median_s"] if base else None
        result["rows"].extend(rows)
        save([])

    print(f"devices: jax {result['jax_devices']}, torch {result['torch_device']}; "
          f"batch {args.batch}, {args.size}x{args.size}")
    print("| model | implementation | median ms/step | images/s | vs PyTorch eager | first step s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['arch']} | {r['impl']} | failed: {r['error'][:80]} | | | |")
            continue
        ratio = f"{r['vs_torch_eager']:.2f}x" if r["vs_torch_eager"] else "-"
        print(f"| {r['arch']} | {r['impl']} | {1e3 * r['median_s']:.1f} | {r['images_per_s']:.0f} | "
              f"{ratio} | {r['first_step_s']:.1f} |")


if __name__ == "__main__":
    main()
