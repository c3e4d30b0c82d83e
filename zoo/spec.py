"""Framework-agnostic architecture specs and the layer plans both frameworks build from.

A spec (`ResNetSpec`) holds the arguments of timm's `ResNet` class, so a depth or a variant is
data. `resnet_plan` turns a spec into a plan: every layer with its PyTorch module name and all the
arithmetic done (channels, strides, paddings, dilations, eps). The Haiku and Equinox builders only
wire the plan's layers together, so the two frameworks cannot drift apart in the arithmetic, and the
converters get the names and the (conv, norm) pairs they need from the same plan.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class ConvSpec:
    name: str  # PyTorch module path, e.g. "layer1.0.conv1"
    in_ch: int
    out_ch: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = False


@dataclass(frozen=True)
class NormSpec:
    name: str
    channels: int
    eps: float = 1e-5
    kind: str = "batchnorm"  # "batchnorm" | "groupnorm"
    groups: int = 32  # groupnorm only
    # The conv whose output this norm normalises: folding merges the norm into it.
    follows: Optional[str] = None


@dataclass(frozen=True)
class PoolSpec:
    kind: str  # "max" | "avg"
    kernel: int
    stride: int
    padding: int = 0
    ceil_mode: bool = False
    count_include_pad: bool = True


@dataclass(frozen=True)
class LinearSpec:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ResNetSpec:
    """The arguments of `timm.models.resnet.ResNet` that define the architecture."""

    block: str  # "basic" | "bottleneck"
    layers: tuple[int, ...]
    channels: tuple[int, ...] = (64, 128, 256, 512)
    num_classes: int = 1000
    in_chans: int = 3
    output_stride: int = 32
    cardinality: int = 1
    base_width: int = 64
    stem_width: int = 64
    stem_type: str = ""  # "" | "deep" | "deep_tiered"
    replace_stem_pool: bool = False
    block_reduce_first: int = 1
    down_kernel_size: int = 1
    avg_down: bool = False
    norm_layer: str = "batchnorm"
    bn_eps: float = 1e-5
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def replace(self, **overrides: Any) -> "ResNetSpec":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown ResNet spec option(s): {', '.join(sorted(unknown))}")
        for key in ("layers", "channels"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def plan(self, fold_bn: bool = False) -> "ResNetPlan":
        return resnet_plan(self, fold_bn)

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4

    @property
    def num_features(self) -> int:
        return self.channels[-1] * self.expansion


@dataclass(frozen=True)
class BlockPlan:
    name: str  # "layer1.0"
    kind: str  # "basic" | "bottleneck"
    convs: tuple[ConvSpec, ...]  # conv1, conv2[, conv3]
    norms: tuple[NormSpec, ...]  # bn1, bn2[, bn3]; empty when folded
    # Shortcut projection, as PyTorch's `downsample` Sequential: (pool or None, conv, norm or None).
    down_pool: Optional[PoolSpec] = None
    down_conv: Optional[ConvSpec] = None
    down_norm: Optional[NormSpec] = None
    drop_path: float = 0.0


@dataclass(frozen=True)
class ResNetPlan:
    spec: ResNetSpec
    fold_bn: bool
    stem_convs: tuple[ConvSpec, ...]  # one ("conv1") or three deep-stem convs ("conv1.0/3/6")
    stem_norms: tuple[NormSpec, ...]  # deep-stem inner norms ("conv1.1/4") then "bn1"
    stem_pool: PoolSpec
    stages: tuple[tuple[BlockPlan, ...], ...]
    fc: LinearSpec
    norms: tuple[NormSpec, ...] = field(default=())  # every norm of the unfolded model

    def fold_pairs(self) -> list[tuple[str, str]]:
        """(conv name, norm name) for every norm that folding merges into its conv."""
        return [(n.follows, n.name) for n in self.norms if n.follows is not None]


def _padding(kernel: int, stride: int, dilation: int = 1) -> int:
    # timm's get_padding: symmetric padding that keeps "same"-like sizes for odd kernels.
    return ((stride - 1) + dilation * (kernel - 1)) // 2


def resnet_plan(spec: ResNetSpec, fold_bn: bool = False) -> ResNetPlan:
    """Mirror of timm's `ResNet.__init__` / `make_blocks` arithmetic, with PyTorch module names."""
    if spec.block not in ("basic", "bottleneck"):
        raise ValueError(f"unknown block type {spec.block!r}")
    if spec.output_stride not in (8, 16, 32):
        raise ValueError("output_stride must be 8, 16 or 32")
    if fold_bn and spec.norm_layer != "batchnorm":
        raise ValueError("only BatchNorm can be folded into a conv")
    eps = spec.bn_eps
    all_norms: list[NormSpec] = []

    def conv(name: str, cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1,
             groups: int = 1, padding: Optional[int] = None) -> ConvSpec:
        pad = _padding(k, stride, dilation) if padding is None else padding
        return ConvSpec(name, cin, cout, k, stride, pad, dilation, groups, bias=fold_bn)

    def norm(name: str, ch: int, follows: Optional[str]) -> NormSpec:
        n = NormSpec(name, ch, eps, spec.norm_layer, follows=follows if spec.norm_layer == "batchnorm" else None)
        all_norms.append(n)
        return n

    deep = "deep" in spec.stem_type
    inplanes = spec.stem_width * 2 if deep else 64
    if deep:
        c0, c1 = spec.stem_width, spec.stem_width
        if "tiered" in spec.stem_type:
            c0 = 3 * (spec.stem_width // 4)
        stem_convs = (
            conv("conv1.0", spec.in_chans, c0, 3, stride=2, padding=1),
            conv("conv1.3", c0, c1, 3, padding=1),
            conv("conv1.6", c1, inplanes, 3, padding=1),
        )
        stem_norms = (norm("conv1.1", c0, "conv1.0"), norm("conv1.4", c1, "conv1.3"),
                      norm("bn1", inplanes, "conv1.6"))
    else:
        stem_convs = (conv("conv1", spec.in_chans, inplanes, 7, stride=2, padding=3),)
        stem_norms = (norm("bn1", inplanes, "conv1"),)
    if spec.replace_stem_pool:
        raise NotImplementedError("replace_stem_pool")
    stem_pool = PoolSpec("max", 3, 2, 1)

    stages = []
    net_blocks = sum(spec.layers)
    block_idx = 0
    net_stride, dilation, prev_dilation = 4, 1, 1
    exp = spec.expansion
    for si, (planes, n_blocks) in enumerate(zip(spec.channels, spec.layers)):
        stage = f"layer{si + 1}"
        stride = 1 if si == 0 else 2
        if net_stride >= spec.output_stride:
            dilation *= stride
            stride = 1
        else:
            net_stride *= stride
        outplanes = planes * exp
        blocks = []
        for bi in range(n_blocks):
            name = f"{stage}.{bi}"
            b_stride = stride if bi == 0 else 1
            first_dil = prev_dilation
            dp = spec.drop_path_rate * block_idx / max(net_blocks - 1, 1)
            down_pool = down_conv = down_norm = None
            if bi == 0 and (stride != 1 or inplanes != outplanes):
                if spec.avg_down:
                    if stride != 1 or dilation != 1:
                        if dilation != 1:
                            raise NotImplementedError("avg_down with dilation")
                        down_pool = PoolSpec("avg", 2, stride, 0, ceil_mode=True, count_include_pad=False)
                    cname = f"{name}.downsample.1"
                    down_conv = conv(cname, inplanes, outplanes, 1, padding=0)
                    down_norm = norm(f"{name}.downsample.2", outplanes, cname)
                else:
                    k = 1 if stride == 1 and dilation == 1 else spec.down_kernel_size
                    d = first_dil if k > 1 else 1
                    cname = f"{name}.downsample.0"
                    down_conv = conv(cname, inplanes, outplanes, k, stride=stride, dilation=d)
                    down_norm = norm(f"{name}.downsample.1", outplanes, cname)
            if spec.block == "basic":
                if spec.cardinality != 1 or spec.base_width != 64:
                    raise ValueError("basic blocks support neither cardinality nor base_width")
                first = planes // spec.block_reduce_first
                convs = (
                    conv(f"{name}.conv1", inplanes, first, 3, stride=b_stride, dilation=first_dil,
                         padding=first_dil),
                    conv(f"{name}.conv2", first, outplanes, 3, dilation=dilation, padding=dilation),
                )
                widths = (first, outplanes)
            else:
                width = int(math.floor(planes * (spec.base_width / 64)) * spec.cardinality)
                first = width // spec.block_reduce_first
                convs = (
                    conv(f"{name}.conv1", inplanes, first, 1, padding=0),
                    conv(f"{name}.conv2", first, width, 3, stride=b_stride, dilation=first_dil,
                         groups=spec.cardinality, padding=first_dil),
                    conv(f"{name}.conv3", width, outplanes, 1, padding=0),
                )
                widths = (first, width, outplanes)
            norms = tuple(norm(f"{name}.bn{i + 1}", w, c.name) for i, (w, c) in enumerate(zip(widths, convs)))
            if fold_bn:
                norms, down_norm = (), None
            blocks.append(BlockPlan(name, spec.block, convs, norms, down_pool, down_conv, down_norm, dp))
            prev_dilation = dilation
            inplanes = outplanes
            block_idx += 1
        stages.append(tuple(blocks))
    if fold_bn:
        stem_norms = ()
    fc = LinearSpec("fc", spec.num_features, spec.num_classes)
    return ResNetPlan(spec, fold_bn, stem_convs, stem_norms, stem_pool, tuple(stages), fc, tuple(all_norms))
