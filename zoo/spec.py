"""Framework-agnostic architecture specs and the layer plans both frameworks build from.

A spec (`ResNetSpec`) holds the arguments of timm's `ResNet` class, so a depth or a variant is
data. `resnet_plan` turns a spec into a plan: every layer with its PyTorch module name and all the
arithmetic done (channels, strides, paddings, dilations, eps). The Haiku and Equinox builders only
wire the plan's layers together, so the two frameworks cannot drift apart in the arithmetic, and the
converters get the names and the (conv, norm) pairs they need from the same plan.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union


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
    kind: str  # "max" | "avg" | "avg_same" (timm's AvgPool2dSame: TF "SAME" zero padding)
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
class BlurSpec:
    """timm's BlurPool2d: a fixed binomial filter per channel after reflect padding (anti-aliased
    downsampling). Its filter is a non-learned constant, never a parameter."""

    channels: int
    filt_size: int = 3
    stride: int = 2
    padding: int = 1
    pad_mode: str = "reflect"

    def filter(self) -> list[list[float]]:
        """The 2-D filter: the outer product of binomial coefficients C(n-1, k) / 2^(n-1)."""
        n = self.filt_size
        coeffs = [math.comb(n - 1, k) / 2 ** (n - 1) for k in range(n)]
        return [[a * b for b in coeffs] for a in coeffs]


@dataclass(frozen=True)
class ActSpec:
    """A parameter-free activation slot that keeps a PyTorch Sequential's indices."""

    kind: str = "relu"


@dataclass(frozen=True)
class Conv1dSpec:
    name: str
    in_ch: int
    out_ch: int
    kernel: int
    padding: int = 0
    bias: bool = False


@dataclass(frozen=True)
class AttnSpec:
    """Channel attention applied to a block's output before the residual sum (PyTorch name `se`).

    "se": global mean -> fc1 (1x1 conv, bias) -> ReLU -> fc2 (1x1 conv, bias) -> sigmoid gate.
    "eca": global mean -> 1-D conv across channels (no bias) -> sigmoid gate.
    """

    name: str
    kind: str  # "se" | "eca"
    channels: int
    fc1: Optional[ConvSpec] = None
    fc2: Optional[ConvSpec] = None
    conv: Optional[Conv1dSpec] = None


@dataclass(frozen=True)
class FeatureInfo:
    """One feature level, as an entry of timm's `feature_info`: the module whose output it is,
    its channels and its reduction (input size / feature size)."""

    module: str
    num_chs: int
    reduction: int


# Head options every spec carries, with timm's `create_model` names and meanings: `num_classes=0`
# gives the pooled pre-logits features, `global_pool=""` (with `num_classes=0`) the unpooled final
# map (timm's `forward_features`), `features_only=True` the maps at `out_indices`.
HEAD_OPTIONS = ("num_classes", "global_pool", "features_only", "out_indices")
FEATURE_LEVELS = 5  # the stem, then one per stage (timm's reductions 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class DropBlockSpec:
    """timm's DropBlock2d as make_blocks configures it (training only)."""

    rate: float
    block_size: int
    gamma_scale: float


