"""A compact U-Net ``F(x, c_noise)`` for the built-in EDM prior (:class:`purifiers.priors.backends.EDMDenoiser`).

Small enough to train on 2 CPU cores and ship under 10 MB, for 1- and 3-channel images whose sides divide by
``2 ** (len(channel_mults) - 1)`` (28x28 MNIST and 32x32 CIFAR-10 with the default three levels).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of ``c_noise = ln(sigma)/4`` at geometric frequencies 1..1000, then a 2-layer MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), dim // 2)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.reshape(-1, 1) * self.freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SmallUNet(nn.Module):
    """Encoder-decoder with skip connections; ``config`` holds the constructor arguments (saved with the weights)."""

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mults: tuple[int, ...] = (1, 2, 2),
                 num_res_blocks: int = 2, emb_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.config = dict(in_channels=in_channels, base_channels=base_channels, channel_mults=list(channel_mults),
                           num_res_blocks=num_res_blocks, emb_dim=emb_dim, dropout=dropout)
        self.embed = NoiseEmbedding(emb_dim)
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in channel_mults]

        self.down = nn.ModuleList()
        skip_widths, ch = [base_channels], base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, width, emb_dim, dropout))
                ch = width
                skip_widths.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_widths.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skip_widths.pop(), width, emb_dim, dropout))
                ch = width
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.head = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise.to(x.dtype).expand(x.shape[0]))
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.head(h)
