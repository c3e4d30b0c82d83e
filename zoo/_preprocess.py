"""Evaluation preprocessing that travels with pretrained weights, without torch.

`preprocess(image, cfg)` gives the (C, H, W) float32 array that timm's eval transform
(`create_transform(**resolve_data_config(...))`, timm 1.0.31 `transforms_imagenet_eval`) gives for
a timm-style pretrained config, or, when the config has `resize_size`, what torchvision's
`ImageClassification` preset gives. Both libraries resample PIL images with PIL's own
`Image.resize`; so do we, which is what makes the results bit-equal rather than merely close.
Cropping, padding and normalisation are plain numpy on the uint8 pixels, in the same float32
operations as torch (x / 255, then (x - mean) / std).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image

__all__ = ["preprocess", "default_cfg", "validate_cfg", "INTERPOLATIONS", "CROP_MODES"]

# timm.data.constants, as literals: importing timm would pull in torch.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875
DEFAULT_CROP_MODE = "center"
DEFAULT_INPUT_SIZE = (3, 224, 224)
# transforms_imagenet_eval's and torchvision's preset default (resolve_data_config's is bicubic
# when a model has no pretrained config at all, but every timm pretrained config names one).
DEFAULT_INTERPOLATION = "bilinear"

# The names timm accepts for eval resizing, and the PIL filters that torchvision hands them to.
INTERPOLATIONS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}
CROP_MODES = ("center", "squash", "border")


def default_cfg() -> dict[str, Any]:
    """The config used when a file records none: timm's defaults (224, crop_pct 0.875, bilinear,
    center crop, ImageNet mean and std)."""
    return {
        "input_size": list(DEFAULT_INPUT_SIZE),
        "interpolation": DEFAULT_INTERPOLATION,
        "crop_pct": DEFAULT_CROP_PCT,
        "crop_mode": DEFAULT_CROP_MODE,
        "mean": list(IMAGENET_DEFAULT_MEAN),
        "std": list(IMAGENET_DEFAULT_STD),
    }


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def validate_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check a pretrained config and fill in what it lacks from `default_cfg()`; raises a
    one-line ValueError naming the first bad field. Keys other than the ones preprocessing uses
    (url, num_classes, test_input_size, ...) are ignored, as timm's eval transform ignores them.
    A value of None counts as missing, as in timm's `resolve_data_config`.

    Returns a new dict: input_size (3, H, W), interpolation, crop_pct, crop_mode, mean, std (all
    tuples or plain Python scalars) and resize_size (None, (s,) for the shorter side, or (h, w))."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"pretrained_cfg must be a mapping, not {type(cfg).__name__}")
    out = default_cfg()
    out.update({k: v for k, v in cfg.items() if v is not None})

    size = out["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(_is_int(d) for d in size)):
        raise ValueError(f"pretrained_cfg field 'input_size' must be [3, H, W] integers, got {size!r}")
    if size[0] != 3:
        raise ValueError(f"pretrained_cfg field 'input_size' must have 3 (RGB) channels, got {size[0]}")
    if min(size[1:]) <= 0:
        raise ValueError(f"pretrained_cfg field 'input_size' must have positive sizes, got {list(size)}")

    interp = out["interpolation"]
    if not (isinstance(interp, str) and interp in INTERPOLATIONS):
        raise ValueError(f"pretrained_cfg field 'interpolation' must be one of {', '.join(INTERPOLATIONS)}, "
                         f"got {interp!r}")

    crop_pct = out["crop_pct"]
    if not (_is_real(crop_pct) and crop_pct > 0):
        raise ValueError(f"pretrained_cfg field 'crop_pct' must be a positive number, got {crop_pct!r}")
    if min(math.floor(d / crop_pct) for d in size[1:]) <= 0:
        raise ValueError(f"pretrained_cfg field 'crop_pct' {crop_pct!r} is too large for input_size "
                         f"{list(size)}: the resize size would be 0")

    mode = out["crop_mode"]
    if not (isinstance(mode, str) and mode in CROP_MODES):
        raise ValueError(f"pretrained_cfg field 'crop_mode' must be one of {', '.join(CROP_MODES)}, got {mode!r}")

    for field in ("mean", "std"):
        v = out[field]
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_real(x) for x in v)):
            raise ValueError(f"pretrained_cfg field {field!r} must be 3 finite numbers, got {v!r}")
    if min(out["std"]) <= 0:
        raise ValueError(f"pretrained_cfg field 'std' must be positive, got {list(out['std'])!r}")

    resize: Optional[tuple[int, ...]] = None
    if "resize_size" in out:
        r = out["resize_size"]
        resize = (r,) if _is_int(r) else tuple(r) if isinstance(r, (list, tuple)) else None
        if resize is None or len(resize) not in (1, 2) or not all(_is_int(d) and d > 0 for d in resize):
            raise ValueError(f"pretrained_cfg field 'resize_size' must be a positive integer or [h, w], got {r!r}")
        # torchvision's presets only resize then center-crop: another crop mode would be ambiguous.
        if mode != "center":
            raise ValueError(f"pretrained_cfg field 'crop_mode' must be 'center' when resize_size is given, "
                             f"got {mode!r}")

    return {
        "input_size": tuple(int(d) for d in size),
        "interpolation": interp,
        "crop_pct": float(crop_pct),
        "crop_mode": mode,
        "mean": tuple(float(x) for x in out["mean"]),
        "std": tuple(float(x) for x in out["std"]),
        "resize_size": None if resize is None else tuple(int(d) for d in resize),
    }


def _to_rgb(image: Any) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")  # convert() loads the pixels, so the file can close
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(f"an image array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4), "
                             f"got {image.dtype} {image.shape}")
        image = Image.fromarray(np.ascontiguousarray(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, a path or a uint8 numpy array, not {type(image).__name__}")
    # Like timm's dataset loader: palette, grayscale, RGBA and CMYK all go through PIL's convert.
    return image.convert("RGB")


def _resize(img: Image.Image, hw: tuple[int, int], interpolation: str) -> Image.Image:
    if (img.height, img.width) == hw:
        return img  # torchvision returns the image untouched rather than resampling it
    return img.resize((hw[1], hw[0]), INTERPOLATIONS[interpolation])


def _shorter_side(img: Image.Image, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `short`, the longer side is truncated."""
    h, w = img.height, img.width
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def _keep_ratio(img: Image.Image, target: tuple[int, int], longest: bool) -> tuple[int, int]:
    """timm's ResizeKeepRatio (no randomness): one ratio for both sides, chosen so that the
    longest (border mode) or shortest (center mode, non-square target) side fits the target;
    Python's round (half to even) on each side, as timm does."""
    rh, rw = img.height / target[0], img.width / target[1]
    ratio = max(rh, rw) if longest else min(rh, rw)
    return round(img.height / ratio), round(img.width / ratio)


