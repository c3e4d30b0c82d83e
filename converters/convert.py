"""PyTorch state dicts -> Haiku / Equinox objects and zoo files, by a checked walk over names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from zoo import registry
from zoo._surgery import adapt, split_surgery, target_overrides
from zoo.checked import ConversionError, checked_merge
from zoo.frameworks import adapter
from zoo.io import Loaded, build_metadata, check_output_path, save_file

from .fold import fold_batchnorm
from .state_dict import IGNORED_SUFFIXES, Source, describe_source, load_state_dict, safetensors_shapes, unwrap


@dataclass
class Converted:
    loaded: Loaded  # the framework objects, plan and metadata, as `zoo.io.load_file` gives them
    arrays: dict[str, np.ndarray]  # PyTorch-named, in the framework's layout: what a file stores

    @property
    def objects(self) -> Any:
        return self.loaded.objects


def infer_overrides(arch: str, sd: Mapping[str, np.ndarray], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The options of the network the checkpoint holds: `num_classes` from its classifier and
    `in_chans` from its input conv when the caller did not set them, `aux_logits=False` when it has
    none of the auxiliary heads (GoogLeNet), and a spec's own readings (pruned widths)."""
    out = dict(overrides)
    default = registry.get_spec(arch)
    if "num_classes" not in out:
        w = sd.get("fc.weight")
        if w is not None and w.ndim == 2 and w.shape[0] != default.num_classes:
            out["num_classes"] = int(w.shape[0])
    if "in_chans" not in out:
        w = sd.get(f"{default.plan().first_conv.name}.weight")
        if w is not None and np.ndim(w) == 4 and w.shape[1] != default.in_chans:
            out["in_chans"] = int(w.shape[1])
    if "aux_logits" not in out and getattr(default, "aux_logits", False):
        if not any(k.startswith(_aux_prefixes(arch)) for k in sd):
            out["aux_logits"] = False
    # A spec may read more of its options from the checkpoint's shapes (pruned ResNets: per-conv
    # widths); options the caller set win.
    hook = getattr(registry.get_spec(arch, **out), "overrides_from_state_dict", None)
    if hook is not None:
        for key, value in hook({k: np.shape(v) for k, v in sd.items()}).items():
            out.setdefault(key, value)
    return out


def consume_fixed_buffers(sd: Mapping[str, np.ndarray], plan: Any) -> Mapping[str, np.ndarray]:
    """Constant buffers a checkpoint may carry (older timm saved BlurPool2d's `filt`) must equal
    the architecture's fixed values; they are then dropped, since the models compute them."""
    fixed = plan.fixed_buffers() if hasattr(plan, "fixed_buffers") else {}
    present = [k for k in fixed if k in sd]
    if not present:
        return sd
    wrong = [k for k in present
             if np.shape(sd[k]) != fixed[k].shape or not np.array_equal(np.asarray(sd[k]), fixed[k])]
    if wrong:
        raise ConversionError(unexpected=[f"{k} (differs from the fixed filter)" for k in wrong],
                              context="checkpoint's constant buffers")
    return {k: v for k, v in sd.items() if k not in fixed}


def _aux_prefixes(arch: str) -> tuple[str, ...]:
    return tuple(f"{aux.name}." for aux in registry.get_spec(arch, aux_logits=True).plan().aux)


def drop_unused_aux(arch: str, sd: Mapping[str, np.ndarray], spec: Any) -> Mapping[str, np.ndarray]:
    """Without the auxiliary heads (`aux_logits=False` asked for), remove the checkpoint's aux
    tensors, as torchvision does for its pretrained GoogLeNet. Only those go: any other tensor
    the model lacks still fails the checked merge."""
    if getattr(spec, "aux_logits", True):
        return sd
    prefixes = _aux_prefixes(arch)
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def convert_state_dict(arch: str, sd: Mapping[str, np.ndarray], framework: str, *, fold_bn: bool = False,
                       overrides: Optional[Mapping[str, Any]] = None,
                       source: Optional[Mapping[str, str]] = None, dtype: Any = None, seed: int = 0,
                       pretrained_cfg: Optional[Mapping[str, Any]] = None) -> Converted:
    """`overrides` are the architecture's options; surgery options among them (num_classes,
    in_chans, features_only, out_indices, global_pool) that differ from what the checkpoint holds
    make another head or input from it: a new classifier initialised from `seed` as PyTorch's
    nn.Linear, the pooled or unpooled features, a feature extractor, an adapted input conv.
    `pretrained_cfg`: the preprocessing the weights expect, recorded in the metadata."""
    if source is None:
        source = {"kind": "in-memory", "digest": state_dict_digest(sd)}
    arch_options, surgery = split_surgery(overrides or {})
    overrides = infer_overrides(arch, sd, arch_options)
    spec = registry.get_spec(arch, **overrides)
    src_plan = spec.plan(fold_bn)
    sd = drop_unused_aux(arch, sd, spec)
    sd = consume_fixed_buffers(sd, src_plan)
    plan = src_plan
    if surgery:
        overrides = target_overrides(arch, overrides, src_plan, surgery)
        plan = registry.get_spec(arch, **overrides).plan(fold_bn)
        if plan != src_plan:
            import jax

            # Surgery is on the unfolded checkpoint; folding then sees the kept layers only.
            sd = adapt(sd, spec.plan(False), registry.get_spec(arch, **overrides).plan(False), jax.random.key(seed))
    if fold_bn:
        eps = {n.name: n.eps for n in plan.norms}
        sd = fold_batchnorm(sd, plan.fold_pairs(), eps)
    ad = adapter(framework)
    template = ad.template(plan, dtype)
    arrays = checked_merge(sd, ad.target_shapes(template), ad.from_torch_layout,
                           context=f"checkpoint does not fit {arch}{' (bn folded)' if fold_bn else ''}")
    meta = build_metadata(framework=framework, arch=arch, overrides=overrides, fold_bn=fold_bn,
                          source=source, pretrained_cfg=pretrained_cfg)
    return Converted(Loaded(ad.fill(template, arrays), plan, meta, framework), arrays)


