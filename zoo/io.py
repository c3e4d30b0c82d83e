"""The zoo file format: one `.safetensors` file, PyTorch-named keys, metadata, checked loading.

Keys are the PyTorch names (`layer1.0.conv1.weight`, `layer1.0.bn1.running_mean`); tensors are in
the layout of the framework named in the metadata. Metadata (all strings, as safetensors wants):
format, format_version, zoo_version, framework, arch, overrides (JSON), num_classes, layout,
bn_folded, source (JSON: kind, name, sha256 for files).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from . import __version__, registry
from .checked import ConversionError, checked_merge
from ._format import FormatError, check_digests, digest_metadata, read_header, validate_metadata
from .frameworks import FRAMEWORKS, adapter

__all__ = ["FormatError", "Loaded", "load_file", "save_file", "read_metadata", "build_metadata"]

FORMAT = "zoo"
FORMAT_VERSION = "2"  # 2: a content digest in the metadata ("digest"); version 1 files still load


def build_metadata(*, framework: str, arch: str, overrides: Mapping[str, Any], fold_bn: bool,
                   source: Mapping[str, str], pretrained_cfg: Optional[Mapping[str, Any]] = None
                   ) -> dict[str, str]:
    """`pretrained_cfg`: the preprocessing the weights expect (timm's pretrained_cfg keys; see
    zoo._preprocess), recorded for `zoo.Model.preprocess`. A new classifier (surgery) keeps the
    preprocessing but not the label set."""
    spec = registry.get_spec(arch, **overrides)
    extra = {}
    if pretrained_cfg is not None:
        cfg = dict(pretrained_cfg)
        if cfg.get("num_classes") not in (None, spec.num_classes):
            cfg.pop("label_set", None)
        cfg["num_classes"] = spec.num_classes
        extra["pretrained_cfg"] = json.dumps(cfg, sort_keys=True)
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
        **extra,
    }


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail before any work when `path` cannot be written: its folder is missing, is not a folder,
    or is not writable (for this user, as `os.access` says), or `path` itself is a folder."""
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: the folder {folder} is not writable")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    return path


def atomic_write(path: str | os.PathLike, write: Any, *, force: bool = False) -> Path:
    """`write(tmp_path)` into a temp file beside `path`, then move it into place: a failure leaves
    no partial file, and without `force` an existing target (even one that appeared meanwhile) is
    never replaced, since the final step is a hard link, which fails if the target exists.

    The temp file (`.{name}.{pid}.{random}.tmp`) is removed on any exception, and on SIGTERM or
    SIGINT while the write runs in the main thread (the process then still ends as the signal
    says). What SIGKILL leaves, no handler sees: each write first removes the temp files of its
    target whose writer process is gone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path.parent, path.name)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite")
    with _temp_beside(path) as tmp:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The middle of a temp file's name, between `.{target name}.` and `.tmp`: the writer's pid, then
# mkstemp's random letters (never a dot, so a longer target name sharing the prefix cannot match).
_TEMP_MIDDLE = re.compile(r"([0-9]+)\.[A-Za-z0-9_]+")
# Temp files of this process's writes in progress, which a fatal signal removes.
_active_temps: set[str] = set()


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Remove the temp files of target `name` in `folder` left by writers that no longer run
    (killed with SIGKILL, or by a power cut). A live process's file, or one whose pid cannot be
    checked, is never touched."""
    if os.name != "posix":  # os.kill(pid, 0) is no liveness probe elsewhere (Windows terminates)
        return
    prefix, suffix = f".{name}.", ".tmp"
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if len(entry) <= len(prefix) + len(suffix) or not (entry.startswith(prefix) and entry.endswith(suffix)):
            continue
        match = _TEMP_MIDDLE.fullmatch(entry[len(prefix):-len(suffix)])
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            os.unlink(folder / entry)
        except OSError:  # removed by another writer meanwhile, or not ours to remove
            pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # os.kill(0, ...) means the process group: never treat such a name as stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


