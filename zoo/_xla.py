"""XLA compiler options for zoo's own jitted inference functions (`predict`, `make_eval_step`).

On a CPU, this jaxlib hands most convolutions to YNNPACK as library fusions (`ynn_fusion` in the
optimized HLO). XLA's own convolution emitter ran zoo's ResNet-50 faster on the benchmark's 2-core
CPU (docs/benchmarks.md, "Why XLA:CPU loses to PyTorch here"), with logits within 1e-6 of the
YNNPACK ones. So zoo compiles its inference functions with YNNPACK's convolutions taken away, per
function (`jax.jit(..., compiler_options=...)`): the user's other programs are left alone, and so
is a GPU. YNNPACK's reductions are taken away too: a reduction fusion takes in the producers of the
classifier's global pool, convolutions included (a ResNet-18 at batch 1, 224²: all of layer4),
which then ran at half speed (ResNet-18 batch 1: 50-61 ms with them, 24-25 ms without; SE and ECA
nets, whose attention pools are reductions, lose 5-9%; docs/benchmarks.md). And YNNPACK's
reductions did not carry NaNs through ReLU's maximum: without them the logits were NaN where
PyTorch's are (`ops.relu` is now a select on a CPU, which carries them under either setting).

Training steps keep JAX's default: the option was faster there too, but a different convolution
algorithm rounds differently, and one of the seed-chosen fp32 training-parity tests then crossed a
ReLU kink (tiered-stem Haiku: 32 gradients off). Users who want it for training set
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`.

- `ZOO_CPU_XLA_CONV=0` (or `false`/`off`/`no`) keeps JAX's default;
- a YNN fusion setting the user gave in `XLA_FLAGS` is kept;
- another jaxlib than 0.10 gets none: the option is experimental, and the value below is 0.10's
  default list less convolutions and reductions.
"""

from __future__ import annotations

import os
from typing import Any

from ._cache import switched_off

_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10's default list less convolutions and reductions: what
# `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,-LIBRARY_FUSION_TYPE_REDUCE`
# gives (compiler options take a whole list, not the flag's +/- edits).
_CPU_CONV = {_YNN_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def jit_options() -> dict[str, Any]:
    """Keyword arguments for `jax.jit`/`eqx.filter_jit` of a zoo function: `compiler_options`
    when zoo's CPU convolution setting applies, else nothing."""
    if switched_off("ZOO_CPU_XLA_CONV"):
        return {}
    if _YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
        return {}
    import jax

    if jax.default_backend() != "cpu" or not _supported():
        return {}
    return {"compiler_options": dict(_CPU_CONV)}


def _supported() -> bool:
    # A version check, not a probe compilation (30-40 ms in every process that loads a model).
    import jaxlib.version

    return jaxlib.version.__version__.startswith("0.10.")
