"""The NCSNv2 score network of Song & Ermon (2020), "Improved techniques for training score-based generative models"
(NeurIPS 2020), in plain PyTorch.

A RefineNet (Lin et al. 2017) with InstanceNorm++ and ELU; following the paper's Technique 3 the body is
noise-unconditional and the output is divided by the sigma of the requested level, ``s(x, i) = f(x) / sigma_i``.
Written so that the public ``ermongroup/ncsnv2`` checkpoints load key for key: module names and registration order are
the reference's ``models/ncsnv2.py:NCSNv2`` (the CIFAR-10 / CelebA network).

ADP (Yoon et al. 2021) uses the same network with the division left out (``used_sigmas = 1``): ``f(x)`` then
approximates ``-eps`` at any noise level, which is what :meth:`NCSNv2.unscaled` returns.

The reference's deeper variants for large images (``NCSNv2Deeper``, ``NCSNv2Deepest``) are not implemented: their
checkpoints fail to load with the missing and unexpected keys named.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class NCSNv2Config:
    """The fields of an NCSNv2 ``config.yml`` (``data`` and ``model`` sections) that shape the network or its
    conventions; names follow the reference."""

    ngf: int = 128
    num_classes: int = 232
    sigma_begin: float = 50.0
    sigma_end: float = 0.01
    sigma_dist: str = "geometric"
    normalization: str = "InstanceNorm++"
    nonlinearity: str = "elu"
    channels: int = 3
    image_size: int = 32
    logit_transform: bool = False
    rescaled: bool = False  # False: data on [0, 1] (the network maps it to [-1, 1] itself); True: data on [-1, 1]

    def __post_init__(self):
        checks = {"sigma_dist": ("geometric", "uniform"), "normalization": ("InstanceNorm++",),
                  "nonlinearity": ("elu",), "logit_transform": (False,)}
        for field, allowed in checks.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"NCSNv2 config: {field}={getattr(self, field)!r} is not supported here "
                                 f"(supported: {', '.join(map(repr, allowed))}).")

    @classmethod
    def from_mapping(cls, mapping: dict) -> "NCSNv2Config":
        """From a flat mapping of the fields above or the reference's ``config.yml`` layout (``data`` and ``model``
        sections; its other sections, training and sampling settings, are ignored)."""
        if "model" in mapping or "data" in mapping:  # the reference layout; its other sections do not shape the net
            mapping = {**mapping.get("data", {}), **mapping.get("model", {})}
        known = {f.name for f in dataclasses.fields(cls)}
        # Settings of the reference's data/model sections that do not shape the network.
        ignorable = {"dataset", "uniform_dequantization", "gaussian_dequantization", "random_flip", "num_workers",
                     "ema", "ema_rate", "spec_norm"}
        unknown = sorted(set(mapping) - known - ignorable)
        if unknown:
            raise ValueError(f"NCSNv2 config: unknown keys {unknown}; expected some of {sorted(known)}.")
        if mapping.get("spec_norm"):
            raise ValueError("NCSNv2 config: spec_norm=True networks are not supported.")
        return cls(**{k: v for k, v in mapping.items() if k in known})

    def sigmas(self) -> Tensor:
        """The noise levels sigma_1 > ... > sigma_L, in the units of the data range (pixel sigma when not rescaled)."""
        if self.sigma_dist == "geometric":
            return torch.exp(torch.linspace(math.log(self.sigma_begin), math.log(self.sigma_end), self.num_classes,
                                            dtype=torch.float64)).float()
        return torch.linspace(self.sigma_begin, self.sigma_end, self.num_classes, dtype=torch.float64).float()


# The reference repository's configs/cifar10.yml (the network of the public CIFAR-10 checkpoint).
CONFIGS = {"cifar10": NCSNv2Config()}


def named_config(name: str) -> NCSNv2Config:
    if name not in CONFIGS:
        raise ValueError(f"unknown NCSNv2 config {name!r}; known: {', '.join(CONFIGS)}.")
    return CONFIGS[name]


class InstanceNormPlus(nn.Module):
    """InstanceNorm++ (Song & Ermon 2019, Appendix A): instance normalisation that puts back the normalised per-channel
    means, ``gamma (IN(x) + alpha m_hat) + beta``."""

    def __init__(self, channels: int):
        super().__init__()
        self.instance_norm = nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
        self.alpha = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        means = x.mean(dim=(2, 3))
        means = (means - means.mean(dim=-1, keepdim=True)) / torch.sqrt(means.var(dim=-1, keepdim=True) + 1e-5)
        h = self.instance_norm(x) + means[..., None, None] * self.alpha[..., None, None]
        return self.gamma[..., None, None] * h + self.beta[..., None, None]


class ConvMeanPool(nn.Module):
    """A convolution followed by 2x2 mean pooling."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return (h[:, :, ::2, ::2] + h[:, :, 1::2, ::2] + h[:, :, ::2, 1::2] + h[:, :, 1::2, 1::2]) / 4.0


