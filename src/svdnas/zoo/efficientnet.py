"""EfficientNet-B0 (Tan and Le 2019) with torchvision's parameter names: MBConv, SE, SiLU."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from svdnas.zoo._blocks import ConvNormAct

# expansion, kernel, first stride, input channels, output channels, repeats
_B0 = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


class StochasticDepth(nn.Module):
    """Drops the residual branch per sample with probability ``p`` while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)


class MBConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, sd_prob: float) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_ch == out_ch
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if hidden != in_ch:
            layers.append(ConvNormAct(in_ch, hidden, 1, act=nn.SiLU))
        layers += [
            ConvNormAct(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcitation(hidden, max(1, in_ch // 4)),
            ConvNormAct(hidden, out_ch, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + self.stochastic_depth(out) if self.use_res_connect else out


class EfficientNet(nn.Module):
    """EfficientNet-B0.

    Args:
        num_classes: classifier outputs.
        in_chans: input image channels.
        small_input: for 28x28 inputs: the stem keeps stride 1 (total stride 16, not 32).
        dropout: dropout before the classifier.
        stochastic_depth_prob: largest drop probability of a residual branch (grows with depth).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
    ) -> None:
        super().__init__()
        total = sum(cfg[-1] for cfg in _B0)
        features: list[nn.Module] = [ConvNormAct(in_chans, 32, 3, 1 if small_input else 2, act=nn.SiLU)]
        block_id = 0
        for expand, kernel, stride, in_ch, out_ch, n in _B0:
            stage = []
            for i in range(n):
                sd = stochastic_depth_prob * block_id / total
                stage.append(MBConv(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, expand, sd))
                block_id += 1
            features.append(nn.Sequential(*stage))
        features.append(ConvNormAct(320, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features**0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))
