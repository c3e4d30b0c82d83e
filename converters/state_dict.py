"""Reading PyTorch checkpoints into {name: numpy array}, safely (no full unpickling)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Keys a training script wraps the weights under, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
# Prefixes that training wrappers add to every key: DataParallel/DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Buffers PyTorch keeps that carry no information for inference or for our training semantics
# (momentum is fixed at 0.1, so BatchNorm's step counter is never read).
IGNORED_SUFFIXES = (".num_batches_tracked",)

Source = Union[str, os.PathLike, Mapping[str, Any], Any]


class CheckpointError(ValueError):
    """The checkpoint file cannot be read as a state dict."""


def sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        # numpy has no bfloat16; every floating tensor becomes float32, losslessly for bf16/fp16.
        if t.is_floating_point():
            t = t.float()
        return t.numpy()
    raise CheckpointError(f"expected tensors, found {type(value).__name__}")


def _read_file(path: Path) -> Mapping[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own untyped errors
            if "bfloat16" not in str(e).lower() and "bf16" not in str(e).lower():
                raise CheckpointError(f"cannot read {path.name} as safetensors: {e}") from e
            from safetensors.torch import load_file as load_torch

            return load_torch(str(path))
    if suffix in (".pth", ".pt", ".bin"):
        import torch

        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"cannot read {path.name} with torch.load(weights_only=True): {str(e).splitlines()[0]}") from e
    raise CheckpointError(f"unsupported checkpoint type {suffix!r}; expected one of {', '.join(CHECKPOINT_SUFFIXES)}")


def unwrap(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """Find the state dict inside a training checkpoint and strip wrapper prefixes."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict, found {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner:
            obj = inner
            break
    for prefix in WRAPPER_PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_state_dict(source: Source) -> dict[str, np.ndarray]:
    """A state dict as {PyTorch name: numpy array} from a file path, a mapping or an nn.Module."""
    if isinstance(source, (str, os.PathLike)):
        raw = _read_file(Path(source))
    elif isinstance(source, Mapping):
        raw = source
    elif hasattr(source, "state_dict"):
        raw = source.state_dict()
    else:
        raise CheckpointError(f"cannot read a state dict from {type(source).__name__}")
    sd = unwrap(raw)
    return {k: _to_numpy(v) for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES)}


def describe_source(source: Source) -> dict[str, str]:
    """Provenance for the file metadata."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        return {"kind": "file", "name": p.name, "sha256": sha256(p)}
    return {"kind": "in-memory", "name": type(source).__name__}
