"""Model surgery on PyTorch-named, PyTorch-layout state dicts: new heads, feature extractors,
other input channels. Loading and conversion both go through here, before the checked merge, so
what surgery removes is removed by name and everything else is still checked tensor by tensor.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import registry

# Options that change the head, the output or the input of a loaded network, not its backbone
# (timm's `create_model` names): a file converted for one setting loads with any other.
SURGERY_OPTIONS = ("num_classes", "in_chans", "global_pool", "features_only", "out_indices")


def split_surgery(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(architecture options, surgery options); surgery options left as None are dropped."""
    arch = {k: v for k, v in options.items() if k not in SURGERY_OPTIONS}
    surgery = {k: v for k, v in options.items() if k in SURGERY_OPTIONS and v is not None}
    return arch, surgery


def target_overrides(arch: str, overrides: Mapping[str, Any], src_plan: Any,
                     surgery: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides of the network that `surgery` makes from the one `overrides` describes."""
    unknown = set(surgery) - set(SURGERY_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; expected {', '.join(SURGERY_OPTIONS)}")
    out = {**overrides, **surgery}
    spec = registry.get_spec(arch, **out)  # checks the values (one line each)
    # A source without auxiliary heads (a features file) cannot grow them back: the new
    # classifying network goes without.
    if getattr(spec, "aux_logits", False) and not getattr(src_plan, "aux", ()):
        out["aux_logits"] = False
    if spec.features_only:
        out["out_indices"] = tuple(spec.out_indices)
    return out


def adapt_input_conv(weight: np.ndarray, in_chans: int) -> np.ndarray:
    """timm's `adapt_input_conv` on an OIHW kernel: one channel sums the RGB kernels (groups of
    three for space-to-depth stems); more channels repeat them cyclically, scaled by 3 / in_chans
    so that the response to a constant image keeps its size."""
    o, i, kh, kw = weight.shape
    if in_chans == i:
        return weight
    w = weight.astype(np.float32)
    if in_chans == 1:
        if i > 3:
            if i % 3:
                raise ValueError(f"cannot adapt a {i}-channel input conv to 1 channel: {i} is not a multiple of 3")
            return w.reshape(o, i // 3, 3, kh, kw).sum(axis=2)
        return w.sum(axis=1, keepdims=True)
    if i != 3:
        raise ValueError(f"in_chans={in_chans} needs an RGB (3-channel) input conv, this one has {i} channels")
    repeat = math.ceil(in_chans / 3)
    w = np.tile(w, (1, repeat, 1, 1))[:, :in_chans]
    return w * np.float32(3 / float(in_chans))


def new_classifiers(layers: Sequence[Any], key: Any) -> dict[str, np.ndarray]:
    """Freshly initialised classifier layers, PyTorch-named and laid out: nn.Linear's default,
    U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
    import jax

    if not layers:
        return {}
    if key is None:
        raise ValueError("a new classifier needs a `key` to initialise it")
    out = {}
    for spec, k in zip(layers, jax.random.split(key, len(layers))):
        bound = 1.0 / np.sqrt(spec.in_features)
        kw, kb = jax.random.split(k)
        out[f"{spec.name}.weight"] = np.asarray(
            jax.random.uniform(kw, (spec.out_features, spec.in_features), minval=-bound, maxval=bound))
        out[f"{spec.name}.bias"] = np.asarray(jax.random.uniform(kb, (spec.out_features,), minval=-bound, maxval=bound))
    return out


def adapt(sd: Mapping[str, np.ndarray], src_plan: Any, dst_plan: Any, key: Optional[Any] = None
          ) -> dict[str, np.ndarray]:
    """The state dict of `src_plan`'s network (PyTorch names and layout) made to fit `dst_plan`,
    the same architecture with other surgery options: tensors of the top-level modules the
    destination lacks are dropped (head, aux heads, stages past the last feature level), a
    classifier of another size is freshly initialised from `key`, and the input conv is adapted
    to `in_chans`. Anything else that does not fit is left for the checked merge to report."""
    dropped = set(src_plan.modules()) - set(dst_plan.modules())
    out = {k: v for k, v in sd.items() if k.split(".")[0] not in dropped}
    src_heads = {c.name: c for c in src_plan.classifiers()}
    fresh = [c for c in dst_plan.classifiers() if src_heads.get(c.name) != c]
    for c in fresh:
        out.pop(f"{c.name}.weight", None)
        out.pop(f"{c.name}.bias", None)
    out.update(new_classifiers(fresh, key))
    if dst_plan.spec.in_chans != src_plan.spec.in_chans:
        name = f"{dst_plan.first_conv.name}.weight"
        if name in out:
            out[name] = adapt_input_conv(np.asarray(out[name]), dst_plan.spec.in_chans)
    return out