class ResidualBlock(nn.Module):
    """Pre-activation residual block. With a ``dilation`` its convolutions are dilated and ``resample="down"`` does not
    reduce the resolution (as in the reference: only the first downsampling block pools)."""

    def __init__(self, in_ch: int, out_ch: int, down: bool = False, dilation: int | None = None):
        super().__init__()
        def conv3(i, o):
            d = dilation or 1
            return nn.Conv2d(i, o, 3, padding=d, dilation=d)
        if down and dilation is None:
            self.conv1 = conv3(in_ch, in_ch)
            self.normalize2 = InstanceNormPlus(in_ch)
            self.conv2 = ConvMeanPool(in_ch, out_ch, 3)
            make_shortcut = partial(ConvMeanPool, in_ch, out_ch, 1)
        elif down:
            self.conv1 = conv3(in_ch, in_ch)
            self.normalize2 = InstanceNormPlus(in_ch)
            self.conv2 = conv3(in_ch, out_ch)
            make_shortcut = partial(conv3, in_ch, out_ch)
        else:
            self.conv1 = conv3(in_ch, out_ch)
            self.normalize2 = InstanceNormPlus(out_ch)
            self.conv2 = conv3(out_ch, out_ch)
            make_shortcut = partial(conv3, in_ch, out_ch) if dilation else partial(nn.Conv2d, in_ch, out_ch, 1)
        # Registered after conv2 and before normalize1: the reference order, which fixes the state_dict order.
        self.has_shortcut = in_ch != out_ch or down
        if self.has_shortcut:
            self.shortcut = make_shortcut()
        self.normalize1 = InstanceNormPlus(in_ch)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.elu(self.normalize1(x)))
        h = self.conv2(F.elu(self.normalize2(h)))
        return (self.shortcut(x) if self.has_shortcut else x) + h


