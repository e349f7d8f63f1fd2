"""The NCSN++ / DDPM++ score networks of Song et al. (2021), "Score-based generative modeling through stochastic
differential equations" (ICLR 2021), in plain PyTorch.

Written from the description in the paper (Section 4.4 and Appendix H) and the structure of the public
``yang-song/score_sde_pytorch`` implementation, so that its checkpoints (``checkpoint_*.pth``) load key for key: the
module tree and the registration order (which fixes ``state_dict()`` names and the ``parameters()`` order that its EMA
``shadow_params`` list follows) are the reference's. "DDPM++" is this same network with DDPM-style settings
(no FIR filter, no input pyramid, positional time embedding).

The reference's CUDA FIR up/down-sampling kernels (StyleGAN2's ``upfirdn2d``) are replaced by :func:`upfirdn2d`,
written with ``conv2d``; it runs on CPU and any GPU.

Only the options the CIFAR-10 continuous configs use are implemented (BigGAN residual blocks, no output pyramid, input
pyramid "none" or "residual"); other values raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class ScoreSDEConfig:
    """The fields of a score_sde config (``config.model``, ``config.data``, ``config.training.sde``) that shape the
    network or its conventions. Field names follow the reference configs."""

    sde: str  # "vpsde" or "vesde": the SDE the network was trained on; fixes the time input and output conventions
    nf: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple = (16,)
    resamp_with_conv: bool = True
    conditional: bool = True
    fir: bool = False
    fir_kernel: tuple = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "none"
    progressive_combine: str = "sum"
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    scale_by_sigma: bool = False
    dropout: float = 0.1
    nonlinearity: str = "swish"
    image_size: int = 32
    num_channels: int = 3
    centered: bool = True  # data on [-1, 1] (True) or on [0, 1] (False; the network then maps it to [-1, 1] itself)
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000

    def __post_init__(self):
        checks = {"sde": ("vpsde", "vesde"), "resblock_type": ("biggan",), "progressive": ("none",),
                  "progressive_input": ("none", "residual"), "progressive_combine": ("sum",),
                  "embedding_type": ("positional", "fourier"), "nonlinearity": ("swish",)}
        for field, allowed in checks.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"score_sde config: {field}={getattr(self, field)!r} is not supported here "
                                 f"(supported: {', '.join(map(repr, allowed))}).")
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        object.__setattr__(self, "fir_kernel", tuple(self.fir_kernel))

    @classmethod
    def from_mapping(cls, mapping: dict) -> "ScoreSDEConfig":
        """From a flat mapping of the fields above, or the reference's nesting (``model``, ``data``, ``training``
        sections); unknown keys raise ``ValueError`` (a misspelt field must not silently fall back to a default)."""
        flat = {}
        for key, value in mapping.items():
            if isinstance(value, dict) and key in ("model", "data", "training"):
                flat.update(value)
            elif key not in ("sampling", "eval", "optim", "seed", "device"):  # the reference's other sections
                flat[key] = value
        known = {f.name for f in dataclasses.fields(cls)}
        # The reference's sections hold training and sampling settings that do not shape the network: skip those only.
        ignorable = {"name", "ema_rate", "normalization", "attention_type", "init_scale", "conv_size", "dataset",
                     "random_flip", "uniform_dequantization", "continuous", "reduce_mean", "n_iters", "batch_size",
                     "snapshot_freq", "log_freq", "eval_freq", "snapshot_freq_for_preemption", "snapshot_sampling",
                     "likelihood_weighting"}
        unknown = sorted(set(flat) - known - ignorable)
        if unknown:
            raise ValueError(f"score_sde config: unknown keys {unknown}; expected some of {sorted(known)}.")
        if "sde" not in flat:
            raise ValueError("score_sde config: 'sde' ('vpsde' or 'vesde') is required.")
        return cls(**{k: v for k, v in flat.items() if k in known})


_CIFAR10_DDPMPP = dict(sde="vpsde", embedding_type="positional", fir=False, progressive_input="none", centered=True)
_CIFAR10_NCSNPP = dict(fir=True, progressive_input="residual")

# The CIFAR-10 configs of the reference repository (configs/vp/*.py, configs/ve/*.py), by the reference's file names.
CONFIGS = {
    "vp/cifar10_ddpmpp_deep_continuous": ScoreSDEConfig(**_CIFAR10_DDPMPP, num_res_blocks=8),
    "vp/cifar10_ddpmpp_continuous": ScoreSDEConfig(**_CIFAR10_DDPMPP),
    "vp/cifar10_ncsnpp_continuous": ScoreSDEConfig(sde="vpsde", embedding_type="positional", centered=True,
                                                   **_CIFAR10_NCSNPP),
    # VE: data stays on [0, 1] (data.centered = False) and the network divides its output by sigma.
    "ve/cifar10_ncsnpp_continuous": ScoreSDEConfig(sde="vesde", embedding_type="fourier", centered=False,
                                                   scale_by_sigma=True, **_CIFAR10_NCSNPP),
}


def named_config(name: str) -> ScoreSDEConfig:
    """A config of :data:`CONFIGS`; the ``vp/`` or ``ve/`` prefix may be left out where the name is unambiguous."""
    if name in CONFIGS:
        return CONFIGS[name]
    matches = [key for key in CONFIGS if key.split("/", 1)[1] == name]
    if len(matches) == 1:
        return CONFIGS[matches[0]]
    if matches:
        raise ValueError(f"score_sde config {name!r} is ambiguous: say {' or '.join(map(repr, matches))}.")
    raise ValueError(f"unknown score_sde config {name!r}; known: {', '.join(CONFIGS)}.")


# --------------------------------------------------------------------------------------------------------------------
# FIR resampling (StyleGAN2's upfirdn2d, Karras et al. 2020): zero-insert by ``up``, pad, filter, keep every ``down``-th
# --------------------------------------------------------------------------------------------------------------------

def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple = (0, 0)) -> Tensor:
    """Upsample by zero insertion, pad (negative pads crop) by ``pad = (before, after)`` on both axes, convolve each
    channel with the 2-D ``kernel`` (a true convolution, so the kernel is flipped for ``conv2d``), subsample."""
    n, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(n, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(n, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, (0, 1)).to(x)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=c)[:, :, ::down, ::down]


def _fir_kernel(taps) -> Tensor:
    """The separable 2-D filter of 1-D ``taps``, normalised to sum 1."""
    k = torch.as_tensor(taps, dtype=torch.float32, device="cpu")
    k = torch.outer(k, k)
    return k / k.sum()


def fir_downsample(x: Tensor, taps) -> Tensor:
    k = _fir_kernel(taps)
    p = k.shape[0] - 2
    return upfirdn2d(x, k, down=2, pad=((p + 1) // 2, p // 2))


def fir_upsample(x: Tensor, taps) -> Tensor:
    k = _fir_kernel(taps) * 4  # gain factor**2 keeps constant images constant after zero insertion
    p = k.shape[0] - 2
    return upfirdn2d(x, k, up=2, pad=((p + 1) // 2 + 1, p // 2))


def naive_downsample(x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def naive_upsample(x: Tensor) -> Tensor:
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


class FIRConvDownsample(nn.Module):
    """A 3x3 convolution with stride 2 preceded by FIR filtering, fused into one padding (StyleGAN2's
    ``conv_downsample_2d``); parameters ``weight`` and ``bias`` as in the reference's ``up_or_down_sampling.Conv2d``."""

    def __init__(self, in_ch: int, out_ch: int, taps, kernel: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.taps = tuple(taps)

    def forward(self, x: Tensor) -> Tensor:
        k = _fir_kernel(self.taps)
        p = (k.shape[0] - 2) + (self.weight.shape[-1] - 1)
        x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
        return F.conv2d(x, self.weight, stride=2) + self.bias.reshape(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------------------------------
# Layers (the reference's names: GroupNorm_0, Conv_0, Dense_0, NIN_0, ...)
# --------------------------------------------------------------------------------------------------------------------

def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


class NIN(nn.Module):
    """A 1x1 "network in network" projection with a (in, out) weight ``W`` and bias ``b``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(in_dim, out_dim) / math.sqrt(in_dim))
        self.b = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b.reshape(1, -1, 1, 1)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (DDPM's), with the skip rescaled by 1/sqrt(2)."""

    def __init__(self, channels: int, skip_rescale: bool):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(normed), self.NIN_1(normed), self.NIN_2(normed)
        weights = torch.einsum("bcn,bcm->bnm", q.reshape(b, c, -1), k.reshape(b, c, -1)) * c**-0.5
        out = torch.einsum("bnm,bcm->bcn", weights.softmax(dim=-1), v.reshape(b, c, -1)).reshape(b, c, h, w)
        out = x + self.NIN_3(out)
        return out / math.sqrt(2.0) if self.skip_rescale else out


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block (Brock et al. 2019) with the time embedding added after the first convolution;
    ``up``/``down`` resample both paths (FIR or nearest/average)."""

    def __init__(self, in_ch: int, out_ch: int | None, temb_dim: int | None, dropout: float, fir: bool, taps,
                 skip_rescale: bool, up: bool = False, down: bool = False):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.needs_projection = in_ch != out_ch or up or down
        if self.needs_projection:
            self.Conv_2 = nn.Conv2d(in_ch, out_ch, 1)
        self.up, self.down, self.fir, self.taps, self.skip_rescale = up, down, fir, tuple(taps), skip_rescale

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return fir_upsample(x, self.taps) if self.fir else naive_upsample(x)
        if self.down:
            return fir_downsample(x, self.taps) if self.fir else naive_downsample(x)
        return x

    def forward(self, x: Tensor, temb: Tensor | None) -> Tensor:
        h = self._resample(F.silu(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if self.needs_projection:
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class PyramidDownsample(nn.Module):
    """The input pyramid's downsampling convolution (progressive_input="residual"): FIR-fused (``Conv2d_0``) or a plain
    stride-2 convolution after padding right and bottom by one (``Conv_0``), as in the reference."""

    def __init__(self, in_ch: int, out_ch: int, fir: bool, taps):
        super().__init__()
        self.fir = fir
        if fir:
            self.Conv2d_0 = FIRConvDownsample(in_ch, out_ch, taps)
        else:
            self.Conv_0 = nn.Conv2d(in_ch, out_ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.Conv2d_0(x) if self.fir else self.Conv_0(F.pad(x, (0, 1, 0, 1)))


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of log-sigma (Tancik et al. 2020); ``W`` is frozen (not trained, not in the EMA)."""

    def __init__(self, size: int, scale: float):
        super().__init__()
        self.W = nn.Parameter(torch.randn(size) * scale, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        proj = x[:, None] * self.W[None, :] * (2 * math.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)


def timestep_embedding(timesteps: Tensor, dim: int, max_positions: int = 10000) -> Tensor:
    """Transformer sinusoidal embedding of a (possibly fractional) time (Vaswani et al. 2017; DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_positions) / (half - 1) * torch.arange(half, dtype=torch.float32,
                                                                          device=timesteps.device))
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# --------------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------------

class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ (Song et al. 2021, Appendix H), called ``net(x, time_cond)``.

    * VP configs: ``time_cond`` is ``999 t`` (continuous VP time ``t`` in [0, 1]), the output predicts the noise eps of
      ``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps`` on [-1, 1] data.
    * VE configs: ``time_cond`` is sigma and the output is the score ``-eps / sigma`` (``scale_by_sigma``); with
      ``centered=False`` the input is on [0, 1] and sigma is in those units.

    All submodules live in the single list ``all_modules``, in the order ``forward`` consumes them (the reference's
    layout).
    """

    def __init__(self, config: ScoreSDEConfig):
        super().__init__()
        self.config = c = config
        sigmas = torch.exp(torch.linspace(math.log(c.sigma_max), math.log(c.sigma_min), c.num_scales,
                                          dtype=torch.float64))
        self.register_buffer("sigmas", sigmas.float())
        nf, temb_dim = c.nf, 4 * c.nf
        resolutions = [c.image_size // 2**i for i in range(len(c.ch_mult))]

        def resblock(in_ch, out_ch=None, up=False, down=False):
            return ResnetBlockBigGAN(in_ch, out_ch, temb_dim if c.conditional else None, c.dropout, c.fir,
                                     c.fir_kernel, c.skip_rescale, up=up, down=down)

        modules = []
        if c.embedding_type == "fourier":
            modules.append(GaussianFourierProjection(nf, c.fourier_scale))
        if c.conditional:
            modules += [nn.Linear(2 * nf if c.embedding_type == "fourier" else nf, temb_dim),
                        nn.Linear(temb_dim, temb_dim)]
        modules.append(nn.Conv2d(c.num_channels, nf, 3, padding=1))
        skip_channels, in_ch, pyramid_ch = [nf], nf, c.num_channels
        for level, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                modules.append(resblock(in_ch, nf * mult))
                in_ch = nf * mult
                if resolutions[level] in c.attn_resolutions:
                    modules.append(AttnBlock(in_ch, c.skip_rescale))
                skip_channels.append(in_ch)
            if level != len(c.ch_mult) - 1:
                modules.append(resblock(in_ch, down=True))
                if c.progressive_input == "residual":
                    modules.append(PyramidDownsample(pyramid_ch, in_ch, c.fir, c.fir_kernel))
                    pyramid_ch = in_ch
                skip_channels.append(in_ch)
        modules += [resblock(in_ch), AttnBlock(in_ch, c.skip_rescale), resblock(in_ch)]
        for level in reversed(range(len(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                modules.append(resblock(in_ch + skip_channels.pop(), nf * c.ch_mult[level]))
                in_ch = nf * c.ch_mult[level]
            if resolutions[level] in c.attn_resolutions:
                modules.append(AttnBlock(in_ch, c.skip_rescale))
            if level != 0:
                modules.append(resblock(in_ch, up=True))
        modules += [_group_norm(in_ch), nn.Conv2d(in_ch, c.num_channels, 3, padding=1)]
        self.all_modules = nn.ModuleList(modules)

    def forward(self, x: Tensor, time_cond: Tensor) -> Tensor:
        c = self.config
        modules = iter(self.all_modules)
        if c.embedding_type == "fourier":
            temb = next(modules)(torch.log(time_cond))
        else:
            temb = timestep_embedding(time_cond, c.nf)
        if c.conditional:
            temb = next(modules)(temb)
            temb = next(modules)(F.silu(temb))
        else:
            temb = None
        if not c.centered:
            x = 2 * x - 1.0
        pyramid = x
        skips = [next(modules)(x)]
        for level in range(len(c.ch_mult)):
            for _ in range(c.num_res_blocks):
                h = next(modules)(skips[-1], temb)
                if h.shape[-1] in c.attn_resolutions:
                    h = next(modules)(h)
                skips.append(h)
            if level != len(c.ch_mult) - 1:
                h = next(modules)(skips[-1], temb)
                if c.progressive_input == "residual":
                    pyramid = next(modules)(pyramid)
                    pyramid = (pyramid + h) / math.sqrt(2.0) if c.skip_rescale else pyramid + h
                    h = pyramid
                skips.append(h)
        h = next(modules)(skips[-1], temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)
        for level in reversed(range(len(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, skips.pop()], dim=1), temb)
            if h.shape[-1] in c.attn_resolutions:
                h = next(modules)(h)
            if level != 0:
                h = next(modules)(h, temb)
        h = F.silu(next(modules)(h))
        h = next(modules)(h)
        if c.scale_by_sigma:
            # Fourier (continuous VE) models take sigma itself; positional ones a discrete level index.
            used_sigmas = time_cond if c.embedding_type == "fourier" else self.sigmas[time_cond.long()]
            h = h / used_sigmas.reshape(-1, 1, 1, 1)
        return h
