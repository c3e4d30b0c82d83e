"""XLA:CPU levers against PyTorch's oneDNN: the same zoo forward under XLA flag sets, beside
PyTorch eager channels_last measured in the same process, with the logits checked against the
default flags' (a lever that changes numerics beyond 1e-5 is reported, not used). Prints a table
and writes JSON.

    python benchmarks/bench_cpu_levers.py --arch resnet50 --batch 8 --repeats 5

Each flag set runs in its own process (XLA reads XLA_FLAGS once). Rows: zoo Haiku (NHWC), zoo
Haiku with BatchNorm folded, zoo Equinox (vmapped CHW) under each flag set; a conv-only probe
(one 3x3 conv, 256 channels at 56x56, batch 8, NHWC) timed in XLA and in PyTorch channels_last,
which says whether the gap is XLA's convolutions themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn custom call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "no eigen threads": "--xla_cpu_multi_thread_eigen=false",
    # This jaxlib already runs convolutions as YNNPACK fusions (`ynn_fusion` in the optimized HLO);
    # these two take them away (XLA's own convolution emitter: what zoo's functions now compile
    # with on a CPU, zoo/_xla.py) or hand YNNPACK more op kinds.
    "ynn conv off": "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "ynn more": "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_DOT,+LIBRARY_FUSION_TYPE_ELTWISE,"
                "+LIBRARY_FUSION_TYPE_REDUCE",
}

CHILD = r"""
import json, os, statistics, sys, time
cfg = json.loads(sys.argv[1])
import numpy as np, jax, jax.numpy as jnp, torch
import zoo
def med(fn, n):
    fn(); fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
x = np.random.default_rng(0).standard_normal((cfg["batch"], 3, cfg["size"], cfg["size"])).astype(np.float32)
out = {"rows": {}}
for name, path in cfg["files"].items():
    m = zoo.load(path)
    y = np.asarray(m.predict(x))
    np.save(os.path.join(cfg["tmp"], f"{cfg['label']}-{name}.npy"), y)
    out["rows"][name] = med(lambda: jax.block_until_ready(m.predict(x)), cfg["repeats"])
# conv-only probe: XLA NHWC vs PyTorch channels_last, same shapes and weights
a = np.random.default_rng(1).standard_normal((8, 56, 56, 256)).astype(np.float32)
w = np.random.default_rng(2).standard_normal((3, 3, 256, 256)).astype(np.float32) * 0.02
conv = jax.jit(lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), ((1, 1), (1, 1)),
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC")))
aj, wj = jnp.asarray(a), jnp.asarray(w)
out["rows"]["conv probe (XLA)"] = med(lambda: jax.block_until_ready(conv(aj, wj)), cfg["repeats"])
if cfg["torch"]:
    ta = torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out["rows"]["conv probe (PyTorch channels_last)"] = med(lambda: torch.nn.functional.conv2d(ta, tw, padding=1), cfg["repeats"])
        from converters.torch_models import random_model
        tm = random_model(cfg["arch"]).to(memory_format=torch.channels_last)
        tx = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        out["rows"]["PyTorch eager channels_last"] = med(lambda: tm(tx), cfg["repeats"])
        tn = random_model(cfg["arch"])
        tx2 = torch.from_numpy(x)
        out["rows"]["PyTorch eager NCHW"] = med(lambda: tn(tx2), cfg["repeats"])
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--flags", nargs="*", default=list(FLAG_SETS), help="which flag sets")
    ap.add_argument("--out", default="benchmarks/results/cpu_levers.json")
    args = ap.parse_args()

    import tempfile

    import numpy as np
    import torch

    from converters.convert import convert_to_file
    from converters.state_dict import load_state_dict
    from converters.torch_models import random_model

    results = {"config": vars(args), "platform": platform.platform(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "flag_sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sd = load_state_dict(random_model(args.arch))
        files = {}
        for name, fw, fold in (("zoo Haiku", "haiku", False), ("zoo Haiku folded", "haiku", True),
                               ("zoo Equinox", "equinox", False)):
            files[name] = str(convert_to_file(args.arch, sd, fw, os.path.join(tmp, f"{fw}{int(fold)}.safetensors"),
                                              fold_bn=fold))
        for label in args.flags:
            # JAX's defaults and these flags alone: zoo's own CPU convolution option is off here.
            env = {**os.environ, "XLA_FLAGS": FLAG_SETS[label], "ZOO_COMPILATION_CACHE": "0", "ZOO_CPU_XLA_CONV": "0"}
            cfg = {"files": files, "batch": args.batch, "size": args.size, "repeats": args.repeats, "tmp": tmp,
                   "label": label, "arch": args.arch, "torch": True}
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                results["flag_sets"][label] = {"flags": FLAG_SETS[label], "error": proc.stderr.strip().splitlines()[-1][:300]}
                print(f"{label}: failed: {results['flag_sets'][label]['error']}", flush=True)
                continue
            rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
            parity = {}
            for name in files:
                ref = np.load(os.path.join(tmp, f"default-{name}.npy")) if "default" in args.flags else None
                got = np.load(os.path.join(tmp, f"{label}-{name}.npy"))
                if ref is not None:
                    parity[name] = float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))
            base = rows["PyTorch eager channels_last"]
            ratios = {k: base / v for k, v in rows.items()}
            # The probe against PyTorch's same conv, not against the whole model.
            ratios["conv probe (XLA)"] = rows["conv probe (PyTorch channels_last)"] / rows["conv probe (XLA)"]
            results["flag_sets"][label] = {"flags": FLAG_SETS[label], "median_s": rows,
                                           "vs_torch_channels_last": ratios,
                                           "rel_diff_vs_default_flags": parity}
            print(f"{label}: " + ", ".join(f"{k} {1e3 * v:.0f} ms ({ratios[k]:.2f}x)" for k, v in rows.items())
                  + "; parity " + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    names = ["zoo Haiku", "zoo Haiku folded", "zoo Equinox", "conv probe (XLA)"]
    print("| XLA flags | " + " | ".join(names) + " | PyTorch cl | conv probe, PyTorch cl |")
    print("|---|" + "---:|" * (len(names) + 2))
    for label, r in results["flag_sets"].items():
        if "error" in r:
            print(f"| {label} | failed: {r['error'][:60]} |")
            continue
        m, v = r["median_s"], r["vs_torch_channels_last"]
        cells = [f"{1e3 * m[n]:.0f} ms ({v[n]:.2f}×)" for n in names]
        print(f"| {label} (`{r['flags'] or 'none'}`) | " + " | ".join(cells)
              + f" | {1e3 * m['PyTorch eager channels_last']:.0f} ms | {1e3 * m['conv probe (PyTorch channels_last)']:.0f} ms |")
    print(f"(statistics.median of {args.repeats}; ratios: PyTorch channels_last time / row time, same process)")


if __name__ == "__main__":
    main()
