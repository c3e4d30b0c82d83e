"""Inference throughput: jitted zoo models (Haiku, Equinox) beside PyTorch eager (NCHW and
channels_last), measured in the same run. Prints a table and writes JSON.

    python benchmarks/bench_inference.py --arch resnet50 --batch 8 --repeats 10 --out bench.json

Times are medians over `--repeats` timed calls after warm-up (JAX: compile excluded, reported
apart). Ratios are against PyTorch eager NCHW from the same run: these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import numpy as np


def _median_time(fn: Callable[[], object], repeats: int, sync: Callable[[object], object]) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", default="benchmarks/results/inference.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from converters.convert import convert_state_dict
    from converters.state_dict import load_state_dict
    from converters.torch_models import random_model
    from converters.verify import jax_device, torch_device
    from zoo.model import make_predict

    jdev, tdev = jax_device(args.device), torch_device(args.device)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    model = random_model(args.arch).to(tdev).to(tdtype)
    sd = load_state_dict(model.float().cpu())
    model = model.to(tdev).to(tdtype)
    rows = []

    def torch_row(name: str, memory_format) -> None:
        m = model.to(memory_format=memory_format)
        xt = torch.from_numpy(x).to(tdev).to(tdtype).contiguous(memory_format=memory_format)
        sync = (lambda o: torch.cuda.synchronize()) if tdev == "cuda" else (lambda o: o)
        with torch.inference_mode():
            for _ in range(args.warmup):
                sync(m(xt))
            med, times = _median_time(lambda: m(xt), args.repeats, sync)
        rows.append({"impl": name, "median_s": med, "times_s": times, "compile_s": None})

    torch_row("pytorch eager NCHW", torch.contiguous_format)
    torch_row("pytorch eager channels_last", torch.channels_last)

    for framework, fold in (("haiku", False), ("equinox", False), ("haiku", True), ("equinox", True)):
        loaded = convert_state_dict(args.arch, sd, framework, fold_bn=fold).loaded
        with jax.default_device(jdev):
            loaded.objects = jax.device_put(loaded.objects, jdev)
            predict = make_predict(loaded, dtype)
            xj = jax.device_put(x, jdev)
            t0 = time.perf_counter()
            predict(xj).block_until_ready()
            compile_s = time.perf_counter() - t0
            for _ in range(args.warmup):
                predict(xj).block_until_ready()
            med, times = _median_time(lambda: predict(xj), args.repeats, lambda o: o.block_until_ready())
        rows.append({"impl": f"zoo {framework} jit{' (bn folded)' if fold else ''}", "median_s": med,
                     "times_s": times, "compile_s": compile_s})

    base = rows[0]["median_s"]
    for r in rows:
        r["images_per_s"] = args.batch / r["median_s"]
        r["speed_vs_pytorch_nchw"] = base / r["median_s"]

    env = {
        "arch": args.arch, "batch": args.batch, "size": args.size, "dtype": args.dtype,
        "repeats": args.repeats, "jax": jax.__version__, "torch": torch.__version__,
        "jax_device": f"{jdev.platform}:{getattr(jdev, 'device_kind', '')}", "torch_device": tdev,
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "python": platform.python_version(),
    }
    print(f"{args.arch}, batch {args.batch}, {args.size}x{args.size}, {args.dtype}; "
          f"jax {env['jax']} on {env['jax_device']}, torch {env['torch']} on {tdev}")
    print(f"{'implementation':34} {'median ms':>10} {'images/s':>10} {'vs PyTorch NCHW':>16} {'compile s':>10}")
    for r in rows:
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        print(f"{r['impl']:34} {r['median_s'] * 1e3:10.1f} {r['images_per_s']:10.1f} "
              f"{r['speed_vs_pytorch_nchw']:15.2f}x {comp:>10}")
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