@contextmanager
def _temp_beside(path: Path) -> Iterator[str]:
    """A new empty temp file beside `path`, removed when the block ends however it ends.

    The order closes the window a signal could otherwise hit: the handlers go in first, then the
    name is registered, then the file is created (O_EXCL). So the file never exists while a
    SIGTERM or SIGINT would leave it behind."""
    with _signals_remove_temps():
        tmp: Optional[str] = None
        try:
            for _ in range(100):
                tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
                _active_temps.add(tmp)
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:  # a name this pid left before (pid reuse): draw again
                    _active_temps.discard(tmp)
                    tmp = None
                    continue
                os.close(fd)
                break
            else:
                raise FileExistsError(f"no free temp file name beside {path} in 100 tries")
            yield tmp
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:  # moved into place, or never created
                    pass
                _active_temps.discard(tmp)


@contextmanager
def _signals_remove_temps() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT remove this process's temp files in progress before
    they end the process. Handlers can only be set in the main thread; elsewhere (and where a
    signal is ignored, or its handler was not set from Python) nothing changes, and a killed
    writer's file goes at the next write."""
    installed: dict[int, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(signum)
                if previous is None or previous == signal.SIG_IGN or getattr(previous, "_zoo_temp_handler", False):
                    continue  # not restorable, ignored, or an outer write's handler already covers it
                signal.signal(signum, _temp_handler(previous))
                installed[signum] = previous
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


def _temp_handler(previous: Any) -> Any:
    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            # A Python handler decides (KeyboardInterrupt by default): an exception it raises unwinds
            # the write, whose `finally` removes the temp file; one that returns (a graceful-shutdown
            # flag) lets the write finish.
            previous(signum, frame)
            return
        # The default action: remove the temp files, then die of the same signal.
        for tmp in list(_active_temps):
            try:
                os.unlink(tmp)
            except OSError:
                pass
        signal.signal(signum, previous)
        os.kill(os.getpid(), signum)

    handler._zoo_temp_handler = True  # type: ignore[attr-defined]
    return handler


def save_file(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, str], *,
              force: bool = False) -> Path:
    """Write atomically: a failure leaves no partial file, and an existing file needs `force`."""
    from safetensors.numpy import save_file as st_save

    tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    metadata = {**metadata, "format_version": FORMAT_VERSION}
    metadata["digest"] = digest_metadata(tensors, metadata)
    return atomic_write(path, lambda tmp: st_save(tensors, tmp, metadata=dict(metadata)), force=force)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A zoo file's metadata, checked field by field (`zoo._format.validate_metadata`)."""
    return _read_checked_header(path)[1]


