"""Where zoo's CPU inference loses to PyTorch: every convolution and max pool of a registry model,
one at a time, in XLA and in PyTorch channels_last (oneDNN), beside the whole model, in one process.
Prints a table and writes JSON.

    python benchmarks/bench_cpu_layers.py googlenet resnet50 --batch 8 --repeats 7

The layers are read off the real PyTorch model (forward hooks on its `Conv2d` and `MaxPool2d`
modules at the given input size), so the list is the model's, not a hand-written one; identical
layers are timed once and weighted by how often the model runs them. XLA runs zoo's own ops
(`zoo.ops.conv2d`: 1x1 convolutions as dot products; `zoo.ops.max_pool`) jitted the way zoo's
`predict` is (its CPU compiler options, channels-last input, HWIO kernels), and again with JAX's
default options; PyTorch runs `F.conv2d` / `F.max_pool2d` on channels_last tensors under
`inference_mode`. The whole model: `zoo.load(...).predict` (Haiku) against the PyTorch model in
channels_last, timed in alternating blocks. "rest" = whole model minus its convolutions and max
pools: BatchNorm, ReLU, concatenation, the head and what overlaps.

Each convolution wider than 1x1 (one group, no dilation) is also timed as an explicit im2col and
one dot product (`im2col_conv2d`, compiled with zoo's options): the GEMM route that XLA:CPU runs
1x1 convolutions on, measured here as a lever for the rest.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
from typing import Any, Callable


def med_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of `repeats` calls after two untimed ones (`zoo bench`'s measurement)."""
    from zoo._bench import _measure

    return 1e3 * _measure(fn, lambda out: out, warmup=1, repeats=repeats)["median_s"]


def model_layers(model: Any, batch: int, size: int) -> list[dict[str, Any]]:
    """The model's distinct convolutions and max pools at this input, in order of first use, with
    how many times a forward pass runs each."""
    import torch

    seen: dict[tuple, dict[str, Any]] = collections.OrderedDict()

    def hook(mod: Any, inp: tuple, out: Any) -> None:
        shape = tuple(inp[0].shape)
        if isinstance(mod, torch.nn.Conv2d):
            key = ("conv", shape, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                   mod.groups, mod.bias is not None)
        else:
            key = ("max_pool", shape, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode)
        if key not in seen:
            seen[key] = {"key": key, "count": 0}
        seen[key]["count"] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d))]
    with torch.inference_mode():
        model(torch.zeros(batch, 3, size, size))
    for h in handles:
        h.remove()
    return list(seen.values())


def im2col_conv2d(x: Any, w: Any, stride: int, padding: int) -> Any:
    """An NHWC convolution with an HWIO kernel as im2col + one dot product, zoo's own
    (`zoo.ops._im2col_dot`, which zoo runs only on maps narrower than the kernel): the k*k shifted
    (and strided) views of the padded input stacked on the channel axis, times the kernel as a
    (k*k*I, O) matrix. Same values as the convolution up to rounding."""
    from zoo import ops

    return ops._im2col_dot(x, w, stride, padding, 1, ("NHWC", "HWIO", "NHWC"))


def _pair(v: Any) -> int:
    v = v if isinstance(v, (tuple, list)) else (v, v)
    if v[0] != v[1] or isinstance(v[0], str):
        raise ValueError(f"non-square or named setting {v!r}: not supported by this benchmark")
    return int(v[0])


