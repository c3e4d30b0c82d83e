"""Which op kinds zoo's CPU inference functions leave to YNNPACK: `predict` compiled with several
`xla_cpu_experimental_ynn_fusion_type` lists (zoo/_xla.py) in one process, on the same zoo file and
batch, called in alternating blocks; medians in ms, and each variant's logits against the first's.

    python benchmarks/bench_cpu_ynn.py --archs resnet18 resnet50 --out benchmarks/results/cpu_ynn.json

Variants (convolutions are never YNNPACK's in zoo's inference programs): "dots+reductions" (zoo's
list before the ninth session), "dots" (zoo's list now), "none".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = {
    "dots+reductions": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "dots": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "none": "",
}


def medians_in_alternating_blocks(calls: dict[str, Callable[[], Any]], n: int, blocks: int) -> dict[str, float]:
    """Medians (ms) of each callable's calls, `n` at a time, in `blocks` blocks whose order
    alternates (the shared machine's load drifts; none of the variants always goes first)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls.items())
    for block in range(blocks):
        for k, call in order if block % 2 == 0 else order[::-1]:
            for _ in range(n):
                t0 = time.perf_counter()
                call()
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def measure(arch: str, framework: str, batches: list[int], size: int, calls: int, blocks: int,
            variants: list[str], folder: str) -> dict:
    import jax
    import numpy as np

    from converters.convert import convert_to_file
    from converters.torch_models import random_model
    from zoo import _xla
    from zoo.io import load_file
    from zoo.model import make_predict

    path = convert_to_file(arch, random_model(arch), framework, os.path.join(folder, f"{arch}_{framework}.safetensors"))
    loaded = load_file(str(path))
    saved = _xla._CPU_CONV
    predicts = {}
    try:
        for name in variants:
            _xla._CPU_CONV = {_xla._YNN_FLAG: VARIANTS[name]}
            predicts[name] = make_predict(loaded)
    finally:
        _xla._CPU_CONV = saved
    rng = np.random.default_rng(0)
    row: dict = {"arch": arch, "framework": framework, "size": size}
    for b in batches:
        x = jax.numpy.asarray(rng.standard_normal((b, 3, size, size)).astype(np.float32))
        outs = {k: np.asarray(p(x)) for k, p in predicts.items()}  # compiles each
        first = outs[variants[0]]
        row[f"batch{b}_ms"] = medians_in_alternating_blocks(
            {k: (lambda p=p: jax.block_until_ready(p(x))) for k, p in predicts.items()}, max(1, calls // b), blocks)
        row[f"batch{b}_rel_to_first"] = {k: float(np.abs(o - first).max() / np.abs(first).max())
                                         for k, o in outs.items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "seresnext26d_32x4d"])
    ap.add_argument("--frameworks", nargs="+", default=["haiku"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calls", type=int, default=12, help="calls per block at batch 1 (divided by the batch)")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["dots+reductions", "dots"], choices=list(VARIANTS))
    ap.add_argument("--out", default="benchmarks/results/cpu_ynn.json")
    args = ap.parse_args()

    import jax
    import torch

    if jax.default_backend() != "cpu":
        raise SystemExit("a CPU benchmark: run it where JAX's default backend is the CPU")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.archs:
            for fw in args.frameworks:
                rows.append(measure(arch, fw, args.batches, args.size, args.calls, args.blocks, args.variants, folder))
                r = rows[-1]
                print(arch, fw, {b: {k: round(v, 1) for k, v in r[f"batch{b}_ms"].items()} for b in args.batches},
                      flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                   "jax": jax.__version__, "torch": torch.__version__, "rows": rows}, f, indent=1)
    base, *others = args.variants
    head = " | ".join(f"batch {b}: {v} (×)" for b in args.batches for v in args.variants)
    print(f"| model | framework | {head} |")
    print("|---|---|" + "---:|" * (len(args.batches) * len(args.variants)))
    for r in rows:
        cells = []
        for b in args.batches:
            ms = r[f"batch{b}_ms"]
            cells += [f"{ms[base]:.1f}"] + [f"{ms[v]:.1f} ({ms[base] / ms[v]:.2f}×)" for v in others]
        print(f"| {r['arch']} | {r['framework']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
