"""Checked loading: every source tensor used once, every target leaf filled once."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np


class ConversionError(ValueError):
    """Source tensors and target leaves do not match; lists every problem, not the first."""

    def __init__(self, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 misshaped: Sequence[tuple[str, tuple, tuple]] = (), context: str = ""):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.misshaped = sorted(misshaped)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {', '.join(self.unexpected)}")
        if self.misshaped:
            parts.append(f"{len(self.misshaped)} mis-shaped: " + ", ".join(
                f"{k} (source {tuple(s)} vs target {tuple(t)}, in the target layout)" for k, s, t in self.misshaped))
        prefix = f"{context}: " if context else ""
        super().__init__(prefix + "; ".join(parts))


def checked_merge(source: Mapping[str, np.ndarray], target: Mapping[str, tuple[int, ...]],
                  transform: Callable[[np.ndarray], np.ndarray] = lambda a: a,
                  context: str = "") -> dict[str, np.ndarray]:
    """Map `source` onto the names and shapes of `target` (both keyed by PyTorch names).

    `transform` turns a source array into the target layout before its shape is checked. Raises
    `ConversionError` with all missing, unexpected and mis-shaped names at once.
    """
    out: dict[str, np.ndarray] = {}
    unexpected, misshaped = [], []
    for name, array in source.items():
        if name not in target:
            unexpected.append(name)
            continue
        value = transform(np.asarray(array))
        if tuple(value.shape) != tuple(target[name]):
            misshaped.append((name, tuple(value.shape), tuple(target[name])))
            continue
        out[name] = value
    missing = [n for n in target if n not in source]
    if missing or unexpected or misshaped:
        raise ConversionError(missing, unexpected, misshaped, context)
    return out
