"""MobileNetV2 (Sandler et al. 2018) with torchvision's parameter names."""

from __future__ import annotations

from torch import Tensor, nn

from svdnas.zoo._blocks import ConvNormAct, make_divisible

# expansion t, output channels c, repeats n, first stride s
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvNormAct(in_ch, hidden, 1))
        layers += [
            ConvNormAct(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2.

    Args:
        num_classes: classifier outputs.
        in_chans: input image channels.
        small_input: for 28x28 inputs: the stem keeps stride 1 (total stride 16, not 32).
        dropout: dropout before the classifier.
    """

    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, small_input: bool = False, dropout: float = 0.2
    ) -> None:
        super().__init__()
        in_ch, last = 32, 1280
        features: list[nn.Module] = [ConvNormAct(in_chans, in_ch, 3, 1 if small_input else 2)]
        for t, c, n, s in _SETTINGS:
            out_ch = make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvNormAct(in_ch, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))
