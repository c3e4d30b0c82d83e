"""`zoo bench`: zoo's jitted models beside PyTorch, inference and a training step, in one process.

How a number is made:
- Every implementation gets the same batch: `batch` random N(0, 1) images of `size` (made once,
  float32, already on the device) and, for training, the same random labels.
- One call is timed from the Python call until its result is ready: `block_until_ready` for JAX,
  `torch.cuda.synchronize()` on a GPU (PyTorch on a CPU returns when it is done). Calls are
  therefore never overlapped with the next one, on either side.
- The first call is timed on its own and reported as `first_call_s`: JAX's tracing and XLA
  compilation (or a load from zoo's persistent compilation cache, whose folder `meta` records;
  `ZOO_COMPILATION_CACHE=0` measures cold compiles), torch.compile's compilation, or PyTorch
  eager's first-call set-up. Then `warmup` untimed calls, then `repeats` timed calls; the row's
  figure is their median, `images_per_s` is batch / median.
- Ratios are speeds relative to a baseline from the same run, baseline median / this median
  (above 1: faster): `vs_torch_compile` and `vs_torch_eager_nchw`. Absolute times on a shared
  machine wander from run to run; ratios taken within one run are the comparable figures.

Inference: zoo's `make_predict` (jitted; parameters passed as arguments, never closed over) on
weights converted from the PyTorch model (random weights, randomised BatchNorm statistics), with
BatchNorm folded into the convs or not; PyTorch under `torch.inference_mode()` in NCHW,
channels_last, and `torch.compile` of the channels_last model. bfloat16: zoo computes in bf16 with
float32 parameters (`dtype=jnp.bfloat16`); PyTorch keeps float32 parameters under
`torch.autocast(bfloat16)`. Inputs are float32 on both sides and cast inside the model.

Training step: forward in training mode (batch statistics, running statistics updated), softmax
cross-entropy on the random labels (GoogLeNet: + 0.3 x each auxiliary head's, as torchvision's
reference scripts), backward, SGD with momentum 0.9. zoo: `zoo.training.make_train_step` with
`optax.sgd` (the state it is given is donated, so each call gets the previous call's result);
PyTorch: `model.train()`, `torch.optim.SGD`, the whole step (forward to `opt.step()`) under
torch.compile for torch-compile-cl. Each implementation starts from a fresh model with the same
weights: PyTorch's initialisation of it, converted for zoo. Compute dtype as for inference.

Rows run in the order PyTorch eager, zoo, torch.compile: torch.compile's compilation is the
longest, so a time limit cuts it first, and `on_row` lets a caller save each row as it arrives.
A failure (a torch.compile without a working C++ compiler, memory) is recorded in its row's
`error` and the run goes on.

JSON written by `zoo bench --json` (`run`'s return value): `{"meta": {...}, "rows": [...]}`.

meta: schema (1), arch, modes (["inference"] / ["train"] / both), impls (selected), batch,
  size [H, W], dtype ("float32" | "bfloat16"), device (asked: auto | cpu | gpu), jax_device
  ("platform:kind"), torch_device ("cpu" | "cuda"), device_name (the GPU's name, else the CPU's
  model), repeats, warmup, cpu {name, count, affinity, torch_threads, torch_interop_threads},
  versions {python, numpy, jax, jaxlib, torch, torchvision, timm, equinox, dm-haiku, optax},
  precision {jax_default_matmul_precision, torch_cudnn_allow_tf32, torch_matmul_allow_tf32},
  jax_compilation_cache (folder or null), xla_flags (the environment's XLA_FLAGS or null),
  zoo_env (the environment's ZOO_* variables, e.g. the ZOO_BN_GRAD and ZOO_CONV_AS_DOT levers), train {optimizer, lr, momentum, aux_weight}, platform,
  started (UTC, ISO 8601).
rows: one per (mode, impl) run, in mode order then IMPLS order: mode ("inference" | "train"),
  impl (a name of IMPLS), label, framework ("pytorch" | "haiku" | "equinox"), bn_folded,
  median_s, times_s (the `repeats` timed calls), first_call_s, images_per_s, vs_torch_compile,
  vs_torch_eager_nchw, error. A failed row has `error` (a string) and null figures; a ratio is
  null when its baseline was not selected or failed.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

SCHEMA = 1
MODES = ("inference", "train")
DTYPES = ("float32", "bfloat16")
LR, MOMENTUM, AUX_WEIGHT = 0.01, 0.9, 0.3


@dataclass(frozen=True)
class Impl:
    label: str
    framework: str
    bn_folded: bool = False


IMPLS: dict[str, Impl] = {
    "torch-eager-nchw": Impl("PyTorch eager, NCHW", "pytorch"),
    "torch-eager-cl": Impl("PyTorch eager, channels_last", "pytorch"),
    "torch-compile-cl": Impl("torch.compile, channels_last", "pytorch"),
    "zoo-haiku": Impl("zoo Haiku, jit", "haiku"),
    "zoo-haiku-folded": Impl("zoo Haiku, jit, BN folded", "haiku", True),
    "zoo-equinox": Impl("zoo Equinox, jit", "equinox"),
    "zoo-equinox-folded": Impl("zoo Equinox, jit, BN folded", "equinox", True),
}
# Execution order within a mode; see the module docstring for why torch.compile comes last.
RUN_ORDER = ("torch-eager-nchw", "torch-eager-cl", "zoo-haiku", "zoo-haiku-folded", "zoo-equinox",
             "zoo-equinox-folded", "torch-compile-cl")
ROW_FIELDS = ("mode", "impl", "label", "framework", "bn_folded", "median_s", "times_s", "first_call_s",
              "images_per_s", "vs_torch_compile", "vs_torch_eager_nchw", "error")


def select_impls(names: Optional[Iterable[str]] = None) -> list[str]:
    """The implementations asked for, in IMPLS order (all of them for None or an empty list);
    names may also be comma-separated."""
    asked = [n.strip() for name in (names or []) for n in name.split(",") if n.strip()]
    unknown = [n for n in asked if n not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation {unknown[0]!r}; expected some of {', '.join(IMPLS)}")
    return [n for n in IMPLS if not asked or n in asked]


def impls_for(mode: str, impls: Sequence[str]) -> list[str]:
    """Those of `impls` that `mode` runs, in execution order: folded BatchNorm is inference-only."""
    return [n for n in RUN_ORDER if n in impls and (mode == "inference" or not IMPLS[n].bn_folded)]


def _measure(call: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, repeats: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    sync(call())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times, "first_call_s": first}


def _error_text(e: BaseException) -> str:
    # torch.compile's errors run to pages; the head says what failed, and JSON keeps enough of it.
    return f"{type(e).__name__}: {e}".strip()[:2000]


# ---------------------------------------------------------------------------------------------
# Environment


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meta(arch: str, modes: Sequence[str], impls: Sequence[str], batch: int, size: tuple[int, int], dtype: str,
          device: str, repeats: int, warmup: int, jdev: Any, tdev: str) -> dict[str, Any]:
    import jax
    import torch

    from . import _cache

    gpu_name = torch.cuda.get_device_name() if tdev == "cuda" else None
    kind = getattr(jdev, "device_kind", "")
    return {
        "schema": SCHEMA, "arch": arch, "modes": list(modes), "impls": list(impls), "batch": batch,
        "size": list(size), "dtype": dtype, "device": device,
        "jax_device": f"{jdev.platform}:{kind}", "torch_device": tdev,
        "device_name": gpu_name or (kind if jdev.platform == "gpu" else _cpu_name()),
        "repeats": repeats, "warmup": warmup,
        "cpu": {"name": _cpu_name(), "count": os.cpu_count(),
                "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()},
        "versions": {"python": platform.python_version(),
                     **{d: _version(d) for d in ("numpy", "jax", "jaxlib", "torch", "torchvision", "timm",
                                                 "equinox", "dm-haiku", "optax")}},
        "precision": {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
                      "torch_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                      "torch_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        "jax_compilation_cache": _cache.enable(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "zoo_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ZOO_")},
        "train": {"optimizer": "sgd", "lr": LR, "momentum": MOMENTUM, "aux_weight": AUX_WEIGHT},
        "platform": platform.platform(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# PyTorch


def _torch_sync(tdev: str) -> Callable[[Any], None]:
    import torch

    return (lambda _: torch.cuda.synchronize()) if tdev == "cuda" else (lambda _: None)


def _autocast(tdev: str, dtype: str):
    import torch

    if dtype == "bfloat16":
        return torch.autocast(device_type=tdev, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_format(impl: str):
    import torch

    return torch.contiguous_format if impl == "torch-eager-nchw" else torch.channels_last


def _torch_inference(model: Any, impl: str, images: Any, tdev: str, dtype: str, warmup: int,
                     repeats: int) -> dict[str, Any]:
    import torch

    fmt = _memory_format(impl)
    model = model.to(memory_format=fmt)
    x = torch.from_numpy(images).to(tdev).contiguous(memory_format=fmt)
    fn = torch.compile(model) if impl == "torch-compile-cl" else model

    def call() -> Any:
        with _autocast(tdev, dtype):
            return fn(x)

    with torch.inference_mode():
        return _measure(call, _torch_sync(tdev), warmup, repeats)


def _torch_train(arch: str, impl: str, state_dict: Any, images: Any, labels: Any, tdev: str, dtype: str,
                 warmup: int, repeats: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from converters.torch_models import torch_model

    fmt = _memory_format(impl)
    model = torch_model(arch)
    model.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()})
    model = model.to(tdev).to(memory_format=fmt).train()
    x = torch.from_numpy(images).to(tdev).contiguous(memory_format=fmt)
    y = torch.from_numpy(labels.astype("int64")).to(tdev)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(x: Any, y: Any) -> Any:
        with _autocast(tdev, dtype):
            out = model(x)
            if hasattr(out, "aux_logits1"):  # torchvision's GoogLeNet in training mode
                loss = F.cross_entropy(out.logits, y) + AUX_WEIGHT * (
                    F.cross_entropy(out.aux_logits1, y) + F.cross_entropy(out.aux_logits2, y))
            else:
                loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    fn = torch.compile(step) if impl == "torch-compile-cl" else step
    return _measure(lambda: fn(x, y), _torch_sync(tdev), warmup, repeats)


# ---------------------------------------------------------------------------------------------
# zoo


def _jax_dtype(dtype: str) -> Any:
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]


def _zoo_inference(arch: str, impl: str, state_dict: Any, images: Any, jdev: Any, dtype: str, warmup: int,
                   repeats: int) -> dict[str, Any]:
    import jax

    from converters.convert import convert_state_dict
    from zoo.model import make_predict

    spec = IMPLS[impl]
    jdtype = _jax_dtype(dtype)
    loaded = convert_state_dict(arch, state_dict, spec.framework, fold_bn=spec.bn_folded, dtype=jdtype).loaded
    with jax.default_device(jdev):
        loaded.objects = jax.device_put(loaded.objects, jdev)
        predict = make_predict(loaded, jdtype)
        x = jax.device_put(images, jdev)
        return _measure(lambda: predict(x), jax.block_until_ready, warmup, repeats)


def _zoo_train(arch: str, impl: str, state_dict: Any, images: Any, labels: Any, jdev: Any, dtype: str,
               warmup: int, repeats: int, remat: bool = False) -> dict[str, Any]:
    import equinox as eqx
    import jax
    import optax

    import zoo.training as zt
    from converters.convert import convert_state_dict

    framework = IMPLS[impl].framework
    jdtype = _jax_dtype(dtype)
    tx = optax.sgd(LR, momentum=MOMENTUM)
    # PyTorch's initial weights, converted (numpy only): zoo's own initialisation, run eagerly,
    # compiled each of its hundreds of small ops on its own, longer than compiling the step.
    loaded = convert_state_dict(arch, state_dict, framework, dtype=jdtype).loaded
    with jax.default_device(jdev):
        params, state = jax.device_put(loaded.objects, jdev)
        if framework == "haiku":
            from zoo.haiku import build

            model: Any = build(loaded.plan, jdtype)
            x = jax.device_put(images.transpose(0, 2, 3, 1), jdev)  # Haiku's models take NHWC
        else:
            model = params
            x = jax.device_put(images, jdev)
        ts = eqx.filter_jit(lambda p, s: zt.TrainState.create(p, s, tx))(params, state)
        step = zt.make_train_step(model, tx, remat=remat)
        y = jax.device_put(labels.astype("int32"), jdev)
        # Committed to the device as the step's outputs are: an uncommitted first state is another
        # jit signature, and the second call would compile again (inside the timed calls).
        ts = jax.tree_util.tree_map(lambda a: jax.device_put(a, jdev) if isinstance(a, jax.Array) else a, ts)
        # Made before timing: splitting inside a call would time a dispatch that is no part of a step.
        # (Cycled: a caller may make more calls than the timed ones, e.g. under a profiler.)
        keys = itertools.cycle(list(jax.random.split(jax.random.key(1), 1 + warmup + repeats)))
        holder = {"ts": ts}
        del ts, params, state, loaded  # the first step donates the state: only the holder's may be used

        def call() -> Any:
            holder["ts"], metrics = step(holder["ts"], x, y, next(keys))
            return metrics["loss"]

        return _measure(call, jax.block_until_ready, warmup, repeats)


# ---------------------------------------------------------------------------------------------
# The run


def _finish(rows: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Rows in display order with images/s and the ratios to the baselines of their mode."""
    order = {(m, n): i for i, (m, n) in enumerate((m, n) for m in MODES for n in IMPLS)}
    rows = sorted(rows, key=lambda r: order[(r["mode"], r["impl"])])
    for r in rows:
        base = {b["impl"]: b["median_s"] for b in rows if b["mode"] == r["mode"] and b["median_s"] is not None}
        ok = r["median_s"] is not None
        r["images_per_s"] = batch / r["median_s"] if ok else None
        for key, baseline in (("vs_torch_compile", "torch-compile-cl"), ("vs_torch_eager_nchw", "torch-eager-nchw")):
            r[key] = base[baseline] / r["median_s"] if ok and baseline in base else None
    return rows


