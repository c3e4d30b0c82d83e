"""Measure logit parity for registered models and write docs/parity.md (+ JSON).

    python scripts/parity_report.py --models 'resnet*' --sizes 224x224 97x131

Each model gets random weights with randomised BatchNorm statistics; each framework, folded and
not, at each size, is compared with the PyTorch model on the same inputs (fp32, `highest`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["*"], help="Glob patterns over registry names.")
    ap.add_argument("--ci-only", action="store_true", help="Only models in CI's parity tests.")
    ap.add_argument("--sizes", nargs="+", default=["224x224", "97x131"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--precision", default="highest", choices=["highest", "default"])
    ap.add_argument("--out", default="docs/parity_table")
    args = ap.parse_args()

    import jax
    import torch

    from converters.state_dict import load_state_dict
    from converters.torch_models import random_model
    from converters.verify import verify
    from zoo import registry

    names = sorted({n for p in args.models for n in registry.list_models(p)
                    if not args.ci_only or registry.get(n).ci})
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    rows = []
    t_start = time.time()
    for name in names:
        model = random_model(name)
        params = sum(p.numel() for p in model.parameters())
        sd = load_state_dict(model)
        for size in sizes:
            for framework in ("haiku", "equinox"):
                for fold in (False, True):
                    r = verify(name, sd, framework, fold_bn=fold, batch=args.batch, size=size,
                               device=args.device, precision=args.precision, reference=model)
                    rows.append({"model": name, "params": params, **r.to_dict()})
                    print(f"{name:22} {framework:8} {'folded' if fold else 'bn':6} {size[0]}x{size[1]:<4} "
                          f"rel {r.rel:.2e} max|Δ| {r.max_abs:.2e} top1 {r.top1:.0%} "
                          f"{'PASS' if r.passed else 'FAIL'}", flush=True)
        del model
    env = {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "torch": torch.__version__,
           "jax_device": rows[0]["jax_device"] if rows else "", "torch_device": rows[0]["torch_device"] if rows else "",
           "precision": args.precision, "batch": args.batch, "machine": platform.machine(),
           "seconds": round(time.time() - t_start)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    worst = max((r["rel"] for r in rows), default=float("nan"))
    lines = [
        "# Logit parity with PyTorch", "",
        f"Measured {env['date']} with `python scripts/parity_report.py --models {' '.join(args.models)} --sizes "
        f"{' '.join(args.sizes)}`: jax {env['jax']} on {env['jax_device']}, torch {env['torch']} on "
        f"{env['torch_device']}, precision `{args.precision}`, batch {args.batch} of standard-normal "
        "inputs, random weights with randomised BatchNorm statistics and affine parameters. "
        f"{sum(r['passed'] for r in rows)}/{len(rows)} pass; worst ‖Δ‖/‖ref‖ {worst:.2e}. "
        f"Raw numbers: [{out.with_suffix('.json').name}]({out.with_suffix('.json').name}).", "",
        "| model | params | framework | BN | input | max abs Δ | ‖Δ‖/‖ref‖ | top-1 | top-5 | result |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['framework']} | "
                     f"{'folded' if r['fold_bn'] else 'kept'} | {r['size'][0]}×{r['size'][1]} | "
                     f"{r['max_abs']:.2e} | {r['rel']:.2e} | {r['top1']:.0%} | {r['top5']:.0%} | "
                     f"{'pass' if r['passed'] else '**FAIL**'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} ({len(rows)} rows, {env['seconds']} s)")


if __name__ == "__main__":
    main()
