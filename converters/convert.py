"""PyTorch state dicts -> Haiku / Equinox objects and zoo files, by a checked walk over names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from zoo import registry
from zoo.checked import checked_merge
from zoo.frameworks import adapter
from zoo.io import Loaded, build_metadata, save_file

from .fold import fold_batchnorm
from .state_dict import Source, describe_source, load_state_dict


@dataclass
class Converted:
    loaded: Loaded  # the framework objects, plan and metadata, as `zoo.io.load_file` gives them
    arrays: dict[str, np.ndarray]  # PyTorch-named, in the framework's layout: what a file stores

    @property
    def objects(self) -> Any:
        return self.loaded.objects


def infer_overrides(arch: str, sd: Mapping[str, np.ndarray], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Fill in `num_classes` from the checkpoint's classifier when the caller did not set it."""
    out = dict(overrides)
    if "num_classes" not in out:
        fc = registry.get_spec(arch).plan().fc
        w = sd.get(f"{fc.name}.weight")
        if w is not None and w.ndim == 2 and w.shape[0] != registry.get_spec(arch).num_classes:
            out["num_classes"] = int(w.shape[0])
    return out


def convert_state_dict(arch: str, sd: Mapping[str, np.ndarray], framework: str, *, fold_bn: bool = False,
                       overrides: Optional[Mapping[str, Any]] = None,
                       source: Optional[Mapping[str, str]] = None, dtype: Any = None) -> Converted:
    overrides = infer_overrides(arch, sd, overrides or {})
    spec = registry.get_spec(arch, **overrides)
    plan = spec.plan(fold_bn)
    if fold_bn:
        eps = {n.name: n.eps for n in plan.norms}
        sd = fold_batchnorm(sd, plan.fold_pairs(), eps)
    ad = adapter(framework)
    template = ad.template(plan, dtype)
    arrays = checked_merge(sd, ad.target_shapes(template), ad.from_torch_layout,
                           context=f"checkpoint does not fit {arch}{' (bn folded)' if fold_bn else ''}")
    meta = build_metadata(framework=framework, arch=arch, overrides=overrides, fold_bn=fold_bn,
                          source=source or {"kind": "in-memory"})
    return Converted(Loaded(ad.fill(template, arrays), plan, meta, framework), arrays)


def convert(arch: str, source: Source, framework: str, *, fold_bn: bool = False,
            overrides: Optional[Mapping[str, Any]] = None, dtype: Any = None) -> Converted:
    """Convert a checkpoint file, a state dict or an `nn.Module` for `arch` into `framework`."""
    registry.get(arch)  # fail on an unknown name before reading a large file
    sd = load_state_dict(source)
    return convert_state_dict(arch, sd, framework, fold_bn=fold_bn, overrides=overrides,
                              source=describe_source(source), dtype=dtype)


def convert_to_file(arch: str, source: Source, framework: str, out: str | os.PathLike, *,
                    fold_bn: bool = False, force: bool = False,
                    overrides: Optional[Mapping[str, Any]] = None) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite")
    converted = convert(arch, source, framework, fold_bn=fold_bn, overrides=overrides)
    return save_file(out, converted.arrays, converted.loaded.metadata, force=force)