BLOCK_KINDS = ("basic", "bottleneck", "res2net", "resnest", "sk_basic", "sk_bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4, "res2net": 4, "resnest": 4, "sk_basic": 1, "sk_bottleneck": 4}


class ModelSpec:
    """What every architecture spec shares: a frozen dataclass whose fields are the PyTorch
    constructor's arguments, checked `replace`, plain `to_dict`, and `plan(fold_bn)`."""

    _label = "model"

    def _normalise(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """JSON metadata gives lists where the spec holds tuples: subclasses convert here."""
        return overrides

    def replace(self, **overrides: Any):
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown {self._label} spec option(s): {', '.join(sorted(unknown))}")
        if "out_indices" in overrides and overrides["out_indices"] is not None:
            overrides["out_indices"] = tuple(overrides["out_indices"])
        out = dataclasses.replace(self, **self._normalise(overrides))
        out.check_head()
        return out

    def check_head(self) -> None:
        """Refuse head options timm would refuse, with one line each."""
        n = self.num_classes
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: pooled features), got {n!r}")
        if self.global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {self.global_pool!r}")
        if self.global_pool == "" and n != 0:
            raise ValueError("global_pool='' (the unpooled feature map) needs num_classes=0, as in timm")
        idx = self.out_indices
        if (not idx or any(isinstance(i, bool) or not isinstance(i, int) for i in idx)
                or any(not 0 <= i < FEATURE_LEVELS for i in idx) or list(idx) != sorted(set(idx))):
            raise ValueError(f"out_indices must be increasing feature levels in 0..{FEATURE_LEVELS - 1} "
                             f"(0 the stem, 1-4 the stages), got {tuple(idx) if idx else idx!r}")
        in_chans = self.in_chans
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ResNetSpec(ModelSpec):
    """The arguments of `timm.models.resnet.ResNet` (and of its block classes' `block_args`) that
    define the architecture. Every timm model built on that class is one of these."""

    # One block kind for all stages, or one per stage ("basic" | "bottleneck" | "res2net" |
    # "resnest" | "sk_basic" | "sk_bottleneck": timm's BasicBlock, Bottleneck, Bottle2neck,
    # ResNestBottleneck, SelectiveKernelBasic, SelectiveKernelBottleneck).
    block: Union[str, tuple[str, ...]]
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
    norm_layer: str = "batchnorm"  # "batchnorm" | "groupnorm"
    bn_eps: float = 1e-5
    gn_groups: int = 32  # timm's GroupNorm default
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_block_rate: float = 0.0
    # Attention in every block (timm's block_args attn_layer): "" | "se" | "eca".
    attn: str = ""
    se_rd_ratio: float = 1.0 / 16
    # Anti-aliasing (timm's aa_layer): "" | "avg" (nn.AvgPool2d) | "blur" (BlurPool2d).
    aa: str = ""
    # Res2Net (Bottle2neck): number of channel splits.
    res2net_scale: int = 4
    # ResNeSt (ResNestBottleneck): split-attention radix and the strided average pool ("avd").
    radix: int = 2
    avd: bool = False
    avd_first: bool = False
    # Selective kernel (SelectiveKernel's sk_kwargs).
    sk_rd_ratio: float = 1.0 / 16
    sk_rd_divisor: int = 8
    sk_split_input: bool = True
    # Irregular (pruned) widths: `widths` holds (conv name, output channels) pairs that replace
    # the computed widths; `pruned` names timm's pruning file (timm/models/_pruned/NAME.txt)
    # that supplies them when `widths` is empty, and marks the spec as one whose widths may be
    # read from a checkpoint (`overrides_from_state_dict`).
    pruned: str = ""
    widths: tuple[tuple[str, int], ...] = ()
    # Head options (HEAD_OPTIONS): timm's ResNet `global_pool` and `create_model`'s features_only.
    global_pool: str = "avg"
    features_only: bool = False
    out_indices: tuple[int, ...] = (0, 1, 2, 3, 4)

    _label = "ResNet"

    def _normalise(self, overrides: dict[str, Any]) -> dict[str, Any]:
        for key in ("layers", "channels"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        if isinstance(overrides.get("block"), list):
            overrides["block"] = tuple(overrides["block"])
        if "widths" in overrides:
            # JSON metadata gives lists of lists, a dict is accepted too.
            w = overrides["widths"]
            items = w.items() if isinstance(w, Mapping) else w
            overrides["widths"] = tuple((str(k), int(v)) for k, v in items)
        return overrides

    def plan(self, fold_bn: bool = False) -> "ResNetPlan":
        return resnet_plan(self, fold_bn)

    @property
    def blocks(self) -> tuple[str, ...]:
        """The block kind of each stage."""
        if isinstance(self.block, str):
            return (self.block,) * len(self.layers)
        return tuple(self.block)

    @property
    def expansion(self) -> int:
        return EXPANSION[self.blocks[-1]]

    @property
    def num_features(self) -> int:
        return self.channels[-1] * self.expansion

    def resolved_widths(self) -> dict[str, int]:
        """Per-conv output widths that replace the computed ones (empty for regular models)."""
        if self.widths:
            return dict(self.widths)
        if self.pruned:
            return dict(timm_pruned_widths(self.pruned))
        return {}

    def overrides_from_state_dict(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        """For a pruned spec, the per-conv widths a checkpoint holds when they differ from the
        spec's (so any pruning of the same architecture converts, checked tensor by tensor).
        Regular specs return nothing: a checkpoint of other widths must fail the checked merge."""
        if not (self.pruned or self.widths):
            return {}
        plan = self.plan()
        found = {}
        for conv in plan.all_convs():
            shape = shapes.get(f"{conv.name}.weight")
            if shape is not None and len(shape) == 4:
                found[conv.name] = int(shape[0])
        if all(found.get(c.name, c.out_ch) == c.out_ch for c in plan.all_convs()):
            return {}
        return {"widths": tuple(sorted(found.items()))}


@functools.lru_cache(maxsize=None)
def timm_pruned_widths(name: str) -> tuple[tuple[str, int], ...]:
    """Conv output widths from timm's pruning file `timm/models/_pruned/{name}.txt`, read without
    importing timm (and torch): "layer.weight:[out, in, kh, kw]" entries joined by "***"."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} takes its pruned widths from timm's {name}.txt; install timm")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "_pruned" / f"{name}.txt"
    if not path.exists():
        raise RuntimeError(f"timm has no pruning file {path.name}")
    out = []
    for entry in path.read_text().strip().split("***"):
        key, _, shape = entry.partition(":")
        dims = [int(v) for v in shape.strip()[1:-1].split(",") if v.strip()]
        if key.endswith(".weight") and len(dims) == 4:
            out.append((key[: -len(".weight")], dims[0]))
    return tuple(out)


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None,
                   round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of `divisor` (at least `min_value`), bumped up a
    step when rounding lost more than 1 - round_limit of `v`."""
    min_value = min_value or divisor
    out = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if out < round_limit * v:
        out += divisor
    return out


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive kernel size: |log2(C) + beta| / gamma, made odd, at least 3."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


@dataclass(frozen=True)
class BlockPlan:
    """One residual block. `convs`/`norms` hold every conv/norm of the residual branch (not the
    shortcut's, not the attention's), named by PyTorch module path; `conv(local)`/`norm(local)`
    look them up by the path below the block ("conv1", "conv2.paths.0.bn")."""

    name: str  # "layer1.0"
    kind: str  # one of BLOCK_KINDS
    convs: tuple[ConvSpec, ...]
    norms: tuple[NormSpec, ...]  # empty when folded
    # Shortcut projection, as PyTorch's `downsample` Sequential: (pool or None, conv, norm or None).
    down_pool: Optional[PoolSpec] = None
    down_conv: Optional[ConvSpec] = None
    down_norm: Optional[NormSpec] = None
    drop_path: float = 0.0
    aa: Optional[Union[PoolSpec, BlurSpec]] = None  # anti-aliasing after the strided conv's act
    attn: Optional[AttnSpec] = None
    drop_block: Optional[DropBlockSpec] = None
    # Res2Net: the pool over the last split (first block of a stage); ResNeSt: the "avd" pool.
    pool: Optional[PoolSpec] = None
    scale: int = 1  # Res2Net splits
    width: int = 0  # Res2Net split width
    radix: int = 1  # ResNeSt
    groups: int = 1  # ResNeSt split-attention / selective-kernel cardinality
    avd_first: bool = False
    sk_paths: int = 0
    split_input: bool = False  # selective kernel: each path sees its own share of the channels

    def conv(self, local: str) -> ConvSpec:
        full = f"{self.name}.{local}"
        for c in self.convs:
            if c.name == full:
                return c
        raise KeyError(f"{self.name} has no conv {local!r}")

    def has_conv(self, local: str) -> bool:
        return any(c.name == f"{self.name}.{local}" for c in self.convs)

    def norm(self, local: str) -> Optional[NormSpec]:
        """The norm `local`, or None when the block's norms were folded into its convs."""
        if not self.norms:
            return None
        full = f"{self.name}.{local}"
        for n in self.norms:
            if n.name == full:
                return n
        raise KeyError(f"{self.name} has no norm {local!r}")

    @property
    def out_ch(self) -> int:
        return self.convs[-1].out_ch  # every kind lists its last conv last


@dataclass(frozen=True)
class ResNetPlan:
    spec: ResNetSpec
    fold_bn: bool
    stem_convs: tuple[ConvSpec, ...]  # one ("conv1") or three deep-stem convs ("conv1.0/3/6")
    stem_norms: tuple[NormSpec, ...]  # deep-stem inner norms ("conv1.1/4") then "bn1"
    # PyTorch's `maxpool`: one PoolSpec, or a Sequential's layers with PyTorch's indices (a folded
    # norm's slot is None): (max, blur) for blur anti-aliasing, (conv, [aa,] norm, act) for
    # replace_stem_pool.
    maxpool: tuple[Any, ...]
    maxpool_seq: bool
    stages: tuple[tuple[BlockPlan, ...], ...]  # up to the last feature level asked for
    fc: Optional[LinearSpec]  # None: num_classes=0 or features_only
    norms: tuple[NormSpec, ...] = field(default=())  # every norm of the unfolded model, as built
    # Every feature level of the full network (timm's feature_info); the levels returned by a
    # features_only model (None: the model ends in its head); whether the head pools.
    feature_info: tuple[FeatureInfo, ...] = ()
    out_indices: Optional[tuple[int, ...]] = None
    global_pool: bool = True

    @property
    def stem_pool(self) -> PoolSpec:
        if self.maxpool_seq:
            raise AttributeError("this stem's `maxpool` is a Sequential; see `maxpool`")
        return self.maxpool[0]

    @property
    def first_conv(self) -> ConvSpec:
        """The conv that sees the input (adapted when `in_chans` changes; timm's `first_conv`)."""
        return self.stem_convs[0]

    def modules(self) -> tuple[str, ...]:
        """The top-level PyTorch modules that hold tensors in this (possibly truncated) network."""
        out = ["conv1", "bn1"] + (["maxpool"] if self.maxpool else [])
        out += [f"layer{i + 1}" for i in range(len(self.stages))]
        return tuple(out + (["fc"] if self.fc is not None else []))

    def fold_pairs(self) -> list[tuple[str, str]]:
        """(conv name, norm name) for every norm that folding merges into its conv."""
        return [(n.follows, n.name) for n in self.norms if n.follows is not None]

    def classifiers(self) -> tuple[LinearSpec, ...]:
        """The layers whose outputs are the classes (replaced when `num_classes` changes)."""
        return () if self.fc is None else (self.fc,)

    def all_convs(self) -> list[ConvSpec]:
        """Every 2-D conv with weights, in module order."""
        out = list(self.stem_convs) + [m for m in self.maxpool if isinstance(m, ConvSpec)]
        for stage in self.stages:
            for b in stage:
                out.extend(b.convs)
                if b.attn is not None and b.attn.fc1 is not None:
                    out.extend([b.attn.fc1, b.attn.fc2])
                if b.down_conv is not None:
                    out.append(b.down_conv)
        return out

    def fixed_buffers(self) -> dict[str, Any]:
        """Constant buffers some checkpoints carry (older timm saved BlurPool2d's `filt`): a
        converter checks each against its fixed value and consumes it."""
        import numpy as np

        out = {}
        blurs = [("maxpool.1", self.maxpool[1])] if (self.maxpool_seq and self.maxpool
                                                      and isinstance(self.maxpool[1], BlurSpec)) else []
        blurs += [(f"{b.name}.aa", b.aa) for stage in self.stages for b in stage if isinstance(b.aa, BlurSpec)]
        for name, blur in blurs:
            filt = np.asarray(blur.filter(), np.float32)[None, None]
            out[f"{name}.filt"] = np.repeat(filt, blur.channels, axis=0)
        return out


def _padding(kernel: int, stride: int, dilation: int = 1) -> int:
    # timm's get_padding: symmetric padding that keeps "same"-like sizes for odd kernels.
    return ((stride - 1) + dilation * (kernel - 1)) // 2


def resnet_plan(spec: ResNetSpec, fold_bn: bool = False) -> ResNetPlan:
    """Mirror of timm's `ResNet.__init__` / `make_blocks` and block constructors' arithmetic, with
    PyTorch module names."""
    return _ResNetPlanner(spec, fold_bn).plan()


class _ResNetPlanner:
    def __init__(self, spec: ResNetSpec, fold_bn: bool):
        kinds = spec.blocks
        if not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1000 for n in spec.layers):
            raise ValueError(f"layers must be 1 to 1000 blocks per stage, got {tuple(spec.layers)}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 1 << 16 for c in spec.channels):
            raise ValueError(f"channels must be integers from 1 to 65536, got {tuple(spec.channels)}")
        for name in ("stem_width", "base_width", "cardinality", "res2net_scale", "radix", "gn_groups"):
            v = getattr(spec, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 16:
                raise ValueError(f"{name} must be an integer from 1 to 65536, got {v!r}")
        for name in ("se_rd_ratio", "sk_rd_ratio", "bn_eps", "drop_rate", "drop_path_rate", "drop_block_rate"):
            v = getattr(spec, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be a number from 0 to 1, got {v!r}")
        if len(kinds) != len(spec.layers) or len(spec.channels) != len(spec.layers):
            raise ValueError("block, layers and channels need one entry per stage")
        unknown = [k for k in kinds if k not in BLOCK_KINDS]
        if unknown:
            raise ValueError(f"unknown block type(s) {unknown}; expected {', '.join(BLOCK_KINDS)}")
        if spec.output_stride not in (8, 16, 32):
            raise ValueError("output_stride must be 8, 16 or 32")
        if spec.norm_layer not in ("batchnorm", "groupnorm"):
            raise ValueError(f"unknown norm_layer {spec.norm_layer!r}")
        if spec.attn not in ("", "se", "eca"):
            raise ValueError(f"unknown attn {spec.attn!r}; expected '', 'se' or 'eca'")
        if spec.aa not in ("", "avg", "blur"):
            raise ValueError(f"unknown aa {spec.aa!r}; expected '', 'avg' or 'blur'")
        for k in set(kinds) - {"basic", "bottleneck"}:
            # timm's other blocks reject (or silently drop) these; refuse rather than diverge.
            if spec.aa or (spec.attn and k in ("res2net", "resnest")):
                raise ValueError(f"{k} blocks support no aa{'' if k.startswith('sk') else ' nor attn'}")
            if k in ("res2net", "resnest") and spec.block_reduce_first != 1:
                raise ValueError(f"{k} blocks do not support block_reduce_first")
        spec.check_head()
        # Folding merges BatchNorm's running statistics into the conv before it; GroupNorm has no
        # running statistics, so a GroupNorm model folds to itself.
        self.spec, self.fold_bn = spec, fold_bn and spec.norm_layer == "batchnorm"
        self.widths = spec.resolved_widths()
        self.all_norms: list[NormSpec] = []

    # -- layer factories ------------------------------------------------------------------------

    def conv(self, name: str, cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1,
             groups: int = 1, padding: Optional[int] = None, bias: bool = False,
             normed: bool = True) -> ConvSpec:
        """A conv; `normed` says a norm follows it (so folding gives it a bias)."""
        pad = _padding(k, stride, dilation) if padding is None else padding
        cout = self.widths.get(name, cout)
        if cin < 1 or cout < 1:
            raise ValueError(f"{name} would have {cin} input and {cout} output channels: the spec's widths "
                             "(channels, stem_width, base_width, widths) must give at least one")
        return ConvSpec(name, cin, cout, k, stride, pad, dilation, groups,
                        bias=bias or (self.fold_bn and normed))

    def norm(self, name: str, conv: ConvSpec) -> NormSpec:
        s = self.spec
        if s.norm_layer == "groupnorm" and conv.out_ch % s.gn_groups:
            raise ValueError(f"{name}: GroupNorm's {s.gn_groups} groups do not divide {conv.out_ch} channels")
        follows = conv.name if s.norm_layer == "batchnorm" else None
        n = NormSpec(name, conv.out_ch, s.bn_eps, s.norm_layer, s.gn_groups, follows=follows)
        self.all_norms.append(n)
        return n

    def conv_norm(self, name: str, norm_name: str, *args: Any, **kw: Any) -> tuple[ConvSpec, NormSpec]:
        c = self.conv(name, *args, **kw)
        return c, self.norm(norm_name, c)

    def aa(self, channels: int, stride: int) -> Union[PoolSpec, BlurSpec]:
        if self.spec.aa == "avg":
            # create_aa falls back to nn.AvgPool2d(stride): kernel = stride, no padding.
            return PoolSpec("avg", stride, stride)
        return BlurSpec(channels, 3, stride, _padding(3, stride))

    def attn(self, name: str, cin: int, nominal: int) -> Optional[AttnSpec]:
        """`nominal` is the unpruned channel count timm sized the module from; `cin` the real one."""
        s = self.spec
        if s.attn == "se":
            rd = make_divisible(nominal * s.se_rd_ratio, 8, round_limit=0.0)
            fc1 = self.conv(f"{name}.fc1", cin, rd, 1, padding=0, bias=True, normed=False)
            fc2 = self.conv(f"{name}.fc2", fc1.out_ch, cin, 1, padding=0, bias=True, normed=False)
            return AttnSpec(name, "se", cin, fc1=fc1, fc2=fc2)
        if s.attn == "eca":
            k = eca_kernel_size(nominal)
            return AttnSpec(name, "eca", cin, conv=Conv1dSpec(f"{name}.conv", 1, 1, k, (k - 1) // 2))
        return None

    # -- the network ----------------------------------------------------------------------------

    def plan(self) -> ResNetPlan:
        s, fold = self.spec, self.fold_bn
        deep = "deep" in s.stem_type
        inplanes = s.stem_width * 2 if deep else 64
        if deep:
            c0, c1 = s.stem_width, s.stem_width
            if "tiered" in s.stem_type:
                c0 = 3 * (s.stem_width // 4)
            a, na = self.conv_norm("conv1.0", "conv1.1", s.in_chans, c0, 3, stride=2, padding=1)
            b, nb = self.conv_norm("conv1.3", "conv1.4", a.out_ch, c1, 3, padding=1)
            c, nc = self.conv_norm("conv1.6", "bn1", b.out_ch, inplanes, 3, padding=1)
            stem_convs, stem_norms = (a, b, c), (na, nb, nc)
        else:
            c, nc = self.conv_norm("conv1", "bn1", s.in_chans, inplanes, 7, stride=2, padding=3)
            stem_convs, stem_norms = (c,), (nc,)
        width = c.out_ch

        maxpool: tuple[Any, ...]
        if s.replace_stem_pool:
            pc = self.conv("maxpool.0", width, width, 3, stride=1 if s.aa else 2, padding=1)
            layers: list[Any] = [pc] + ([self.aa(pc.out_ch, 2)] if s.aa else [])
            pn = self.norm(f"maxpool.{len(layers)}", pc)
            layers += [None if fold else pn, ActSpec()]
            maxpool, seq = tuple(layers), True
            width = pc.out_ch
        elif s.aa == "avg":
            maxpool, seq = (PoolSpec("avg", 2, 2),), False
        elif s.aa == "blur":
            maxpool, seq = (PoolSpec("max", 3, 1, 1), BlurSpec(width, 3, 2, 1)), True
        else:
            maxpool, seq = (PoolSpec("max", 3, 2, 1),), False

        stem_info = FeatureInfo("act1", width, 2)
        stages = []
        reductions = []
        net_blocks = sum(s.layers)
        block_idx = 0
        net_stride, dilation, prev_dilation = 4, 1, 1
        nominal_in = inplanes
        for si, (kind, planes, n_blocks) in enumerate(zip(s.blocks, s.channels, s.layers)):
            stride = 1 if si == 0 else 2
            if net_stride >= s.output_stride:
                dilation *= stride
                stride = 1
            else:
                net_stride *= stride
            outplanes = planes * EXPANSION[kind]
            drop_block = None
            if s.drop_block_rate > 0 and si >= 2:
                # make_blocks' drop_blocks(): stage 3 block 5 (gamma 0.25), stage 4 block 3 (gamma 1).
                drop_block = (DropBlockSpec(s.drop_block_rate, 5, 0.25) if si == 2
                              else DropBlockSpec(s.drop_block_rate, 3, 1.0))
            needs_down = stride != 1 or nominal_in != outplanes
            blocks = []
            for bi in range(n_blocks):
                name = f"layer{si + 1}.{bi}"
                b_stride = stride if bi == 0 else 1
                # timm divides by (n - 1): a one-block network has no drop path to decay.
                dp = s.drop_path_rate * block_idx / (net_blocks - 1) if net_blocks > 1 else 0.0
                down = self.downsample(name, width, outplanes, stride, dilation, prev_dilation) \
                    if bi == 0 and needs_down else (None, None, None)
                args = dict(name=name, cin=width, planes=planes, stride=b_stride, dilation=dilation,
                            first_dil=prev_dilation, has_down=down[1] is not None)
                block = getattr(self, f"block_{kind}")(**args)
                block = dataclasses.replace(block, down_pool=down[0], down_conv=down[1],
                                            down_norm=None if fold else down[2], drop_path=dp,
                                            drop_block=drop_block)
                if fold:
                    block = dataclasses.replace(block, norms=())
                if down[1] is not None and down[1].out_ch != block.out_ch:
                    raise ValueError(f"{name}: shortcut width {down[1].out_ch} != block width {block.out_ch}")
                blocks.append(block)
                prev_dilation = dilation
                width = block.out_ch
                nominal_in = outplanes
                block_idx += 1
            stages.append(tuple(blocks))
            reductions.append(net_stride)
        info = (stem_info, *(FeatureInfo(f"layer{i + 1}", st[-1].out_ch, r)
                             for i, (st, r) in enumerate(zip(stages, reductions))))
        fc = LinearSpec("fc", width, s.num_classes) if s.num_classes > 0 else None
        out_indices = None
        if s.features_only:
            # timm's FeatureListNet keeps the modules up to the last level asked for, no head.
            last = max(s.out_indices)
            stages, fc, out_indices = stages[:last], None, tuple(s.out_indices)
            maxpool = maxpool if last >= 1 else ()
        kept = {f"layer{i + 1}" for i in range(len(stages))} | {"conv1", "bn1"} | ({"maxpool"} if maxpool else set())
        norms = tuple(n for n in self.all_norms if n.name.split(".")[0] in kept)
        return ResNetPlan(s, fold, stem_convs, () if fold else stem_norms, maxpool, seq,
                          tuple(stages), fc, norms, info, out_indices, s.global_pool == "avg")

    def downsample(self, name: str, cin: int, cout: int, stride: int, dilation: int,
                   first_dil: int) -> tuple[Optional[PoolSpec], ConvSpec, NormSpec]:
        s = self.spec
        if s.avg_down:
            pool = None
            if stride != 1 or dilation != 1:
                if dilation != 1:
                    # Dilated stages do not downsample: timm's AvgPool2dSame(2, stride 1).
                    pool = PoolSpec("avg_same", 2, 1, 0, ceil_mode=True, count_include_pad=False)
                else:
                    pool = PoolSpec("avg", 2, stride, 0, ceil_mode=True, count_include_pad=False)
            conv, norm = self.conv_norm(f"{name}.downsample.1", f"{name}.downsample.2", cin, cout, 1, padding=0)
            return pool, conv, norm
        k = 1 if stride == 1 and dilation == 1 else s.down_kernel_size
        d = first_dil if k > 1 else 1
        conv, norm = self.conv_norm(f"{name}.downsample.0", f"{name}.downsample.1", cin, cout, k,
                                    stride=stride, dilation=d)
        return None, conv, norm

    # -- blocks: each mirrors its timm class's __init__ -----------------------------------------

    def block_basic(self, name: str, cin: int, planes: int, stride: int, dilation: int,
                    first_dil: int, has_down: bool) -> BlockPlan:
        s = self.spec
        if s.cardinality != 1 or s.base_width != 64:
            raise ValueError("basic blocks support neither cardinality nor base_width")
        use_aa = bool(s.aa) and (stride == 2 or first_dil != dilation)
        c1, n1 = self.conv_norm(f"{name}.conv1", f"{name}.bn1", cin, planes // s.block_reduce_first, 3,
                                stride=1 if use_aa else stride, dilation=first_dil, padding=first_dil)
        c2, n2 = self.conv_norm(f"{name}.conv2", f"{name}.bn2", c1.out_ch, planes, 3,
                                dilation=dilation, padding=dilation)
        return BlockPlan(name, "basic", (c1, c2), (n1, n2),
                         aa=self.aa(c1.out_ch, stride) if use_aa else None,
                         attn=self.attn(f"{name}.se", c2.out_ch, planes))

    def block_bottleneck(self, name: str, cin: int, planes: int, stride: int, dilation: int,
                         first_dil: int, has_down: bool) -> BlockPlan:
        s = self.spec
        width = int(math.floor(planes * (s.base_width / 64)) * s.cardinality)
        use_aa = bool(s.aa) and (stride == 2 or first_dil != dilation)
        c1, n1 = self.conv_norm(f"{name}.conv1", f"{name}.bn1", cin, width // s.block_reduce_first, 1, padding=0)
        c2, n2 = self.conv_norm(f"{name}.conv2", f"{name}.bn2", c1.out_ch, width, 3,
                                stride=1 if use_aa else stride, dilation=first_dil,
                                groups=s.cardinality, padding=first_dil)
        c3, n3 = self.conv_norm(f"{name}.conv3", f"{name}.bn3", c2.out_ch, planes * 4, 1, padding=0)
        return BlockPlan(name, "bottleneck", (c1, c2, c3), (n1, n2, n3),
                         aa=self.aa(c2.out_ch, stride) if use_aa else None,
                         attn=self.attn(f"{name}.se", c3.out_ch, planes * 4))

    def _no_widths(self, kind: str) -> None:
        if self.widths:
            raise ValueError(f"per-conv widths are only supported for basic/bottleneck blocks, not {kind}")

    def block_res2net(self, name: str, cin: int, planes: int, stride: int, dilation: int,
                      first_dil: int, has_down: bool) -> BlockPlan:
        s = self.spec
        self._no_widths("res2net")
        scale = s.res2net_scale
        width = int(math.floor(planes * (s.base_width / 64.0))) * s.cardinality
        c1, n1 = self.conv_norm(f"{name}.conv1", f"{name}.bn1", cin, width * scale, 1, padding=0)
        convs, norms = [c1], [n1]
        for i in range(max(1, scale - 1)):
            c, n = self.conv_norm(f"{name}.convs.{i}", f"{name}.bns.{i}", width, width, 3, stride=stride,
                                  dilation=first_dil, groups=s.cardinality, padding=first_dil)
            convs.append(c)
            norms.append(n)
        c3, n3 = self.conv_norm(f"{name}.conv3", f"{name}.bn3", width * scale, planes * 4, 1, padding=0)
        is_first = stride > 1 or has_down
        # Bottle2neck's pool keeps nn.AvgPool2d's default count_include_pad=True.
        pool = PoolSpec("avg", 3, stride, 1) if is_first and scale > 1 else None
        return BlockPlan(name, "res2net", (*convs, c3), (*norms, n3), pool=pool, scale=scale, width=width,
                         groups=s.cardinality)

    def block_resnest(self, name: str, cin: int, planes: int, stride: int, dilation: int,
                      first_dil: int, has_down: bool) -> BlockPlan:
        s = self.spec
        self._no_widths("resnest")
        gw = int(planes * (s.base_width / 64.0)) * s.cardinality
        avd_stride = 0
        if s.avd and stride > 1:  # timm's `is_first` is never set by make_blocks
            avd_stride, stride = stride, 1
        radix, card = s.radix, s.cardinality
        c1, n1 = self.conv_norm(f"{name}.conv1", f"{name}.bn1", cin, gw, 1, padding=0)
        # SplitAttn (as `conv2`): conv of radix * gw channels, bn0, fc1 (bias), bn1, fc2 (bias).
        sa = f"{name}.conv2"
        conv, bn0 = self.conv_norm(f"{sa}.conv", f"{sa}.bn0", gw, gw * radix, 3, stride=stride,
                                   dilation=first_dil, groups=card * radix, padding=first_dil)
        attn_chs = make_divisible(gw * radix * 0.25, 8, min_value=32)
        fc1, bn1 = self.conv_norm(f"{sa}.fc1", f"{sa}.bn1", gw, attn_chs, 1, groups=card, padding=0, bias=True)
        fc2 = self.conv(f"{sa}.fc2", attn_chs, gw * radix, 1, groups=card, padding=0, bias=True, normed=False)
        c3, n3 = self.conv_norm(f"{name}.conv3", f"{name}.bn3", gw, planes * 4, 1, padding=0)
        pool = PoolSpec("avg", 3, avd_stride, 1) if avd_stride else None
        return BlockPlan(name, "resnest", (c1, conv, fc1, fc2, c3), (n1, bn0, bn1, n3), pool=pool,
                         radix=radix, groups=card, avd_first=s.avd_first)

    def _selective_kernel(self, name: str, cin: int, cout: int, stride: int, dilation: int,
                          groups: int) -> tuple[list[ConvSpec], list[NormSpec]]:
        s = self.spec
        paths = 2  # kernel_size [3, 5], keep_3x3: two 3x3 paths of dilation d and 2d
        path_in = cin // paths if s.sk_split_input else cin
        if s.sk_split_input and cin % paths:
            raise ValueError(f"{name}: {cin} channels do not split over {paths} paths")
        groups = min(cout, groups)
        convs, norms = [], []
        for i, d in enumerate([dilation * (k - 1) // 2 for k in (3, 5)]):
            c, n = self.conv_norm(f"{name}.paths.{i}.conv", f"{name}.paths.{i}.bn", path_in, cout, 3,
                                  stride=stride, dilation=d, groups=groups)
            convs.append(c)
            norms.append(n)
        attn_chs = make_divisible(cout * s.sk_rd_ratio, s.sk_rd_divisor)
        fr, bn = self.conv_norm(f"{name}.attn.fc_reduce", f"{name}.attn.bn", cout, attn_chs, 1, padding=0)
        fs = self.conv(f"{name}.attn.fc_select", attn_chs, cout * paths, 1, padding=0, normed=False)
        return convs + [fr, fs], norms + [bn]

    def block_sk_basic(self, name: str, cin: int, planes: int, stride: int, dilation: int,
                       first_dil: int, has_down: bool) -> BlockPlan:
        s = self.spec
        self._no_widths("sk_basic")
        if s.cardinality != 1 or s.base_width != 64:
            raise ValueError("basic blocks support neither cardinality nor base_width")
        first = planes // s.block_reduce_first
        convs, norms = self._selective_kernel(f"{name}.conv1", cin, first, stride, first_dil, 1)
        c2, n2 = self.conv_norm(f"{name}.conv2.conv", f"{name}.conv2.bn", first, planes, 3, dilation=dilation)
        return BlockPlan(name, "sk_basic", (*convs, c2), (*norms, n2), groups=1, sk_paths=2,
                         split_input=s.sk_split_input, attn=self.attn(f"{name}.se", planes, planes))

    def block_sk_bottleneck(self, name: str, cin: int, planes: int, stride: int, dilation: int,
                            first_dil: int, has_down: bool) -> BlockPlan:
        s = self.spec
        self._no_widths("sk_bottleneck")
        width = int(math.floor(planes * (s.base_width / 64)) * s.cardinality)
        first = width // s.block_reduce_first
        c1, n1 = self.conv_norm(f"{name}.conv1.conv", f"{name}.conv1.bn", cin, first, 1)
        convs, norms = self._selective_kernel(f"{name}.conv2", first, width, stride, first_dil, s.cardinality)
        c3, n3 = self.conv_norm(f"{name}.conv3.conv", f"{name}.conv3.bn", width, planes * 4, 1)
        return BlockPlan(name, "sk_bottleneck", (c1, *convs, c3), (n1, *norms, n3), groups=s.cardinality,
                         sk_paths=2, split_input=s.sk_split_input,
                         attn=self.attn(f"{name}.se", planes * 4, planes * 4))
