"""Backbones: each is an ``nn.Module`` mapping images to a feature map, with ``out_channels`` and
``input_convention`` (``bninception`` = Caffe BGR 0–255, ``imagenet`` = RGB mean/std, ``none``) attributes.
timm ViTs (:mod:`deepmetric.models.timm_backbone`) give tokens instead and say so in ``feature_layout``.

``pretrained``: ``None`` (random init), a local weight file (loaded strictly into the *complete* network,
classifier included, exactly as the file was published), or ``"imagenet"`` (hub cache, else download, else an
error naming the file to provide). The classifier is removed afterwards unless ``keep_classifier=True``,
so no parameter is left unused during embedding training (DDP would fail on one).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deepmetric.models.bninception import BNInception
from deepmetric.models.kanji_cnn import KanjiCNN
from deepmetric.models.pretrained import (
    PretrainedWeightsError,
    load_weights,
    resolve_imagenet_file,
    squeeze_leading_singletons,
)
from deepmetric.models.timm_backbone import TimmBackbone


def _weight_file(name: str, pretrained: str | Path | None) -> Path | None:
    if pretrained is None:
        return None
    if str(pretrained) == "imagenet":
        return resolve_imagenet_file(name)
    return Path(pretrained).expanduser()


class BNInceptionBackbone(BNInception):
    """BN-Inception trunk → (B, 1024, H/32, W/32); Cadene's Caffe-converted weights load strictly."""

    input_convention = "bninception"

    def __init__(self, pretrained: str | Path | None = None, keep_classifier: bool = False) -> None:
        super().__init__(num_classes=1000)
        path = _weight_file("bninception", pretrained)
        if path is not None:
            load_weights(self, path, adapt=squeeze_leading_singletons)
        if not keep_classifier:
            self.drop_classifier()

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (needs ``keep_classifier=True``)."""
        return self.logits(self(x))


class TorchvisionBackbone(nn.Module):
    """A torchvision classification network cut before global pooling.

    ``trunk`` produces the feature map; ``classifier`` (pool → head) is kept only on request.
    """

    input_convention = "imagenet"

    def __init__(self, name: str, trunk: nn.Module, out_channels: int, classifier: nn.Module | None) -> None:
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.out_channels = out_channels
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (needs ``keep_classifier=True``)."""
        if self.classifier is None:
            raise RuntimeError(f"{self.name}: classifier was dropped; build with keep_classifier=True")
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self(x), 1), 1))


def _resnet(
    name: str, pretrained: str | Path | None, keep_classifier: bool, last_stride_one: bool = False
) -> TorchvisionBackbone:
    import torchvision.models as tvm

    net = getattr(tvm, name)(weights=None)
    path = _weight_file(name, pretrained)
    if path is not None:
        load_weights(net, path)
    if last_stride_one:
        # XBM: layer4 keeps the 14×14 grid at 224 input (the first block's 3×3 conv and shortcut lose stride 2).
        block = net.layer4[0]
        conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck strides in conv2
        conv.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
    trunk = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return TorchvisionBackbone(name, trunk, net.fc.in_features, net.fc if keep_classifier else None)


