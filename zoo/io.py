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
from .checked import ConversionError, checked_merge
from .frameworks import FRAMEWORKS, adapter

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


def atomic_write(path: str | os.PathLike, write: Any, *, force: bool = False) -> Path:
    """`write(tmp_path)` into a temp file beside `path`, then move it into place: a failure leaves
    no partial file, and without `force` an existing target (even one that appeared meanwhile) is
    never replaced, since the final step is a hard link, which fails if the target exists."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_file(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, str], *,
              force: bool = False) -> Path:
    """Write atomically: a failure leaves no partial file, and an existing file needs `force`."""
    from safetensors.numpy import save_file as st_save

    tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    return atomic_write(path, lambda tmp: st_save(tensors, tmp, metadata=dict(metadata)), force=force)


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
              key: Any = None, **surgery: Any) -> Loaded:
    """Read a zoo file into `framework` (default: the file's own). Every key is checked against
    the architecture in the metadata; a file written for the other framework is re-laid out.

    `surgery` (`zoo._surgery.SURGERY_OPTIONS`: num_classes, in_chans, global_pool, features_only,
    out_indices) loads the backbone into another head or input: a classifier of another size is
    new, initialised as PyTorch's nn.Linear from `key` (timm's `reset_classifier`; GoogLeNet's aux
    heads follow), `num_classes=0` drops it, `features_only` keeps the layers up to the last
    feature level, `in_chans` adapts the input conv as timm does. The metadata then records the
    new options."""
    from safetensors.numpy import load_file as st_load

    from ._surgery import adapt, target_overrides

    meta = read_metadata(path)
    stored = adapter(meta["framework"])
    target = adapter(framework or meta["framework"])
    name = Path(path).name
    try:
        overrides = json.loads(meta["overrides"])
        spec = registry.get_spec(meta["arch"], **overrides)
    except (KeyError, TypeError) as e:
        raise FormatError(f"{name}: {e}") from e
    fold_bn = meta["bn_folded"] == "true"
    plan = spec.plan(fold_bn)
    arrays = {k: stored.to_torch_layout(v) for k, v in st_load(str(path)).items()}
    surgery = {k: v for k, v in surgery.items() if v is not None}
    if surgery:
        new = target_overrides(meta["arch"], overrides, plan, surgery)
        new_plan = registry.get_spec(meta["arch"], **new).plan(fold_bn)
        if new_plan != plan:
            arrays = adapt(arrays, plan, new_plan, key)
            meta = build_metadata(framework=target.name, arch=meta["arch"], overrides=new, fold_bn=fold_bn,
                                  source=json.loads(meta["source"]))
            plan = new_plan
    template = target.template(plan, dtype)
    shapes = target.target_shapes(template)
    try:
        merged = checked_merge(arrays, shapes, target.from_torch_layout,
                               context=f"{name} does not fit {meta['arch']}")
    except ConversionError as e:
        _explain_layout(e, arrays, shapes, meta, name, target)
        raise
    return Loaded(target.fill(template, merged), plan, meta, target.name)


def _explain_layout(e: ConversionError, arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple],
                    meta: Mapping[str, str], name: str, target: Any) -> None:
    """A file whose tensors are laid out for the other framework than its metadata says fails the
    merge with every conv mis-shaped; say that in one line instead."""
    if e.missing or e.unexpected or not e.misshaped:
        return
    stored = meta["framework"]
    for other in FRAMEWORKS:
        if other == stored:
            continue
        relaid = {k: target.from_torch_layout(adapter(other).to_torch_layout(adapter(stored).from_torch_layout(v)))
                  for k, v in arrays.items()}
        if all(tuple(relaid[k].shape) == tuple(shapes[k]) for k in shapes):
            raise FormatError(f"{name}: its tensors are laid out for {other} ({adapter(other).layout}), but its "
                              f"metadata says framework {stored!r}; the file was written wrongly") from e


# --- the way back and across: PyTorch state dicts, the other framework, zoo files ---------------

# The stem conv has no bias in any unfolded network of the registry: one there means BatchNorm was
# folded into the convs, and the unfolded PyTorch module tree has no place for the result.
_FOLDED_MARKERS = ("conv1.bias", "conv1.0.bias", "conv1.conv.bias")


def to_torch(framework: str, named: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """PyTorch-named leaves of `framework` (from its `named_arrays`) as a PyTorch-layout state
    dict of numpy arrays. Leaves that are None are left out; every BatchNorm with running
    statistics gets its `num_batches_tracked` (0: zoo does not count steps, and PyTorch reads it
    only when momentum is None)."""
    if any(k in named for k in _FOLDED_MARKERS):
        raise ValueError("this model has BatchNorm folded into its convs, which no PyTorch model of this "
                         "architecture can load: export the model converted or loaded without fold_bn")
    to_layout = adapter(framework).to_torch_layout
    out: dict[str, np.ndarray] = {}
    for k, v in named.items():
        if v is None:
            continue
        a = np.asarray(v)
        out[k] = np.array(to_layout(a)) if a.ndim >= 2 else np.array(a)  # writable, for torch.from_numpy
        if k.endswith(".running_var"):
            out[k[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out


def _arrays_for(framework: str, objects: Any, plan: Any, what: str) -> dict[str, np.ndarray]:
    """The PyTorch-layout arrays of `objects`, checked against `plan`'s network."""
    ad = adapter(framework)
    named = {k: v for k, v in ad.named(objects).items() if v is not None}
    bad = [k for k, v in named.items() if not hasattr(v, "shape") or not _is_float(v)]
    if bad:
        raise TypeError(f"{what}: expected floating-point arrays, found other leaves at {', '.join(sorted(bad)[:5])}")
    torch_named = {k: ad.to_torch_layout(np.asarray(v, np.float32)) for k, v in named.items()}
    # Zero-stride stand-ins: the layout change of a shape, without allocating the tensor.
    shapes = {k: tuple(ad.to_torch_layout(np.broadcast_to(np.float32(0), s)).shape)
              for k, s in ad.target_shapes(ad.template(plan)).items()}
    return checked_merge(torch_named, shapes, context=what)


