"""`zoo predict`: classify image files with a converted model, the preprocessing its file records,
and optionally the PyTorch model beside it (same weights, exported back; PyTorch's own transforms)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np


def class_names(cfg: dict[str, Any], num_classes: int) -> Optional[list[str]]:
    """Class names from timm's bundled ImageNet info (no download), when the file's label set is
    one timm knows and has `num_classes` names; None otherwise (indices are shown)."""
    subset = cfg.get("label_set")
    if not subset:
        return None
    from timm.data import ImageNetInfo

    try:
        info = ImageNetInfo(subset)
    except AssertionError:  # timm asserts on an unknown subset
        return None
    if info.num_classes() != num_classes:
        return None
    return [info.index_to_description(i) for i in range(num_classes)]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _top(probs: np.ndarray, k: int, names: Optional[list[str]]) -> list[dict[str, Any]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"index": int(i), "name": names[i] if names else str(int(i)), "prob": float(probs[i])} for i in order]


def torch_transform(cfg: dict[str, Any], arch: Optional[str] = None):
    """PyTorch's own preprocessing for `cfg`: the torchvision weights' `transforms()` when the file
    records torchvision weights, torchvision's Resize/CenterCrop for another resize_size, else
    timm's eval transform. Independent of zoo's, so a reference run also checks
    `zoo.Model.preprocess`."""
    from zoo._preprocess import validate_cfg

    full = validate_cfg(cfg)
    if cfg.get("weights") and arch is not None:
        import torchvision

        from zoo import registry

        name = registry.get(arch).torchvision
        if name is not None:
            return torchvision.models.get_model_weights(name)[cfg["weights"]].transforms()
    if full.get("resize_size"):
        from torchvision import transforms as T

        return T.Compose([T.Resize(list(full["resize_size"]), T.InterpolationMode(full["interpolation"])),
                          T.CenterCrop(list(full["input_size"][1:])), T.ToTensor(),
                          T.Normalize(full["mean"], full["std"])])
    from timm.data import create_transform, resolve_data_config

    keys = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
    return create_transform(**resolve_data_config({}, pretrained_cfg={k: full[k] for k in keys}), is_training=False)


def predict_images(path: str | os.PathLike, images: Sequence[str | os.PathLike], *, top: int = 5,
                   reference: bool = False) -> dict[str, Any]:
    """Top-k classes and probabilities for each image; with `reference`, PyTorch's too (its model
    loaded strictly with the file's weights, its transforms) and how far the two are apart."""
    import zoo

    if top < 1:
        raise ValueError(f"--top must be positive, got {top}")
    for image in images:
        if not os.path.isfile(image):
            raise FileNotFoundError(f"no such image: {image}")
    model = zoo.load(path)
    if model.metadata["bn_folded"] == "true" and reference:
        raise ValueError(f"{os.path.basename(path)} has BatchNorm folded into its convs, which no PyTorch model "
                         "can load: --reference needs a file converted without --fold-bn")
    spec = model.loaded.plan.spec
    if getattr(spec, "features_only", False) or spec.num_classes == 0:
        raise ValueError(f"{os.path.basename(path)} returns features, not class scores: predict needs a classifier")
    cfg = model.pretrained_cfg
    x = np.stack([model.preprocess(p) for p in images])
    logits = np.asarray(model.predict(x), np.float64)
    names = class_names(cfg, logits.shape[1])
    probs = _softmax(logits)
    k = min(top, logits.shape[1])
    out: dict[str, Any] = {
        "file": str(path), "arch": model.arch, "framework": model.framework,
        "label_set": cfg.get("label_set") if names else None, "preprocessing": cfg,
        "images": [{"image": str(p), "top": _top(pr, k, names)} for p, pr in zip(images, probs)],
    }
    if reference:
        ref_logits = _torch_logits(model, images, cfg)
        ref_probs = _softmax(ref_logits)
        for row, pr in zip(out["images"], ref_probs):
            row["reference_top"] = _top(pr, k, names)
            row["same_top"] = [t["index"] for t in row["top"]] == [t["index"] for t in row["reference_top"]]
        out["reference"] = {
            "max_abs_logit_diff": float(np.abs(ref_logits - logits).max()),
            "rel_logit_diff": float(np.linalg.norm(ref_logits - logits) / max(np.linalg.norm(ref_logits), 1e-30)),
            "max_abs_prob_diff": float(np.abs(ref_probs - probs).max()),
            "same_top_all": all(r["same_top"] for r in out["images"]),
        }
    return out


def _torch_logits(model: Any, images: Sequence[str | os.PathLike], cfg: dict[str, Any]) -> np.ndarray:
    import torch
    from PIL import Image

    from zoo.frameworks import adapter
    from zoo.io import to_torch

    from .torch_models import torch_model

    loaded = model.loaded
    tm = torch_model(loaded.arch, None, **loaded.overrides)
    sd = to_torch(loaded.framework, adapter(loaded.framework).named(loaded.objects))
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    transform = torch_transform(cfg, loaded.arch)
    batch = []
    for p in images:
        with Image.open(p) as im:
            batch.append(transform(im.convert("RGB")))
    with torch.no_grad():
        return tm.eval()(torch.stack(batch)).double().numpy()
