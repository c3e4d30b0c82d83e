import functools

import jax
import numpy as np
import pytest

from converters.torch_models import random_model


@pytest.fixture(autouse=True)
def highest_precision():
    # Exact comparisons need true fp32 (no TF32/bf16 passes) wherever JAX would otherwise choose.
    with jax.default_matmul_precision("highest"):
        yield


@functools.lru_cache(maxsize=2)
def cached_random_model(arch: str, library: str | None = None, seed: int = 0):
    """A reference model with random weights and randomised norm statistics (eval mode)."""
    return random_model(arch, library, seed=seed)


def rel_err(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
