"""The PyTorch reference models: building them, randomising them for tests, pretrained weights."""

from __future__ import annotations

from typing import Any

from zoo import registry

LIBRARIES = ("timm", "torchvision")


def default_library(arch: str) -> str:
    """timm where it has the model, else torchvision."""
    entry = registry.get(arch)
    return "timm" if entry.timm else "torchvision"


def torch_model(arch: str, library: str | None = None, **overrides: Any):
    """The PyTorch model with the same module tree as zoo's `arch`, randomly initialised, eval mode."""
    entry = registry.get(arch)
    library = library or default_library(arch)
    name = getattr(entry, library, None) if library in LIBRARIES else None
    if name is None:
        raise ValueError(f"{arch} has no {library} counterpart")
    num_classes = overrides.pop("num_classes", entry.spec.num_classes)
    if library == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **overrides)
    else:
        model = _torchvision_model(name, num_classes, overrides)
    return model.eval()


def _torchvision_model(name: str, num_classes: int, overrides: dict[str, Any]):
    """torchvision's model with zoo's surgery options, which torchvision lacks, done by hand the
    way timm does them: another input conv, no classifier (num_classes=0), no pooling, or a
    feature extractor (`create_feature_extractor` at zoo's feature taps) returning a list."""
    import torch
    import torchvision

    in_chans = overrides.pop("in_chans", 3)
    global_pool = overrides.pop("global_pool", "avg")
    features_only = overrides.pop("features_only", False)
    out_indices = overrides.pop("out_indices", (0, 1, 2, 3, 4))
    if name == "googlenet":
        # Its default init, asked for explicitly: left unset, the constructor warns.
        overrides.setdefault("init_weights", True)
        if num_classes == 0 or features_only:
            overrides["aux_logits"] = False
    model = torchvision.models.get_model(name, weights=None, num_classes=max(num_classes, 1), **overrides)
    if in_chans != 3:
        first = model.conv1.conv if name == "googlenet" else model.conv1
        new = torch.nn.Conv2d(in_chans, first.out_channels, first.kernel_size, first.stride, first.padding,
                              bias=False)
        if name == "googlenet":
            model.conv1.conv = new
        else:
            model.conv1 = new
    if num_classes == 0 and not features_only:
        model.fc = torch.nn.Identity()
        if global_pool == "":
            return _FeatureList(model, ["inception5b" if name == "googlenet" else "layer4"], single=True)
    if features_only:
        from zoo.googlenet import FEATURE_TAPS

        taps = FEATURE_TAPS if name == "googlenet" else ("relu", "layer1", "layer2", "layer3", "layer4")
        return _FeatureList(model, [taps[i] for i in out_indices])
    return model


def _FeatureList(model, nodes: list[str], single: bool = False):
    import torch
    from torchvision.models.feature_extraction import create_feature_extractor

    class FeatureList(torch.nn.Module):
        """The graph up to `nodes`, returning their outputs as a list (timm's FeatureListNet)."""

        def __init__(self):
            super().__init__()
            self.body = create_feature_extractor(model.eval(), return_nodes={n: n for n in nodes})

        def forward(self, x):
            out = [self.body(x)[n] for n in nodes]
            return out[0] if single else out

        def state_dict(self, *args, **kwargs):
            return {k[len("body."):]: v for k, v in super().state_dict(*args, **kwargs).items()}

        def load_state_dict(self, sd, strict=True, assign=False):
            return self.body.load_state_dict(sd, strict=strict, assign=assign)

    return FeatureList()


