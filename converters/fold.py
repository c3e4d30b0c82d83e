"""Folding BatchNorm into the bias-free conv before it, on PyTorch-named arrays."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from zoo.checked import ConversionError


def fold_batchnorm(sd: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]],
                   eps: Mapping[str, float]) -> dict[str, np.ndarray]:
    """For every (conv, norm) pair: w' = w * g/sqrt(v+eps), b' = beta - mean * g/sqrt(v+eps).

    Computed in float64 so the fold itself adds no error beyond the final rounding to the conv
    weight's dtype (float32, or float64 for float64 reference checks).
    Every norm tensor is consumed; the conv gains a bias (adding to one it already has).
    """
    out = dict(sd)
    leaves = ("weight", "bias", "running_mean", "running_var")
    missing = [f"{n}.{leaf}" for _, n in pairs for leaf in leaves if f"{n}.{leaf}" not in sd]
    missing += [f"{c}.weight" for c, _ in pairs if f"{c}.weight" not in sd]
    if missing:
        raise ConversionError(missing=missing, context="cannot fold BatchNorm")
    for conv, norm in pairs:
        g, beta, mean, var = (sd[f"{norm}.{leaf}"].astype(np.float64) for leaf in leaves)
        w = sd[f"{conv}.weight"].astype(np.float64)
        bias = sd.get(f"{conv}.bias", np.zeros(w.shape[0])).astype(np.float64)
        factor = g / np.sqrt(var + eps[norm])
        dtype = np.result_type(sd[f"{conv}.weight"].dtype, np.float32)
        out[f"{conv}.weight"] = (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(dtype)
        out[f"{conv}.bias"] = (beta + (bias - mean) * factor).astype(dtype)
        for leaf in leaves:
            del out[f"{norm}.{leaf}"]
    return out