def run(arch: str, *, modes: Sequence[str] = ("inference",), impls: Optional[Iterable[str]] = None, batch: int = 8,
        size: tuple[int, int] = (224, 224), dtype: str = "float32", device: str = "auto", repeats: int = 10,
        warmup: int = 2, remat: bool = False, seed: int = 0,
        on_start: Optional[Callable[[str, str], None]] = None,
        on_row: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Measure `arch` in each of `modes` with each of `impls` (default: all); returns
    `{"meta", "rows"}` (the module docstring describes both). `on_start(mode, impl)` is called
    before each row, `on_row(results)` after it with the results so far. `remat`: zoo's training
    step under `jax.checkpoint`."""
    from zoo import registry

    spec = registry.get(arch).spec  # an unknown name fails before anything heavy is imported
    modes = [m for m in MODES if m in modes]
    if not modes:
        raise ValueError(f"modes: expected some of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch and repeats must be at least 1, warmup at least 0")
    size = (int(size[0]), int(size[1]))
    if min(size) < 1:
        raise ValueError(f"size {size[0]}x{size[1]}: both sides must be positive")
    impls = select_impls(impls)
    if not any(impls_for(m, impls) for m in modes):
        raise ValueError(f"none of {', '.join(impls)} runs in {' or '.join(modes)} mode "
                         f"(BN-folded models are inference-only)")

    # JAX would take 75% of a GPU's memory up front, and PyTorch shares the process. No effect
    # once JAX's GPU backend is up; the caller's own setting wins.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    import numpy as np
    import torch

    from converters.verify import jax_device, torch_device

    jdev, tdev = jax_device(device), torch_device(device)
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, spec.in_chans, *size)).astype(np.float32)
    labels = rng.integers(0, max(spec.num_classes, 1), batch)
    results: dict[str, Any] = {"meta": _meta(arch, modes, impls, batch, size, dtype, device, repeats, warmup,
                                             jdev, tdev), "rows": []}
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] = {}

    def inference_model() -> Any:
        # Built once for all inference rows: zoo's weights are converted from it.
        if "model" not in reference:
            from converters.state_dict import load_state_dict
            from converters.torch_models import random_model

            model = random_model(arch, seed=seed)
            reference["state_dict"] = load_state_dict(model)
            reference["model"] = model.to(tdev)
        return reference["model"]

    def train_weights() -> Any:
        # Every training row starts from these: PyTorch's initialisation, as a numpy state dict.
        if "train" not in reference:
            from converters.state_dict import load_state_dict
            from converters.torch_models import torch_model

            torch.manual_seed(seed)
            reference["train"] = load_state_dict(torch_model(arch))
        return reference["train"]

    for mode in modes:
        for impl in impls_for(mode, impls):
            if on_start:
                on_start(mode, impl)
            spec_i = IMPLS[impl]
            row: dict[str, Any] = {"mode": mode, "impl": impl, "label": spec_i.label, "framework": spec_i.framework,
                                   "bn_folded": spec_i.bn_folded, "median_s": None, "times_s": [],
                                   "first_call_s": None, "error": None}
            try:
                if mode == "inference" and spec_i.framework == "pytorch":
                    row.update(_torch_inference(inference_model(), impl, images, tdev, dtype, warmup, repeats))
                elif mode == "inference":
                    inference_model()
                    row.update(_zoo_inference(arch, impl, reference["state_dict"], images, jdev, dtype, warmup,
                                              repeats))
                elif spec_i.framework == "pytorch":
                    row.update(_torch_train(arch, impl, train_weights(), images, labels, tdev, dtype, warmup,
                                            repeats))
                else:
                    row.update(_zoo_train(arch, impl, train_weights(), images, labels, jdev, dtype, warmup, repeats,
                                          remat))
            except Exception as e:  # noqa: BLE001 - one failed implementation is a result, not the end of the run
                row.update(median_s=None, times_s=[], first_call_s=None, error=_error_text(e))
            finally:
                _release(impl, tdev)
            rows.append(row)
            results["rows"] = _finish([dict(r) for r in rows], batch)
            if on_row:
                on_row(results)
    results["rows"] = [{k: r[k] for k in ROW_FIELDS} for r in _finish(rows, batch)]
    return results


def _release(impl: str, tdev: str) -> None:
    """Between rows: compiled code and cached memory of one implementation must not weigh on the next."""
    import gc

    gc.collect()
    if impl == "torch-compile-cl":
        import torch

        torch._dynamo.reset()
    if IMPLS[impl].framework != "pytorch":
        import jax

        jax.clear_caches()
    if tdev == "cuda":
        import torch

        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Output


def title(results: dict[str, Any]) -> str:
    m = results["meta"]
    h, w = m["size"]
    return f"{m['arch']} on {m['device_name']}, batch {m['batch']}, {h}x{w}, {m['dtype']}"


def tables(results: dict[str, Any]) -> list[Any]:
    """One rich Table per mode."""
    from rich.markup import escape
    from rich.table import Table

    def ratio(v: Optional[float]) -> str:
        return f"{v:.2f}x" if v is not None else "-"

    out = []
    for mode in results["meta"]["modes"]:
        rows = [r for r in results["rows"] if r["mode"] == mode]
        if not rows:
            continue
        what = "inference" if mode == "inference" else "training step"
        t = Table(title=f"{escape(title(results))}: {what}")
        # Short headers: the table fits 80 columns, the width of a pipe or CI log.
        t.add_column("implementation", no_wrap=True)
        for col in ("median ms", "images/s", "vs compile", "vs NCHW", "first s"):
            t.add_column(col, justify="right")
        failures = []
        for r in rows:
            if r["error"]:
                # Under the table, where it can wrap: a cell that narrow would stand it on end.
                t.add_row(r["impl"], "[red]failed[/]", "", "", "", "")
                failures.append(f"[red]{r['impl']} failed:[/] {escape(r['error'].splitlines()[0][:300])}")
                continue
            t.add_row(r["impl"], f"{r['median_s'] * 1e3:.1f}", f"{r['images_per_s']:.1f}", ratio(r["vs_torch_compile"]),
                      ratio(r["vs_torch_eager_nchw"]), f"{r['first_call_s']:.1f}")
        if failures:
            t.caption = "\n".join(failures)
            t.caption_justify = "left"
        out.append(t)
    return out


def _import_figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--chart needs matplotlib: pip install matplotlib") from None
    return Figure


def chart(results: dict[str, Any], path: Any) -> Any:
    """A bar chart of images/s per implementation, one panel per mode (inference, train), titled
    with model, device, batch, size and dtype, written to `path` (PNG). `results` is `run`'s
    return value or its saved JSON. Failed rows are labelled, not drawn. Drawn on a bare
    matplotlib Figure (no pyplot, no backend, no global state) and without a version string in
    the PNG, so that the same JSON gives the same file."""
    from pathlib import Path

    Figure = _import_figure()
    colors = {"pytorch": "tab:gray", "haiku": "tab:blue", "equinox": "tab:orange"}
    modes = [m for m in MODES if any(r["mode"] == m for r in results["rows"])]
    n = max((sum(r["mode"] == m for r in results["rows"]) for m in modes), default=1)
    fig = Figure(figsize=(10.0, 1.2 + len(modes) * (0.9 + 0.42 * n)))
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0] if modes else []
    for ax, mode in zip(axes, modes):
        rows = [r for r in results["rows"] if r["mode"] == mode]
        ys = list(range(len(rows)))
        values = [r["images_per_s"] or 0.0 for r in rows]
        # torch.compile, the baseline of the ratios, outlined.
        ax.barh(ys, values, height=0.6, color=[colors.get(r["framework"], "tab:green") for r in rows],
                edgecolor=["black" if r["impl"] == "torch-compile-cl" else "none" for r in rows], linewidth=1.2)
        top = max(values, default=0.0) or 1.0
        for r, y, v in zip(rows, ys, values):
            if r["error"]:
                text = "failed: " + r["error"].splitlines()[0][:60]
            else:
                text = f"{v:,.1f} img/s"
                for key, name in (("vs_torch_compile", "torch.compile"), ("vs_torch_eager_nchw", "eager NCHW")):
                    if r.get(key) is not None:  # the first baseline that was measured
                        text += f"  ({r[key]:.2f}x {name})"
                        break
            ax.text(v + top * 0.01, y, text, va="center", fontsize=8)
        ax.set_yticks(ys, [r["impl"] for r in rows], fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlim(0, top * 1.45)
        ax.set_title("inference" if mode == "inference" else "training step", fontsize=10)
        ax.grid(axis="x", linewidth=0.4, alpha=0.5)
        ax.set_axisbelow(True)
    if len(axes):
        axes[-1].set_xlabel("images/s (batch / median time per call), higher is better", fontsize=9)
    fig.suptitle(title(results), fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, format="png", metadata={"Software": None})
    return path


def write_json(results: dict[str, Any], path: Any) -> None:
    """Through a temp file, so that a reader (or a run killed mid-write) never sees half a file."""
    import json
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