def randomize_norms(model, seed: int = 0, calibration_size: int = 96, calibration_batch: int = 8):
    """Random affine parameters and running statistics in every norm layer.

    Default statistics (mean 0, var 1, scale 1, shift 0) make a norm the identity and would hide
    swapped or misrouted tensors. Purely random statistics are no better: activations then drift
    layer after layer until the logits barely depend on the input (GoogLeNet's spread across a batch
    fell to ~1e-7 of their norm), and a parity check compares constants. So the running statistics
    are measured on a random calibration batch, then perturbed; scales and shifts are random.

    The random model must also be as well conditioned as a trained one, or fp32 rounding alone
    (PyTorch's own, measured against float64) exceeds the 1e-5 parity tolerance:
    - the last norm of each residual branch gets scales and shifts 5x smaller (0.1..0.3), as in
      trained ResNets, whose branches add small corrections to the residual stream (timm
      initialises those scales to zero); less in networks of more than 16 blocks, 0.8/sqrt(blocks),
      so that the branches' summed variance does not grow with depth (the Fixup / SkipInit
      argument). With full-scale branches the stream grew ~400x through ecaresnet101d_pruned,
      saturated its attention gates, and PyTorch fp32 was 5e-2 from float64 (3e-7 with this);
      with 0.2 in all 66 blocks of resnest200e, 5e-6 (1e-6 with depth scaling). A misrouted
      tensor still moves the logits by percents;
    - variances are floored at 1% of the channel's second moment: a norm of nearly constant
      features (pooled attention inputs barely vary across random images) would otherwise amplify
      their rounding by up to 1/sqrt(eps);
    - statistics come from one training-mode pass (batch statistics upstream), then the norms that
      feed the residual stream (branch ends, shortcuts) or an attention gate (pooled, 1x1 inputs)
      are recalibrated in forward order on the inputs they see in inference. Without that, the
      perturbed statistics shifted each layer's inference inputs away from its training-mode ones,
      and the drift compounded along the stream (resnetrs350's grew 60x through layer3 in
      inference, ~1x in training; ResNeSt's split-attention softmax saturated). Recalibrating
      every norm would be exact normalisation everywhere, which makes a deep plain network chaotic
      (GoogLeNet's fp32 error grew 1.3x per inception module to 1.2e-5; 2e-6 this way).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm))]
    tracked = [m for m in norms if getattr(m, "running_mean", None) is not None]
    with torch.no_grad():
        ends = _residual_branch_ends(model)
        branch_scale = min(0.2, 0.8 / max(len(ends), 1) ** 0.5)
        for m in norms:
            if getattr(m, "weight", None) is not None:
                small = branch_scale if any(m is e for e in ends) else 1.0
                m.weight.copy_((torch.rand(m.weight.shape, generator=g) + 0.5) * small)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2 * small)
        if not tracked:
            return model

        def set_stats(m, mean, var):
            # running_var is the unbiased variance; the floor is taken against the second moment
            var = torch.maximum(var, 1e-2 * (var + mean.square()))
            m.running_mean.copy_(mean + 0.2 * torch.randn(mean.shape, generator=g) * var.sqrt())
            m.running_var.copy_(var * (torch.rand(var.shape, generator=g) + 0.5))

        in_chans = next(p for p in model.parameters() if p.ndim == 4).shape[1]
        x = torch.randn(calibration_batch, in_chans, calibration_size, calibration_size, generator=g)
        was_training = model.training
        momenta = [m.momentum for m in tracked]
        for m in tracked:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
        model.train()
        model(x)
        for m, momentum in zip(tracked, momenta):
            m.momentum = momentum
            set_stats(m, m.running_mean.clone(), m.running_var.clone())

        shortcuts = [n for name, mod in model.named_modules() if name.rsplit(".", 1)[-1] == "downsample"
                     for n in mod.modules()]
        stream = ends + shortcuts

        def recalibrate(m, args):
            x = args[0]
            if any(m is s for s in stream) or x[0, 0].numel() == 1:
                dims = [d for d in range(x.ndim) if d != 1]
                set_stats(m, x.mean(dims), x.var(dims))

        hooks = [m.register_forward_pre_hook(recalibrate) for m in tracked]
        model.eval()
        try:
            model(x)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
    return model


def _residual_branch_ends(model) -> list:
    """The norm layer that ends each residual branch: timm's blocks zero it in `zero_init_last`
    (found by calling that on a copy of the scales), torchvision's are bn2 / bn3."""
    import torch

    ends = []
    for m in model.modules():
        if m is not model and hasattr(m, "zero_init_last"):
            norms = [n for n in m.modules() if getattr(n, "weight", None) is not None
                     and isinstance(n, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm))]
            saved = [n.weight.detach().clone() for n in norms]
            with torch.no_grad():
                for n in norms:
                    n.weight.fill_(1.0)
                m.zero_init_last()
                ends += [n for n in norms if bool((n.weight == 0).all())]
                for n, w in zip(norms, saved):
                    n.weight.copy_(w)
        elif type(m).__module__ == "torchvision.models.resnet" and type(m).__name__ in ("BasicBlock", "Bottleneck"):
            ends.append(m.bn2 if type(m).__name__ == "BasicBlock" else m.bn3)
    return ends


def random_model(arch: str, library: str | None = None, seed: int = 0, **overrides: Any):
    """A reference model with random weights and randomised norm statistics (for tests and demos)."""
    import torch

    torch.manual_seed(seed)
    return randomize_norms(torch_model(arch, library, **overrides), seed)
