"""Preprocessing presets (methods.md §1.2): colour conventions, crop sizes, RandomResizedCrop ranges."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from deepmetric.config_errors import ConfigError
from deepmetric.data.bundle import build_transform
from deepmetric.data.config import DataConfig
from deepmetric.data.transforms import (
    TRANSFORMS,
    BNInceptionPreprocess,
    DASBNInceptionNormalize,
    build_transforms,
    eval_transform,
    get_transform,
    input_channels,
    train_transform,
)
from deepmetric.models.config import ModelConfig
from deepmetric.models.factory import build_model

PRESETS = ("deep_metric", "ms", "xbm", "proxy_anchor", "mdr", "iaa", "das", "reality_check")


def _steps(compose, kind):
    return [t for t in compose.transforms if isinstance(t, kind)]


def test_bninception_constant_caffe_mean_image_maps_to_zero():
    image = Image.new("RGB", (300, 260), (128, 117, 104))
    out = eval_transform("ms", "bninception")(image)
    assert out.shape == (3, 227, 227)
    assert out.dtype == torch.float32 and torch.count_nonzero(out) == 0
    as_float = torch.tensor([128.0, 117.0, 104.0]).view(3, 1, 1).expand(3, 5, 5) / 255
    assert BNInceptionPreprocess()(as_float).abs().max() < 1e-4


def test_bninception_preprocess_is_bgr_0_255_minus_mean():
    x = torch.zeros(2, 3, 1, 1)
    x[:, 0] = 1.0  # pure red in RGB [0, 1]
    y = BNInceptionPreprocess()(x)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0 - 104.0, 0 - 117.0, 255 - 128.0]))


def test_imagenet_convention_and_das_variant():
    mean_rgb = tuple(round(255 * m) for m in (0.485, 0.456, 0.406))
    out = eval_transform("xbm", "resnet50")(Image.new("RGB", (256, 256), mean_rgb))
    assert out.shape == (3, 224, 224) and out.abs().max() < 0.01
    x = torch.rand(3, 4, 4)
    das, caffe = DASBNInceptionNormalize()(x), BNInceptionPreprocess()(x)
    # DAS divides by 0.0039 instead of multiplying by 255: 0.55 % larger, otherwise the same BGR tensor.
    assert torch.allclose(das, caffe * (1 / 0.0039) / 255, atol=0.15)
    assert isinstance(eval_transform("das", "bninception").transforms[-1], DASBNInceptionNormalize)
    assert isinstance(eval_transform("ms", "bninception").transforms[-1], BNInceptionPreprocess)
    assert isinstance(eval_transform("ms", "resnet50").transforms[-1], T.Normalize)


@pytest.mark.parametrize(
    ("preset", "pre", "crop", "scale", "ratio", "eval_resize", "eval_crop"),
    [
        ("deep_metric", [256], 227, (0.16, 1.0), (3 / 4, 4 / 3), [256], 227),
        ("ms", [256], 227, (0.16, 1.0), (3 / 4, 4 / 3), [256], 227),
        ("xbm", [256], 224, (0.2, 1.0), (3 / 4, 4 / 3), [256], 224),
        ("proxy_anchor", None, 224, (0.08, 1.0), (3 / 4, 4 / 3), [256], 224),
        ("mdr", [256, 256], 224, (0.16, 1.0), (0.75, 1.33), [256, 256], 224),
        ("iaa", [256, 256], 224, (0.16, 1.0), (0.75, 1.33), [256, 256], 224),
        ("das", None, 224, (0.08, 1.0), (3 / 4, 4 / 3), [256], 224),
        ("reality_check", [256], 227, (0.16, 1.0), (0.75, 1.33), [256], 227),
    ],
)
def test_preset_geometry(preset, pre, crop, scale, ratio, eval_resize, eval_crop):
    tr, ev = build_transforms(preset, "bninception")
    rrc = _steps(tr, T.RandomResizedCrop)
    assert len(rrc) == 1 and list(rrc[0].size) == [crop, crop]
    assert rrc[0].scale == scale and rrc[0].ratio == pytest.approx(ratio)
    resizes = _steps(tr, T.Resize)
    assert ([list(resizes[0].size)] if resizes else [None]) == [pre]
    assert len(_steps(tr, T.RandomHorizontalFlip)) == 1
    assert list(_steps(ev, T.Resize)[0].size) == eval_resize
    assert list(_steps(ev, T.CenterCrop)[0].size) == [eval_crop, eval_crop]
    image = Image.new("RGB", (300, 200), (10, 200, 30))
    assert tr(image).shape == (3, crop, crop) and ev(image).shape == (3, eval_crop, eval_crop)


def test_iaa_cub_has_no_pre_resize_and_shorter_side_eval():
    tr, ev = build_transforms("iaa", "bninception", dataset="cub200")
    assert not _steps(tr, T.Resize) and rrc_interp(tr) == InterpolationMode.LANCZOS
    assert list(_steps(ev, T.Resize)[0].size) == [256]
    tr_cars, _ = build_transforms("iaa", "bninception", dataset="cars196")
    assert list(_steps(tr_cars, T.Resize)[0].size) == [256, 256]


def rrc_interp(compose):
    return _steps(compose, T.RandomResizedCrop)[0].interpolation


def test_das_googlenet_uses_227_and_interpolations():
    tr, ev = build_transforms("das", "googlenet")
    assert list(_steps(tr, T.RandomResizedCrop)[0].size) == [227, 227]
    assert list(_steps(ev, T.CenterCrop)[0].size) == [227, 227]
    assert rrc_interp(train_transform("mdr")) == InterpolationMode.LANCZOS
    assert rrc_interp(train_transform("ms")) == InterpolationMode.BILINEAR


def test_registry_names_defaults_and_unknown():
    assert {f"{p}_{k}" for p in PRESETS for k in ("train", "eval")} <= set(TRANSFORMS)
    # no backbone given: the repo's default convention (XBM: ImageNet RGB, the others Caffe BGR)
    assert isinstance(TRANSFORMS["xbm_eval"]().transforms[-1], T.Normalize)
    assert isinstance(TRANSFORMS["ms_eval"]().transforms[-1], BNInceptionPreprocess)
    assert isinstance(get_transform("ms_train", backbone="resnet50").transforms[-1], T.Normalize)
    with pytest.raises(KeyError, match="known:"):
        get_transform("nope_train")


# (backbone, dataset, preset, channels): the presets give RGB except kanji_cnn's convention "none", which keeps the
# dataset's own channels; the glyph transforms always keep them
CHANNEL_CASES = [
    ("kanji_cnn", "kanji_glyphs", "kanji", 1),
    ("kanji_cnn", "kanji_glyphs", "xbm", 1),
    ("resnet50", "kanji_glyphs", "xbm", 3),
    ("resnet18", "kanji_glyphs", "proxy_anchor", 3),
    ("bninception", "kanji_glyphs", "ms", 3),
    ("timm:vit_tiny_patch16_224", "kanji_glyphs", "vit", 3),
    ("kanji_cnn", "cub200", "reality_check", 3),
    ("resnet50", "folder", "xbm", 3),
    ("resnet50", "kanji_glyphs", "kanji", 1),  # refused by the model factory, see below
]


@pytest.mark.parametrize(("backbone", "dataset", "preset", "channels"), CHANNEL_CASES)
def test_input_channels_is_what_the_transforms_give(backbone, dataset, preset, channels):
    data = DataConfig(dataset=dataset, train_transform=f"{preset}_train", eval_transform=f"{preset}_eval")
    assert input_channels(data, backbone) == channels
    # the rule agrees with the tensors the transforms make of the dataset's own images (glyphs: PIL "L")
    image = Image.new("L" if dataset == "kanji_glyphs" else "RGB", (32, 32), 40)
    for name in (data.train_transform, data.eval_transform):
        assert get_transform(name, backbone=backbone, dataset=dataset)(image).shape[0] == channels


def test_input_channels_refuses_train_and_eval_transforms_that_disagree():
    data = DataConfig(dataset="kanji_glyphs", train_transform="kanji_train", eval_transform="xbm_eval")
    with pytest.raises(ConfigError, match=r"data.eval_transform 'xbm_eval' gives 3-channel .* 1-channel"):
        input_channels(data, "resnet50")
    assert input_channels(data, "kanji_cnn") == 1  # convention "none": both keep the glyphs grey


def test_a_3_channel_backbone_on_grey_glyphs_is_refused_naming_both_fixes():
    channels = input_channels(DataConfig(), "resnet50")  # the default transforms: kanji_train / kanji_eval
    with pytest.raises(ConfigError, match=r"model.backbone=kanji_cnn.*data.train_transform=xbm_train"):
        build_model(ModelConfig(backbone="resnet50", pretrained=None), channels)


@pytest.mark.parametrize("dataset", ["cub200", "folder"])
def test_the_glyph_transforms_are_refused_for_photo_datasets(dataset):
    """They read PIL "L" images; on an RGB photo they would give an (H, W, 3) tensor, so the config is refused with
    the field and a preset to use instead (the defaults are the glyph transforms: forgetting to change them with
    data.dataset is an easy mistake)."""
    with pytest.raises(ConfigError, match=rf"'kanji_eval' is for the grey-scale kanji_glyphs .* {dataset!r}.*xbm_eval"):
        build_transform("kanji_eval", "resnet50", dataset)
    assert build_transform("kanji_eval", "kanji_cnn", "kanji_glyphs") is not None