class RCUBlock(nn.Module):
    """Residual conv units: ``n_blocks`` times ``x + conv(elu(...conv(elu(x))))`` with ``n_stages`` bias-free convs;
    the convs are attributes named ``{block}_{stage}_conv`` (1-based)."""

    def __init__(self, channels: int, n_blocks: int, n_stages: int):
        super().__init__()
        self.n_blocks, self.n_stages = n_blocks, n_stages
        for i in range(1, n_blocks + 1):
            for j in range(1, n_stages + 1):
                setattr(self, f"{i}_{j}_conv", nn.Conv2d(channels, channels, 3, padding=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.n_blocks + 1):
            residual = x
            for j in range(1, self.n_stages + 1):
                x = getattr(self, f"{i}_{j}_conv")(F.elu(x))
            x = x + residual
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: each input convolved and bilinearly resized to the output shape, then summed."""

    def __init__(self, in_channels: list, features: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1) for c in in_channels)

    def forward(self, xs: list, shape) -> Tensor:
        return sum(F.interpolate(conv(x), size=shape, mode="bilinear", align_corners=True)
                   for conv, x in zip(self.convs, xs))


class CRPBlock(nn.Module):
    """Chained residual pooling: a chain of 5x5 max-pool + bias-free conv, each stage added to the input."""

    def __init__(self, features: int, n_stages: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(features, features, 3, padding=1, bias=False) for _ in range(n_stages))

    def forward(self, x: Tensor) -> Tensor:
        x = path = F.elu(x)
        for conv in self.convs:
            path = conv(F.max_pool2d(path, kernel_size=5, stride=1, padding=2))
            x = path + x
        return x


class RefineBlock(nn.Module):
    def __init__(self, in_channels: list, features: int, start: bool = False, end: bool = False):
        super().__init__()
        self.adapt_convs = nn.ModuleList(RCUBlock(c, 2, 2) for c in in_channels)
        self.output_convs = RCUBlock(features, 3 if end else 1, 2)
        if not start:
            self.msf = MSFBlock(in_channels, features)
        self.crp = CRPBlock(features, 2)

    def forward(self, xs: list, shape) -> Tensor:
        hs = [adapt(x) for adapt, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, shape) if len(hs) > 1 else hs[0]
        return self.output_convs(self.crp(h))


class NCSNv2(nn.Module):
    """``net(x, labels)``: the score at noise level ``sigmas[labels]``, ``f(x) / sigmas[labels]``."""

    def __init__(self, config: NCSNv2Config):
        super().__init__()
        self.config = config
        ngf = config.ngf
        self.register_buffer("sigmas", config.sigmas())
        self.begin_conv = nn.Conv2d(config.channels, ngf, 3, padding=1)
        self.normalizer = InstanceNormPlus(ngf)
        self.end_conv = nn.Conv2d(ngf, config.channels, 3, padding=1)
        self.res1 = nn.ModuleList([ResidualBlock(ngf, ngf), ResidualBlock(ngf, ngf)])
        self.res2 = nn.ModuleList([ResidualBlock(ngf, 2 * ngf, down=True), ResidualBlock(2 * ngf, 2 * ngf)])
        self.res3 = nn.ModuleList([ResidualBlock(2 * ngf, 2 * ngf, down=True, dilation=2),
                                   ResidualBlock(2 * ngf, 2 * ngf, dilation=2)])
        self.res4 = nn.ModuleList([ResidualBlock(2 * ngf, 2 * ngf, down=True, dilation=4),
                                   ResidualBlock(2 * ngf, 2 * ngf, dilation=4)])
        self.refine1 = RefineBlock([2 * ngf], 2 * ngf, start=True)
        self.refine2 = RefineBlock([2 * ngf, 2 * ngf], 2 * ngf)
        self.refine3 = RefineBlock([2 * ngf, 2 * ngf], ngf)
        self.refine4 = RefineBlock([ngf, ngf], ngf, end=True)

    def unscaled(self, x: Tensor) -> Tensor:
        """``f(x)``, the output before the division by sigma (approximately ``-eps`` at every noise level)."""
        h = x if self.config.rescaled else 2 * x - 1.0
        layer1 = self.begin_conv(h)
        for block in self.res1:
            layer1 = block(layer1)
        layer2 = layer1
        for block in self.res2:
            layer2 = block(layer2)
        layer3 = layer2
        for block in self.res3:
            layer3 = block(layer3)
        layer4 = layer3
        for block in self.res4:
            layer4 = block(layer4)
        ref = self.refine1([layer4], layer4.shape[2:])
        ref = self.refine2([layer3, ref], layer3.shape[2:])
        ref = self.refine3([layer2, ref], layer2.shape[2:])
        ref = self.refine4([layer1, ref], layer1.shape[2:])
        return self.end_conv(F.elu(self.normalizer(ref)))

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.unscaled(x) / self.sigmas[labels].reshape(-1, 1, 1, 1)