def convert(arch: str, source: Source, framework: str, *, fold_bn: bool = False,
            overrides: Optional[Mapping[str, Any]] = None, dtype: Any = None, seed: int = 0,
            allow_nonfinite: bool = False, pretrained_cfg: Optional[Mapping[str, Any]] = None,
            source_info: Optional[Mapping[str, str]] = None,
            progress: Optional[Callable[[str], None]] = None) -> Converted:
    """Convert a checkpoint file, a state dict or an `nn.Module` for `arch` into `framework`
    (surgery options in `overrides`: see `convert_state_dict`). A checkpoint with NaN or Inf
    values is refused unless `allow_nonfinite`. `source_info` adds to what the file records of its
    source (pretrained weights: library and name)."""
    registry.get(arch)  # fail on an unknown name before reading a large file
    if overrides:
        registry.get_spec(arch, **overrides)  # and on bad options
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".safetensors"):
        # and on tensors the architecture lacks, from the header, before any data is read
        preflight(arch, safetensors_shapes(source), overrides)
    step = progress or (lambda stage: None)
    step("reading the checkpoint")
    sd = load_state_dict(source, allow_nonfinite=allow_nonfinite)
    step("converting")
    return convert_state_dict(arch, sd, framework, fold_bn=fold_bn, overrides=overrides,
                              source={**provenance(source, sd), **(source_info or {})}, dtype=dtype, seed=seed,
                              pretrained_cfg=pretrained_cfg)


def preflight(arch: str, shapes: Mapping[str, tuple[int, ...]], overrides: Optional[Mapping[str, Any]]) -> None:
    """The checked merge on names and shapes alone (zero-stride stand-ins, nothing allocated), so
    a checkpoint that cannot fit is refused before its data is read."""
    sd = unwrap({k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items() if not k.endswith(IGNORED_SUFFIXES)})
    arch_options, _ = split_surgery(overrides or {})
    options = infer_overrides(arch, sd, arch_options)
    spec = registry.get_spec(arch, **options)
    plan = spec.plan(False)
    fixed = plan.fixed_buffers() if hasattr(plan, "fixed_buffers") else {}
    sd = {k: v for k, v in drop_unused_aux(arch, sd, spec).items() if k not in fixed}  # values: checked later
    ad = adapter("equinox")  # PyTorch's layout
    checked_merge(sd, ad.target_shapes(ad.template(plan)), context=f"checkpoint does not fit {arch}")


def provenance(source: Source, sd: Mapping[str, np.ndarray]) -> dict[str, str]:
    """What the file metadata records of its source: a file's name and sha256, or for a state
    dict or module in memory, a digest of its tensors (`state_dict_digest`)."""
    out = describe_source(source)
    if out.get("kind") == "in-memory":
        out["digest"] = state_dict_digest(sd)
    return out


def state_dict_digest(sd: Mapping[str, np.ndarray]) -> str:
    """sha256 over the state dict's tensors as float32 (names, shapes, bytes), key order aside."""
    from zoo._format import content_digest, tensor_digest

    return content_digest({k: tensor_digest(k, np.asarray(v, np.float32)) for k, v in sd.items()})


def convert_to_file(arch: str, source: Source, framework: str, out: str | os.PathLike, *,
                    fold_bn: bool = False, force: bool = False,
                    overrides: Optional[Mapping[str, Any]] = None, seed: int = 0,
                    allow_nonfinite: bool = False, pretrained_cfg: Optional[Mapping[str, Any]] = None,
                    source_info: Optional[Mapping[str, str]] = None,
                    progress: Optional[Callable[[str], None]] = None) -> Path:
    """`progress(stage)` is called as each stage starts (reading, converting, writing)."""
    check_output_path(out)  # a missing or read-only folder fails before any work
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite")
    converted = convert(arch, source, framework, fold_bn=fold_bn, overrides=overrides, seed=seed,
                        allow_nonfinite=allow_nonfinite, pretrained_cfg=pretrained_cfg, source_info=source_info,
                        progress=progress)
    if progress is not None:
        progress("writing and digesting")
    return save_file(out, converted.arrays, converted.loaded.metadata, force=force)
