"""Shapes-only initialisation, shared by the Haiku and Equinox layers.

A template (the parameter tree with shapes for leaves, which conversion and loading fill) is the
model's initialisation traced under `jax.eval_shape`. Tracing the random-number draws was most of
that cost (and of a first `zoo convert` in a process), though no number is ever drawn: inside
`shapes_only()` the initialisers stage zeros of the same shape and dtype instead.

Set it only inside a function made for the template (a fresh transform, a separate builder), never
around a call of a shared jitted function: jit's caches do not see context variables.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("zoo_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def active() -> bool:
    return _SHAPES_ONLY.get()
