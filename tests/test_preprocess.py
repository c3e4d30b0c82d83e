"""`zoo._preprocess` and `Model.preprocess` against the transforms they stand in for: timm's eval
transform (`create_transform(**resolve_data_config(...))`) and torchvision's `weights.transforms()`,
on real photographs. Every comparison is bit-exact: both libraries resample with PIL, as we do."""

import functools
import json
import types

import numpy as np
import pytest
import timm.data
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from zoo._preprocess import default_cfg, preprocess, validate_cfg  # noqa: E402


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    return getattr(skimage_data, name)()


def timm_reference(image: Image.Image, cfg: dict) -> np.ndarray:
    return timm.data.create_transform(**timm.data.resolve_data_config({}, pretrained_cfg=cfg))(image).numpy()


def stored(cfg: dict) -> dict:
    """The config as a zoo file gives it back: through JSON (tuples become lists)."""
    return json.loads(json.dumps(cfg))


# Each case resizes a differently shaped photograph (512x512, 300x451, 400x600, 427x640) so that
# every mode meets landscape and square inputs, odd crop offsets (half-to-even rounding) and, with
# crop_pct > 1, the zero padding of torchvision's CenterCrop.
CASES = [
    ("astronaut", dict(input_size=(3, 224, 224), interpolation="bilinear", crop_pct=0.875)),
    ("chelsea", dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.95)),
    ("coffee", dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0)),
    ("rocket", dict(input_size=(3, 160, 192), interpolation="bilinear", crop_pct=0.875)),
    ("chelsea", dict(input_size=(3, 193, 97), interpolation="bicubic", crop_pct=0.95)),
    ("coffee", dict(input_size=(3, 224, 224), interpolation="bilinear", crop_pct=1.15)),
    ("rocket", dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0, crop_mode="squash")),
    ("chelsea", dict(input_size=(3, 160, 192), interpolation="bilinear", crop_pct=0.875, crop_mode="squash")),
    ("coffee", dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0, crop_mode="border",
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))),
    ("astronaut", dict(input_size=(3, 160, 192), interpolation="bilinear", crop_pct=0.95, crop_mode="border")),
    ("rocket", dict(input_size=(3, 193, 97), interpolation="bicubic", crop_pct=0.875, crop_mode="border")),
    ("chelsea", dict(input_size=(3, 128, 128), interpolation="nearest", crop_pct=0.9,
                     mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))),
    ("rocket", dict(input_size=(3, 128, 144), interpolation="lanczos", crop_pct=0.95)),
]


@pytest.mark.parametrize("name, cfg", CASES,
                         ids=[f"{n}-{c.get('crop_mode', 'center')}-{c['interpolation']}-{c['crop_pct']}-"
                              f"{c['input_size'][1]}x{c['input_size'][2]}" for n, c in CASES])
def test_matches_timm_eval_transform(name, cfg):
    image = Image.fromarray(photo(name))
    ours = preprocess(image, stored(cfg))
    assert ours.dtype == np.float32 and ours.shape == tuple(cfg["input_size"])
    np.testing.assert_array_equal(ours, timm_reference(image, cfg))


# timm's own configs, as `model.pretrained_cfg` holds them (test_input_size is ignored, as
# resolve_data_config ignores it without use_test_size).
PRETRAINED = ["test_resnet.r160_in1k", "resnet50.a1_in1k", "resnet50.tv2_in1k",
              "convnext_tiny.fb_in22k_ft_in1k_384", "vit_base_patch16_clip_224.openai_ft_in1k"]


@pytest.mark.parametrize("tag", PRETRAINED)
def test_matches_timm_pretrained_cfgs(tag):
    cfg = timm.models.get_pretrained_cfg(tag).to_dict()
    image = Image.fromarray(photo("chelsea"))
    np.testing.assert_array_equal(preprocess(image, stored(cfg)), timm_reference(image, cfg))


