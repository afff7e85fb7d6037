"""Image preprocessing presets of the seed repositories (methods.md §1.2), built on torchvision.transforms.v2.

Each preset fixes the geometry (pre-resize, RandomResizedCrop size/scale/ratio, eval resize + centre crop,
interpolation); the colour convention follows the backbone:

* ``bninception`` (Caffe port, Cadene weights): RGB→BGR, ×255, minus [104, 117, 128], std 1
  (:class:`BNInceptionPreprocess`). The ``das`` preset reproduces DAS's slightly different normalisation
  (std 0.0039 ≠ 1/255) with :class:`DASBNInceptionNormalize`.
* ``imagenet`` (torchvision / timm weights): RGB in [0, 1], ImageNet mean/std.
* ``clip`` (CLIP image towers) and ``imagenet_inception`` (timm's AugReg ViTs: mean = std = 0.5): their mean/std.
  A ``timm:<model>`` backbone takes the convention its weights were trained with, read from timm's pretrained
  config (DINO and DINOv2 weights: ImageNet; ``vit_*_224`` AugReg: 0.5; ``*_clip_*``: CLIP).
* ``none``: tensor in [0, 1], nothing else.

Every convention except ``none`` converts its input to 3 channels, so a grey-scale image (KanjiGlyphs) feeds an
ImageNet or ViT encoder unchanged in content (zero-shot baselines); :func:`input_channels` is the one rule for
the channel count a model is built for.

=============  ======================  ======================================  ====================  =========
preset         train pre-resize        RandomResizedCrop (size, scale, ratio)  eval                  interp.
=============  ======================  ======================================  ====================  =========
deep_metric    shorter side 256        227, (0.16, 1), (3/4, 4/3)              256 → crop 227        bilinear
ms             shorter side 256        227, (0.16, 1), (3/4, 4/3)              256 → crop 227        bilinear
xbm            shorter side 256        224, (0.2, 1), (3/4, 4/3)               256 → crop 224        bilinear
proxy_anchor   none (raw image)        224, (0.08, 1), (3/4, 4/3)              256 → crop 224        bilinear
mdr            256×256                 224, (0.16, 1), (0.75, 1.33)            256×256 → crop 224    lanczos
iaa            as mdr; CUB: none       224, (0.16, 1), (0.75, 1.33)            mdr; CUB: 256 → 224   lanczos
das            none (raw image)        224 (227 for googlenet), (0.08, 1)      256 → crop 224 (227)  bilinear
reality_check  shorter side 256        227, (0.16, 1), (0.75, 1.33)            256 → crop 227        bilinear
vit            none (raw image)        224, (0.08, 1), (3/4, 4/3)              248 → crop 224        bicubic
dino           none (raw image)        224, (0.2, 1), (3/4, 4/3)               224 → crop 224        bicubic
dinov2         none (raw image)        224, (0.2, 1), (3/4, 4/3)               224 → crop 224        bicubic
clip           none (raw image)        224, (0.2, 1), (3/4, 4/3)               224 → crop 224        bicubic
=============  ======================  ======================================  ====================  =========

The encoder-family presets: ``vit`` is timm's ViT evaluation (crop_pct 0.9, bicubic); ``dino`` / ``dinov2`` are
the fine-tuning transforms OML and Hyp-ViT use on DINO ViTs (RandomResizedCrop scale 0.2–1, eval shorter side
224 → centre crop 224); ``clip`` is CLIP's own evaluation geometry. 224 is a whole number of patches for both
patch 16 (14×14) and patch 14 (16×16); any preset used with a ``patch<N>`` backbone must crop a multiple of N
(:func:`preset_geometry` refuses others). Without a backbone the family presets normalise with their family's
weights (``vit``: 0.5, ``dino`` / ``dinov2``: ImageNet, ``clip``: CLIP).

All presets flip horizontally with p = 0.5 after the crop. Transforms take a PIL image (LANCZOS needs PIL).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from deepmetric.config_errors import ConfigError
from deepmetric.data.config import DataConfig
from deepmetric.data.kanji import kanji_eval_transform, kanji_train_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BNINCEPTION_BGR_MEAN = (104.0, 117.0, 128.0)
# RGB conventions that are a per-channel (mean, std) normalisation of [0, 1] input
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "imagenet_inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
CONVENTIONS = ("bninception", *MEAN_STD, "none")

# Backbones whose published weights expect the Caffe BGR/0–255 input; everything else is ImageNet RGB.
_BGR_BACKBONES = {"bninception", "bn_inception"}
_NO_NORMALIZATION = {"kanji_cnn"}
# transforms that pass on the image's own channels whatever the backbone (the glyph transforms)
_NATIVE_CHANNEL_TRANSFORMS = {"kanji_train", "kanji_eval"}


class BNInceptionPreprocess(nn.Module):
    """RGB image (C, H, W) or (B, C, H, W) → BGR in 0–255 minus the Caffe mean [104, 117, 128], float32.

    Float input is taken to be in [0, 1] (×255); uint8 input is used as is, which keeps the result exact
    (the presets feed uint8, so a constant RGB image (128, 117, 104) maps exactly to zeros).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(BNINCEPTION_BGR_MEAN).view(3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[-3] != 3:
            raise ValueError(
                f"BNInceptionPreprocess expects 3 channels at dim -3, got shape {tuple(x.shape)}"
            )
        x = x.to(torch.float32) if not x.is_floating_point() else x * 255.0
        return x.flip(-3) - self.mean.to(x.dtype)


class DASBNInceptionNormalize(nn.Module):
    """DAS/Revisiting's BN-Inception input: Normalize(mean=[.502,.4588,.4078], std=.0039) on RGB, then BGR.

    1/0.0039 = 256.4, so inputs are 0.55 % larger than :class:`BNInceptionPreprocess`; kept for exact
    reproduction of the DAS tables.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.502, 0.4588, 0.4078]).view(3, 1, 1), persistent=False)
        self.std = 0.0039

    def forward(self, x: Tensor) -> Tensor:
        return ((x - self.mean.to(x.dtype)) / self.std).flip(-3)


def input_convention(backbone: str | None) -> str:
    """The colour convention (one of ``CONVENTIONS``) for a backbone or convention name."""
    if backbone is None:
        return "imagenet"
    if backbone in CONVENTIONS:
        return backbone
    if backbone in _BGR_BACKBONES:
        return "bninception"
    if backbone in _NO_NORMALIZATION:
        return "none"
    if backbone.startswith("timm:"):
        return timm_convention(backbone[len("timm:"):])
    return "imagenet"


def timm_convention(name: str) -> str:
    """The convention of a timm model's pretrained weights, from its pretrained config's mean/std (no download).

    ImageNet when timm is not installed, the model is unknown to it, or its mean/std is none of ``MEAN_STD``.
    """
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        return "imagenet"
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return "imagenet"
    for convention, (mean, std) in MEAN_STD.items():
        if all(abs(a - b) < 1e-3 for a, b in zip((*cfg.mean, *cfg.std), (*mean, *std), strict=True)):
            return convention
    return "imagenet"


def input_channels(data: DataConfig, backbone: str | None) -> int:
    """The channels of the images ``build_data(data, backbone=backbone)`` feeds the model: its ``in_channels``.

    Every colour convention but ``none`` converts to 3 channels (``T.RGB``); convention ``none`` (``kanji_cnn``)
    and the glyph transforms (``kanji_train`` / ``kanji_eval``) keep the dataset's own: 1 for the grey-scale
    KanjiGlyphs, 3 for the image-file datasets (decoded as RGB). Raises :class:`ConfigError` when the train and
    eval transforms disagree, since one model sees both.
    """
    native = 1 if data.dataset == "kanji_glyphs" else 3

    def channels(transform: str) -> int:
        keeps_native = transform in _NATIVE_CHANNEL_TRANSFORMS or input_convention(backbone) == "none"
        return native if keeps_native else 3

    train, evaluation = channels(data.train_transform), channels(data.eval_transform)
    if train != evaluation:
        raise ConfigError(
            f"data.eval_transform {data.eval_transform!r} gives {evaluation}-channel images but "
            f"data.train_transform {data.train_transform!r} gives {train}-channel ones (model.backbone={backbone}, "
            f"data.dataset={data.dataset}); pick the two transforms of one preset"
        )
    return train


def patch_size(backbone: str | None) -> int | None:
    """The patch size a ``timm:`` token backbone tiles its input with (``patch16`` in the name), else None."""
    if backbone is None or not backbone.startswith("timm:"):
        return None
    match = re.search(r"patch(\d+)", backbone)
    return int(match.group(1)) if match else None


def normalization(convention: str, preset: str | None = None) -> nn.Module:
    """Tensor-to-network-input step for a colour convention (the ``das`` preset has its own BGR variant)."""
    if convention == "bninception":
        return DASBNInceptionNormalize() if preset == "das" else BNInceptionPreprocess()
    if convention in MEAN_STD:
        return T.Normalize(*MEAN_STD[convention])
    if convention == "none":
        return nn.Identity()
    raise ValueError(f"unknown input convention {convention!r}; expected one of {CONVENTIONS}")


@dataclass(frozen=True)
class Geometry:
    """Spatial part of a preset. ``pre_resize``: int = shorter side, pair = exact (h, w), None = raw image."""

    pre_resize: int | tuple[int, int] | None
    crop: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    eval_resize: int | tuple[int, int]
    eval_crop: int
    interpolation: InterpolationMode = InterpolationMode.BILINEAR


_DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_LANCZOS = InterpolationMode.LANCZOS
_BICUBIC = InterpolationMode.BICUBIC
PRESETS: dict[str, Geometry] = {
    "deep_metric": Geometry(256, 227, (0.16, 1.0), _DEFAULT_RATIO, 256, 227),
    "ms": Geometry(256, 227, (0.16, 1.0), _DEFAULT_RATIO, 256, 227),
    "xbm": Geometry(256, 224, (0.2, 1.0), _DEFAULT_RATIO, 256, 224),
    "proxy_anchor": Geometry(None, 224, (0.08, 1.0), _DEFAULT_RATIO, 256, 224),
    "mdr": Geometry((256, 256), 224, (0.16, 1.0), (0.75, 1.33), (256, 256), 224, _LANCZOS),
    "iaa": Geometry((256, 256), 224, (0.16, 1.0), (0.75, 1.33), (256, 256), 224, _LANCZOS),
    "das": Geometry(None, 224, (0.08, 1.0), _DEFAULT_RATIO, 256, 224),
    "reality_check": Geometry(256, 227, (0.16, 1.0), (0.75, 1.33), 256, 227),
    "vit": Geometry(None, 224, (0.08, 1.0), _DEFAULT_RATIO, 248, 224, _BICUBIC),
    "dino": Geometry(None, 224, (0.2, 1.0), _DEFAULT_RATIO, 224, 224, _BICUBIC),
    "dinov2": Geometry(None, 224, (0.2, 1.0), _DEFAULT_RATIO, 224, 224, _BICUBIC),
    "clip": Geometry(None, 224, (0.2, 1.0), _DEFAULT_RATIO, 224, 224, _BICUBIC),
}
# the preset of each encoder family (zero-shot defaults: :func:`family_preset`)
FAMILY_PRESETS = ("vit", "dino", "dinov2", "clip")


def preset_geometry(preset: str, backbone: str | None = None, dataset: str | None = None) -> Geometry:
    """The geometry of ``preset`` after its dataset/backbone special cases (IAA on CUB, DAS with GoogLeNet)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown transform preset {preset!r}; known: {sorted(PRESETS)}")
    g = PRESETS[preset]
    if preset == "iaa" and dataset == "cub200":
        # IAA's CUB branch: RRC on the raw image, eval resizes the shorter side only.
        g = Geometry(None, g.crop, g.scale, g.ratio, 256, 224, g.interpolation)
    if preset == "das" and backbone is not None and "googlenet" in backbone:
        g = Geometry(g.pre_resize, 227, g.scale, g.ratio, g.eval_resize, 227, g.interpolation)
    patch = patch_size(backbone)
    if patch is not None and (g.crop % patch or g.eval_crop % patch):
        # a ViT would silently drop the border pixels that do not fill a whole patch
        raise ConfigError(
            f"transform preset {preset!r} crops {g.crop} (train) / {g.eval_crop} (eval) px, not a multiple of the "
            f"patch size {patch} of backbone {backbone}; use a preset made for it ({', '.join(FAMILY_PRESETS)})"
        )
    return g


def family_preset(backbone: str) -> str:
    """The preset of a backbone's encoder family: ``clip``, ``dinov2``, ``dino``, ``vit`` (other patch
    models) or ``xbm`` (CNNs: 224-px crops)."""
    name = backbone.lower()
    for family in ("clip", "dinov2", "dino"):
        if family in name:
            return family
    return "vit" if patch_size(backbone) is not None else "xbm"


def _to_input(convention: str, preset: str) -> list[Any]:
    norm = normalization(convention, preset)
    if convention == "none":
        return [T.ToImage(), T.ToDtype(torch.float32, scale=True), norm]
    if isinstance(norm, BNInceptionPreprocess):
        return [T.ToImage(), T.RGB(), norm]  # from uint8 directly: exact integers, no 1/255 round trip
    return [T.ToImage(), T.RGB(), T.ToDtype(torch.float32, scale=True), norm]


def train_transform(
    preset: str, backbone: str | None = "bninception", dataset: str | None = None
) -> T.Compose:
    """Training augmentation of ``preset`` for ``backbone`` (a backbone or convention name)."""
    g = preset_geometry(preset, backbone, dataset)
    steps: list[Any] = []
    if g.pre_resize is not None:
        steps.append(T.Resize(g.pre_resize, interpolation=g.interpolation))
    steps += [
        T.RandomResizedCrop(g.crop, scale=g.scale, ratio=g.ratio, interpolation=g.interpolation),
        T.RandomHorizontalFlip(0.5),
    ]
    return T.Compose(steps + _to_input(input_convention(backbone), preset))


def eval_transform(
    preset: str, backbone: str | None = "bninception", dataset: str | None = None
) -> T.Compose:
    """Deterministic evaluation transform of ``preset`` (resize → centre crop → network input)."""
    g = preset_geometry(preset, backbone, dataset)
    steps: list[Any] = [T.Resize(g.eval_resize, interpolation=g.interpolation), T.CenterCrop(g.eval_crop)]
    return T.Compose(steps + _to_input(input_convention(backbone), preset))


def build_transforms(
    preset: str, backbone_convention: str | None = "bninception", dataset: str | None = None
) -> tuple[T.Compose, T.Compose]:
    """``(train_transform, eval_transform)`` of a preset; ``backbone_convention``: backbone or convention name."""
    return (
        train_transform(preset, backbone_convention, dataset),
        eval_transform(preset, backbone_convention, dataset),
    )


TransformFactory = Callable[..., Callable[[Any], Any]]


# Colour convention used when a registry factory is called without a backbone: the seed repo's default.
PRESET_DEFAULT_CONVENTION = {preset: "bninception" for preset in PRESETS} | {
    "xbm": "imagenet", "vit": "imagenet_inception", "dino": "imagenet", "dinov2": "imagenet", "clip": "clip"}


def _factory(preset: str, train: bool) -> TransformFactory:
    def make(backbone: str | None = None, dataset: str | None = None) -> Callable[[Any], Any]:
        backbone = PRESET_DEFAULT_CONVENTION[preset] if backbone is None else backbone
        return (train_transform if train else eval_transform)(preset, backbone, dataset)

    make.__name__ = f"{preset}_{'train' if train else 'eval'}"
    make.__doc__ = f"{'Training' if train else 'Evaluation'} transform of the {preset!r} preset."
    return make


# name → factory(backbone=None, dataset=None) → transform; pass the model's backbone name so that the colour
# convention follows it (without one, the preset's repo default above). The embedded dataset's glyph transforms
# ignore both.
TRANSFORMS: dict[str, TransformFactory] = {
    f"{preset}_{kind}": _factory(preset, kind == "train") for preset in PRESETS for kind in ("train", "eval")
} | {"kanji_train": kanji_train_transform, "kanji_eval": kanji_eval_transform}


def get_transform(name: str, backbone: str | None = None, dataset: str | None = None) -> Any:
    """Look up ``TRANSFORMS[name]`` and build it; unknown names list what exists."""
    if name not in TRANSFORMS:
        raise KeyError(f"unknown transform {name!r}; known: {sorted(TRANSFORMS)}")
    if name in _NATIVE_CHANNEL_TRANSFORMS and dataset not in (None, "kanji_glyphs"):
        # they read a PIL "L" image: an RGB photo would come out as an (H, W, 3) tensor
        raise ValueError(f"transform {name!r} is for the grey-scale kanji_glyphs images, not data.dataset "
                         f"{dataset!r} (RGB photos): use a photo preset, e.g. xbm_train / xbm_eval")
    return TRANSFORMS[name](backbone=backbone, dataset=dataset)