class _GoogLeNetTrunk(nn.Module):
    """torchvision GoogLeNet up to inception5b, with its optional ``transform_input`` re-normalisation.

    torchvision's ImageNet GoogLeNet weights were ported from a network fed (x − 0.5)/0.5 per channel;
    ``transform_input=True`` converts ImageNet-normalised input into that. IAA built the model with
    ``transform_input=False`` while loading these weights (methods.md §1.3 ⚠); set False to reproduce it.
    """

    def __init__(self, net: nn.Module, transform_input: bool) -> None:
        super().__init__()
        self.transform_input = transform_input
        names = [
            "conv1",
            "maxpool1",
            "conv2",
            "conv3",
            "maxpool2",
            "inception3a",
            "inception3b",
            "maxpool3",
            "inception4a",
            "inception4b",
            "inception4c",
            "inception4d",
            "inception4e",
            "maxpool4",
            "inception5a",
            "inception5b",
        ]
        self.layers = nn.Sequential(*[getattr(net, n) for n in names])
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        # x_tv = (x_imagenet·std + mean − 0.5) / 0.5 = x_imagenet·(std/0.5) + (mean − 0.5)/0.5
        self.register_buffer("scale", std / 0.5, persistent=False)
        self.register_buffer("shift", (mean - 0.5) / 0.5, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.transform_input:
            x = x * self.scale + self.shift
        return self.layers(x)


def _googlenet(
    pretrained: str | Path | None, keep_classifier: bool, transform_input: bool = True
) -> TorchvisionBackbone:
    import torchvision.models as tvm

    # The published file includes the auxiliary heads: build them so it loads strictly, then discard them.
    net = tvm.GoogLeNet(aux_logits=True, transform_input=False, init_weights=pretrained is None)
    path = _weight_file("googlenet", pretrained)
    if path is not None:
        load_weights(net, path)
    classifier = nn.Sequential(net.dropout, net.fc) if keep_classifier else None
    return TorchvisionBackbone("googlenet", _GoogLeNetTrunk(net, transform_input), 1024, classifier)


def _features_net(name: str, pretrained: str | Path | None, keep_classifier: bool) -> TorchvisionBackbone:
    """MobileNetV2 / EfficientNet: ``features`` → map, ``classifier`` = dropout + linear."""
    import torchvision.models as tvm

    net = getattr(tvm, name)(weights=None)
    path = _weight_file(name, pretrained)
    if path is not None:
        load_weights(net, path)
    out_channels = net.classifier[-1].in_features
    return TorchvisionBackbone(name, net.features, out_channels, net.classifier if keep_classifier else None)


BackboneBuilder = Callable[..., nn.Module]


def _build_bninception(
    pretrained: str | Path | None = None, keep_classifier: bool = False, **_: Any
) -> nn.Module:
    return BNInceptionBackbone(pretrained, keep_classifier)


def _build_googlenet(
    pretrained: str | Path | None = None,
    keep_classifier: bool = False,
    transform_input: bool = True,
    **_: Any,
) -> nn.Module:
    return _googlenet(pretrained, keep_classifier, transform_input)


def _resnet_builder(name: str) -> BackboneBuilder:
    def build(
        pretrained: str | Path | None = None,
        keep_classifier: bool = False,
        last_stride_one: bool = False,
        **_: Any,
    ) -> nn.Module:
        return _resnet(name, pretrained, keep_classifier, last_stride_one)

    return build


def _features_builder(name: str) -> BackboneBuilder:
    def build(pretrained: str | Path | None = None, keep_classifier: bool = False, **_: Any) -> nn.Module:
        return _features_net(name, pretrained, keep_classifier)

    return build


def _build_kanji(
    pretrained: str | Path | None = None, width: int = 64, in_channels: int = 1, **_: Any
) -> nn.Module:
    net = KanjiCNN(in_channels=in_channels, width=width)
    if pretrained is not None:
        if str(pretrained) == "imagenet":
            raise PretrainedWeightsError(
                "kanji_cnn has no ImageNet weights; pass a weight file or leave it unset"
            )
        load_weights(net, Path(pretrained).expanduser())
    net.input_convention = "none"  # its own transform already normalises the glyphs
    return net


# name → builder(pretrained=None, keep_classifier=False, last_stride_one=False, width=64, ...) → backbone
BACKBONES: dict[str, BackboneBuilder] = {
    "bninception": _build_bninception,
    "googlenet": _build_googlenet,
    "resnet18": _resnet_builder("resnet18"),
    "resnet50": _resnet_builder("resnet50"),
    "resnet101": _resnet_builder("resnet101"),
    "mobilenet_v2": _features_builder("mobilenet_v2"),
    "efficientnet_b0": _features_builder("efficientnet_b0"),
    "efficientnet_b1": _features_builder("efficientnet_b1"),
    "kanji_cnn": _build_kanji,
}


def build_backbone(name: str, pretrained: str | Path | None = None, **options: Any) -> nn.Module:
    """Backbone by name (``BACKBONES`` or ``timm:<model>``); options: keep_classifier, last_stride_one, width,
    image_size (timm token models)."""
    if name.startswith("timm:"):
        unknown = set(options) - {"keep_classifier", "image_size"}
        if unknown:
            raise ValueError(f"options {sorted(unknown)} do not apply to timm backbones like {name!r}")
        return TimmBackbone(name[len("timm:") :], pretrained, options.get("keep_classifier", False),
                            options.get("image_size"))
    if name == "bn_inception":
        name = "bninception"
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)} or 'timm:<model name>'")
    if options.get("last_stride_one") and not name.startswith("resnet"):
        raise ValueError(f"last_stride_one applies to ResNet backbones only, not {name!r}")
    return BACKBONES[name](pretrained=pretrained, **options)
