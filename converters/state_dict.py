"""Reading PyTorch checkpoints into {name: numpy array}, safely (no full unpickling)."""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
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


def _one_line(text: str) -> str:
    """`text` as one line: ANSI escapes dropped, whitespace runs collapsed."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        # Every float becomes float32, as for torch tensors (bf16 arrays come from ml_dtypes).
        return value if value.dtype == np.float32 else value.astype(np.float32)
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        # numpy has no bfloat16; every floating tensor becomes float32, losslessly for bf16/fp16.
        if t.is_floating_point():
            t = t.float()
        return t.numpy()
    raise CheckpointError(f"expected tensors, found {type(value).__name__} at {name!r}")


def _dtype_name(value: Any) -> str:
    return str(value.dtype).replace("torch.", "")


def _is_float(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"
    is_floating_point = getattr(value, "is_floating_point", None)
    return bool(is_floating_point()) if callable(is_floating_point) else True  # non-tensors: _to_numpy says


def _listing(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def check_dtypes(sd: Mapping[str, Any], label: str = "state dict") -> None:
    """Weights, biases and norm statistics are floats (fp16/bf16/fp32/fp64, read as float32);
    integer, bool or complex tensors under those names mean a damaged or foreign file."""
    bad = [f"{k} ({_dtype_name(v)})" for k, v in sd.items() if hasattr(v, "dtype") and not _is_float(v)]
    if bad:
        raise CheckpointError(f"{label}: {len(bad)} tensor{'s' if len(bad) > 1 else ''} must be floating point "
                              f"but {'are' if len(bad) > 1 else 'is'} not: {_listing(bad)}")


def check_finite(sd: Mapping[str, np.ndarray], label: str = "state dict") -> None:
    """NaN or Inf anywhere (weights, biases, running statistics) makes every output non-finite."""
    bad = []
    for k, v in sd.items():
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            nan = int(np.isnan(v).sum())
            inf = int(v.size - nan - np.isfinite(v).sum())
            bad.append(f"{k} ({', '.join(p for p in (f'{nan} NaN' if nan else '', f'{inf} Inf' if inf else '') if p)})")
    if bad:
        raise CheckpointError(f"{label}: non-finite values in {len(bad)} tensor{'s' if len(bad) > 1 else ''}: "
                              f"{_listing(bad)}; pass allow_nonfinite=True (zoo convert --allow-nonfinite) "
                              "to convert anyway")


def _check_zip(path: Path) -> None:
    """CRC-check every member of a zip-format torch checkpoint: torch.load does not, and reads a
    damaged tensor's bytes as they are."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path.name} is a truncated or corrupt zip archive ({_one_line(str(e))}); "
                              "download or copy it again") from e
    with zf:
        for info in zf.infolist():
            try:
                with zf.open(info) as f:
                    while f.read(1 << 22):
                        pass
            except Exception as e:  # BadZipFile (bad CRC, bad header), zlib.error, EOFError
                raise CheckpointError(f"{path.name} is corrupt: zip member {info.filename!r} is damaged "
                                      f"({_one_line(str(e)) or type(e).__name__}); download or copy it again") from e


def _pickle_bytes(path: Path, limit: int = 64 << 20) -> bytes:
    """The checkpoint's pickle, unparsed: data.pkl of a zip checkpoint, else the file's start."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                return zf.read(name)[:limit] if name else b""
        with open(path, "rb") as f:
            return f.read(limit)
    except Exception:  # noqa: BLE001 - only a hint for the message
        return b""


def _holds_module(path: Path, cls: str) -> bool:
    """Whether the refused pickle is a whole nn.Module: a torch.nn class, or an object carrying
    nn.Module's own attributes. Found by looking at the bytes; nothing is unpickled."""
    if cls.startswith("torch.nn.modules."):
        return True
    data = _pickle_bytes(path)
    return b"_modules" in data and b"_parameters" in data


