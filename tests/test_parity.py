"""Logit parity with the real timm / torchvision models, over the registry."""

import pytest

from converters.verify import verify
from zoo import registry

from .conftest import cached_random_model, ci_models, load_script

CI_MODELS = ci_models()
SLOW_MODELS = [n for n in registry.list_models() if not registry.get(n).ci]
ODD_SIZE = (67, 93)  # odd, non-square: exercises padding, ceil_mode and stride-2 rounding


def _check(arch, framework, fold_bn, size, library=None, batch=2):
    model = cached_random_model(arch, library)
    report = verify(arch, model, framework, fold_bn=fold_bn, batch=batch, size=size,
                    precision="highest", library=library, reference=model)
    assert report.rel <= 1e-5, report
    assert report.top1 == 1.0, report
    return report


def _assert_well_conditioned(arch: str):
    """The bar above is meaningful only if PyTorch's own fp32 logits are well within 1e-5 of its
    float64 logits, and only if the logits depend on the input."""
    r = load_script("reference_conditioning").conditioning(arch, size=ODD_SIZE, trace=r"^fc$",
                                                           model=cached_random_model(arch))
    assert r["fp32_vs_f64"] <= 5e-6, r  # half the bar; measured 4.6e-7..2.6e-6 on these
    assert r["spread"] >= 0.05, r
    assert [n for n, *_ in r["trace"]] == ["fc"] and r["trace"][0][1] == r["fp32_vs_f64"]


def _deep(arch: str) -> bool:
    return sum(getattr(registry.get_spec(arch), "layers", ())) > 16


def _odd_size_cases():
    """Every CI model in both frameworks, BatchNorm folded and not; the deep ones (more than 16
    blocks: resnet101/152, the 101-layer ResNeXts and wide ResNet, each 10-15 s per case on 2 cores)
    in two of the four, one per framework and one per folding, to keep CI under its 30 minutes.
    Every pairing runs on resnet50 and wide_resnet50_2, and all four on every registry model in
    the slow sweep."""
    cases = []
    for arch in CI_MODELS:
        for framework in ("haiku", "equinox"):
            for fold_bn in (False, True):
                if _deep(arch) and fold_bn != (framework == "equinox"):
                    continue
                cases.append(pytest.param(arch, framework, fold_bn,
                                          id=f"{arch}-{framework}-{'folded' if fold_bn else 'bn'}"))
    return cases


@pytest.mark.parametrize("arch,framework,fold_bn", _odd_size_cases())
def test_parity_odd_size(arch, framework, fold_bn):
    """Every CI model; in its Haiku unfolded case (every model has one) the reference's own
    conditioning is checked first, on the same model object: building and calibrating a random
    reference took as long as the comparison (resnet152: 1.9 s of 3.8 on 2 cores), so a separate
    test built each one again."""
    if framework == "haiku" and not fold_bn:
        _assert_well_conditioned(arch)
    _check(arch, framework, fold_bn, ODD_SIZE)


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn", "folded"])
@pytest.mark.parametrize("framework", ["haiku", "equinox"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_parity_224(arch, framework, fold_bn):
    _check(arch, framework, fold_bn, (224, 224))


SHARED = [n for n in CI_MODELS if registry.get(n).torchvision and registry.get(n).timm]


@pytest.mark.parametrize("arch,framework", [pytest.param(a, fw, id=f"{a}-{fw}") for i, a in enumerate(SHARED)
                                            for fw in [("haiku", "equinox")[i % 2]]])
def test_parity_torchvision_reference(arch, framework):
    """The torchvision model with the same module tree (and its checkpoints) converts exactly too.
    What is checked is the module tree, which the conversion walks the same way for both
    frameworks: one framework per model, alternating (both run on the timm models above)."""
    _check(arch, framework, False, ODD_SIZE, library="torchvision", batch=1)


@pytest.mark.slow
@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn", "folded"])
@pytest.mark.parametrize("framework", ["haiku", "equinox"])
@pytest.mark.parametrize("arch", SLOW_MODELS)
def test_parity_slow(arch, framework, fold_bn):
    _check(arch, framework, fold_bn, ODD_SIZE)

