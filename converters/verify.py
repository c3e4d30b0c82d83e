"""Run the PyTorch model and the converted JAX model on the same inputs and compare logits."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

# fp32 at "highest": both sides compute in true fp32; differences are summation order only.
# "default": TF32 (10-bit mantissa, relative rounding ~5e-4 per product) on GPUs, accumulated over
# ~50 conv layers; measured on CPU it equals "highest". See docs/parity.md.
TOLERANCES = {"highest": {"rel": 1e-5, "top1": 1.0}, "default": {"rel": 2e-2, "top1": 0.0}}


@dataclass
class Report:
    arch: str
    framework: str
    fold_bn: bool
    batch: int
    size: tuple[int, int]
    precision: str
    jax_device: str
    torch_device: str
    max_abs: float
    rel: float
    top1: float
    top5: float
    tolerance_rel: float
    tolerance_top1: float

    @property
    def passed(self) -> bool:
        return self.rel <= self.tolerance_rel and self.top1 >= self.tolerance_top1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    k = min(5, ref.shape[1])
    top5_ref = np.argsort(-ref, axis=1)[:, :k]
    top5_out = np.argsort(-out, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top5_ref, top5_out)]
    return {
        "max_abs": float(np.max(np.abs(out - ref))),
        "rel": float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)),
        "top1": float(np.mean(ref.argmax(1) == out.argmax(1))),
        "top5": float(np.mean(overlap)),
    }


def jax_device(device: str):
    import jax

    if device == "cpu":
        return jax.devices("cpu")[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if gpus:
        return gpus[0]
    if device == "gpu":
        raise RuntimeError("--device gpu: JAX sees no GPU " + gpu_install_hint())
    return jax.devices("cpu")[0]


def gpu_install_hint() -> str:
    """Why JAX has no GPU and the install line that gives it one (the CUDA plugin must match the
    CUDA major version of the installed torch, whose CUDA libraries it shares)."""
    import jax

    backends = sorted({d.platform for d in jax.devices()})
    cuda = None
    try:
        import torch

        cuda = torch.version.cuda
    except ImportError:
        pass
    major = (cuda or "13").split(".")[0]
    extra = "gpu" if major == "13" else f"gpu-cuda{major}"
    torch_says = f"torch uses CUDA {cuda}" if cuda else "torch has no CUDA build"
    return (f"(JAX's backends: {', '.join(backends)}; {torch_says}). On a machine with an NVIDIA GPU, install "
            f"JAX's CUDA {major} plugin: pip install -e '.[{extra}]' (= jax[cuda{major}]), or pass --device cpu")


def torch_device(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return "cuda"
    if device == "gpu":
        raise RuntimeError("--device gpu: torch sees no CUDA device")
    return "cpu"


@contextlib.contextmanager
def torch_precision(precision: str):
    """`highest` turns TF32 off for the duration; `default` leaves PyTorch as users have it."""
    import torch

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if precision == "highest":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_jax(loaded, x: np.ndarray, device, precision: str) -> Any:
    import jax

    from zoo.model import make_predict

    with jax.default_device(device), jax.default_matmul_precision(precision):
        objects = jax.device_put(loaded.objects, device)
        predict = make_predict(dataclasses.replace(loaded, objects=objects))
        out = predict(jax.device_put(x, device))
        return [np.asarray(o) for o in out] if isinstance(out, list) else np.asarray(out)


def inputs(batch: int, size: tuple[int, int], channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, channels, *size)).astype(np.float32)


def verify(arch: str, checkpoint: Any, framework: str, *, fold_bn: bool = False, device: str = "auto",
           batch: int = 4, size: tuple[int, int] = (224, 224), precision: str = "highest", seed: int = 0,
           library: Optional[str] = None, converted_file: Optional[str] = None,
           overrides: Optional[Mapping[str, Any]] = None, reference: Any = None,
           allow_nonfinite: bool = False, allow_other_source: bool = False, check: bool = True) -> Report:
    """Compare PyTorch's logits for `checkpoint` with the converted model's.

    The JAX side is converted from `checkpoint` in memory, or read from `converted_file` (a zoo
    file made by `zoo convert`) to check that file. The PyTorch side is built from the registry
    and loaded with `checkpoint`, unless `reference` (an `nn.Module` whose weights `checkpoint`
    holds, e.g. the model itself) is given. A checkpoint with NaN or Inf values is refused
    unless `allow_nonfinite`.
    """
    from zoo._surgery import split_surgery
    from zoo.checked import ConversionError
    from zoo.io import load_file

    from zoo import registry

    from .convert import convert_state_dict, drop_unused_aux, infer_overrides
    from .state_dict import IGNORED_SUFFIXES, describe_source, load_state_dict
    from .torch_models import torch_model

    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {', '.join(TOLERANCES)}")
    if batch < 1 or min(size) < 1:
        raise ValueError(f"--batch and --size must be positive, got batch {batch}, size {tuple(size)}")
    jdev, tdev = jax_device(device), torch_device(device)  # an absent GPU fails before any work
    sd = load_state_dict(checkpoint, allow_nonfinite=allow_nonfinite)
    arch_options, surgery = split_surgery(overrides or {})
    overrides = infer_overrides(arch, sd, arch_options)
    # Heads the user asked to drop (GoogLeNet's --no-aux) are absent from both sides.
    sd = drop_unused_aux(arch, sd, registry.get_spec(arch, **overrides))
    # The checked conversion first: its error lists every mismatch, PyTorch's stops at the first.
    if converted_file is not None:
        loaded = load_file(converted_file, framework, check=check)
        if loaded.arch != arch:
            raise ValueError(f"{converted_file} holds {loaded.arch}, not {arch}")
        if not allow_other_source:
            check_same_source(converted_file, loaded.metadata, checkpoint, sd)
        fold_bn = loaded.fold_bn
    else:
        loaded = convert_state_dict(arch, sd, framework, fold_bn=fold_bn, overrides={**overrides, **surgery},
                                    source=describe_source(checkpoint), seed=seed).loaded
    if reference is not None:
        model = reference
    else:
        import torch

        # The PyTorch model with the same head and input as the JAX one (new classifier, features,
        # adapted input conv, as timm makes them), loaded with the checkpoint.
        model = torch_model(arch, library, **loaded.overrides)
        ref_sd = reference_state_dict(sd, registry.get_spec(arch, **overrides).plan(), loaded)
        result = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ref_sd.items()}, strict=False)
        # Only the BatchNorm step counters, which zoo drops on reading, may be absent.
        missing = [k for k in result.missing_keys if not k.endswith(IGNORED_SUFFIXES)]
        if missing or result.unexpected_keys:
            raise ConversionError(missing, result.unexpected_keys,
                                  context=f"checkpoint does not fit PyTorch's {arch}")
    x = inputs(batch, size, loaded.plan.spec.in_chans, seed)
    ref = _flat(run_torch(model, x, tdev, precision))
    out = _flat(run_jax(loaded, x, jdev, precision))
    tol = TOLERANCES[precision]
    return Report(arch, loaded.framework, fold_bn, batch, tuple(size), precision,
                  f"{jdev.platform}:{getattr(jdev, 'device_kind', jdev)}", tdev, **compare(ref, out),
                  tolerance_rel=tol["rel"], tolerance_top1=tol["top1"])


def check_same_source(converted_file: str, metadata: Mapping[str, str], checkpoint: Any,
                      sd: Mapping[str, np.ndarray]) -> None:
    """A zoo file records the sha256 of the checkpoint file it came from (or a digest of the
    state dict it was given); verifying it against another checkpoint proves nothing about it."""
    import json
    import os

    from .convert import state_dict_digest
    from .state_dict import sha256

    source = json.loads(metadata.get("source", "{}"))
    if isinstance(checkpoint, (str, os.PathLike)) and source.get("sha256"):
        actual, recorded, what = sha256(checkpoint), source["sha256"], "sha256"
    elif source.get("digest"):
        actual, recorded, what = state_dict_digest(sd), source["digest"], "state-dict digest"
    else:
        return  # nothing recorded to compare with (a file saved from JAX objects)
    if actual != recorded:
        raise ValueError(f"{os.path.basename(str(converted_file))} was converted from another checkpoint "
                         f"({what} {recorded[:16]}…, this one {actual[:16]}…); pass --allow-other-source "
                         "to compare them anyway")


def _flat(out: Any) -> np.ndarray:
    """Logits as they are; feature maps (one or a list) as one (N, features) matrix."""
    maps = out if isinstance(out, (list, tuple)) else [out]
    return np.concatenate([np.asarray(m, np.float32).reshape(len(m), -1) for m in maps], axis=1)


def reference_state_dict(sd: Mapping[str, np.ndarray], src_plan: Any, loaded: Any) -> dict[str, np.ndarray]:
    """The checkpoint made to fit the PyTorch counterpart of `loaded` when surgery made it: the
    layers it lacks dropped, the input conv adapted by timm's own `adapt_input_conv`, and a new
    classifier (random, so nothing to compare it with) copied from the JAX model."""
    from zoo import registry
    from zoo.frameworks import adapter

    dst = registry.get_spec(loaded.arch, **loaded.overrides).plan()
    if dst == src_plan:
        return dict(sd)
    kept = set(dst.modules())
    out = {k: v for k, v in sd.items() if k.split(".")[0] in kept}
    if dst.spec.in_chans != src_plan.spec.in_chans:
        import torch
        from timm.models import adapt_input_conv

        name = f"{dst.first_conv.name}.weight"
        out[name] = adapt_input_conv(dst.spec.in_chans, torch.from_numpy(np.array(out[name]))).numpy()
    src_heads = {c.name: c for c in src_plan.classifiers()}
    named = adapter(loaded.framework).named(loaded.objects)
    for c in dst.classifiers():
        if src_heads.get(c.name) != c:
            for leaf in ("weight", "bias"):
                value = np.asarray(named[f"{c.name}.{leaf}"])
                out[f"{c.name}.{leaf}"] = adapter(loaded.framework).to_torch_layout(value)
    return out


def run_torch(model, x: np.ndarray, device: str, precision: str) -> Any:
    import torch

    model = model.to(device).eval()
    with torch.no_grad(), torch_precision(precision):
        out = model(torch.from_numpy(x).to(device))
        if isinstance(out, (list, tuple)):
            return [o.float().cpu().numpy() for o in out]
        return out.float().cpu().numpy()