def _torch_load_error(path: Path, e: Exception) -> CheckpointError:
    """One line saying why torch.load(weights_only=True) refused `path`, without torch's advice
    to retry with weights_only=False (which would run whatever code the file holds)."""
    text = _one_line(str(e))
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK", b"\x80")):  # torch writes zip archives, or pickles of protocol 2+
        return CheckpointError(f"{path.name} is not a PyTorch state dict that can be read safely: neither "
                               f"torch's zip format nor a pickle (it starts with {head!r})")
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        cls = found.group(1)
        if _holds_module(path, cls):
            return CheckpointError(
                f"{path.name} holds a whole pickled model ({cls}), not a state dict; zoo reads state dicts "
                "only: save it with torch.save(model.state_dict(), path) and convert that file")
        return CheckpointError(
            f"{path.name} holds an object of type {cls}, which torch.load(weights_only=True) refuses to "
            "unpickle; zoo reads tensors in dicts only: save the model's state_dict()")
    if "weights only load failed" in text.lower() or type(e).__name__ == "UnpicklingError":
        reason = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation of torch\.load|$)", text)
        detail = f" (torch.load(weights_only=True): {reason.group(1).strip()})" if reason else ""
        return CheckpointError(f"{path.name} is not a PyTorch state dict that can be read safely{detail}")
    if isinstance(e, EOFError):
        return CheckpointError(f"{path.name} ends early: a truncated or incomplete PyTorch checkpoint")
    return CheckpointError(f"{path.name} is not a PyTorch state dict that can be read safely "
                           f"(torch.load(weights_only=True): {text or type(e).__name__})")


def _read_file(path: Path) -> Mapping[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is empty (0 bytes), not a checkpoint")
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        safetensors_shapes(path)  # byte ranges checked before anything is allocated
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own untyped errors
            if "bfloat16" not in str(e).lower() and "bf16" not in str(e).lower():
                raise CheckpointError(f"cannot read {path.name} as safetensors: "
                                      f"{_one_line(str(e)) or type(e).__name__}") from e
            from safetensors.torch import load_file as load_torch

            return load_torch(str(path))
    if suffix in (".pth", ".pt", ".bin"):
        import torch

        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        if zipped:
            _check_zip(path)
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise _torch_load_error(path, e) from e
    raise CheckpointError(f"unsupported checkpoint type {suffix!r}; expected one of {', '.join(CHECKPOINT_SUFFIXES)}")


def safetensors_shapes(path: Union[str, os.PathLike]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a .safetensors checkpoint from its header alone; a header whose tensors do
    not fit the file (truncated, lying offsets) is refused here, before anything is allocated."""
    from zoo._format import FormatError, read_header

    try:
        tensors, _ = read_header(path)
    except FormatError as e:
        raise CheckpointError(str(e)) from None
    return {k: shape for k, (_, shape) in tensors.items()}


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
        if obj and all(isinstance(k, str) and k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_state_dict(source: Source, *, allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """A state dict as {PyTorch name: numpy array} from a file path, a mapping or an nn.Module.

    Refused with a CheckpointError: damaged zip members (CRC), tensors that should be floats but
    are integer, bool or complex, and NaN/Inf values unless `allow_nonfinite`."""
    label = "state dict"
    if isinstance(source, (str, os.PathLike)):
        label = Path(source).name
        raw = _read_file(Path(source))
    elif isinstance(source, Mapping):
        raw = source
    elif hasattr(source, "state_dict"):
        raw = source.state_dict()
    else:
        raise CheckpointError(f"cannot read a state dict from {type(source).__name__}")
    raw = unwrap(raw)
    bad_keys = [repr(k)[:40] for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{label}: state dict keys must be names (strings), found {_listing(bad_keys)}")
    sd = {k: v for k, v in raw.items() if not k.endswith(IGNORED_SUFFIXES)}
    odd = [k for k, v in sd.items() if getattr(v, "is_sparse", False) or getattr(v, "is_meta", False)]
    if odd:
        raise CheckpointError(f"{label}: sparse or meta-device tensors hold no dense weights: {_listing(odd)}")
    check_dtypes(sd, label)
    out = {k: _to_numpy(k, v) for k, v in sd.items()}
    if not allow_nonfinite:
        check_finite(out, label)
    return out


def describe_source(source: Source) -> dict[str, str]:
    """Provenance for the file metadata."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        return {"kind": "file", "name": p.name, "sha256": sha256(p)}
    return {"kind": "in-memory", "name": type(source).__name__}
