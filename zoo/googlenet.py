"""torchvision's GoogLeNet (Inception v1): its spec, the table of inception blocks, and the plan.

As for the ResNets (`zoo.spec`), the plan holds every layer with its PyTorch module name and all
the channel arithmetic, so the Haiku and Equinox builders only wire it together and the converters
read names and (conv, norm) pairs from it. Where torchvision departs from the paper, the plan
follows torchvision, since its checkpoints are what gets converted: the "5x5" branch is a 3x3 conv
(pytorch/vision#906), every max-pool uses ceil_mode, and BatchNorm's eps is 0.001.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

from .spec import ConvSpec, FeatureInfo, LinearSpec, ModelSpec, NormSpec, PoolSpec


class InceptionWidths(NamedTuple):
    ch1x1: int  # branch1: 1x1
    ch3x3red: int  # branch2: 1x1 reduction, then 3x3
    ch3x3: int
    ch5x5red: int  # branch3: 1x1 reduction, then a 3x3 (the paper's 5x5)
    ch5x5: int
    pool_proj: int  # branch4: 3x3 max-pool, then 1x1 projection

    @property
    def out_ch(self) -> int:
        return self.ch1x1 + self.ch3x3 + self.ch5x5 + self.pool_proj


# The nine inception blocks, in order (torchvision's `GoogLeNet.__init__`); each block's input is
# the previous block's concatenated output.
INCEPTION_BLOCKS: dict[str, InceptionWidths] = {
    "inception3a": InceptionWidths(64, 96, 128, 16, 32, 32),
    "inception3b": InceptionWidths(128, 128, 192, 32, 96, 64),
    "inception4a": InceptionWidths(192, 96, 208, 16, 48, 64),
    "inception4b": InceptionWidths(160, 112, 224, 24, 64, 64),
    "inception4c": InceptionWidths(128, 128, 256, 24, 64, 64),
    "inception4d": InceptionWidths(112, 144, 288, 32, 64, 64),
    "inception4e": InceptionWidths(256, 160, 320, 32, 128, 128),
    "inception5a": InceptionWidths(256, 160, 320, 32, 128, 128),
    "inception5b": InceptionWidths(384, 192, 384, 48, 128, 128),
}

# The stride-2 max-pools between stages: (name, kernel), before the named block.
POOL_BEFORE: dict[str, tuple[str, int]] = {"inception4a": ("maxpool3", 3), "inception5a": ("maxpool4", 2)}

# Feature levels (features_only): torchvision has no feature_info for GoogLeNet, so zoo follows
# timm's convention for CNNs, one level per reduction, each the last layer before the next
# downsampling: conv1 (reduction 2), conv3 (4, the stem before maxpool2), and the last inception
# block of each stage, inception3b (8), inception4e (16) and inception5b (32).
FEATURE_TAPS = ("conv1", "conv3", "inception3b", "inception4e", "inception5b")

# Auxiliary classifier -> the block whose output it reads.
AUX_TAPS: dict[str, str] = {"aux1": "inception4a", "aux2": "inception4d"}

STEM_CHANNELS = (64, 64, 192)  # conv1 (7x7/2), conv2 (1x1), conv3 (3x3)
BN_EPS = 1e-3  # torchvision's BasicConv2d
AUX_CONV_CHANNELS = 128
AUX_POOL = (4, 4)  # the aux heads' adaptive average pool; fc1 sees 128 * 4 * 4 features
AUX_HIDDEN = 1024

# torchvision's `_transform_input`: per channel (scale, shift) turning ImageNet-normalised inputs
# into the (x - 0.5) / 0.5 normalisation the original weights were trained with.
TRANSFORM_INPUT = tuple((std / 0.5, (mean - 0.5) / 0.5)
                        for mean, std in ((0.485, 0.229), (0.456, 0.224), (0.406, 0.225)))


class GoogLeNetOutputs(NamedTuple):
    """Training-mode outputs, in torchvision's order (its `GoogLeNetOutputs`)."""

    logits: Any
    aux_logits2: Any
    aux_logits1: Any


