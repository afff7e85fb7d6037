"""BN-Inception (Inception with Batch Normalization, Ioffe & Szegedy 2015), Caffe-port layer names.

Every deep-metric-learning repository we reproduce uses the ImageNet weights converted from Caffe by Cadene
(``bn_inception-52deb4733.pth``). To load that file with ``strict=True`` this module flattens every layer into
an attribute with the Caffe blob name (``conv1_7x7_s2``, ``conv1_7x7_s2_bn``, ``inception_3a_1x1``, …,
``inception_5b_pool_proj_bn``, ``last_linear``); all convolutions carry a bias, as in Caffe. The network expects
BGR 0–255 mean-subtracted input (:class:`deepmetric.data.transforms.BNInceptionPreprocess`).

Shapes at a 224×224 input: stem → 192×28×28, 3a/3b → 256/320, 3c (stride 2) → 576×14×14, 4a–4c → 576/576/608,
4d → 608, 4e (stride 2) → 1056×7×7, 5a/5b → 1024×7×7. Max pools use ``ceil_mode`` like Caffe; branch average
pools count the zero padding (Caffe's convention). The block outputs are concatenated in the order
1×1, 3×3, double 3×3, pool — the channel order the converted weights assume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class InceptionSpec:
    """One inception block. ``reduce_out`` pairs are (1×1 reduce width, 3×3 width); ``stride`` 2 = grid reduction."""

    name: str
    in_channels: int
    n1x1: int  # 0: no 1×1 branch (grid-reduction blocks)
    b3x3: tuple[int, int]
    double3x3: tuple[int, int]
    pool: str  # "avg" (stride 1) or "max" (stride 1 or 2)
    pool_proj: int  # 0: pooled input is concatenated unprojected
    stride: int = 1

    @property
    def out_channels(self) -> int:
        pooled = self.pool_proj if self.pool_proj else self.in_channels
        return self.n1x1 + self.b3x3[1] + self.double3x3[1] + pooled


# The published architecture (BN-Inception paper, Fig. 5 / Caffe prototxt).
INCEPTION_BLOCKS: tuple[InceptionSpec, ...] = (
    InceptionSpec("3a", 192, 64, (64, 64), (64, 96), "avg", 32),
    InceptionSpec("3b", 256, 64, (64, 96), (64, 96), "avg", 64),
    InceptionSpec("3c", 320, 0, (128, 160), (64, 96), "max", 0, stride=2),
    InceptionSpec("4a", 576, 224, (64, 96), (96, 128), "avg", 128),
    InceptionSpec("4b", 576, 192, (96, 128), (96, 128), "avg", 128),
    InceptionSpec("4c", 576, 160, (128, 160), (128, 160), "avg", 128),
    InceptionSpec("4d", 608, 96, (128, 192), (160, 192), "avg", 128),
    InceptionSpec("4e", 608, 0, (128, 192), (192, 256), "max", 0, stride=2),
    InceptionSpec("5a", 1056, 352, (192, 320), (160, 224), "avg", 128),
    InceptionSpec("5b", 1024, 352, (192, 320), (192, 224), "max", 128),
)


class BNInception(nn.Module):
    """BN-Inception; ``forward`` returns the 1024-channel map, :meth:`logits` the 1000 ImageNet scores.

    ``num_classes=0`` builds no ``last_linear`` (a pure feature extractor; the Cadene file then no longer loads
    strictly, so load weights first and call :meth:`drop_classifier`).
    """

    out_channels = 1024

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_bn("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
        self._conv_bn("conv2_3x3_reduce", 64, 64, 1)
        self._conv_bn("conv2_3x3", 64, 192, 3, padding=1)
        for spec in INCEPTION_BLOCKS:
            p = f"inception_{spec.name}"
            if spec.n1x1:
                self._conv_bn(f"{p}_1x1", spec.in_channels, spec.n1x1, 1)
            self._conv_bn(f"{p}_3x3_reduce", spec.in_channels, spec.b3x3[0], 1)
            self._conv_bn(f"{p}_3x3", spec.b3x3[0], spec.b3x3[1], 3, stride=spec.stride, padding=1)
            self._conv_bn(f"{p}_double_3x3_reduce", spec.in_channels, spec.double3x3[0], 1)
            self._conv_bn(f"{p}_double_3x3_1", spec.double3x3[0], spec.double3x3[1], 3, padding=1)
            self._conv_bn(
                f"{p}_double_3x3_2", spec.double3x3[1], spec.double3x3[1], 3, stride=spec.stride, padding=1
            )
            if spec.pool_proj:
                self._conv_bn(f"{p}_pool_proj", spec.in_channels, spec.pool_proj, 1)
        self.last_linear: nn.Linear | None = nn.Linear(1024, num_classes) if num_classes else None

    def _conv_bn(self, name: str, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> None:
        setattr(self, name, nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=True))
        setattr(self, f"{name}_bn", nn.BatchNorm2d(cout))

    def _unit(self, name: str, x: Tensor) -> Tensor:
        return F.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)), inplace=True)

    def _block(self, spec: InceptionSpec, x: Tensor) -> Tensor:
        p = f"inception_{spec.name}"
        branches = []
        if spec.n1x1:
            branches.append(self._unit(f"{p}_1x1", x))
        branches.append(self._unit(f"{p}_3x3", self._unit(f"{p}_3x3_reduce", x)))
        d = self._unit(f"{p}_double_3x3_1", self._unit(f"{p}_double_3x3_reduce", x))
        branches.append(self._unit(f"{p}_double_3x3_2", d))
        if spec.pool == "avg":
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
        elif spec.stride == 2:
            pooled = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        else:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1, ceil_mode=True)
        branches.append(self._unit(f"{p}_pool_proj", pooled) if spec.pool_proj else pooled)
        return torch.cat(branches, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self._unit("conv1_7x7_s2", x), 3, stride=2, ceil_mode=True)
        x = self._unit("conv2_3x3", self._unit("conv2_3x3_reduce", x))
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        for spec in INCEPTION_BLOCKS:
            x = self._block(spec, x)
        return x

    def logits(self, features: Tensor) -> Tensor:
        """ImageNet class scores from :meth:`forward`'s map (global average pool → ``last_linear``)."""
        if self.last_linear is None:
            raise RuntimeError("this BNInception has no classifier (built with num_classes=0 or dropped)")
        return self.last_linear(F.adaptive_avg_pool2d(features, 1).flatten(1))

    def drop_classifier(self) -> None:
        """Remove ``last_linear`` so that no parameter goes unused in embedding training (DDP requires it)."""
        self.last_linear = None
