"""Pretrained weights by name: timm's hub tags (`resnet50.a1_in1k`) and torchvision's weight enums
(`IMAGENET1K_V2`), fetched through the libraries' own machinery, so the user's caches are used
(huggingface_hub's for timm, `torch.hub`'s for torchvision) and `HF_HUB_OFFLINE=1` works; with the
preprocessing each set of weights was trained with (`pretrained_cfg`), which the converted file
records for `zoo.Model.preprocess`.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from typing import Any, Optional

from zoo import registry

# What a zoo file records of the preprocessing (timm's pretrained_cfg keys, plus torchvision's
# resize_size): zoo._preprocess reads these.
CFG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "resize_size",
            "num_classes", "label_set")


@dataclass
class Pretrained:
    arch: str                 # zoo's registry name
    library: str              # timm | torchvision
    name: str                 # resnet50.a1_in1k | resnet50:IMAGENET1K_V2
    state_dict: Any
    cfg: dict[str, Any]       # the preprocessing and label set (CFG_KEYS)
    source: dict[str, str]    # provenance recorded in the file
    overrides: dict[str, Any]  # options the weights imply but cannot show


def split_name(name: str) -> tuple[str, Optional[str]]:
    """`resnet50.a1_in1k` -> ("resnet50", "a1_in1k"); a registry name without a tag -> (name, None)."""
    if "." in name:
        arch, tag = name.split(".", 1)
        registry.get(arch)
        return arch, tag
    registry.get(name)
    return name, None


def default_library(arch: str) -> str:
    return "timm" if registry.get(arch).timm else "torchvision"


def implied_overrides(arch: str, library: str) -> dict[str, Any]:
    """torchvision's GoogLeNet weights expect `transform_input=True` (torchvision sets it when it
    loads them); the option is not in the state dict."""
    return {"transform_input": True} if (arch, library) == ("googlenet", "torchvision") else {}


def timm_tags(arch: str) -> list[str]:
    """The pretrained tags timm knows for `arch` (`a1_in1k`, ...), its default first."""
    import timm

    name = registry.get(arch).timm
    if name is None:
        return []
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*") if "." in n]
    return tags


def torchvision_weights(arch: str) -> list[str]:
    """torchvision's weight enum names for `arch` (`IMAGENET1K_V1`, ...)."""
    name = registry.get(arch).torchvision
    if name is None:
        return []
    import torchvision

    return [w.name for w in torchvision.models.get_model_weights(name)]


def list_pretrained(pattern: str = "*") -> list[dict[str, str]]:
    """Every (model, library, tag or weights) zoo can fetch, for registered models matching `pattern`."""
    out = []
    for arch in registry.list_models(pattern):
        for tag in timm_tags(arch):
            out.append({"model": arch, "library": "timm", "name": f"{arch}.{tag}", "tag": tag})
        for w in torchvision_weights(arch):
            out.append({"model": arch, "library": "torchvision", "name": f"{arch} --weights {w}", "tag": w})
    return out


def resolve(name: str, library: Optional[str] = None, weights: Optional[str] = None) -> tuple[str, str, Optional[str]]:
    """(arch, library, tag-or-weights) for a `--pretrained` request; bad tags and weights fail
    here, listing what exists, before any download."""
    arch, tag = split_name(name)
    if weights is not None:
        if tag is not None:
            raise ValueError(f"pass either a timm tag ({name}) or --weights {weights}, not both")
        library = library or "torchvision"
        if library != "torchvision":
            raise ValueError("--weights names torchvision weights; use --library torchvision")
    if tag is not None:
        library = library or "timm"
        if library != "timm":
            raise ValueError(f"{name}: tags are timm's; torchvision's weights are named with --weights")
    library = library or default_library(arch)
    if library == "timm":
        if registry.get(arch).timm is None:
            raise ValueError(f"{arch} has no timm counterpart; try --library torchvision")
        tags = timm_tags(arch)
        if tag is not None and tag not in tags:
            raise ValueError(f"timm has no pretrained {arch}.{tag}; its tags: {', '.join(tags) or 'none'}")
        if tag is None and not tags:
            raise ValueError(f"timm has no pretrained weights for {arch}")
        return arch, library, tag  # None: timm's default tag
    if registry.get(arch).torchvision is None:
        raise ValueError(f"{arch} has no torchvision counterpart; try --library timm")
    known = torchvision_weights(arch)
    if weights is not None and weights != "DEFAULT" and weights not in known:
        raise ValueError(f"torchvision has no {weights} weights for {arch}; it has: {', '.join(known)} (or DEFAULT)")
    return arch, library, weights or "DEFAULT"


def pretrained_cfg(arch: str, library: str, tag: Optional[str]) -> dict[str, Any]:
    """The preprocessing and label set of a set of weights, from the libraries' own registries
    (no download): timm's `pretrained_cfg`, torchvision's weight `transforms()` and `meta`."""
    if library == "timm":
        from timm.data import infer_imagenet_subset

        src = _timm_cfg(arch, tag)
        cfg = {k: _plain(src[k]) for k in CFG_KEYS if src.get(k) is not None}
        subset = infer_imagenet_subset(src)
        if subset:
            cfg["label_set"] = subset
        cfg["tag"] = src.get("tag") or tag
        return cfg
    import torchvision

    w = torchvision.models.get_model_weights(registry.get(arch).torchvision)[tag or "DEFAULT"]
    t = w.transforms()
    crop = list(t.crop_size)
    resize = list(t.resize_size)
    cfg = {"input_size": [3, crop[0], crop[-1]], "interpolation": t.interpolation.value,
           "crop_pct": crop[0] / resize[0], "crop_mode": "center", "resize_size": resize,
           "mean": list(t.mean), "std": list(t.std), "num_classes": len(w.meta["categories"]),
           "weights": w.name}
    if len(w.meta["categories"]) == 1000:
        cfg["label_set"] = "imagenet-1k"
    return cfg


