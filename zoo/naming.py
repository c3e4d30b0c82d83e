"""Name rules between PyTorch module paths and the frameworks' parameter trees.

Parameters are addressed everywhere by their PyTorch names (`layer1.0.conv1.weight`); each
framework maps its own tree to those names with the few rules below, never with per-layer tables.
"""

from __future__ import annotations

import re

import numpy as np

# Haiku module names must be Python identifiers, so a Sequential index joins its parent with "_":
# PyTorch `layer1.0.downsample.0` is Haiku module `layer1_0/downsample_0`.
_INDEXED = re.compile(r"^(.*[^_\d].*?)_(\d+)$")

# Haiku leaf name -> PyTorch leaf name. Reverse lookups go through the target tree, which knows
# whether a module's "weight" is a kernel (`w`) or a norm scale (`scale`).
HAIKU_LEAVES = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias",
                "mean": "running_mean", "var": "running_var"}


def haiku_module(torch_module: str) -> str:
    out: list[str] = []
    for part in torch_module.split("."):
        if part.isdigit():
            if not out:
                raise ValueError(f"module path {torch_module!r} starts with an index")
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return "/".join(out)


def torch_module(haiku_module_path: str) -> str:
    parts = []
    for part in haiku_module_path.split("/"):
        # A component may carry several indices (`conv1_0_1` never occurs in our trees, but the
        # rule stays reversible for it).
        idx: list[str] = []
        while (m := _INDEXED.match(part)) is not None:
            part, i = m.group(1), m.group(2)
            idx.insert(0, i)
        parts.extend([part, *idx])
    return ".".join(parts)


def haiku_from_torch_layout(a: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO for conv kernels, (out, in) -> (in, out) for Linear, OIW -> WIO for 1-D convs:
    spatial axes first, then input, then output. Vectors are unchanged."""
    if a.ndim < 2:
        return a
    return np.transpose(a, (*range(2, a.ndim), 1, 0))


def torch_from_haiku_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim < 2:
        return a
    n = a.ndim
    return np.transpose(a, (n - 1, n - 2, *range(0, n - 2)))
