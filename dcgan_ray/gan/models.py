"""The reference DCGAN for 32x32x3 images (Radford et al. 2015, as in the reference network's SVHN network).

G: z -> dense 4x4x(8f) -> BN, lrelu -> 5x5 stride-2 transposed convs 8f -> 4f -> 2f (BN, lrelu) -> 3, tanh
D: 3 -> 5x5 stride-2 convs f -> 2f -> 4f, lrelu (BN on all but the first) -> dense -> 1 logit
with f = d_features = 64 and 2f = g_features = 128 by default, so G reaches 512 channels at 4x4.

Parameter counts with the defaults: G 4,935,171, D 1,033,729. D's second and third convs carry no
bias: BatchNorm subtracts the batch mean right after them, which cancels any bias (as in
pytorch/examples' DCGAN); G keeps every bias the reference network's layers have.
"""

from __future__ import annotations

import torch
from torch import nn


def _up(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    # kernel 5, stride 2, padding 2, output_padding 1 doubles the size exactly, like TF's 'same'.
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=5, stride=2, padding=2, output_padding=1)


def _down(in_ch: int, out_ch: int, bias: bool) -> nn.Conv2d:
    # kernel 5, stride 2, padding 2 halves the size exactly, like TF's 'same'.
    return nn.Conv2d(in_ch, out_ch, kernel_size=5, stride=2, padding=2, bias=bias)


class Generator(nn.Module):
    def __init__(self, z_dim: int = 100, features: int = 128, alpha: float = 0.2):
        super().__init__()
        self.z_dim = z_dim
        self.top = 4 * features
        self.project = nn.Linear(z_dim, 4 * 4 * self.top)  # z -> 4x4x512
        self.net = nn.Sequential(
            nn.BatchNorm2d(self.top),
            nn.LeakyReLU(alpha),
            _up(self.top, self.top // 2),  # -> 8x8x256
            nn.BatchNorm2d(self.top // 2),
            nn.LeakyReLU(alpha),
            _up(self.top // 2, self.top // 4),  # -> 16x16x128
            nn.BatchNorm2d(self.top // 4),
            nn.LeakyReLU(alpha),
            _up(self.top // 4, 3),  # -> 32x32x3
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, self.top, 4, 4)
        return self.net(x)


class Discriminator(nn.Module):
    def __init__(self, features: int = 64, alpha: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            _down(3, features, bias=True),  # 32x32x3 -> 16x16x64, no BN on the first layer
            nn.LeakyReLU(alpha),
            _down(features, 2 * features, bias=False),  # -> 8x8x128
            nn.BatchNorm2d(2 * features),
            nn.LeakyReLU(alpha),
            _down(2 * features, 4 * features, bias=False),  # -> 4x4x256
            nn.BatchNorm2d(4 * features),
            nn.LeakyReLU(alpha),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4 * features, 1),  # -> one logit
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1)


def init_weights(module: nn.Module) -> None:
    """DCGAN paper init: weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0; biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(z_dim: int, g_features: int, d_features: int, alpha: float) -> tuple[Generator, Discriminator]:
    netG = Generator(z_dim, g_features, alpha)
    netD = Discriminator(d_features, alpha)
    netG.apply(init_weights)
    netD.apply(init_weights)
    return netG, netD


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
