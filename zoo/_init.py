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
import math
from typing import Any, Callable, Iterator, Optional, TypeVar

T = TypeVar("T")

_SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("zoo_shapes_only", default=False)


def shapes_only() -> contextlib.AbstractContextManager[None]:
    return _set(_SHAPES_ONLY, True)


def active() -> bool:
    return _SHAPES_ONLY.get()


# --- one draw per distribution ----------------------------------------------------------------
#
# Each parameter drawn on its own made XLA expand a random-number generator per parameter shape
# (RngBitGenerator's rounds, ~500 fusions for GoogLeNet): its initialisation compiled for 9.6 s
# on 2 CPU cores, a ResNet-50 with one block per stage for 3.2 s. `one_draw` traces the model's
# initialisation once for shapes, recording what each initialiser asks for in call order, then
# draws every normal parameter as one vector and every uniform one as another, and runs the
# initialisation again handing out consecutive slices (GoogLeNet 2.3 s, ResNet-50 1.0 s).

_REQUESTS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("zoo_init_requests", default=None)
_SUPPLY: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("zoo_init_supply", default=None)
_KINDS = ("normal", "uniform")


@contextlib.contextmanager
def _set(var: contextvars.ContextVar, value: object) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def rbg_key(key: Any) -> Any:
    """`key` (typed, or raw uint32 words) re-keyed for XLA's RngBitGenerator: threefry kernels
    compile slowly on CPU, RBG's are cheap."""
    import jax
    import jax.numpy as jnp

    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = jnp.asarray(data).reshape(-1)
    return jax.random.wrap_key_data(jnp.concatenate([data, data])[:4].astype(jnp.uint32), impl="rbg")


def initial(kind: str, shape: tuple[int, ...], scale: float, key: Callable[[], Any]) -> Any:
    """A parameter's initial value in float32: `scale` times a standard normal (`kind` "normal"),
    or uniform on [-scale, scale) ("uniform"). Zeros for a template; a slice of the one draw inside
    `one_draw`; else its own draw from `key()` (called only then)."""
    import jax
    import jax.numpy as jnp

    requests, supply = _REQUESTS.get(), _SUPPLY.get()
    if active() or requests is not None:
        if requests is not None:
            requests.append((kind, shape))
        return jnp.zeros(shape, jnp.float32)
    if supply is not None:
        flat, start = supply[kind]
        size = math.prod(shape)
        supply[kind] = (flat, start + size)
        unit = jax.lax.slice(flat, (start,), (start + size,)).reshape(shape)
    elif kind == "normal":
        unit = jax.random.normal(rbg_key(key()), shape, jnp.float32)
    else:
        unit = jax.random.uniform(rbg_key(key()), shape, jnp.float32)
    return scale * unit if kind == "normal" else scale * (2 * unit - 1)


def one_draw(init: Callable[[], T], key: Any) -> T:
    """`init()`, a model's whole random initialisation (traced: call it inside `jit`), with every
    parameter taken from one normal and one uniform draw keyed by `key`."""
    import jax
    import jax.numpy as jnp

    if active() or key is None:  # a template draws nothing; without a key the model's own error
        return init()                # (Haiku's MissingRNGError) says what is missing
    requests: list = []
    with _set(_REQUESTS, requests):
        jax.eval_shape(lambda: (init(), None)[1])
    sizes = {k: sum(math.prod(shape) for kind, shape in requests if kind == k) for k in _KINDS}
    normal_key, uniform_key = jax.random.split(rbg_key(key))
    supply = {"normal": (jax.random.normal(normal_key, (sizes["normal"],), jnp.float32), 0),
              "uniform": (jax.random.uniform(uniform_key, (sizes["uniform"],), jnp.float32), 0)}
    with _set(_SUPPLY, supply):
        out = init()
    assert all(supply[k][1] == sizes[k] for k in _KINDS), "the two initialisations asked for different draws"
    return out
