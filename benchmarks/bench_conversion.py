"""What converting and loading a file costs: peak memory of `zoo convert` against the checkpoint's
size, time beyond reading the checkpoint and writing the file (the conversion alone, first in a
process and again), and the content digest's cost on load. Each measurement runs in a fresh process; medians of `--repeat` runs; a table and JSON.

    .venv/bin/python benchmarks/bench_conversion.py [--models resnet50 resnet152] [--json out.json]

Peak memory is the process's maximum RSS (`ru_maxrss`). It includes the Python, JAX and PyTorch
runtimes, so the same process with the same imports and no conversion is measured too ("baseline"),
and the conversion's own share is the difference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a child: print peak RSS (bytes) and timings as JSON.
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
mode, arch, ckpt, out = sys.argv[1:5]
t0 = time.perf_counter()
import jax, torch, numpy as np  # noqa: F401  (the runtimes a conversion loads)
import zoo.haiku, converters.convert as cc
from converters.state_dict import load_state_dict
from zoo.io import load_file
t_import = time.perf_counter() - t0
res = {{}}
if mode == "baseline":
    pass
elif mode == "convert":
    t = time.perf_counter(); cc.convert_to_file(arch, ckpt, "haiku", out, force=True); res["convert_s"] = time.perf_counter() - t
elif mode.startswith("breakdown-"):
    # The conversion alone (names, layouts, the checked merge, the framework's template), apart
    # from reading the checkpoint and writing the file: first in the process, then again.
    from zoo.io import save_file
    for run in ("first", "again"):
        t = time.perf_counter(); sd = load_state_dict(ckpt); t1 = time.perf_counter()
        c = cc.convert_state_dict(arch, sd, mode.split("-", 1)[1], source={{"kind": "file"}}); t2 = time.perf_counter()
        save_file(out, c.arrays, c.loaded.metadata, force=True); t3 = time.perf_counter()
        res[run] = {{"read_s": t1 - t, "convert_only_s": t2 - t1, "write_s": t3 - t2}}
elif mode == "read":
    t = time.perf_counter(); load_state_dict(ckpt); res["read_s"] = time.perf_counter() - t
elif mode == "load":
    t = time.perf_counter(); load_file(out, check=True); res["load_s"] = time.perf_counter() - t
    t = time.perf_counter(); load_file(out, check=False); res["load_nocheck_s"] = time.perf_counter() - t
    t = time.perf_counter(); load_file(out, check=True); res["load_s_2"] = time.perf_counter() - t
res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
res["import_s"] = t_import
print(json.dumps(res))
"""


def child(mode: str, arch: str, ckpt: Path, out: Path) -> dict:
    code = CHILD.format(root=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, mode, arch, str(ckpt), str(out)], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "resnet152"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from converters.torch_models import random_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            sd = random_model(arch).state_dict()
            for suffix in (".pth", ".safetensors"):
                ckpt = Path(tmp) / f"{arch}{suffix}"
                if suffix == ".pth":
                    torch.save(sd, ckpt)
                else:
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
                out = Path(tmp) / f"{arch}_zoo.safetensors"
                runs = {m: [child(m, arch, ckpt, out) for _ in range(args.repeat)]
                        for m in ("baseline", "read", "convert", "load", "breakdown-haiku", "breakdown-equinox")}
                med = lambda m, k: statistics.median(r[k] for r in runs[m])  # noqa: E731
                size = ckpt.stat().st_size
                row = {
                    "model": arch, "checkpoint": suffix, "checkpoint_mb": size / 2 ** 20,
                    "baseline_rss_mb": med("baseline", "peak_rss") / 2 ** 20,
                    "convert_rss_mb": med("convert", "peak_rss") / 2 ** 20,
                    "read_s": med("read", "read_s"), "convert_s": med("convert", "convert_s"),
                    "load_s": min(med("load", "load_s"), med("load", "load_s_2")),
                    "load_nocheck_s": med("load", "load_nocheck_s"),
                }
                for fw in ("haiku", "equinox"):
                    for run in ("first", "again"):
                        for k in ("read_s", "convert_only_s", "write_s"):
                            row[f"{fw}_{run}_{k}"] = statistics.median(r[run][k] for r in runs[f"breakdown-{fw}"])
                row["convert_rss_over_file"] = (row["convert_rss_mb"] - row["baseline_rss_mb"]) / row["checkpoint_mb"]
                row["digest_s"] = row["load_s"] - row["load_nocheck_s"]
                rows.append(row)
                print(f"{arch:10s} {suffix:12s} file {row['checkpoint_mb']:6.1f} MB | peak RSS {row['convert_rss_mb']:6.0f} MB "
                      f"(baseline {row['baseline_rss_mb']:4.0f}, conversion's share {row['convert_rss_over_file']:.2f}x "
                      f"the file) | read {row['read_s']:.2f} s, convert {row['convert_s']:.2f} s | load "
                      f"{row['load_s']:.2f} s, without digest {row['load_nocheck_s']:.2f} s", flush=True)
                print("  " + "; ".join(f"{fw}: conversion alone {row[f'{fw}_first_convert_only_s']:.2f} s first in the "
                                       f"process, {row[f'{fw}_again_convert_only_s']:.2f} s again (read "
                                       f"{row[f'{fw}_first_read_s']:.2f} s, write {row[f'{fw}_first_write_s']:.2f} s)"
                                       for fw in ("haiku", "equinox")), flush=True)
    if args.json:
        import jax

        meta = {"python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
                "machine": platform.machine(), "cpus": __import__("os").cpu_count(), "repeat": args.repeat}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
