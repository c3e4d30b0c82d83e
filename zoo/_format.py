"""Checks of zoo files that need no framework: the safetensors header read by hand (bounds before
any allocation), the metadata schema, and the content digests."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import registry

# safetensors dtype codes -> bytes per element.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
DIGEST_ALGORITHM = "sha256"
READABLE_VERSIONS = ("1", "2")  # 1: before content digests


class FormatError(ValueError):
    """The file is not a zoo file, or its metadata does not fit this version of zoo."""


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """{name: (dtype code, shape)} and the metadata of a safetensors file, from its header alone.
    Every tensor's byte range must lie inside the file and match its dtype and shape, so nothing
    later allocates for a tensor the file does not hold (a sparse or truncated file, lying offsets)."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{name} is not a safetensors file: {size} bytes, shorter than a header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise FormatError(f"{name} is not a safetensors file: its header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise FormatError(f"{name} is not a safetensors file: its header is not JSON "
                              f"({str(e)[:80] or type(e).__name__})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{name} is not a safetensors file: its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{name}: its metadata is not a map of strings")
    data = size - 8 - n
    tensors = {}
    for key, info in header.items():
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dtype, str) and dtype in _ITEMSIZE and isinstance(shape, list)
                  and all(is_int(d) and 0 <= d < 2 ** 48 for d in shape) and is_int(begin) and is_int(end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise FormatError(f"{name}: tensor {key[:80]!r} has a malformed header entry")
        shape = tuple(shape)
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]  # Python integers: no wraparound
        if not 0 <= begin <= end <= data or end - begin != nbytes:
            raise FormatError(f"{name}: tensor {key[:80]!r} ({dtype}{list(shape)}, {nbytes} bytes) lies outside the "
                              f"file's {data} data bytes, or its size does not fit: the file is damaged")
        tensors[key] = (dtype, shape)
    return tensors, meta


def tensor_digest(name: str, array: np.ndarray) -> str:
    """sha256 of a tensor's name, dtype, shape and bytes (128 bits shown: enough to tell damage)."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
    h.update(a.reshape(-1).view(np.uint8) if a.size else b"")
    return h.hexdigest()[:32]


def content_digest(per_tensor: Mapping[str, str]) -> str:
    """One sha256 over the sorted per-tensor digests: the file's content, whatever its key order."""
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(per_tensor.items())).encode()).hexdigest()


# The metadata fields that decide what network the tensors make: changing one (say, overrides
# {"aa": "blur"}) would leave every tensor intact and change the outputs. The preprocessing the
# weights expect (pretrained_cfg) changes what a photo gives as much, so it is covered when present
# (files without one keep the digest they were written with).
ARCHITECTURE_FIELDS = ("framework", "arch", "overrides", "bn_folded")
OPTIONAL_DIGESTED_FIELDS = ("pretrained_cfg",)


