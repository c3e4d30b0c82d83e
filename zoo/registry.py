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
    except (KeyError, TypeError):
        close = suggestions(str(name))
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown model {name!r}{hint}; `zoo list` shows the registry") from None


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, with a transposition of neighbours counting one (`resent` ~ `resnet`)."""
    prev2, prev = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if prev2 is not None and i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def suggestions(name: str, limit: int = 5) -> list[str]:
    """Registered names close to `name`: those containing it (shortest first), then by edit
    distance (typos such as `resent18`)."""
    out = sorted(fnmatch.filter(_REGISTRY, f"*{name.lower()}*"), key=lambda n: (len(n), n))
    near = sorted((d, n) for n in _REGISTRY if (d := _edit_distance(name.lower(), n)) <= max(2, len(name) // 4))
    out += [n for _, n in near if n not in out]
    return out[:limit]


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

    # Every other timm model built on `timm.models.resnet.ResNet` (resnet.py, res2net.py,
    # resnest.py, sknet.py), with the arguments of its timm entrypoint.
    c = dict(stem_width=32, stem_type="deep")  # "c": deep stem
    d = dict(c, avg_down=True)  # "d": deep stem, average-pool downsample
    t = dict(d, stem_type="deep_tiered")  # "t": tiered deep stem, average-pool downsample
    s = dict(stem_width=64, stem_type="deep")  # "s": wide deep stem
    r18, r26, r50, r101 = (2, 2, 2, 2), (2, 2, 2, 2), (3, 4, 6, 3), (3, 4, 23, 3)
    r152, r200, r269 = (3, 8, 36, 3), (3, 24, 36, 3), (3, 30, 48, 8)
    x32x4, x32x8 = dict(cardinality=32, base_width=4), dict(cardinality=32, base_width=8)
    se, eca, rs = dict(attn="se"), dict(attn="eca"), dict(d, replace_stem_pool=True, attn="se", se_rd_ratio=0.25)
    sk = dict(sk_split_input=True)
    sk_small = dict(sk, sk_rd_ratio=1 / 8, sk_rd_divisor=16)
    nest = dict(d, radix=2, avd=True)
    timm_only: dict[str, tuple[str, tuple[int, ...], dict]] = dict(
        resnet10t=(basic, (1, 1, 1, 1), t),
        resnet14t=(bottle, (1, 1, 1, 1), t),
        resnet18d=(basic, r18, d),
        resnet34d=(basic, (3, 4, 6, 3), d),
        resnet26=(bottle, r26, {}),
        resnet26t=(bottle, r26, t),
        resnet26d=(bottle, r26, d),
        resnet50c=(bottle, r50, c),
        resnet50d=(bottle, r50, d),
        resnet50s=(bottle, r50, s),
        resnet50t=(bottle, r50, t),
        resnet101c=(bottle, r101, c),
        resnet101d=(bottle, r101, d),
        resnet101s=(bottle, r101, s),
        resnet152c=(bottle, r152, c),
        resnet152d=(bottle, r152, d),
        resnet152s=(bottle, r152, s),
        resnet200=(bottle, r200, {}),
        resnet200d=(bottle, r200, d),
        resnet50_gn=(bottle, r50, dict(norm_layer="groupnorm")),
        resnext50d_32x4d=(bottle, r50, dict(x32x4, **d)),
        resnext101_32x4d=(bottle, r101, x32x4),
        resnext101_32x16d=(bottle, r101, dict(cardinality=32, base_width=16)),
        resnext101_32x32d=(bottle, r101, dict(cardinality=32, base_width=32)),
        ecaresnet26t=(bottle, r26, dict(t, **eca)),
        ecaresnet50d=(bottle, r50, dict(d, **eca)),
        ecaresnet50d_pruned=(bottle, r50, dict(d, **eca, pruned="ecaresnet50d_pruned")),
        ecaresnet50t=(bottle, r50, dict(t, **eca)),
        # A plain 7x7 stem: stem_width only sizes deep stems.
        ecaresnetlight=(bottle, (1, 1, 11, 3), dict(stem_width=32, avg_down=True, **eca)),
        ecaresnet101d=(bottle, r101, dict(d, **eca)),
        ecaresnet101d_pruned=(bottle, r101, dict(d, **eca, pruned="ecaresnet101d_pruned")),
        ecaresnet200d=(bottle, r200, dict(d, **eca)),
        ecaresnet269d=(bottle, r269, dict(d, **eca)),
        ecaresnext26t_32x4d=(bottle, r26, dict(x32x4, **t, **eca)),
        ecaresnext50t_32x4d=(bottle, r50, dict(x32x4, **t, **eca)),
        seresnet18=(basic, r18, se),
        seresnet34=(basic, (3, 4, 6, 3), se),
        seresnet50=(bottle, r50, se),
        seresnet50t=(bottle, r50, dict(t, **se)),
        seresnet101=(bottle, r101, se),
        seresnet152=(bottle, r152, se),
        seresnet152d=(bottle, r152, dict(d, **se)),
        seresnet200d=(bottle, r200, dict(d, **se)),
        seresnet269d=(bottle, r269, dict(d, **se)),
        seresnext26d_32x4d=(bottle, r26, dict(x32x4, **d, **se)),
        seresnext26t_32x4d=(bottle, r26, dict(x32x4, **t, **se)),
        seresnext50_32x4d=(bottle, r50, dict(x32x4, **se)),
        seresnext101_32x4d=(bottle, r101, dict(x32x4, **se)),
        seresnext101_32x8d=(bottle, r101, dict(x32x8, **se)),
        seresnext101d_32x8d=(bottle, r101, dict(x32x8, **d, **se)),
        seresnext101_64x4d=(bottle, r101, dict(cardinality=64, base_width=4, **se)),
        senet154=(bottle, r152, dict(cardinality=64, base_width=4, stem_type="deep", down_kernel_size=3,
                                     block_reduce_first=2, **se)),
        resnetblur18=(basic, r18, dict(aa="blur")),
        resnetblur50=(bottle, r50, dict(aa="blur")),
        resnetblur50d=(bottle, r50, dict(d, aa="blur")),
        resnetblur101d=(bottle, r101, dict(d, aa="blur")),
        resnetaa34d=(basic, (3, 4, 6, 3), dict(d, aa="avg")),
        resnetaa50=(bottle, r50, dict(aa="avg")),
        resnetaa50d=(bottle, r50, dict(d, aa="avg")),
        resnetaa101d=(bottle, r101, dict(d, aa="avg")),
        seresnetaa50d=(bottle, r50, dict(d, aa="avg", **se)),
        seresnextaa101d_32x8d=(bottle, r101, dict(x32x8, **d, aa="avg", **se)),
        seresnextaa201d_32x8d=(bottle, (3, 24, 36, 4), dict(x32x8, **dict(d, stem_width=64), aa="avg", **se)),
        resnetrs50=(bottle, r50, rs),
        resnetrs101=(bottle, r101, rs),
        resnetrs152=(bottle, r152, rs),
        resnetrs200=(bottle, r200, rs),
        resnetrs270=(bottle, (4, 29, 53, 4), rs),
        resnetrs350=(bottle, (4, 36, 72, 4), rs),
        resnetrs420=(bottle, (4, 44, 87, 4), rs),
        test_resnet=((basic, basic, bottle, basic), (1, 1, 1, 1),
                     dict(stem_width=16, stem_type="deep", avg_down=True, channels=(32, 48, 48, 96))),
        res2net50_26w_4s=("res2net", r50, dict(base_width=26, res2net_scale=4)),
        res2net101_26w_4s=("res2net", r101, dict(base_width=26, res2net_scale=4)),
        res2net50_26w_6s=("res2net", r50, dict(base_width=26, res2net_scale=6)),
        res2net50_26w_8s=("res2net", r50, dict(base_width=26, res2net_scale=8)),
        res2net50_48w_2s=("res2net", r50, dict(base_width=48, res2net_scale=2)),
        res2net50_14w_8s=("res2net", r50, dict(base_width=14, res2net_scale=8)),
        res2next50=("res2net", r50, dict(base_width=4, cardinality=8, res2net_scale=4)),
        res2net50d=("res2net", r50, dict(d, base_width=26, res2net_scale=4)),
        res2net101d=("res2net", r101, dict(d, base_width=26, res2net_scale=4)),
        resnest14d=("resnest", (1, 1, 1, 1), nest),
        resnest26d=("resnest", r26, nest),
        resnest50d=("resnest", r50, nest),
        resnest101e=("resnest", r101, dict(nest, stem_width=64)),
        resnest200e=("resnest", r200, dict(nest, stem_width=64)),
        resnest269e=("resnest", r269, dict(nest, stem_width=64)),
        resnest50d_4s2x40d=("resnest", r50, dict(nest, base_width=40, cardinality=2, radix=4, avd_first=True)),
        resnest50d_1s4x24d=("resnest", r50, dict(nest, base_width=24, cardinality=4, radix=1, avd_first=True)),
        skresnet18=("sk_basic", r18, sk_small),
        skresnet34=("sk_basic", (3, 4, 6, 3), sk_small),
        skresnet50=("sk_bottleneck", r50, sk),
        skresnet50d=("sk_bottleneck", r50, dict(d, **sk)),
        skresnext50_32x4d=("sk_bottleneck", r50, dict(x32x4, sk_rd_ratio=1 / 16, sk_rd_divisor=32,
                                                      sk_split_input=False)),
    )
    # CI's parity tests (strict 1e-5 at an odd size): small models that together exercise the
    # stems, avg_down, SE, ECA, blur anti-aliasing, GroupNorm, per-stage block kinds, Res2Net,
    # ResNeSt and selective kernels. Avg anti-aliasing is not here (timm itself needs even stage
    # sizes) and is covered by tests/test_resnet_family.py's variants. The rest run in the slow sweep.
    ci = {"resnet10t", "resnet14t", "resnetblur18", "ecaresnet26t", "seresnext26d_32x4d",
          "resnet50_gn", "test_resnet", "skresnet18", "res2net50_48w_2s", "resnest14d"}
    for name, (block, layers, kwargs) in timm_only.items():
        register(name, ResNetSpec(block, layers, **kwargs), timm=name, ci=name in ci)


_resnets()

from .googlenet import GoogLeNetSpec  # noqa: E402  (zoo.googlenet needs only zoo.spec)

register("googlenet", GoogLeNetSpec(), torchvision="googlenet")
