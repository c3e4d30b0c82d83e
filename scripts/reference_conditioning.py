"""How well conditioned are the random reference models? PyTorch's own fp32 logits against its
float64 logits, same weights and inputs: two fp32 implementations cannot be expected to agree
more closely than this, so it must stay well under the 1e-5 parity bar.

    python scripts/reference_conditioning.py resnet50 resnest269e googlenet
    python scripts/reference_conditioning.py resnest50d_4s2x40d --trace 'layer[34]\\.\\d+$'

Prints, per model, ‖fp32 − f64‖/‖f64‖ of the logits, their rms and how much they vary across the
batch (‖x₀ − x₁‖/‖x‖: near 0 means the logits hardly depend on the input). `--trace REGEX` adds
the same error and the rms for every module whose name matches, in forward order: where the
rounding is amplified.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def conditioning(name: str, *, size: tuple[int, int] = (97, 131), batch: int = 2, seed: int = 1,
                 trace: str | None = None, model=None) -> dict:
    """`model`: the reference to measure (left unchanged), by default `random_model(name)`."""
    import torch

    from converters.torch_models import random_model

    model = (random_model(name) if model is None else model).eval()
    model64 = copy.deepcopy(model).double()
    outputs: dict[tuple[str, str], "torch.Tensor"] = {}
    hooks = []
    if trace:
        pattern = re.compile(trace)
        for tag, m in (("32", model), ("64", model64)):
            for n, mod in m.named_modules():
                if n and pattern.search(n):
                    # A clone: in-place activations would overwrite the recorded output.
                    def record(mod, args, out, key=(tag, n)):
                        if torch.is_tensor(out):
                            outputs.setdefault(key, out.detach().double().clone())
                    hooks.append(mod.register_forward_hook(record))
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out32 = model(x).double()
        out64 = model64(x.double())
    for h in hooks:
        h.remove()

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()

    row = {"model": name, "fp32_vs_f64": rel(out32, out64), "logit_rms": out64.square().mean().sqrt().item(),
           "spread": ((out64[0] - out64[-1]).norm() / out64.norm()).item(), "trace": []}
    for (tag, n), o64 in outputs.items():
        if tag == "64" and ("32", n) in outputs:
            row["trace"].append((n, rel(outputs["32", n], o64), o64.square().mean().sqrt().item()))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--size", default="97x131")
    ap.add_argument("--trace", help="Regex over module names to trace.")
    args = ap.parse_args()
    size = tuple(int(s) for s in args.size.split("x"))
    print(f"{'model':28s} {'fp32 vs f64':>11s} {'logit rms':>9s} {'spread':>8s} {'time':>6s}")
    for name in args.models:
        t = time.perf_counter()
        r = conditioning(name, size=size, trace=args.trace)
        print(f"{name:28s} {r['fp32_vs_f64']:11.2e} {r['logit_rms']:9.2f} {r['spread']:8.2e} "
              f"{time.perf_counter() - t:5.0f}s", flush=True)
        for n, e, rms in r["trace"]:
            print(f"  {n:40s} {e:9.1e}  rms {rms:.2e}")


if __name__ == "__main__":
    main()