def _is_float(v: Any) -> bool:
    import jax.numpy as jnp

    return bool(jnp.issubdtype(v.dtype, jnp.floating))


def convert_objects(objects: Any, source: str, target: str, arch: str, overrides: Mapping[str, Any],
                    fold_bn: bool = False, dtype: Any = None) -> Any:
    """One framework's objects as the other's, in memory, checked as a file load is."""
    plan = registry.get_spec(arch, **overrides).plan(fold_bn)
    arrays = _arrays_for(source, objects, plan, f"{source} objects do not fit {arch}")
    ad = adapter(target)
    template = ad.template(plan, dtype)
    return ad.fill(template, {k: ad.from_torch_layout(v) for k, v in arrays.items()})


def save_objects(path: str | os.PathLike, framework: str, objects: Any, arch: str,
                 overrides: Mapping[str, Any], fold_bn: bool = False, force: bool = False) -> Path:
    """A zoo file of fine-tuned (or any) objects: the same checks and metadata as `zoo convert`."""
    plan = registry.get_spec(arch, **overrides).plan(fold_bn)
    arrays = _arrays_for(framework, objects, plan, f"{framework} objects do not fit {arch}")
    ad = adapter(framework)
    meta = build_metadata(framework=framework, arch=arch, overrides=overrides, fold_bn=fold_bn,
                          source={"kind": "saved", "name": f"zoo.{framework}.save"})
    return save_file(path, {k: ad.from_torch_layout(v) for k, v in arrays.items()}, meta, force=force)


def export_file(path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a zoo file as a PyTorch state dict (`.pth`/`.pt` with torch.save, or `.safetensors`)
    that the timm / torchvision model of its architecture loads with `strict=True`."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".pth", ".pt", ".safetensors"):
        raise ValueError(f"export writes .pth, .pt or .safetensors, not {out.name!r}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite")
    meta = read_metadata(path)
    if meta["bn_folded"] == "true":
        raise ValueError(f"{Path(path).name} has BatchNorm folded into its convs, which no PyTorch model of "
                         f"{meta['arch']} can load; export a file converted without --fold-bn")
    loaded = load_file(path)
    sd = to_torch(loaded.framework, adapter(loaded.framework).named(loaded.objects))
    if suffix == ".safetensors":
        from safetensors.numpy import save_file as st_save

        return atomic_write(out, lambda tmp: st_save(sd, tmp, metadata={"format": "pt"}), force=force)

    def write_torch(tmp: str) -> None:
        import torch

        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, tmp)

    return atomic_write(out, write_torch, force=force)
