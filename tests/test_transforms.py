"""Preprocessing presets (methods.md §1.2): colour conventions, crop sizes, RandomResizedCrop ranges."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from deepmetric.data.transforms import (
    TRANSFORMS,
    BNInceptionPreprocess,
    DASBNInceptionNormalize,
    build_transforms,
    eval_transform,
    get_transform,
    train_transform,
)

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