def architecture_digest(meta: Mapping[str, str]) -> str:
    fields = {k: meta.get(k) for k in ARCHITECTURE_FIELDS}
    fields.update({k: meta[k] for k in OPTIONAL_DIGESTED_FIELDS if k in meta})
    for k in ("overrides", *OPTIONAL_DIGESTED_FIELDS):
        if k in fields:
            try:  # the meaning, not the spelling
                fields[k] = json.loads(fields[k] or "{}")
            except (ValueError, RecursionError):
                pass
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def digest_metadata(arrays: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> str:
    """The "digest" field: per-tensor digests, their content digest and (given the metadata) the
    digest of the fields that define the network."""
    tensors = {k: tensor_digest(k, v) for k, v in arrays.items()}
    out = {"algorithm": DIGEST_ALGORITHM, "content": content_digest(tensors), "tensors": tensors}
    if meta is not None:
        out["architecture"] = architecture_digest(meta)
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def check_digests(name: str, meta: Mapping[str, str], arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse content that differs from what was written, naming the first tensor that does."""
    if "digest" not in meta:
        if meta.get("format_version") == "1":
            return  # written before zoo recorded digests
        raise FormatError(f"{name}: metadata lacks the content digest")
    digest = parse_digest(name, meta["digest"])
    if "architecture" in digest and digest["architecture"] != architecture_digest(meta):
        fields = ", ".join((*ARCHITECTURE_FIELDS, *(k for k in OPTIONAL_DIGESTED_FIELDS if k in meta)))
        raise FormatError(f"{name}: its metadata ({fields}) was changed after the file "
                          "was written: the tensors no longer describe the network it names (check=False / "
                          "--no-verify-digest skips this check)")
    recorded = digest["tensors"]
    for key in sorted(set(recorded) | set(arrays)):
        if key not in arrays or key not in recorded or tensor_digest(key, arrays[key]) != recorded[key]:
            raise FormatError(f"{name}: tensor {key} does not match the digest recorded when the file was "
                              "written: the file is damaged or was changed (check=False / --no-verify-digest "
                              "skips this check)")


def parse_digest(name: str, text: str) -> dict[str, Any]:
    try:
        d = json.loads(text)
        ok = (isinstance(d, dict) and d.get("algorithm") == DIGEST_ALGORITHM and isinstance(d.get("content"), str)
              and isinstance(d.get("tensors"), dict) and all(isinstance(v, str) for v in d["tensors"].values()))
    except (ValueError, RecursionError):  # not JSON, too deep, integers too long
        ok = False
    if not ok:
        raise FormatError(f"{name}: metadata field 'digest' is malformed")
    return d


def validate_metadata(name: str, meta: Mapping[str, str]) -> dict[str, Any]:
    """The metadata schema, field by field: one FormatError naming the first bad field. Returns
    the parsed fields (overrides and source as dicts, the spec, bn_folded as a bool)."""
    from .frameworks import FRAMEWORKS, adapter

    def bad(field: str, why: str) -> FormatError:
        return FormatError(f"{name}: metadata field {field!r} {why}")

    for field in ("format_version", "framework", "arch", "overrides", "bn_folded"):
        if field not in meta:
            raise bad(field, "is missing")
    if meta["format_version"] not in READABLE_VERSIONS:
        raise FormatError(f"{name}: format version {meta['format_version']} is not supported "
                          f"(this zoo reads versions {', '.join(READABLE_VERSIONS)})")
    if meta["framework"] not in FRAMEWORKS:
        raise bad("framework", f"is {meta['framework']!r}, not one of {', '.join(FRAMEWORKS)}")
    if meta["bn_folded"] not in ("true", "false"):
        raise bad("bn_folded", f"is {meta['bn_folded']!r}, not 'true' or 'false'")
    try:
        registry.get(meta["arch"])
    except KeyError as e:
        raise FormatError(f"{name}: metadata field 'arch': {e.args[0]}") from None
    def json_object(field: str) -> dict[str, Any]:
        try:
            value = json.loads(meta[field])
        except (ValueError, RecursionError):
            raise bad(field, "is not JSON") from None
        if not isinstance(value, dict):
            raise bad(field, "is not a JSON object")
        return value

    overrides = json_object("overrides")
    try:
        spec = registry.get_spec(meta["arch"], **overrides)
        spec.plan(meta["bn_folded"] == "true")
    except (TypeError, ValueError, ArithmeticError, LookupError, RuntimeError, RecursionError) as e:
        raise bad("overrides", f"does not describe a valid {meta['arch']}: {str(e)[:200]}") from None
    if "layout" in meta and meta["layout"] != adapter(meta["framework"]).layout:
        raise bad("layout", f"is {meta['layout']!r}, but {meta['framework']} files are laid out "
                            f"{adapter(meta['framework']).layout!r}")
    if "num_classes" in meta and meta["num_classes"] != str(spec.num_classes):
        raise bad("num_classes", f"is {meta['num_classes']!r}, but the overrides give {spec.num_classes}")
    source = json_object("source") if "source" in meta else {}
    cfg: Any = None
    if "pretrained_cfg" in meta:
        from ._preprocess import validate_cfg

        try:
            cfg = json.loads(meta["pretrained_cfg"])
            validate_cfg(cfg)
        except (ValueError, RecursionError) as e:
            raise bad("pretrained_cfg", f"is not a valid preprocessing config: {str(e)[:200]}") from None
    if "digest" in meta:
        parse_digest(name, meta["digest"])
    return {"pretrained_cfg": cfg, "overrides": overrides, "source": source, "spec": spec, "fold_bn": meta["bn_folded"] == "true"}