def test_matches_timm_for_a_model():
    """The exact expression users run: resolve_data_config({}, model=m) on a timm model."""
    import timm

    m = timm.create_model("test_resnet.r160_in1k", pretrained=False)
    image = Image.fromarray(photo("coffee"))
    reference = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))(image).numpy()
    np.testing.assert_array_equal(preprocess(image, stored(m.pretrained_cfg)), reference)


@pytest.mark.parametrize("version", ["IMAGENET1K_V1", "IMAGENET1K_V2"])
def test_matches_torchvision_presets(version):
    """ResNet-50's presets (resize 256 or 232, crop 224), built without downloading weights."""
    from torchvision.models import ResNet50_Weights

    transform = getattr(ResNet50_Weights, version).transforms()
    cfg = {"input_size": [3, transform.crop_size[0], transform.crop_size[0]],
           "resize_size": transform.resize_size, "interpolation": transform.interpolation.value,
           "mean": transform.mean, "std": transform.std}
    assert cfg["resize_size"] == {"IMAGENET1K_V1": [256], "IMAGENET1K_V2": [232]}[version]
    for name in ("astronaut", "rocket"):
        image = Image.fromarray(photo(name))
        np.testing.assert_array_equal(preprocess(image, stored(cfg)), transform(image).numpy())
    image = Image.fromarray(photo("chelsea"))
    np.testing.assert_array_equal(preprocess(image, {**cfg, "resize_size": cfg["resize_size"][0]}),
                                  transform(image).numpy())
    # [h, w] resizes both sides, as torchvision's Resize([h, w]) does
    import torchvision.transforms as T

    both = T.Compose([T.Resize([250, 300]), T.CenterCrop(224), T.ToTensor(), T.Normalize(transform.mean, transform.std)])
    np.testing.assert_array_equal(preprocess(image, {**cfg, "resize_size": [250, 300]}), both(image).numpy())


