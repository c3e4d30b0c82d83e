"""Model names (timm's) mapped to architecture specs."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Optional

from .spec import ResNetSpec


@dataclass(frozen=True)
class Entry:
    name: str
    spec: Any
    # Which PyTorch libraries build this exact module tree (used by verification and tests).
    timm: Optional[str] = None
    torchvision: Optional[str] = None
    # Whether CI's parity tests cover this model; the rest run in the slow sweep (`-m slow`).
    ci: bool = True


_REGISTRY: dict[str, Entry] = {}


def register(name: str, spec: Any, *, timm: Optional[str] = None,
             torchvision: Optional[str] = None, ci: bool = True) -> None:
    """`spec` is any frozen dataclass with `.replace(**overrides)` and `.plan(fold_bn)`."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = Entry(name, spec, timm, torchvision, ci)


def get(name: str) -> Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = fnmatch.filter(_REGISTRY, f"*{name}*")[:5]
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown model {name!r}{hint}; `zoo list` shows the registry") from None


def get_spec(name: str, **overrides: Any) -> Any:
    return get(name).spec.replace(**overrides) if overrides else get(name).spec


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _resnets() -> None:
    basic, bottle = "basic", "bottleneck"
    torchvision_too = dict(
        resnet18=ResNetSpec(basic, (2, 2, 2, 2)),
        resnet34=ResNetSpec(basic, (3, 4, 6, 3)),
        resnet50=ResNetSpec(bottle, (3, 4, 6, 3)),
        resnet101=ResNetSpec(bottle, (3, 4, 23, 3)),
        resnet152=ResNetSpec(bottle, (3, 8, 36, 3)),
        resnext50_32x4d=ResNetSpec(bottle, (3, 4, 6, 3), cardinality=32, base_width=4),
        resnext101_32x8d=ResNetSpec(bottle, (3, 4, 23, 3), cardinality=32, base_width=8),
        resnext101_64x4d=ResNetSpec(bottle, (3, 4, 23, 3), cardinality=64, base_width=4),
        wide_resnet50_2=ResNetSpec(bottle, (3, 4, 6, 3), base_width=128),
        wide_resnet101_2=ResNetSpec(bottle, (3, 4, 23, 3), base_width=128),
    )
    for name, spec in torchvision_too.items():
        register(name, spec, timm=name, torchvision=name)


_resnets()
