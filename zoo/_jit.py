"""A leaner `eqx.filter_jit` for zoo's steps: the same partition (JAX and NumPy arrays are traced,
every other leaf is held static), less host work per call.

Why: a training step is called with the whole `TrainState` (model, BatchNorm state, optimizer
state) and returns a new one. `eqx.filter_jit` spent 4.8-6.4 ms of Python per call on an Equinox
ResNet-50's state (1.2-1.7 ms on Haiku's) before and after the compiled program, measured with a
step that computes nothing; on an H200 the Equinox step's calls were 3.5 ms longer than its kernels
beyond Haiku's (docs/benchmarks.md). Here one flatten per argument, one cache lookup and one
unflatten of the result remain (1.9 ms and 0.8 ms on the same states). The function is traced for
the platform its arguments are on (`ops.tracing_for`).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import numpy as np

from . import ops

_tu = jax.tree_util


def _traced(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))  # what eqx.is_array traces


def _split(tree: Any) -> tuple[tuple[Any, tuple[bool, ...], tuple[Any, ...]], list[Any]]:
    """(treedef, which leaves are traced, the static leaves in place) and the traced leaves."""
    leaves, treedef = _tu.tree_flatten(tree)
    mask = tuple(map(_traced, leaves))
    static = tuple(None if m else leaf for leaf, m in zip(leaves, mask))
    return (treedef, mask, static), [leaf for leaf, m in zip(leaves, mask) if m]


def _join(spec: tuple[Any, tuple[bool, ...], tuple[Any, ...]], traced: Sequence[Any]) -> Any:
    treedef, mask, static = spec
    it = iter(traced)
    return _tu.tree_unflatten(treedef, [next(it) if m else s for m, s in zip(mask, static)])


def platform_of(leaves: Iterable[Any]) -> Optional[str]:
    """Where a computation on these leaves runs: the first JAX array's platform (JAX and zoo's
    steps keep arguments on one device or one mesh); NumPy arrays alone: JAX's default backend;
    inside another transformation (tracers only): unknown."""
    tracer = False
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            tracer = True
        elif isinstance(leaf, jax.Array):
            return next(iter(leaf.devices())).platform
    return None if tracer else jax.default_backend()


class Jitted:
    """`fn` jitted over the array leaves of its positional arguments; `donate_argnums` donates
    those arguments' arrays. Other keyword arguments go to `jax.jit`. One compiled program per
    tree structure and static leaves (which must be hashable), as with `eqx.filter_jit`; the
    result's structure and static leaves are taken to depend on those alone, not on shapes (true
    of zoo's steps: a new shape retraces, and the result is rebuilt with the latest trace's)."""

    def __init__(self, fn: Callable[..., Any], *, donate_argnums: Sequence[int] = (), **jit_kwargs: Any):
        self._fn = fn
        self._donate = tuple(donate_argnums)
        self._jit_kwargs = jit_kwargs
        self._cache: dict[Any, tuple[Any, dict[str, Any]]] = {}

    def _entry(self, args: tuple[Any, ...]) -> tuple[Any, dict[str, Any], list[list[Any]]]:
        specs, traced = zip(*map(_split, args)) if args else ((), ())
        platform = platform_of(itertools.chain.from_iterable(traced))
        # Types first: a C-speed pass over the leaves, then a handful of subclass checks.
        types = set(map(type, itertools.chain.from_iterable(traced)))
        nested = any(issubclass(t, jax.core.Tracer) for t in types)
        key = (tuple(specs), platform, nested)
        entry = self._cache.get(key)
        if entry is None:
            out: dict[str, Any] = {}

            def inner(*traced_args: list[Any]) -> list[Any]:
                with ops.tracing_for(platform):
                    result = self._fn(*(_join(s, t) for s, t in zip(key[0], traced_args)))
                out["spec"], leaves = _split(result)
                return leaves

            kwargs = _nested_options(self._jit_kwargs) if nested else self._jit_kwargs
            entry = self._cache[key] = (jax.jit(inner, donate_argnums=self._donate, **kwargs), out)
        return entry[0], entry[1], list(traced)

    def __call__(self, *args: Any) -> Any:
        jitted, out, traced = self._entry(args)
        result = jitted(*traced)  # the first call traces, which sets out["spec"]
        return _join(out["spec"], result)

    def lower(self, *args: Any) -> Any:
        """JAX's `Lowered` for these arguments (`.compile().as_text()`: the optimized program)."""
        jitted, _, traced = self._entry(args)
        return jitted.lower(*traced)


def _nested_options(jit_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`jax.jit` options for a call inside the caller's own transformation: JAX takes compiler
    options only on a top-level jit (a ValueError otherwise), and the caller's program is compiled
    with its own."""
    return {k: v for k, v in jit_kwargs.items() if k != "compiler_options"}


def jit(fn: Callable[..., Any], *, donate_argnums: Sequence[int] = (), **jit_kwargs: Any) -> Jitted:
    return Jitted(fn, donate_argnums=donate_argnums, **jit_kwargs)


class TopLevel:
    """`jax.jit(fn, **jit_kwargs)` for calls whose last argument is concrete; called with a traced
    one (inside the caller's own `jax.jit` or `jax.grad`), `fn` jitted without `compiler_options`,
    which JAX accepts only on a top-level jit. For functions whose other arguments are bound
    arrays (`zoo.Model`'s Haiku predict), so that one isinstance check decides."""

    def __init__(self, fn: Callable[..., Any], **jit_kwargs: Any):
        self._top = jax.jit(fn, **jit_kwargs)
        plain = _nested_options(jit_kwargs)
        self._nested = jax.jit(fn, **plain) if plain != jit_kwargs else self._top

    def __call__(self, *args: Any) -> Any:
        return (self._nested if isinstance(args[-1], jax.core.Tracer) else self._top)(*args)

    def lower(self, *args: Any) -> Any:
        return self._top.lower(*args)

