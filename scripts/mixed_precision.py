"""How far bfloat16 / float16 compute puts the logits from float32, per model and framework.

    python scripts/mixed_precision.py [--models resnet50 googlenet] [--size 224 224] [--batch 8]

Each model gets random weights with randomised norm statistics (the parity tests' references),
converted once; the logits of the same model built with `dtype=bfloat16` / `float16` (parameters
and BatchNorm statistics float32, convolutions in the half type) are compared with its float32
logits, in inference mode and in training mode (batch statistics). Prints a table and writes
JSON (default docs/mixed_precision.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def measure(arch: str, framework: str, size: tuple[int, int], batch: int) -> list[dict]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    import zoo.haiku
    import zoo.training as zt
    from converters.convert import convert_state_dict
    from converters.state_dict import load_state_dict
    from converters.torch_models import random_model
    from converters.verify import compare, inputs

    sd = load_state_dict(random_model(arch))
    x = inputs(batch, size)
    rows = []
    outputs = {}
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        converted = convert_state_dict(arch, sd, framework, dtype=dtype)
        if framework == "haiku":
            model = zoo.haiku.build(converted.loaded.plan, dtype)
            params, state = converted.objects
            images = x.transpose(0, 2, 3, 1)
        else:
            model, state = converted.objects
            params, images = model, x
        forward = zt._forward(model)
        for training in (False, True):
            out, _ = eqx.filter_jit(lambda p, s, x, t=training: forward(p, s, x, jax.random.key(0), t))(
                params, state, images)
            out = out.logits if hasattr(out, "logits") else out
            outputs[(jnp.dtype(dtype).name, training)] = np.asarray(out, np.float32)
    for half in ("bfloat16", "float16"):
        for training in (False, True):
            c = compare(outputs[("float32", training)], outputs[(half, training)])
            rows.append({"arch": arch, "framework": framework, "dtype": half,
                         "mode": "training" if training else "inference", "rel": c["rel"],
                         "max_abs": c["max_abs"], "top1": c["top1"], "top5": c["top5"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "googlenet"])
    ap.add_argument("--size", nargs=2, type=int, default=[224, 224])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="docs/mixed_precision.json")
    args = ap.parse_args()

    import jax

    rows = [r for arch in args.models for fw in ("haiku", "equinox")
            for r in measure(arch, fw, tuple(args.size), args.batch)]
    print("| model | framework | compute | mode | ‖Δ‖/‖fp32‖ | max abs Δ | top-1 agreement | top-5 overlap |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['framework']} | {r['dtype']} | {r['mode']} | {r['rel']:.2e} | {r['max_abs']:.3f} "
              f"| {r['top1']:.3f} | {r['top5']:.3f} |")
    meta = {"size": args.size, "batch": args.batch, "jax": jax.__version__, "device": str(jax.devices()[0]),
            "platform": platform.platform()}
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
