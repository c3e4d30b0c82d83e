"""Which seeds give a kink-free training-parity reference for each spec option (see
`tests/test_training.py::parity_reference`): runs that test's comparison for candidate seeds, both
frameworks, and prints the failures per seed.

    python scripts/training_parity_seeds.py [--options basic resnest] [--seeds 1 2 3 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--options", nargs="+")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4])
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    from tests import test_training as t

    for key in args.options or list(t.GRAD_PARITY):
        for seed in args.seeds:
            model, sd, x, labels = t.parity_reference(key, seed)
            refs32 = t.fp32_references(model, x, labels, ("sgd", "adamw"))
            ref64 = t.torch_run(model, x.astype(np.float64), labels, torch.float64)
            start = {k: np.asarray(v, np.float64) for k, v in sd.items()}
            bad = {fw: t.parity_failures(ref64, refs32, t.zoo_run(key, seed, fw), start) for fw in t.FRAMEWORKS}
            jax.clear_caches()  # each run compiles new programs; JAX would keep them all
            verdict = "ok" if not any(bad.values()) else "; ".join(f"{fw}: {len(b)} off ({b[0]})" for fw, b in bad.items() if b)
            print(f"{key} seed {seed}: {verdict}", flush=True)


if __name__ == "__main__":
    main()