def _center_crop_or_pad(a: np.ndarray, hw: tuple[int, int], fill: tuple[int, int, int]) -> np.ndarray:
    """torchvision's center_crop (fill 0) and timm's CenterCropOrPad (fill = mean colour): pad the
    short sides with the odd pixel after, then crop at round((size - crop) / 2), half to even."""
    th, tw = hw
    h, w = a.shape[:2]
    if th > h or tw > w:
        top, left = max(th - h, 0) // 2, max(tw - w, 0) // 2
        padded = np.empty((max(h, th), max(w, tw), 3), np.uint8)
        padded[...] = np.clip(fill, 0, 255).astype(np.uint8)  # PIL clips an out-of-range fill colour
        padded[top:top + h, left:left + w] = a
        a = padded
        h, w = a.shape[:2]
    y, x = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return a[y:y + th, x:x + tw]


def preprocess(image: Any, cfg: Optional[Mapping[str, Any]] = None) -> np.ndarray:
    """One image as the (3, H, W) float32 array the model's eval transform makes of it.

    `image`: a PIL image, a path, or a uint8 array (H, W, 3), (H, W, 4) or (H, W); converted to
    RGB first. `cfg`: a timm-style pretrained config (see `validate_cfg`; None: `default_cfg()`).
    With `resize_size`, torchvision's preset: Resize(resize_size), CenterCrop(input_size). Else
    timm's: resize to floor(size / crop_pct) per side (center: the shorter side, keeping the
    aspect ratio; squash: both sides; border: the longer side, then pad with the mean colour),
    then a center crop to input_size."""
    c = validate_cfg(default_cfg() if cfg is None else cfg)
    img = _to_rgb(image)
    hw = c["input_size"][1], c["input_size"][2]
    interp = c["interpolation"]
    fill = (0, 0, 0)
    if c["resize_size"] is not None:
        r = c["resize_size"]
        img = _resize(img, _shorter_side(img, r[0]) if len(r) == 1 else (r[0], r[1]), interp)
    else:
        scale = math.floor(hw[0] / c["crop_pct"]), math.floor(hw[1] / c["crop_pct"])
        mode = c["crop_mode"]
        if mode == "squash":
            img = _resize(img, scale, interp)
        elif mode == "border":
            img = _resize(img, _keep_ratio(img, scale, longest=True), interp)
            fill = tuple(round(255 * m) for m in c["mean"])
        elif scale[0] == scale[1]:
            img = _resize(img, _shorter_side(img, scale[0]), interp)
        else:
            img = _resize(img, _keep_ratio(img, scale, longest=False), interp)
    pixels = _center_crop_or_pad(np.asarray(img, np.uint8), hw, fill)
    x = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(c["mean"], np.float32)[:, None, None]
    std = np.asarray(c["std"], np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
