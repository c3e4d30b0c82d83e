"""The zoo file format: one `.safetensors` file, PyTorch-named keys, metadata, checked loading.

Keys are the PyTorch names (`layer1.0.conv1.weight`, `layer1.0.bn1.running_mean`); tensors are in
the layout of the framework named in the metadata. Metadata (all strings, as safetensors wants):
format, format_version, zoo_version, framework, arch, overrides (JSON), num_classes, layout,
bn_folded, source (JSON: kind, name, sha256 for files).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from . import __version__, registry
from .checked import checked_merge
from .frameworks import adapter

FORMAT = "zoo"
FORMAT_VERSION = "1"
REQUIRED = ("format", "format_version", "framework", "arch", "overrides", "bn_folded")


class FormatError(ValueError):
    """The file is not a zoo file, or its metadata does not fit this version of zoo."""


def build_metadata(*, framework: str, arch: str, overrides: Mapping[str, Any], fold_bn: bool,
                   source: Mapping[str, str]) -> dict[str, str]:
    spec = registry.get_spec(arch, **overrides)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "zoo_version": __version__,
        "framework": framework,
        "arch": arch,
        "overrides": json.dumps(dict(overrides), sort_keys=True),
        "num_classes": str(spec.num_classes),
        "layout": adapter(framework).layout,
        "bn_folded": "true" if fold_bn else "false",
        "source": json.dumps(dict(source), sort_keys=True),
    }


def save_file(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, str], *,
              force: bool = False) -> Path:
    """Write atomically: a failure leaves no partial file, and an existing file needs `force`."""
    from safetensors.numpy import save_file as st_save

    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite")
    tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        st_save(tensors, tmp, metadata=dict(metadata))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise FormatError(f"{path.name} is not a safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path.name} is not a zoo file (no 'format: {FORMAT}' metadata); "
                          "convert PyTorch checkpoints with `zoo convert`")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise FormatError(f"{path.name}: metadata lacks {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise FormatError(f"{path.name}: format version {meta['format_version']} is not supported "
                          f"(this zoo reads version {FORMAT_VERSION})")
    return meta


@dataclass
class Loaded:
    objects: Any  # haiku (params, state) or equinox (model, state)
    plan: Any
    metadata: dict[str, str]
    framework: str

    @property
    def arch(self) -> str:
        return self.metadata["arch"]

    @property
    def overrides(self) -> dict[str, Any]:
        return json.loads(self.metadata["overrides"])

    @property
    def fold_bn(self) -> bool:
        return self.metadata["bn_folded"] == "true"


def load_file(path: str | os.PathLike, framework: Optional[str] = None, *, dtype: Any = None,
              num_classes: Optional[int] = None, key: Any = None) -> Loaded:
    """Read a zoo file into `framework` (default: the file's own). Every key is checked against
    the architecture in the metadata; a file written for the other framework is re-laid out.

    `num_classes` different from the file's: every backbone tensor is loaded and the classifiers
    (GoogLeNet's aux heads too) are new, initialised as PyTorch's nn.Linear from `key` (timm's
    `reset_classifier`). The metadata then records the new number of classes."""
    from safetensors.numpy import load_file as st_load

    meta = read_metadata(path)
    stored = adapter(meta["framework"])
    target = adapter(framework or meta["framework"])
    try:
        overrides = json.loads(meta["overrides"])
        spec = registry.get_spec(meta["arch"], **overrides)
    except (KeyError, TypeError) as e:
        raise FormatError(f"{Path(path).name}: {e}") from e
    plan = spec.plan(meta["bn_folded"] == "true")
    arrays = st_load(str(path))

    def relayout(a: np.ndarray) -> np.ndarray:
        return target.from_torch_layout(stored.to_torch_layout(a))

    merged = checked_merge(arrays, target.target_shapes(target.template(plan, dtype)), relayout,
                           context=f"{Path(path).name} does not fit {meta['arch']}")
    if num_classes is not None and num_classes != spec.num_classes:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        overrides = dict(overrides, num_classes=num_classes)
        meta = build_metadata(framework=target.name, arch=meta["arch"], overrides=overrides,
                              fold_bn=meta["bn_folded"] == "true", source=json.loads(meta["source"]))
        plan = registry.get_spec(meta["arch"], **overrides).plan(plan.fold_bn)
        merged.update({k: target.from_torch_layout(v) for k, v in new_classifiers(plan, key).items()})
    template = target.template(plan, dtype)
    return Loaded(target.fill(template, merged), plan, meta, target.name)


def new_classifiers(plan: Any, key: Any) -> dict[str, np.ndarray]:
    """Freshly initialised classifier layers of `plan`, PyTorch-named and laid out: nn.Linear's
    default, U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
    import jax

    if key is None:
        raise ValueError("a new classifier needs a `key` to initialise it")
    out = {}
    for spec, k in zip(plan.classifiers(), jax.random.split(key, len(plan.classifiers()))):
        bound = 1.0 / np.sqrt(spec.in_features)
        kw, kb = jax.random.split(k)
        out[f"{spec.name}.weight"] = np.asarray(
            jax.random.uniform(kw, (spec.out_features, spec.in_features), minval=-bound, maxval=bound))
        out[f"{spec.name}.bias"] = np.asarray(jax.random.uniform(kb, (spec.out_features,), minval=-bound, maxval=bound))
    return out
