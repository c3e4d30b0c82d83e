import functools
import os
import importlib.util
from pathlib import Path

# Tests compile into no shared cache (zoo's default is the user's cache folder); tests of the cache
# itself run their own processes with their own directory.
os.environ["ZOO_COMPILATION_CACHE"] = "0"


def _omp_threads_per_worker() -> None:
    """Under pytest-xdist (the README's `-n 2`) the workers share the machine's cores. PyTorch's
    OpenMP team in each worker, as many threads as cores, then outnumbered the cores, and its
    threads' spin-waiting between parallel regions took the CPU from the other worker's XLA
    compiles: tests/test_parity.py with `-n 2` on 2 cores took 240 s, and 132 s with one thread a
    worker. Set before torch is first imported (nothing imports it before this file); a value the
    user gave is kept. The fp32 training references set their own count (test_training.py)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


_omp_threads_per_worker()

import jax  # noqa: E402
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


@functools.lru_cache(maxsize=None)
def load_script(name: str):
    """A module of scripts/ (not a package), imported once, for tests of what the scripts do."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# --- training mode ----------------------------------------------------------------------------


def torch_train_step(model, x: np.ndarray):
    """One training-mode forward of a copy of `model` (in its dtype): logits and updated state."""
    import copy

    import torch

    model = copy.deepcopy(model).train()
    with torch.no_grad():
        out = model(torch.from_numpy(x).to(next(model.parameters()).dtype)).double().numpy()
    return out, {k: v.double().numpy() for k, v in model.state_dict().items()}


def jax_train_forward(converted, framework: str, x: np.ndarray):
    """One jitted training-mode forward of a converted model on NCHW `x`: outputs and the
    PyTorch-named parameters and updated statistics."""
    import equinox as eqx
    import jax.numpy as jnp

    import zoo.equinox
    import zoo.haiku

    if framework == "haiku":
        net = zoo.haiku.build(converted.loaded.plan)
        params, state = converted.objects
        apply = jax.jit(functools.partial(net.apply, is_training=True))
        out, state = apply(params, state, None, jnp.asarray(x.transpose(0, 2, 3, 1)))
        return out, zoo.haiku.named_arrays(params, state)
    model, state = converted.objects

    @eqx.filter_jit
    def forward(model, state, x):
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    out, state = forward(model, state, jnp.asarray(x))
    return out, zoo.equinox.named_arrays(model, state)


def close_to_float64(ref64, ref32, out, floor: float = 1e-5):
    """Training-mode BatchNorm divides by batch standard deviations, which amplifies fp32 rounding
    (PyTorch's own fp32 result can be ~3e-5 from its float64 one on random weights). So the JAX
    result must be within `floor`, or no further than 1.5x PyTorch fp32's distance, from float64."""
    ours, theirs = rel_err(ref64, out), rel_err(ref64, ref32)
    return ours <= max(floor, 1.5 * theirs), (ours, theirs)


def ci_models() -> list[str]:
    """The registry's CI models (`registry.get(name).ci`); the slow tests take every model."""
    from zoo import registry

    return [n for n in registry.list_models() if registry.get(n).ci]


def shallow_overrides(arch: str) -> dict:
    """Overrides giving at most two blocks per stage (the first, with its downsample, and one
    after it; deeper stages repeat the second's program): a ResNet-152 traces and compiles in a
    fraction of the time, and every kind of block and option is still there."""
    from zoo import registry

    layers = getattr(registry.get_spec(arch), "layers", None)
    return {} if layers is None else {"layers": tuple(min(n, 2) for n in layers)}


def shallow_ci_models() -> list:
    """The CI models at `shallow_overrides`, one per distinct spec: at two blocks per stage
    resnet50, resnet101 and resnet152 are one model, as are the two wide ResNets. Parameters
    `arch`, with ids naming every model a case stands for."""
    from zoo import registry

    cases: dict[str, list[str]] = {}
    for name in ci_models():
        cases.setdefault(repr(registry.get_spec(name, **shallow_overrides(name))), []).append(name)
    return [pytest.param(names[0], id="+".join(names)) for names in cases.values()]
