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
        import torchvision

        if name == "googlenet":
            # Its default init, asked for explicitly: left unset, the constructor warns.
            overrides.setdefault("init_weights", True)
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **overrides)
    return model.eval()


def randomize_norms(model, seed: int = 0, calibration_size: int = 96):
    """Random affine parameters and running statistics in every norm layer.

    Default statistics (mean 0, var 1, scale 1, shift 0) make a norm the identity and would hide
    swapped or misrouted tensors. Purely random statistics are no better: activations then drift
    layer after layer until the logits barely depend on the input (GoogLeNet's spread across a batch
    fell to ~1e-7 of their norm), and a parity check compares constants. So the running statistics
    are measured on a random calibration batch, then perturbed; scales and shifts are random.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm))]
    tracked = [m for m in norms if getattr(m, "running_mean", None) is not None]
    with torch.no_grad():
        for m in norms:
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        if tracked:
            momenta = [m.momentum for m in tracked]
            for m in tracked:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
            was_training = model.training
            model.train()
            in_chans = next(p for p in model.parameters() if p.ndim == 4).shape[1]
            model(torch.randn(4, in_chans, calibration_size, calibration_size, generator=g))
            model.train(was_training)
            for m, momentum in zip(tracked, momenta):
                m.momentum = momentum
                m.running_mean += 0.2 * torch.randn(m.running_mean.shape, generator=g) * m.running_var.sqrt()
                m.running_var *= torch.rand(m.running_var.shape, generator=g) + 0.5
    return model


def random_model(arch: str, library: str | None = None, seed: int = 0, **overrides: Any):
    """A reference model with random weights and randomised norm statistics (for tests and demos)."""
    import torch

    torch.manual_seed(seed)
    return randomize_norms(torch_model(arch, library, **overrides), seed)


def pretrained_overrides(arch: str, library: str | None = None) -> dict[str, Any]:
    """Options that a library's pretrained weights imply but cannot show: torchvision's GoogLeNet
    weights expect `transform_input=True` (torchvision sets it when it loads them)."""
    library = library or default_library(arch)
    return {"transform_input": True} if (arch, library) == ("googlenet", "torchvision") else {}


def pretrained_state_dict(arch: str, library: str | None = None):
    """Pretrained weights through timm / torchvision; needs network access to their hubs."""
    entry = registry.get(arch)
    library = library or default_library(arch)
    name = getattr(entry, library, None)
    if name is None:
        raise ValueError(f"{arch} has no {library} counterpart")
    try:
        if library == "timm":
            import timm

            return timm.create_model(name, pretrained=True).state_dict()
        import torchvision

        return torchvision.models.get_model(name, weights="DEFAULT").state_dict()
    except Exception as e:
        raise RuntimeError(
            f"could not fetch pretrained {library} weights for {arch} ({type(e).__name__}); "
            "without network access, download the checkpoint elsewhere and pass it with --checkpoint FILE"
        ) from e
