"""One interface over the two frameworks, for the converters and the file format.

Everything is keyed by PyTorch names; an adapter knows its framework's layout and how to go from
its trees to PyTorch-named leaves and back.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .naming import haiku_from_torch_layout, torch_from_haiku_layout

FRAMEWORKS = ("haiku", "equinox")


@dataclass(frozen=True)
class Adapter:
    name: str
    layout: str
    from_torch_layout: Callable[[np.ndarray], np.ndarray]
    to_torch_layout: Callable[[np.ndarray], np.ndarray]

    @property
    def module(self) -> Any:
        return importlib.import_module(f"zoo.{self.name}")

    def template(self, plan: Any, dtype: Any = None) -> Any:
        """Abstract (shape-only) objects of this framework for `plan`."""
        m = self.module
        return m.template(plan) if self.name == "haiku" else m.template(plan, dtype or np.float32)

    def named(self, objects: Any) -> dict[str, Any]:
        return self.module.named_arrays(*objects)

    def target_shapes(self, template: Any) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.named(template).items()}

    def fill(self, template: Any, arrays: Mapping[str, Any]) -> Any:
        m = self.module
        if self.name == "haiku":
            return m.from_named_arrays(template[0], template[1], arrays)
        return m.from_named_arrays(template[0], arrays)


def _identity(a: np.ndarray) -> np.ndarray:
    return a


_ADAPTERS = {
    "haiku": Adapter("haiku", "conv HWIO, linear (in, out)", haiku_from_torch_layout, torch_from_haiku_layout),
    "equinox": Adapter("equinox", "conv OIHW, linear (out, in)", _identity, _identity),
}


def adapter(framework: str) -> Adapter:
    try:
        return _ADAPTERS[framework]
    except KeyError:
        raise ValueError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}") from None
