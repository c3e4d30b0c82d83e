"""Where the time of a `zoo bench` row goes on the device: its kernels, grouped, per call.

    python benchmarks/profile_gpu.py resnet50 --device gpu --dtype bfloat16 --batch 256 --out profile.json

Runs `zoo bench`'s own rows (the same programs, so zoo's compilation cache serves what a bench run
compiled) and, after each row's timing, records a few more calls under a profiler: JAX's
(`jax.profiler.trace`, read back with `jax.profiler.ProfileData`) or PyTorch's (`torch.profiler`,
its Chrome trace; the two cannot share a process, both take CUPTI, so PyTorch's rows run in a
child process). Kernels are grouped by name into convolution (cuDNN's fprop/dgrad/wgrad and
implicit-GEMM kernels), pooling (and its gradient's scatter), normalisation and other reductions,
GEMM (cuBLAS, cuBLASLt's nvjet, Triton or CUTLASS GEMMs), layout (transposes, copies, cuDNN's
padding) and other (elementwise fusions); the table gives milliseconds per call, and the JSON also
keeps the 40 costliest kernel names per row.

On a CPU (`--device cpu --dtype float32`) zoo's rows are profiled by XLA's thunks, the events
JAX's profiler records per HLO op on the host's threads (the "library" group: YNNPACK's fusions);
they run on several threads, so their sum can exceed the call's time. PyTorch's CPU rows keep
their timing only (its CPU profile has operators, not kernels).

`--dots cpu all none` runs zoo's unfolded rows again for each further value of zoo.ops' switch
(where 1x1 convolutions run as dot products: on a CPU only, zoo's default; everywhere; nowhere),
each row's median beside the first pass's: the dot lever measured on this device. PyTorch eager's kernels are the reference for the convolutions: torch.compile calls
the same cuDNN convolutions (it fuses the rest), so PyTorch's convolution time bounds what it can
reach.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = (  # first match wins: cuDNN's convolution kernels have "nhwc" in their names too
    # On a CPU: XLA's library fusions (YNNPACK's, oneDNN's), whose names do not say what they hold
    # (convolutions, dot products, reductions; the optimized HLO does).
    ("library", re.compile(r"ynn_fusion|onednn|xnn_fusion", re.I)),
    ("conv", re.compile(r"fprop|dgrad|wgrad|implicit_?gemm|ImplicitGemmConv|^convolution", re.I)),
    ("pool", re.compile(r"max_pool|avg_pool|reduce_window|scatter", re.I)),
    ("norm/reduce", re.compile(r"batch_norm|bn_fw|bn_bw|batchnorm|reduce|welford|softmax", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cublas|cutlass|triton_dot|matmul|dot", re.I)),
    ("layout", re.compile(r"transpose|nchw|nhwc|padding|copy|memcpy|memset", re.I)),
)


def group(name: str) -> str:
    for label, pattern in GROUPS:
        if pattern.search(name):
            return label
    return "other"


def summarise(kernels: list[tuple[str, float]], calls: int) -> dict[str, Any]:
    """kernels: (name, microseconds) of every kernel in `calls` calls."""
    by_name: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for name, us in kernels:
        by_name[name] += us
        counts[name] += 1
    by_group: dict[str, float] = collections.defaultdict(float)
    for name, us in by_name.items():
        by_group[group(name)] += us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:40]
    return {"calls": calls, "kernels_per_call": len(kernels) / calls,
            "kernel_ms_per_call": sum(by_name.values()) / calls / 1e3,
            "groups_ms_per_call": {g: by_group.get(g, 0.0) / calls / 1e3 for g in [*(g for g, _ in GROUPS), "other"]},
            "top": [{"name": n[:200], "ms_per_call": us / calls / 1e3, "count_per_call": counts[n] / calls,
                     "group": group(n)} for n, us in top]}


def jax_kernels(call: Callable[[], Any], sync: Callable[[Any], Any], calls: int) -> tuple[list, dict]:
    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                sync(call())
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(files[0])
        streams, others, lines = [], [], {}
        for plane in data.planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                events = [(e.name, e.duration_ns / 1e3) for e in line.events]
                lines[f"{plane.name} | {line.name}"] = (len(events), sum(us for _, us in events) / 1e3)
                # The device's streams hold the kernels; the "XLA Ops"/"XLA Modules" lines repeat them.
                if line.name.startswith("Stream"):
                    streams += events
                elif not line.name.startswith(("XLA", "Steps", "Launch", "Source", "TensorFlow")):
                    others += events
        if not (streams or others):
            # A CPU: XLA's thunks (its fusions and library calls) on the host's threads, the events
            # that name an HLO op; "end: ..." marks when a thunk's asynchronous work finished.
            for plane in data.planes:
                for line in plane.lines if plane.name.startswith("/host:") else ():
                    events = [(e.name, e.duration_ns / 1e3) for e in line.events
                              if not e.name.startswith("end: ") and any(k == "hlo_op" for k, _ in e.stats)]
                    if events:
                        lines[f"{plane.name} | {line.name}"] = (len(events), sum(us for _, us in events) / 1e3)
                        others += events
        return streams or others, lines


def torch_kernels(call: Callable[[], Any], sync: Callable[[Any], Any], calls: int) -> tuple[list, dict]:
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                sync(call())
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    kernels = [(e["name"], float(e.get("dur", 0))) for e in events
               if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return kernels, {"chrome trace events": (len(events), None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch")
    ap.add_argument("--impl", default="torch-eager-cl,zoo-haiku,zoo-haiku-folded,zoo-equinox")
    ap.add_argument("--mode", default="both", choices=["inference", "train", "both"])
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3, help="calls recorded under the profiler")
    ap.add_argument("--dots", nargs="+", default=["cpu"], choices=["cpu", "all", "none"],
                    help="where 1x1 convolutions run as dots, one pass each (after the first, unfolded zoo rows only)")
    ap.add_argument("--out", default="benchmarks/results/profile_gpu.json")
    args = ap.parse_args()

    impls = [i for i in args.impl.split(",") if i]
    torch_impls = [i for i in impls if i.startswith("torch")]
    child: list[dict[str, Any]] = []
    if torch_impls and len(torch_impls) < len(impls):
        # PyTorch's and JAX's profilers both take CUPTI: in one process the second gets no kernels.
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "torch.json")
            cmd = [sys.executable, __file__, args.arch, "--impl", ",".join(torch_impls), "--mode", args.mode,
                   "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--size",
                   str(args.size), "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--calls",
                   str(args.calls), "--out", out]
            subprocess.run(cmd, check=False)
            if os.path.exists(out):
                child = json.loads(Path(out).read_text())["rows"]
        impls = [i for i in impls if i not in torch_impls]

    import jax

    from zoo import _bench, ops

    records: list[dict[str, Any]] = list(child)
    current: dict[str, Any] = {}
    measure = _bench._measure

    def write() -> None:  # after every row: a time limit keeps what was measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": vars(args), "jax": jax.__version__,
                                              "devices": [str(d) for d in jax.devices()], "rows": records},
                                             indent=1))

    def profiled(call: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, repeats: int) -> dict[str, Any]:
        result = measure(call, sync, warmup, repeats)
        rec = {**current, "median_ms": result["median_s"] * 1e3, "first_call_s": result["first_call_s"],
               "images_per_s": args.batch / result["median_s"]}
        try:
            t0 = time.perf_counter()
            tracer = torch_kernels if current["impl"].startswith("torch") else jax_kernels
            kernels, lines = tracer(call, sync, args.calls)
            rec.update(summarise(kernels, args.calls) if kernels else {"error": "no kernels recorded"})
            rec["trace_lines"] = lines
            rec["profile_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a profiler that fails still leaves the timing
            rec["error"] = f"{type(e).__name__}: {e}"[:1000]
        records.append(rec)
        write()
        g = rec.get("groups_ms_per_call", {})
        print(f"{rec['mode']:9s} {rec['impl']:18s} dots={rec['dots']:4s} {rec['median_ms']:8.2f} ms "
              f"({rec['images_per_s']:7.0f} img/s, first {rec['first_call_s']:.1f} s) kernels "
              f"{rec.get('kernel_ms_per_call', float('nan')):7.2f} ms: "
              + ", ".join(f"{k} {v:.2f}" for k, v in g.items()) + (f" ERROR {rec['error']}" if "error" in rec else ""),
              flush=True)
        return result

    _bench._measure = profiled
    modes = ["inference", "train"] if args.mode == "both" else [args.mode]
    # Later passes: unfolded only, the lever's effect on the convolutions is the same folded or not.
    passes = [(args.dots[0], impls)] + [(d, [i for i in impls if i in ("zoo-haiku", "zoo-equinox")])
                                         for d in args.dots[1:]]
    for dots, pass_impls in passes:
        if not pass_impls:
            continue
        ops._CONV_AS_DOT = dots
        current["dots"] = dots

        def on_start(mode: str, impl: str) -> None:
            current.update(mode=mode, impl=impl)

        results = _bench.run(args.arch, modes=modes, impls=pass_impls, batch=args.batch, size=(args.size, args.size),
                             dtype=args.dtype, device=args.device, repeats=args.repeats, warmup=args.warmup,
                             on_start=on_start)
        for row in results["rows"]:
            if row["error"]:
                print(f"{row['mode']} {row['impl']} dots={dots}: {row['error'][:300]}", flush=True)
    write()


if __name__ == "__main__":
    main()
