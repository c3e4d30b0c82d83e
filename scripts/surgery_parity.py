"""Model surgery against PyTorch, every option in both frameworks, at full depth: a table and JSON.

CI (tests/test_surgery.py) runs each option in one framework, at one block per stage; this runs
the full networks and both frameworks. For each model and option, the zoo file made by conversion
with that option is compared with the PyTorch model built with it (timm's features_only /
num_classes / global_pool / in_chans; torchvision's GoogLeNet with the same surgery by hand), on
random weights with randomised BatchNorm statistics, at an odd, non-square size, fp32 at highest
precision: the worst ‖Δ‖/‖ref‖ over the outputs (every feature map).

    .venv/bin/python scripts/surgery_parity.py [--models resnet50 googlenet] [--json docs/surgery_parity.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIONS = {
    "features_only": dict(features_only=True),
    "features_only, out_indices=(1, 3)": dict(features_only=True, out_indices=(1, 3)),
    "num_classes=0": dict(num_classes=0),
    "num_classes=0, global_pool=''": dict(num_classes=0, global_pool=""),
    "in_chans=1": dict(in_chans=1),
    "in_chans=4, num_classes=7": dict(in_chans=4, num_classes=7),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["ecaresnet26t", "resnet50", "googlenet"])
    ap.add_argument("--size", nargs=2, type=int, default=(225, 257))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import jax
    import timm
    import torch

    from converters.convert import convert_state_dict
    from converters.state_dict import load_state_dict
    from converters.torch_models import random_model, torch_model
    from converters.verify import inputs, reference_state_dict
    from zoo import registry
    from zoo.model import make_predict

    jax.config.update("jax_default_matmul_precision", "highest")
    rows = []
    for arch in args.models:
        sd = load_state_dict(random_model(arch))
        src_plan = registry.get_spec(arch).plan()
        for label, surgery in OPTIONS.items():
            reference = torch_model(arch, **surgery)
            row = {"model": arch, "option": label}
            for framework in ("haiku", "equinox"):
                t0 = time.perf_counter()
                loaded = convert_state_dict(arch, sd, framework, overrides=surgery).loaded
                ref_sd = reference_state_dict(sd, src_plan, loaded)
                reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ref_sd.items()}, strict=False)
                x = inputs(2, tuple(args.size), surgery.get("in_chans", 3))
                with torch.no_grad():
                    ref = reference.eval()(torch.from_numpy(x))
                out = make_predict(loaded)(x)
                refs = [r.numpy() for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
                outs = [np.asarray(o) for o in (out if isinstance(out, list) else [out])]
                assert [r.shape for r in refs] == [o.shape for o in outs]
                rel = max(float(np.linalg.norm(o.astype(np.float64) - r) / np.linalg.norm(r)) for r, o in zip(refs, outs))
                row[framework] = rel
                row["shapes"] = [list(r.shape) for r in refs]
                print(f"{arch:14s} {label:36s} {framework:8s} {rel:.1e}  ({time.perf_counter() - t0:.1f} s)", flush=True)
            rows.append(row)
    worst = max(max(r["haiku"], r["equinox"]) for r in rows)
    print(f"\nworst ‖Δ‖/‖ref‖ {worst:.1e} over {2 * len(rows)} cases (bar: 1e-5)")
    if args.json:
        meta = {"jax": jax.__version__, "torch": torch.__version__, "timm": timm.__version__,
                "device": str(jax.devices()[0]), "machine": platform.machine(), "size": list(args.size),
                "batch": 2, "precision": "highest"}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