def test_defaults():
    cfg = default_cfg()
    assert cfg["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN) and cfg["std"] == list(timm.data.IMAGENET_DEFAULT_STD)
    assert cfg["crop_pct"] == timm.data.DEFAULT_CROP_PCT and cfg["crop_mode"] == timm.data.DEFAULT_CROP_MODE
    assert cfg["input_size"] == [3, 224, 224] and cfg["interpolation"] == "bilinear"
    image = Image.fromarray(photo("rocket"))
    reference = timm.data.create_transform(224)(image).numpy()  # transforms_imagenet_eval's defaults
    for partial in ({}, {"input_size": None, "mean": None}, None, cfg):
        np.testing.assert_array_equal(preprocess(image, partial), reference)


def test_image_kinds(tmp_path):
    """A PIL image, a path (str or Path) and a uint8 array (also a non-contiguous view) agree."""
    a = photo("chelsea")[:, ::-1]
    path = tmp_path / "chelsea.png"
    Image.fromarray(np.ascontiguousarray(a)).save(path)
    cfg = stored(CASES[3][1])
    ours = [preprocess(x, cfg) for x in (Image.fromarray(np.ascontiguousarray(a)), path, str(path), a)]
    for other in ours[1:]:
        np.testing.assert_array_equal(other, ours[0])
    np.testing.assert_array_equal(ours[0], timm_reference(Image.open(path).convert("RGB"), CASES[3][1]))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_are_converted(tmp_path, mode):
    """Grayscale, RGBA and palette images become RGB as timm's dataset loader makes them."""
    source = {"L": photo("camera"), "RGBA": photo("logo")}.get(mode, np.ascontiguousarray(photo("coffee")[::2, ::2]))
    image = Image.fromarray(source)
    if mode == "P":
        image = image.quantize(64)
    assert image.mode == mode
    path = tmp_path / "image.png"
    image.save(path)
    cfg = CASES[1][1]
    reference = timm_reference(Image.open(path).convert("RGB"), cfg)
    arrays = [source] if mode != "P" else []
    for x in [image, path, *arrays]:
        np.testing.assert_array_equal(preprocess(x, cfg), reference)


BAD = [
    ({"input_size": [224, 224]}, "input_size"),
    ({"input_size": [1, 224, 224]}, "input_size"),
    ({"input_size": [3, 0, 224]}, "input_size"),
    ({"input_size": [3, 224.0, 224]}, "input_size"),
    ({"interpolation": "cubic"}, "interpolation"),
    ({"interpolation": 3}, "interpolation"),
    ({"crop_pct": 0}, "crop_pct"),
    ({"crop_pct": -0.9}, "crop_pct"),
    ({"crop_pct": "0.9"}, "crop_pct"),
    ({"crop_pct": float("nan")}, "crop_pct"),
    ({"input_size": [3, 4, 4], "crop_pct": 8.0}, "crop_pct"),
    ({"crop_mode": "random"}, "crop_mode"),
    ({"mean": [0.5, 0.5]}, "mean"),
    ({"mean": "0.5"}, "mean"),
    ({"std": [0.2, 0.0, 0.2]}, "std"),
    ({"resize_size": 0}, "resize_size"),
    ({"resize_size": [256, 256, 256]}, "resize_size"),
    ({"resize_size": True}, "resize_size"),
    ({"resize_size": 256, "crop_mode": "squash"}, "crop_mode"),
]


@pytest.mark.parametrize("cfg, field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_cfgs_are_rejected(cfg, field):
    with pytest.raises(ValueError, match=f"field '{field}'") as info:
        validate_cfg(cfg)
    assert "\n" not in str(info.value)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="mapping"):
        validate_cfg([("input_size", [3, 224, 224])])
    with pytest.raises(ValueError, match="uint8"):
        preprocess(photo("chelsea").astype(np.float32), None)
    with pytest.raises(TypeError, match="PIL image"):
        preprocess(object(), None)


def test_model_preprocess(tmp_path):
    """A real zoo file without a recorded config uses timm's defaults; images stack into the NCHW
    batch `predict` takes (not run here: compiling it would double this file's time)."""
    import zoo
    from converters.convert import convert_state_dict
    from converters.state_dict import load_state_dict
    from converters.torch_models import torch_model
    from zoo.io import save_file

    # Weights play no part in preprocessing: the untrained model skips random_model's calibration.
    converted = convert_state_dict("test_resnet", load_state_dict(torch_model("test_resnet")), "equinox")
    path = save_file(tmp_path / "tiny.safetensors", converted.arrays, converted.loaded.metadata)
    model = zoo.load(path)
    assert "pretrained_cfg" not in model.metadata and model.pretrained_cfg == default_cfg()
    images = [photo("chelsea"), photo("camera")]
    batch = np.stack([model.preprocess(im) for im in images])
    for x, im in zip(batch, images):
        np.testing.assert_array_equal(x, timm.data.create_transform(224)(Image.fromarray(im).convert("RGB")).numpy())
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.float32


def test_model_preprocess_uses_recorded_cfg():
    """The config stored under the metadata key "pretrained_cfg" (a JSON string) decides."""
    from zoo.model import Model

    cfg = timm.models.get_pretrained_cfg("resnet50.a1_in1k").to_dict()
    loaded = types.SimpleNamespace(metadata={"pretrained_cfg": json.dumps(cfg)})
    model = Model(loaded, predict_fn=None)
    assert model.pretrained_cfg == stored(cfg)
    image = Image.fromarray(photo("astronaut"))
    np.testing.assert_array_equal(model.preprocess(image), timm_reference(image, cfg))
    for bad, why in (("{", "not JSON"), ("[1, 2]", "not a JSON object")):
        with pytest.raises(ValueError, match=why):
            Model(types.SimpleNamespace(metadata={"pretrained_cfg": bad}), None).pretrained_cfg
    with pytest.raises(ValueError, match="interpolation"):
        Model(types.SimpleNamespace(metadata={"pretrained_cfg": '{"interpolation": "x"}'}), None).preprocess(image)