@dataclass(frozen=True)
class GoogLeNetSpec(ModelSpec):
    """The arguments of torchvision's `GoogLeNet` that zoo models: field names are torchvision's,
    so overrides pass straight to its constructor. Defaults are those of `googlenet(weights=None)`
    (torchvision's pretrained weights want `transform_input=True` and have no aux heads)."""

    num_classes: int = 1000
    aux_logits: bool = True
    transform_input: bool = False
    dropout: float = 0.2
    dropout_aux: float = 0.7
    # Not torchvision's arguments (its GoogLeNet is RGB only and always classifies); timm's
    # meanings, see zoo.spec.HEAD_OPTIONS. The aux heads exist only in a classifying model.
    in_chans: int = 3
    global_pool: str = "avg"
    features_only: bool = False
    out_indices: tuple[int, ...] = (0, 1, 2, 3, 4)

    _label = "GoogLeNet"

    def plan(self, fold_bn: bool = False) -> "GoogLeNetPlan":
        return googlenet_plan(self, fold_bn)

    def check_head(self) -> None:
        super().check_head()
        if self.transform_input and self.in_chans != 3:
            raise ValueError("transform_input re-normalises RGB inputs: it needs in_chans=3")

    @property
    def classifying(self) -> bool:
        return self.num_classes > 0 and not self.features_only

    @property
    def num_features(self) -> int:
        return INCEPTION_BLOCKS["inception5b"].out_ch


@dataclass(frozen=True)
class ConvBNPlan:
    """torchvision's `BasicConv2d`: conv (no bias) -> BatchNorm -> ReLU."""

    name: str  # "inception3a.branch2.0"; its layers are `<name>.conv`, `<name>.bn`
    conv: ConvSpec
    norm: Optional[NormSpec]  # None when folded into the conv


@dataclass(frozen=True)
class PoolPlan:
    name: str  # "maxpool1", "inception3a.branch4.0"
    pool: PoolSpec


@dataclass(frozen=True)
class InceptionPlan:
    name: str
    branch1: ConvBNPlan
    branch2: tuple[ConvBNPlan, ConvBNPlan]
    branch3: tuple[ConvBNPlan, ConvBNPlan]
    branch4: tuple[PoolPlan, ConvBNPlan]
    out_ch: int


@dataclass(frozen=True)
class AuxPlan:
    """torchvision's `InceptionAux`: adaptive avg-pool 4x4 -> BasicConv2d 1x1 -> flatten (C, H, W
    order) -> fc1 -> ReLU -> dropout -> fc2."""

    name: str  # "aux1"
    tap: str  # the trunk layer whose output it reads
    pool_hw: tuple[int, int]
    conv: ConvBNPlan
    fc1: LinearSpec
    fc2: LinearSpec
    dropout: float


TrunkLayer = Union[ConvBNPlan, PoolPlan, InceptionPlan]


@dataclass(frozen=True)
class GoogLeNetPlan:
    spec: GoogLeNetSpec
    fold_bn: bool
    trunk: tuple[TrunkLayer, ...]  # in execution order, up to inception5b
    aux: tuple[AuxPlan, ...]  # empty without aux_logits, and in a model that does not classify
    fc: Optional[LinearSpec]  # None: num_classes=0 or features_only
    norms: tuple[NormSpec, ...]  # every norm of the unfolded model, as built
    feature_info: tuple[FeatureInfo, ...] = ()  # every level of the full network
    out_indices: Optional[tuple[int, ...]] = None  # the levels returned (features_only)
    global_pool: bool = True

    def classifiers(self) -> tuple[LinearSpec, ...]:
        """The layers whose outputs are the classes: the classifier and the aux heads' `fc2`."""
        return (*(() if self.fc is None else (self.fc,)), *(a.fc2 for a in self.aux))

    @property
    def first_conv(self) -> ConvSpec:
        return self.trunk[0].conv

    def modules(self) -> tuple[str, ...]:
        """The top-level PyTorch modules that hold tensors in this (possibly truncated) network."""
        return (*(t.name for t in self.trunk if not isinstance(t, PoolPlan)), *(a.name for a in self.aux),
                *(() if self.fc is None else ("fc",)))

    def fold_pairs(self) -> list[tuple[str, str]]:
        """(conv name, norm name) for every norm that folding merges into its conv."""
        return [(n.follows, n.name) for n in self.norms if n.follows is not None]


