"""The rule behind `zoo.ops.runs_as_im2col`: XLA:CPU's convolutions against im2col and one dot
product (`zoo.ops._im2col_dot`, what zoo compiles for a CPU where a map is narrower than the
kernel) and PyTorch channels_last, on maps from narrower than the kernel to wider, forward and
input gradient. Prints a table and writes JSON.

    python benchmarks/bench_cpu_narrow_convs.py --repeats 7

Each case is one convolution (float32, NHWC/HWIO, random values) timed alone: XLA's convolution
under JAX's default options (what a training step compiles) and under zoo's CPU inference options,
the im2col form under JAX's defaults, and PyTorch's `conv2d` / `convolution_backward` on
channels_last tensors. "rule" is what `ops.runs_as_im2col` decides for the case. Each XLA form is
checked against PyTorch's values first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

# (batch, height, width, in, out, kernel, stride, dilation, groups): a ResNet's 3x3 convolutions at
# a 32x32 input (its stages see 8, 4, 2 and 1 pixels), the boundary of the rule (maps as wide as
# the kernel and one narrower), other shapes and kernels, and the cases the rule leaves alone.
CASES = [
    (32, 8, 8, 64, 64, 3, 1, 1, 1),
    (32, 4, 4, 128, 128, 3, 1, 1, 1),
    (32, 3, 3, 256, 256, 3, 1, 1, 1),
    (32, 2, 2, 256, 256, 3, 1, 1, 1),
    (32, 4, 4, 256, 256, 3, 2, 1, 1),
    (32, 2, 2, 512, 512, 3, 2, 1, 1),
    (32, 1, 1, 512, 512, 3, 1, 1, 1),
    (32, 3, 4, 256, 256, 3, 1, 1, 1),
    (32, 2, 4, 256, 256, 3, 1, 1, 1),
    (32, 1, 8, 256, 256, 3, 1, 1, 1),
    (1, 2, 2, 512, 512, 3, 1, 1, 1),
    (8, 2, 2, 256, 256, 3, 1, 1, 1),
    (32, 5, 5, 256, 256, 5, 1, 1, 1),
    (32, 4, 4, 256, 256, 5, 1, 1, 1),
    (32, 4, 4, 256, 256, 3, 1, 2, 1),
    (32, 2, 2, 256, 256, 3, 1, 1, 32),
    (8, 7, 7, 512, 512, 3, 1, 1, 1),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/cpu_narrow_convs.json")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    from bench_cpu_layers import med_ms
    from zoo import ops
    from zoo._xla import _CPU_CONV as ZOO_INFERENCE

    rng = np.random.default_rng(0)
    rows = []
    for n, h, w, cin, cout, k, s, d, g in CASES:
        p = d * (k - 1) // 2
        x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
        wk = (rng.standard_normal((k, k, cin // g, cout)) * np.sqrt(2.0 / (k * k * cin // g))).astype(np.float32)
        dims = ("NHWC", "HWIO", "NHWC")

        def conv(x, wk):
            return jax.lax.conv_general_dilated(x, wk, (s, s), ((p, p), (p, p)), rhs_dilation=(d, d),
                                                dimension_numbers=dims, feature_group_count=g)

        def im2col(x, wk):
            return ops._im2col_dot(x, wk, s, p, d, dims)

        xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # a channels_last view
        wt = torch.from_numpy(wk.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = torch.nn.functional.conv2d(xt, wt, stride=s, padding=p, dilation=d, groups=g)
        dy = rng.standard_normal(tuple(ref.permute(0, 2, 3, 1).shape)).astype(np.float32)
        dyt = torch.from_numpy(dy).permute(0, 3, 1, 2)
        xj, wj, dyj = jax.numpy.asarray(x), jax.numpy.asarray(wk), jax.numpy.asarray(dy)
        forms = [("conv, JAX default", conv, {}), ("conv, zoo inference", conv, ZOO_INFERENCE)]
        if g == 1:
            forms.append(("im2col", im2col, {}))
        ho, wo = ref.shape[2], ref.shape[3]
        row = {"case": f"{k}x{k}{f'/{s}' if s > 1 else ''}{f' d{d}' if d > 1 else ''}{f' g{g}' if g > 1 else ''} "
                       f"{cin}>{cout} @{h}x{w}->{ho}x{wo}, batch {n}",
               "rule": ops.runs_as_im2col((k, k), (h, w), (ho, wo), g), "ms": {}}
        scale = float(ref.abs().max())
        for name, f, opts in forms:
            got = np.asarray(jax.jit(f)(xj, wj))
            if np.max(np.abs(got - ref.permute(0, 2, 3, 1).numpy())) > 1e-4 * scale:
                raise AssertionError(f"{row['case']}: {name} and PyTorch differ")
            fwd = jax.jit(f, compiler_options=opts)
            dx = jax.jit(lambda x, w, dy, f=f: jax.vjp(lambda x: f(x, w), x)[1](dy)[0], compiler_options=opts)
            row["ms"][f"{name} / forward"] = med_ms(lambda: jax.block_until_ready(fwd(xj, wj)), args.repeats)
            row["ms"][f"{name} / input grad"] = med_ms(lambda: jax.block_until_ready(dx(xj, wj, dyj)), args.repeats)
        bwd = torch.ops.aten.convolution_backward
        targs = ([s] * 2, [p] * 2, [d] * 2, False, [0, 0], g)
        with torch.no_grad():
            row["ms"]["PyTorch cl / forward"] = med_ms(
                lambda: torch.nn.functional.conv2d(xt, wt, stride=s, padding=p, dilation=d, groups=g), args.repeats)
            row["ms"]["PyTorch cl / input grad"] = med_ms(
                lambda: bwd(dyt, xt, wt, None, *targs, [True, False, False]), args.repeats)
        rows.append(row)
        print(row["case"], row["rule"], " ".join(f"{key}={v:.2f}" for key, v in row["ms"].items()), flush=True)

    result = {"config": vars(args), "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    forms = ["conv, JAX default", "conv, zoo inference", "im2col", "PyTorch cl"]
    print("\nfloat32, medians of", args.repeats, "(ms), forward / input gradient; rule: im2col on a CPU")
    print("| case | rule | " + " | ".join(forms) + " |")
    print("|---|---|" + "---:|" * len(forms))
    for r in rows:
        cells = []
        for name in forms:
            a, b = r["ms"].get(f"{name} / forward"), r["ms"].get(f"{name} / input grad")
            cells.append("–" if a is None else f"{a:.2f} / {b:.2f}")
        print(f"| {r['case']} | {'im2col' if r['rule'] else 'conv'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
