"""Start-up: the first call of a jitted zoo function in a fresh process, with zoo's persistent
compilation cache off, cold (an empty cache directory) and warm (the directory a previous process
filled). Prints a table and writes JSON.

    python benchmarks/bench_startup.py --repeats 3 --out benchmarks/results/startup_cpu.json

Each measurement is its own Python process (what a user starting a script sees): the time of the
first call (tracing, lowering, compilation or the cache lookup, one execution) and of the second
call (execution alone), measured inside the process. Workloads: predict (`zoo.load(file).predict`;
`zoo.load`, which builds the predict, is timed apart), create (a fresh model's random
initialisation) and a training step. `overhead` = first - second: what the cache can remove. Ratios are cold/warm from the same run; the machine is shared, so medians of
`--repeats` processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
load_s = None
if spec["kind"] == "predict":
    import zoo
    t = time.perf_counter(); model = zoo.load(spec["file"]); load_s = time.perf_counter() - t
    x = np.zeros((spec["batch"], 3, spec["size"], spec["size"]), np.float32)
    call = lambda: jax.block_until_ready(model.predict(x))
elif spec["kind"] == "create":  # a fresh model with random weights: its initialisation
    if spec["framework"] == "haiku":
        import zoo.haiku
        net = zoo.haiku.create(spec["arch"])
        x = jnp.zeros((1, spec["size"], spec["size"], 3))
        call = lambda: jax.block_until_ready(net.init(jax.random.key(0), x, is_training=True))
    else:
        import zoo.equinox
        call = lambda: jax.block_until_ready(zoo.equinox.create(spec["arch"], key=jax.random.key(0)))
else:
    import optax, zoo.training as zt
    tx = optax.sgd(0.1, momentum=0.9)
    y = jnp.zeros((spec["batch"],), jnp.int32)
    if spec["framework"] == "haiku":
        import zoo.haiku
        x = jnp.zeros((spec["batch"], spec["size"], spec["size"], 3))
        net = zoo.haiku.create(spec["arch"])
        params, st = net.init(jax.random.key(0), x, is_training=True)
        ts, step = zt.TrainState.create(params, st, tx), zt.make_train_step(net, tx)
    else:
        import zoo.equinox
        x = jnp.zeros((spec["batch"], 3, spec["size"], spec["size"]))
        m, st = zoo.equinox.create(spec["arch"], key=jax.random.key(0))
        ts, step = zt.TrainState.create(m, st, tx), zt.make_train_step(m, tx)
    holder = {"ts": ts}
    def call():
        holder["ts"], metrics = step(holder["ts"], x, y)
        jax.block_until_ready(metrics["loss"])
t0 = time.perf_counter(); call(); t1 = time.perf_counter(); call(); t2 = time.perf_counter()
print(json.dumps({"first_s": t1 - t0, "second_s": t2 - t1, "load_s": load_s, "device": str(jax.devices()[0])}))
"""


def _child(spec: dict, env: dict) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZOO_", "JAX_COMPILATION_CACHE"))}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _zoo_file(arch: str, framework: str, folder: str) -> str:
    from converters.convert import convert_to_file
    from converters.torch_models import random_model

    return str(convert_to_file(arch, random_model(arch), framework, os.path.join(folder, f"{arch}_{framework}.safetensors")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predict-archs", nargs="*", default=["googlenet", "resnet50"])
    ap.add_argument("--train-archs", nargs="*", default=["resnet50"])
    ap.add_argument("--create-archs", nargs="*", default=["googlenet", "resnet50"],
                    help="fresh models (random initialisation; Haiku: net.init, Equinox: create)")
    ap.add_argument("--frameworks", nargs="+", default=["haiku", "equinox"])
    ap.add_argument("--batch", type=int, default=1, help="predict batch")
    ap.add_argument("--size", type=int, default=224, help="predict image size")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["off", "cold", "warm"], choices=["off", "cold", "warm"],
                    help="which processes to run: cache off, cold, warm (warm needs cold)")
    ap.add_argument("--out", default="benchmarks/results/startup_cpu.json")
    args = ap.parse_args()
    modes = set(args.modes)
    if "warm" in modes:
        modes.add("cold")  # a warm process reads the cache its cold one filled

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = []
        for arch in args.predict_archs:
            for fw in args.frameworks:
                work.append({"kind": "predict", "arch": arch, "framework": fw, "file": _zoo_file(arch, fw, tmp),
                             "batch": args.batch, "size": args.size})
        for arch in args.create_archs:
            for fw in args.frameworks:
                work.append({"kind": "create", "arch": arch, "framework": fw, "size": args.size})
        for arch in args.train_archs:
            for fw in args.frameworks:
                work.append({"kind": "train step", "arch": arch, "framework": fw,
                             "batch": args.train_batch, "size": args.train_size})
        for spec in work:
            runs: dict[str, list[dict]] = {m: [] for m in ("off", "cold", "warm") if m in modes}
            for r in range(args.repeats):
                cache = os.path.join(tmp, f"cache-{len(rows)}-{r}")
                for mode in runs:
                    env = {"ZOO_COMPILATION_CACHE": "0"} if mode == "off" else {"ZOO_CACHE_DIR": cache}
                    runs[mode].append(_child(spec, env))
            row = {k: v for k, v in spec.items() if k != "file"}
            for mode in ("off", "cold", "warm"):
                rs = runs.get(mode, [])
                row[f"{mode}_first_s"] = statistics.median(x["first_s"] for x in rs) if rs else math.nan
                row[f"{mode}_overhead_s"] = (statistics.median(x["first_s"] - x["second_s"] for x in rs)
                                             if rs else math.nan)
                if spec["kind"] == "predict":
                    row[f"{mode}_load_s"] = statistics.median(x["load_s"] for x in rs) if rs else math.nan
                row[f"{mode}_runs"] = rs
            row["speedup_first"] = row["cold_first_s"] / row["warm_first_s"]
            row["speedup_overhead"] = row["cold_overhead_s"] / row["warm_overhead_s"]
            rows.append(row)
            print(f"{spec['kind']:10s} {spec['arch']:10s} {spec['framework']:8s} first call: off "
                  f"{row['off_first_s']:.2f}s, cold {row['cold_first_s']:.2f}s, warm {row['warm_first_s']:.2f}s "
                  f"({row['speedup_first']:.1f}x); overhead cold {row['cold_overhead_s']:.2f}s -> warm "
                  f"{row['warm_overhead_s']:.2f}s ({row['speedup_overhead']:.1f}x)", flush=True)
            _write(args, rows)
    _write(args, rows)
    print("| workload | model | framework | first call, cache off | cold | warm | cold/warm | "
          "overhead cold | overhead warm | cold/warm | zoo.load cold / warm |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['arch']} | {r['framework']} | {r['off_first_s']:.2f} s | {r['cold_first_s']:.2f} s | "
              f"{r['warm_first_s']:.2f} s | {r['speedup_first']:.1f}× | {r['cold_overhead_s']:.2f} s | "
              f"{r['warm_overhead_s']:.2f} s | {r['speedup_overhead']:.1f}× | {_load(r)} |")


def _write(args: argparse.Namespace, rows: list) -> None:
    # After every workload: a time limit that stops the run keeps the rows measured so far. The
    # device is each child's (runs[].device): this process must not take a GPU from its children.
    import jax
    import torch

    result = {"config": vars(args), "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "jax": jax.__version__, "torch": torch.__version__, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def _load(row: dict) -> str:
    return f"{row['cold_load_s']:.2f} / {row['warm_load_s']:.2f} s" if "cold_load_s" in row else "–"


if __name__ == "__main__":
    main()