def time_layer(layer: dict[str, Any], repeats: int, rng: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from zoo import ops
    from zoo._xla import jit_options
    from zoo.spec import PoolSpec

    kind, shape = layer["key"][0], layer["key"][1]
    n, c, h, w = shape
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    xj = jnp.asarray(x)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # a channels_last view of the same array
    if kind == "conv":
        _, _, cout, k, s, p, d, g, bias = layer["key"]
        k, s, p, d = _pair(k), _pair(s), _pair(p), _pair(d)
        wk = (rng.standard_normal((k, k, c // g, cout)) * np.sqrt(2.0 / (k * k * c // g))).astype(np.float32)
        b = rng.standard_normal(cout).astype(np.float32) if bias else None
        layer["name"] = f"conv {k}x{k}{f'/{s}' if s > 1 else ''} {c}>{cout}{f' g{g}' if g > 1 else ''} @{h}x{w}"

        def f(x: Any, wk: Any, b: Any) -> Any:
            with ops.tracing_for("cpu"):
                return ops.conv2d(x, wk, b, stride=s, padding=p, dilation=d, groups=g,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))

        args = (xj, jnp.asarray(wk), None if b is None else jnp.asarray(b))
        alternatives = {}
        if k > 1 and g == 1 and d == 1:
            def as_im2col(x: Any, wk: Any, b: Any) -> Any:
                y = im2col_conv2d(x, wk, s, p)
                return y if b is None else y + b

            alternatives["im2col"] = as_im2col
        tw = torch.from_numpy(wk.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=torch.channels_last)
        tb = None if b is None else torch.from_numpy(b)

        def torch_call() -> Any:
            with torch.inference_mode():
                return F.conv2d(xt, tw, tb, stride=s, padding=p, dilation=d, groups=g)
    else:
        _, _, k, s, p, ceil = layer["key"]
        spec = PoolSpec("max", _pair(k), _pair(s), _pair(p), bool(ceil))
        layer["name"] = f"max pool {spec.kernel}x{spec.kernel}/{spec.stride}{' ceil' if ceil else ''} {c} @{h}x{w}"

        def f(x: Any) -> Any:
            return ops.max_pool(x, spec)

        args = (xj,)
        alternatives = {}

        def torch_call() -> Any:
            with torch.inference_mode():
                return F.max_pool2d(xt, spec.kernel, spec.stride, spec.padding, ceil_mode=spec.ceil_mode)

    ms = {}
    for impl, opts in (("zoo", jit_options()), ("JAX default", {})):
        jf = jax.jit(f, **opts)
        ms[impl] = med_ms(lambda: jax.block_until_ready(jf(*args)), repeats)
    for impl, alt in alternatives.items():
        jf = jax.jit(alt, **jit_options())
        ms[impl] = med_ms(lambda: jax.block_until_ready(jf(*args)), repeats)
    ms["PyTorch cl"] = med_ms(torch_call, repeats)
    # The two sides compute the same thing: a wrong layer would make the comparison meaningless.
    ref = torch_call().permute(0, 2, 3, 1).numpy()
    for impl, fn in (("XLA", f), *alternatives.items()):
        got = np.asarray(jax.jit(fn)(*args))
        err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-12))
        if err > 1e-4:
            raise AssertionError(f"{layer['name']}: {impl} and PyTorch differ (relative {err:.1e})")
    return {"name": layer["name"], "kind": kind, "count": layer["count"], "ms": ms}


def time_model(arch: str, tmodel: Any, batch: int, size: int, repeats: int, rounds: int, rng: Any) -> dict[str, Any]:
    import jax
    import numpy as np
    import torch

    import zoo
    from converters.convert import convert_to_file

    with tempfile.TemporaryDirectory() as tmp:
        model = zoo.load(str(convert_to_file(arch, tmodel, "haiku", os.path.join(tmp, f"{arch}.safetensors"))))
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    xj = jax.device_put(x)
    tcl = tmodel.to(memory_format=torch.channels_last)
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)

    def torch_call() -> Any:
        with torch.inference_mode():
            return tcl(xt)

    zoo_ms, torch_ms = [], []
    for _ in range(rounds):  # alternating blocks: the machine's load drifts
        zoo_ms.append(med_ms(lambda: jax.block_until_ready(model.predict(xj)), repeats))
        torch_ms.append(med_ms(torch_call, repeats))
    return {"zoo Haiku": sorted(zoo_ms)[len(zoo_ms) // 2], "PyTorch cl": sorted(torch_ms)[len(torch_ms) // 2],
            "blocks": {"zoo Haiku": zoo_ms, "PyTorch cl": torch_ms}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archs", nargs="+")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks of whole-model calls")
    ap.add_argument("--out", default="benchmarks/results/cpu_layers.json")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    from converters.torch_models import random_model

    results = []
    for arch in args.archs:
        rng = np.random.default_rng(0)
        tmodel = random_model(arch).eval()
        layers = model_layers(tmodel, args.batch, args.size)
        # Once untimed: the first measurement of a process ran 1.5x long (thread pools, allocator).
        time_layer(dict(layers[0]), 1, np.random.default_rng(1))
        rows = [time_layer(layer, args.repeats, rng) for layer in layers]
        whole = time_model(arch, tmodel, args.batch, args.size, args.repeats, args.rounds, rng)
        impls = ["zoo", "JAX default", "PyTorch cl"]
        totals = {kind: {i: sum(r["count"] * r["ms"][i] for r in rows if r["kind"] == kind) for i in impls}
                  for kind in ("conv", "max_pool")}
        wide = [r for r in rows if "im2col" in r["ms"]]
        totals["conv wider than 1x1"] = {i: sum(r["count"] * r["ms"][i] for r in wide) for i in impls + ["im2col"]}
        results.append({"arch": arch, "layers": rows, "totals_ms": totals, "model_ms": whole})
        print(f"\n{arch}, batch {args.batch}, {args.size}x{args.size}, float32, medians of {args.repeats} (ms); "
              "x: PyTorch channels_last / XLA")
        print("| layer | count | zoo's setting | JAX's default | im2col + dot | PyTorch cl |")
        print("|---|---:|---:|---:|---:|---:|")

        def cell(v: Any, t: float, digits: int) -> str:
            return "–" if v is None else f"{v:.{digits}f} ({t / v:.2f}×)"

        for r in rows:
            z, j, c, t = (r["ms"].get(i) for i in impls[:2] + ["im2col", impls[2]])
            print(f"| {r['name']} | {r['count']} | {cell(z, t, 2)} | {cell(j, t, 2)} | {cell(c, t, 2)} | {t:.2f} |")
        for kind, label in (("conv", "all convolutions"), ("conv wider than 1x1", "convolutions wider than 1x1"),
                            ("max_pool", "all max pools")):
            z, j, c, t = (totals[kind].get(i) for i in impls[:2] + ["im2col", impls[2]])
            print(f"| **{label}** (weighted) | | {cell(z, t, 1)} | {cell(j, t, 1)} | {cell(c, t, 1)} | {t:.1f} |")
        zm, tm = whole["zoo Haiku"], whole["PyTorch cl"]
        zl = totals["conv"]["zoo"] + totals["max_pool"]["zoo"]
        tl = totals["conv"]["PyTorch cl"] + totals["max_pool"]["PyTorch cl"]
        print(f"| **whole model** (zoo Haiku predict) | | {zm:.1f} ({tm / zm:.2f}×) | | | {tm:.1f} |")
        print(f"| rest (model - convolutions - max pools) | | {zm - zl:.1f} | | | {tm - tl:.1f} |", flush=True)

    result = {"config": vars(args), "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
