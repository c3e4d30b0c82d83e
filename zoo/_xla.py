"""XLA compiler options for zoo's own jitted inference functions (`predict`, `make_eval_step`).

On a CPU, this jaxlib hands most convolutions to YNNPACK as library fusions (`ynn_fusion` in the
optimized HLO). XLA's own convolution emitter ran zoo's ResNet-50 faster on the benchmark's 2-core
CPU (docs/benchmarks.md, "Why XLA:CPU loses to PyTorch here"), with logits within 1e-6 of the
YNNPACK ones. So zoo compiles its inference functions with YNNPACK's convolutions taken away, per
function (`jax.jit(..., compiler_options=...)`): the user's other programs are left alone, and so
is a GPU.

Training steps keep JAX's default: the option was faster there too, but a different convolution
algorithm rounds differently, and one of the seed-chosen fp32 training-parity tests then crossed a
ReLU kink (tiered-stem Haiku: 32 gradients off). Users who want it for training set
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`.

- `ZOO_CPU_XLA_CONV=0` (or `false`/`off`/`no`) keeps JAX's default;
- a YNN fusion setting the user gave in `XLA_FLAGS` is kept;
- a jaxlib that does not know the option (it is experimental) gets none.
"""

from __future__ import annotations

import functools
import os
from typing import Any

_OFF = {"0", "false", "off", "no"}
_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10's default list less convolutions: the optimized HLO of a ResNet-50 forward is the
# one `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`
# gives (compiler options take a whole list, not the flag's +/- edits).
_CPU_CONV = {_YNN_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def jit_options() -> dict[str, Any]:
    """Keyword arguments for `jax.jit`/`eqx.filter_jit` of a zoo function: `compiler_options`
    when zoo's CPU convolution setting applies, else nothing."""
    if os.environ.get("ZOO_CPU_XLA_CONV", "1").strip().lower() in _OFF:
        return {}
    if _YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
        return {}
    import jax

    if jax.default_backend() != "cpu" or not _supported():
        return {}
    return {"compiler_options": dict(_CPU_CONV)}


@functools.cache
def _supported() -> bool:
    import jax
    import numpy as np

    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_CONV).lower(np.float32(0)).compile()
    except Exception:  # an unknown option is a plain RuntimeError/XlaRuntimeError, version-dependent
        return False
    return True