def _read_checked_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    name = Path(path).name
    tensors, meta = read_header(path)
    if meta.get("format") != FORMAT:
        raise FormatError(f"{name} is not a zoo file (no 'format: {FORMAT}' metadata); "
                          "convert PyTorch checkpoints with `zoo convert`")
    validate_metadata(name, meta)
    wrong = [f"{k} ({dtype})" for k, (dtype, _) in tensors.items() if dtype != "F32"]
    if wrong:
        raise FormatError(f"{name}: zoo files hold float32 tensors; {len(wrong)} are not: "
                          f"{', '.join(sorted(wrong)[:5])}")
    return tensors, meta


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
              key: Any = None, check: bool = True, **surgery: Any) -> Loaded:
    """Read a zoo file into `framework` (default: the file's own). Every key is checked against
    the architecture in the metadata; a file written for the other framework is re-laid out.

    `surgery` (`zoo._surgery.SURGERY_OPTIONS`: num_classes, in_chans, global_pool, features_only,
    out_indices) loads the backbone into another head or input: a classifier of another size is
    new, initialised as PyTorch's nn.Linear from `key` (timm's `reset_classifier`; GoogLeNet's aux
    heads follow), `num_classes=0` drops it, `features_only` keeps the layers up to the last
    feature level, `in_chans` adapts the input conv as timm does. The metadata then records the
    new options.

    Before any tensor is read, the header's byte ranges, dtypes (float32) and the names and shapes
    it declares are checked against the architecture; after reading, every tensor against the
    digest recorded when the file was written (`check=False` skips that, for speed)."""
    from safetensors.numpy import load_file as st_load

    from ._surgery import adapt, target_overrides

    header, meta = _read_checked_header(path)
    stored = adapter(meta["framework"])
    target = adapter(framework or meta["framework"])
    name = Path(path).name
    overrides = json.loads(meta["overrides"])
    fold_bn = meta["bn_folded"] == "true"
    plan = registry.get_spec(meta["arch"], **overrides).plan(fold_bn)
    surgery = {k: v for k, v in surgery.items() if v is not None}
    new_plan = plan
    if surgery:
        new = target_overrides(meta["arch"], overrides, plan, surgery)
        new_plan = registry.get_spec(meta["arch"], **new).plan(fold_bn)
    template = target.template(new_plan, dtype)
    shapes = target.target_shapes(template)

    def fit(arrays: Mapping[str, np.ndarray], key: Any) -> dict[str, np.ndarray]:
        if new_plan != plan:
            arrays = adapt(arrays, plan, new_plan, key)
        try:
            return checked_merge(arrays, shapes, target.from_torch_layout,
                                 context=f"{name} does not fit {meta['arch']}")
        except ConversionError as e:
            _explain_layout(e, arrays, shapes, meta, name, target)
            raise

    # Names and shapes from the header alone, on zero-stride stand-ins: nothing is allocated for
    # a tensor the architecture does not have.
    fit({k: stored.to_torch_layout(np.broadcast_to(np.float32(0), s)) for k, (_, s) in header.items()},
        _shape_pass_key(key))
    try:
        raw = st_load(str(path))
    except Exception as e:  # safetensors' own checks (uncovered bytes, overlaps), untyped
        why = str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise FormatError(f"{name} is damaged: {why}") from None
    if check:
        check_digests(name, meta, raw)
    merged = fit({k: stored.to_torch_layout(v) for k, v in raw.items()}, key)
    if new_plan != plan:
        cfg = json.loads(meta["pretrained_cfg"]) if "pretrained_cfg" in meta else None
        meta = build_metadata(framework=target.name, arch=meta["arch"], overrides=new, fold_bn=fold_bn,
                              source=json.loads(meta.get("source", "{}")), pretrained_cfg=cfg)
    return Loaded(target.fill(template, merged), new_plan, meta, target.name)


def inspect_file(path: str | os.PathLike, *, check: bool = True) -> dict[str, Any]:
    """Check a zoo file as loading does (header, metadata, names and shapes against the
    architecture, digest unless `check=False`) and summarise it: metadata, dtypes, counts,
    digests. Raises on the first problem."""
    from ._format import parse_digest

    header, meta = _read_checked_header(path)
    load_file(path, check=check)
    n_params = n_state = 0
    dtypes: dict[str, int] = {}
    for key, (dtype, shape) in header.items():
        count = int(np.prod(shape, dtype=np.int64))
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        if key.endswith((".running_mean", ".running_var")):
            n_state += count
        else:
            n_params += count
    order = ("arch", "framework", "bn_folded", "num_classes", "overrides", "layout", "source",
             "format", "format_version", "zoo_version")
    keys = sorted(meta, key=lambda k: (order.index(k) if k in order else len(order), k))
    out: dict[str, Any] = {k: meta[k] for k in keys if k != "digest"}
    digest = parse_digest(Path(path).name, meta["digest"]) if "digest" in meta else None
    out.update({"tensors": len(header), "dtypes": dtypes, "parameters": n_params, "state_values": n_state,
                "content_digest": digest["content"] if digest else "none (format version 1)",
                "digest_checked": bool(check and digest), "file_bytes": Path(path).stat().st_size})
    return out


def _shape_pass_key(key: Any) -> Any:
    """The key for the header-only pass: a new classifier there is only shapes, so any key does."""
    if key is not None:
        return key
    import jax

    return jax.random.key(0)


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
    check_output_path(out)  # a missing or read-only folder fails before any work
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
