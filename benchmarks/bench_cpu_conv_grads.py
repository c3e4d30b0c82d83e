"""Where a training step loses to PyTorch on a CPU: a ResNet-50's convolutions one at a time,
forward, input gradient and weight gradient, in XLA (JAX's default convolutions; zoo's inference
setting, XLA's own emitter instead of YNNPACK; and zoo's `ops.conv2d` under JAX's default options,
which runs 1x1 convolutions as dot products, and those on maps narrower than their kernel as im2col
and a dot product) and in PyTorch channels_last (oneDNN), on the same arrays. Prints a table and writes JSON.

    python benchmarks/bench_cpu_conv_grads.py --batch 8 --size 112 --repeats 7

The layers are a ResNet-50's distinct convolution shapes at the given input size (its 53
convolutions, one of each shape), NHWC/HWIO in XLA, channels_last in PyTorch, float32. Gradients are
taken the way autodiff takes them: XLA compiles the VJP of one convolution with respect to the
input or the kernel (the forward is dead code and removed), PyTorch runs
`aten.convolution_backward` with one output. Beside each convolution, the BatchNorm (training:
batch statistics) and ReLU after it, forward and backward together, zoo's ops (`zoo.ops`) against
PyTorch's `batch_norm` + `relu` under autograd. "step" sums each column over the layers, weighted
by how often the network repeats each: their share of a train step.

"im2col" is every convolution as an explicit im2col and one dot product (`bench_cpu_layers.
im2col_conv2d`; a 1x1 one is the dot zoo runs), compiled with JAX's default options as training is:
the GEMM route that made zoo's 1x1 convolutions faster, measured for the wider ones at every map
size (zoo takes it only where a map is narrower than the kernel: `zoo.ops.runs_as_im2col`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

# (name, in, out, kernel, stride, feature-map size divisor at the input, repeats in a ResNet-50)
LAYERS = [
    ("stem 7x7/2 3>64", 3, 64, 7, 2, 1, 1),
    ("layer1 1x1 64>64", 64, 64, 1, 1, 4, 1),
    ("layer1 3x3 64", 64, 64, 3, 1, 4, 3),
    ("layer1 1x1 64>256", 64, 256, 1, 1, 4, 4),  # 3 blocks' conv3 + the downsample
    ("layer1 1x1 256>64", 256, 64, 1, 1, 4, 2),
    ("layer2 1x1 256>128", 256, 128, 1, 1, 4, 1),
    ("layer2 3x3/2 128", 128, 128, 3, 2, 4, 1),
    ("layer2 1x1/2 256>512 (downsample)", 256, 512, 1, 2, 4, 1),
    ("layer2 3x3 128", 128, 128, 3, 1, 8, 3),
    ("layer2 1x1 128>512", 128, 512, 1, 1, 8, 4),
    ("layer2 1x1 512>128", 512, 128, 1, 1, 8, 3),
    ("layer3 1x1 512>256", 512, 256, 1, 1, 8, 1),
    ("layer3 3x3/2 256", 256, 256, 3, 2, 8, 1),
    ("layer3 1x1/2 512>1024 (downsample)", 512, 1024, 1, 2, 8, 1),
    ("layer3 3x3 256", 256, 256, 3, 1, 16, 5),
    ("layer3 1x1 256>1024", 256, 1024, 1, 1, 16, 6),
    ("layer3 1x1 1024>256", 1024, 256, 1, 1, 16, 5),
    ("layer4 1x1 1024>512", 1024, 512, 1, 1, 16, 1),
    ("layer4 3x3/2 512", 512, 512, 3, 2, 16, 1),
    ("layer4 1x1/2 1024>2048 (downsample)", 1024, 2048, 1, 2, 16, 1),
    ("layer4 3x3 512", 512, 512, 3, 1, 32, 2),
    ("layer4 1x1 512>2048", 512, 2048, 1, 1, 32, 3),
    ("layer4 1x1 2048>512", 2048, 512, 1, 1, 32, 2),
]


def med(fn, n: int) -> float:
    """Median seconds of n calls after two untimed ones (`zoo bench`'s measurement)."""
    from zoo._bench import _measure

    return _measure(fn, lambda out: out, warmup=1, repeats=n)["median_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/cpu_conv_grads.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from bench_cpu_layers import im2col_conv2d
    from zoo import ops
    from zoo._xla import _CPU_CONV as XLA_OWN  # zoo's CPU inference setting

    rng = np.random.default_rng(0)
    impls = ["XLA default", "XLA own emitter", "zoo", "im2col", "PyTorch cl"]
    rows = []
    for name, cin, cout, k, stride, div, reps in LAYERS:
        h = -(-args.size // div)  # the stages round up (stride-2 convolutions with padding)
        pad = k // 2
        x = rng.standard_normal((args.batch, h, h, cin)).astype(np.float32)
        w = (rng.standard_normal((k, k, cin, cout)) * np.sqrt(2.0 / (k * k * cin))).astype(np.float32)

        def conv(x, w, stride=stride, pad=pad):
            return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                precision=jax.lax.Precision.HIGHEST)

        def zoo_conv(x, w, stride=stride, pad=pad):  # zoo's own (1x1: a dot), JAX's default options
            return ops.conv2d(x, w, None, stride=stride, padding=pad, dilation=1, groups=1,
                              dimension_numbers=("NHWC", "HWIO", "NHWC"))

        def im2col(x, w, stride=stride, pad=pad):
            return im2col_conv2d(x, w, stride, pad)

        xj, wj = jnp.asarray(x), jnp.asarray(w)
        err = float(jnp.max(jnp.abs(jax.jit(im2col)(xj, wj) - jax.jit(conv)(xj, wj))))
        if err > 1e-4 * float(jnp.max(jnp.abs(jax.jit(conv)(xj, wj)))):
            raise AssertionError(f"{name}: im2col and the convolution differ ({err:.1e})")
        dy = jnp.asarray(rng.standard_normal(jax.eval_shape(conv, xj, wj).shape).astype(np.float32))
        row = {"layer": name, "repeats_in_net": reps, "ms": {}}
        for impl, c, opts in (("XLA default", conv, {}), ("XLA own emitter", conv, XLA_OWN), ("zoo", zoo_conv, {}),
                             ("im2col", im2col, {})):
            fns = {
                "forward": lambda x, w, dy, c=c: c(x, w),
                "input grad": lambda x, w, dy, c=c: jax.vjp(lambda x: c(x, w), x)[1](dy)[0],
                "weight grad": lambda x, w, dy, c=c: jax.vjp(lambda w: c(x, w), w)[1](dy)[0],
            }
            for part, f in fns.items():
                jf = jax.jit(f, compiler_options=opts)
                row["ms"][f"{impl} / {part}"] = 1e3 * med(lambda: jax.block_until_ready(jf(xj, wj, dy)), args.repeats)

        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)
        tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=torch.channels_last)
        tdy = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)
        conv_bwd = torch.ops.aten.convolution_backward
        targs = ([stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1)
        with torch.no_grad():
            tfns = {
                "forward": lambda: torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad),
                "input grad": lambda: conv_bwd(tdy, tx, tw, None, *targs, [True, False, False]),
                "weight grad": lambda: conv_bwd(tdy, tx, tw, None, *targs, [False, True, False]),
            }
            for part, f in tfns.items():
                row["ms"][f"PyTorch cl / {part}"] = 1e3 * med(f, args.repeats)
        # The BatchNorm (training: batch statistics) and ReLU after the convolution, forward and
        # backward together (the backward needs the forward's statistics), zoo's ops vs PyTorch's.
        yshape = dy.shape
        y0 = rng.standard_normal(yshape).astype(np.float32)
        gamma, beta = rng.uniform(0.5, 1.5, cout).astype(np.float32), rng.standard_normal(cout).astype(np.float32)

        def bn_relu(y, g, b):
            mean, var, _ = ops.bn_moments(y, (0, 1, 2))
            return jax.nn.relu(ops.normalize(y, mean, var, g, b, 1e-5, channel_axis=-1))

        bn = jax.jit(lambda y, g, b, dy: jax.vjp(bn_relu, y, g, b)[1](dy))
        yj, gj, bj = jnp.asarray(y0), jnp.asarray(gamma), jnp.asarray(beta)
        row["ms"]["XLA default / bn+relu"] = 1e3 * med(lambda: jax.block_until_ready(bn(yj, gj, bj, dy)), args.repeats)
        ty = torch.from_numpy(y0.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)
        ty.requires_grad_(True)
        tg, tb = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)

        def torch_bn() -> None:
            out = torch.relu(torch.nn.functional.batch_norm(ty, None, None, tg, tb, training=True))
            torch.autograd.grad(out, (ty, tg, tb), tdy)

        row["ms"]["PyTorch cl / bn+relu"] = 1e3 * med(torch_bn, args.repeats)
        rows.append(row)
        print(name, " ".join(f"{k}={v:.2f}" for k, v in row["ms"].items()), flush=True)

    parts = ["forward", "input grad", "weight grad"]
    totals = {impl: {p: sum(r["repeats_in_net"] * r["ms"][f"{impl} / {p}"] for r in rows) for p in parts}
              for impl in impls}
    for impl in ("XLA default", "PyTorch cl"):
        totals[impl]["bn+relu"] = sum(r["repeats_in_net"] * r["ms"][f"{impl} / bn+relu"] for r in rows)
    result = {"config": vars(args), "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "rows": rows, "weighted_totals_ms": totals}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\nbatch {args.batch}, {args.size}x{args.size} input, float32, medians of {args.repeats} (ms); "
          "x: PyTorch channels_last time / XLA time")
    print("| layer | " + " | ".join(f"{p}: XLA default / own emitter / zoo / im2col / PyTorch cl" for p in parts)
          + " | BatchNorm+ReLU train, fwd+bwd: XLA / PyTorch cl |")
    print("|---|" + "---:|" * (len(parts) + 1))
    total_row = {"layer": "step (weighted sum)", "ms": {f"{i} / {p}": v for i in totals for p, v in totals[i].items()}}
    for r in rows + [total_row]:
        cells = []
        for p in parts:
            d, o, z, c, t = (r["ms"][f"{i} / {p}"] for i in impls)
            cells.append(f"{d:.1f} ({t / d:.2f}×) / {o:.1f} ({t / o:.2f}×) / {z:.1f} ({t / z:.2f}×) / "
                         f"{c:.1f} ({t / c:.2f}×) / {t:.1f}")
        d, t = r["ms"]["XLA default / bn+relu"], r["ms"]["PyTorch cl / bn+relu"]
        cells.append(f"{d:.1f} ({t / d:.2f}×) / {t:.1f}")
        print(f"| {r['layer']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