def _max_pool(name: str, kernel: int, stride: int, padding: int = 0) -> PoolPlan:
    return PoolPlan(name, PoolSpec("max", kernel, stride, padding, ceil_mode=True))


def googlenet_plan(spec: GoogLeNetSpec, fold_bn: bool = False) -> GoogLeNetPlan:
    """Mirror of torchvision's `GoogLeNet.__init__`, with PyTorch module names."""
    all_norms: list[NormSpec] = []

    def basic(name: str, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> ConvBNPlan:
        conv = ConvSpec(f"{name}.conv", cin, cout, kernel, stride, padding, bias=fold_bn)
        norm = NormSpec(f"{name}.bn", cout, BN_EPS, follows=conv.name)
        all_norms.append(norm)
        return ConvBNPlan(name, conv, None if fold_bn else norm)

    def inception(name: str, cin: int, w: InceptionWidths) -> InceptionPlan:
        return InceptionPlan(
            name,
            branch1=basic(f"{name}.branch1", cin, w.ch1x1, 1),
            branch2=(basic(f"{name}.branch2.0", cin, w.ch3x3red, 1),
                     basic(f"{name}.branch2.1", w.ch3x3red, w.ch3x3, 3, padding=1)),
            branch3=(basic(f"{name}.branch3.0", cin, w.ch5x5red, 1),
                     basic(f"{name}.branch3.1", w.ch5x5red, w.ch5x5, 3, padding=1)),
            branch4=(_max_pool(f"{name}.branch4.0", 3, 1, padding=1),
                     basic(f"{name}.branch4.1", cin, w.pool_proj, 1)),
            out_ch=w.out_ch,
        )

    c1, c2, c3 = STEM_CHANNELS
    trunk: list[TrunkLayer] = [
        basic("conv1", spec.in_chans, c1, 7, stride=2, padding=3),
        _max_pool("maxpool1", 3, 2),
        basic("conv2", c1, c2, 1),
        basic("conv3", c2, c3, 3, padding=1),
        _max_pool("maxpool2", 3, 2),
    ]
    ch = c3
    block_out: dict[str, int] = {}
    for name, widths in INCEPTION_BLOCKS.items():
        if name in POOL_BEFORE:
            pool_name, kernel = POOL_BEFORE[name]
            trunk.append(_max_pool(pool_name, kernel, 2))
        trunk.append(inception(name, ch, widths))
        ch = block_out[name] = widths.out_ch

    spec.check_head()
    channels = {"conv1": c1, "conv3": c3, **block_out}
    reductions = (2, 4, 8, 16, 32)
    info = tuple(FeatureInfo(t, channels[t], r) for t, r in zip(FEATURE_TAPS, reductions))
    out_indices = None
    if spec.features_only:
        last = [t.name for t in trunk].index(FEATURE_TAPS[max(spec.out_indices)])
        trunk, out_indices = trunk[: last + 1], tuple(spec.out_indices)
        kept = {t.name for t in trunk}
        all_norms[:] = [n for n in all_norms if n.name.split(".")[0] in kept]

    aux = []
    if spec.aux_logits and spec.classifying:
        # Built after the trunk so `norms` lists layers in torchvision's module order.
        for name, tap in AUX_TAPS.items():
            feats = AUX_CONV_CHANNELS * AUX_POOL[0] * AUX_POOL[1]
            conv = basic(f"{name}.conv", block_out[tap], AUX_CONV_CHANNELS, 1)
            aux.append(AuxPlan(name, tap, AUX_POOL, conv, LinearSpec(f"{name}.fc1", feats, AUX_HIDDEN),
                               LinearSpec(f"{name}.fc2", AUX_HIDDEN, spec.num_classes), spec.dropout_aux))
    fc = LinearSpec("fc", ch, spec.num_classes) if spec.classifying else None
    return GoogLeNetPlan(spec, fold_bn, tuple(trunk), tuple(aux), fc, tuple(all_norms), info, out_indices,
                         spec.global_pool == "avg")
