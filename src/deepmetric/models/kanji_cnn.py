"""A small convolutional backbone sized for 32×32 grayscale glyphs on a CPU.

A stem convolution at full resolution, then three stages of (strided conv3×3-BN-ReLU, conv3×3-BN-ReLU):
32→16→8→4 spatial, widths w, 2w, 4w. Downsampling right after the stem keeps the cost at ~12 M multiply-adds per
32×32 image for w = 32 (~0.3 M parameters), so the whole embedded test split (tens of thousands of glyphs) embeds
in seconds and a batch trains in tens of milliseconds on two CPU cores. The output is a feature map; pooling and projection live in the embedding head so the same head
options apply to every backbone.
"""

from __future__ import annotations

from torch import Tensor, nn


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class KanjiCNN(nn.Module):
    """Feature extractor returning a (B, 4·width, H/8, W/8) map; ``out_channels`` tells the head its width."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        self.stages = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            _block(widths[0], widths[0], 2),
            _block(widths[0], widths[1], 2),
            _block(widths[1], widths[2], 2),
        )
        self.out_channels = widths[2]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)