def _timm_cfg(arch: str, tag: Optional[str]) -> dict[str, Any]:
    """timm's registered pretrained_cfg of `arch`.`tag` (its default tag when None), read from
    timm's registry without building the model."""
    from timm.models import get_pretrained_cfg

    name = registry.get(arch).timm + (f".{tag}" if tag else "")
    found = get_pretrained_cfg(name)
    if found is None:
        raise ValueError(f"timm has no pretrained config for {name}")
    return found.to_dict()


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def hf_cache_dir() -> str:
    import huggingface_hub.constants as c

    return c.HF_HUB_CACHE


def fetch(name: str, library: Optional[str] = None, weights: Optional[str] = None) -> Pretrained:
    """Download (or take from the cache) the weights `name` / `weights` names, with their cfg.

    Offline (the hub unreachable within 2 s, or HF_HUB_OFFLINE=1), only the local cache is
    tried and a missing entry is one line naming the cache path."""
    arch, library, tag = resolve(name, library, weights)
    cfg = pretrained_cfg(arch, library, tag)
    entry = registry.get(arch)
    if library == "timm":
        import timm

        full = entry.timm + (f".{tag}" if tag else "")
        model_cfg = _timm_cfg(arch, tag)
        hub_id = model_cfg.get("hf_hub_id") or ""
        where = os.path.join(hf_cache_dir(), "models--" + hub_id.replace("/", "--")) if hub_id else model_cfg.get("url", "")
        with _hf_offline_unless_reachable() as offline:
            try:
                with _quiet(offline):
                    sd = timm.create_model(full, pretrained=True).state_dict()
            except Exception as e:
                raise RuntimeError(_why(library, full, offline, where, e)) from e
        label = f"{arch}.{cfg.get('tag') or tag}"
        source = {"kind": "pretrained", "library": "timm", "name": label, "hf_hub_id": hub_id}
    else:
        import torch
        import torchvision

        w = torchvision.models.get_model_weights(entry.torchvision)[tag]
        where = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
        offline = not os.path.exists(where) and not _reachable("download.pytorch.org")
        try:
            if offline:
                raise ConnectionError("download.pytorch.org is unreachable")
            sd = torchvision.models.get_model(entry.torchvision, weights=w).state_dict()
        except Exception as e:
            raise RuntimeError(_why(library, f"{arch} {w.name}", offline, where, e)) from e
        label = f"{arch}:{w.name}"
        source = {"kind": "pretrained", "library": "torchvision", "name": label, "url": w.url}
    return Pretrained(arch, library, label, sd, cfg, source, implied_overrides(arch, library))


def _why(library: str, what: str, offline: bool, where: str, e: BaseException) -> str:
    if offline:
        host = "huggingface.co" if library == "timm" else "download.pytorch.org"
        offline_mode = " or HF_HUB_OFFLINE=1" if library == "timm" else ""
        why = f"offline: {host} is unreachable{offline_mode}, and the weights are not in the local cache at {where}"
    else:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return (f"could not fetch pretrained {library} weights {what} ({why}); download the checkpoint "
            "elsewhere and pass it with --checkpoint FILE")


@contextlib.contextmanager
def _quiet(on: bool):
    # Offline, timm and huggingface_hub print warnings for every fallback they try; online, their
    # download progress bars are what the user wants to see.
    if on:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    else:
        yield


@contextlib.contextmanager
def _hf_offline_unless_reachable():
    """Yields whether only the cache is tried. An unreachable hub turns on huggingface_hub's
    offline mode for the call (timm would otherwise retry for about a minute); huggingface_hub
    reads the variable when imported, so its constant is set as well and both are restored."""
    import huggingface_hub.constants as constants

    if constants.HF_HUB_OFFLINE:
        yield True
        return
    if _reachable("huggingface.co"):
        yield False
        return
    saved_env, saved = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = saved
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _reachable(host: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to `host`:443 opens within `timeout` seconds."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def data_config(spec: str) -> dict[str, Any]:
    """`--data-config` for one's own checkpoints: a JSON object (timm's pretrained_cfg keys), a
    JSON file, or the name of pretrained weights whose preprocessing they share
    (`resnet50.a1_in1k`, `resnet50:IMAGENET1K_V2`)."""
    import json

    text = spec.strip()
    if text.startswith("{"):
        cfg = json.loads(text)
    elif os.path.isfile(text):
        with open(text) as f:
            cfg = json.load(f)
    else:
        name, _, weights = text.partition(":")
        arch, library, tag = resolve(name, None, weights or None)
        cfg = pretrained_cfg(arch, library, tag)
    if not isinstance(cfg, dict):
        raise ValueError("--data-config must be a JSON object, a JSON file or a pretrained name")
    from zoo._preprocess import validate_cfg

    validate_cfg(cfg)
    return {k: v for k, v in cfg.items() if k in CFG_KEYS or k in ("tag", "weights")}
