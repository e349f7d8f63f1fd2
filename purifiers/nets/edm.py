"""The networks and preconditioners of EDM (Karras et al., NeurIPS 2022), written from the paper and checked against
NVlabs/edm ``training/networks.py`` (read, not copied): same module tree and parameter names, so the released
checkpoints' tensors load one to one.

* :class:`SongUNet`: DDPM++ (``embedding_type="positional"``, ``encoder_type="standard"``) and NCSN++
  (``"fourier"``, ``"residual"``, ``resample_filter=[1, 3, 3, 1]``) of Song et al. (2021).
* :class:`DhariwalUNet`: ADM of Dhariwal & Nichol (2021) as EDM re-implements it.
* :class:`EDMPrecond`, :class:`VPPrecond`, :class:`VEPrecond`: ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``
  (EDM Table 1) on [-1, 1] data, sigma on that scale; the coefficients come from :mod:`purifiers.conventions`.

Inference only: the constructors accept the training-time arguments a checkpoint records (``dropout``,
``label_dropout``, ``use_fp16``, init settings) so that a recorded configuration builds the same tree, but the forward
pass always runs in float32, and the augmentation-label input ``map_augment`` is left out (EDM feeds it zeros outside
training, and the layer has no bias, so its contribution is exactly zero).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from purifiers import conventions

Tensor = torch.Tensor


def _uniform(shape, fan_in: int) -> Tensor:
    """Random init in +-1/sqrt(fan_in): only for building a network before its checkpoint's tensors overwrite it."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return torch.empty(shape).uniform_(-bound, bound)


class Linear(nn.Module):
    """``x W^T + b`` with EDM's parameter names (``weight`` (out, in), optional ``bias``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(_uniform((out_features, in_features), in_features))
        self.bias = nn.Parameter(_uniform((out_features,), in_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """A square convolution (``kernel=0``: none) with optional 2x up- or downsampling by a separable FIR filter
    (``resample_filter``, normalised to unit gain; stored as a buffer only when resampling, as EDM does).

    ``fused_resample`` applies the filter and the convolution in one padded pass (EDM's NCSN++ residual encoder
    branch); the result differs from the unfused order only at the borders, so it is kept to match the checkpoints.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1), fused_resample: bool = False):
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both.")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fan_in = in_channels * kernel * kernel
        self.weight = nn.Parameter(_uniform((out_channels, in_channels, kernel, kernel), fan_in)) if kernel else None
        self.bias = nn.Parameter(_uniform((out_channels,), fan_in)) if kernel and bias else None
        # The outer product in plain Python: a few numbers, and no tensor arithmetic when built on the meta device.
        taps = [float(tap) for tap in resample_filter]
        filter_2d = [[[[a * b / sum(taps) ** 2 for b in taps] for a in taps]]]
        self.register_buffer("resample_filter", torch.tensor(filter_2d) if up or down else None)

    def _upsample(self, x: Tensor, channels: int, padding: int) -> Tensor:
        # Zero-insertion upsampling followed by the filter, as one transposed convolution; x4 keeps the mean.
        f = (self.resample_filter * 4).expand(channels, 1, -1, -1)
        return F.conv_transpose2d(x, f, groups=channels, stride=2, padding=padding)

    def _downsample(self, x: Tensor, channels: int, padding: int) -> Tensor:
        f = self.resample_filter.expand(channels, 1, -1, -1)
        return F.conv2d(x, f, groups=channels, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        w_pad = self.weight.shape[-1] // 2 if self.weight is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0
        if self.fused_resample and self.up and self.weight is not None:
            x = self._upsample(x, self.in_channels, max(f_pad - w_pad, 0))
            x = F.conv2d(x, self.weight, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and self.weight is not None:
            x = F.conv2d(x, self.weight, padding=w_pad + f_pad)
            x = self._downsample(x, self.out_channels, 0)
        else:
            if self.up:
                x = self._upsample(x, self.in_channels, f_pad)
            if self.down:
                x = self._downsample(x, self.in_channels, f_pad)
            if self.weight is not None:
                x = F.conv2d(x, self.weight, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most 32 groups of at least ``min_channels_per_group`` channels."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class UNetBlock(nn.Module):
    """Residual block with optional up/downsampling and self-attention, the union of DDPM++, NCSN++ and ADM blocks.

    ``adaptive_scale``: the embedding gives a scale and a shift of the second normalisation (ADM) instead of a bias
    added before it (DDPM++/NCSN++). The output is multiplied by ``skip_scale`` after the residual and again after
    the attention residual.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5, resample_filter=(1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(shift + self.norm1(h) * (scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(h)
        h = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            n, c = h.shape[:2]
            # Heads split the channels; each head's channels hold (q, k, v) interleaved per channel.
            q, k, v = self.qkv(self.norm2(h)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
            attended = torch.einsum("nqk,nck->ncq", weights, v)
            h = (self.proj(attended.reshape(h.shape)) + h) * self.skip_scale
        return h


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding ``[cos(x f_i), sin(x f_i)]`` with ``f_i = (1/max_positions)^(i/(n/2 - endpoint))``."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = (1.0 / self.max_positions) ** (torch.arange(half, device=x.device) / (half - int(self.endpoint)))
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi x f_i), sin(2 pi x f_i)]`` with frozen ``freqs`` ~ N(0, scale^2) (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.normal(0.0, float(scale), size=(num_channels // 2,)))

    def forward(self, x: Tensor) -> Tensor:
        angles = torch.outer(x, 2 * math.pi * self.freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ (Song et al. 2021) in EDM's formulation; arguments and defaults as EDM's ``SongUNet``."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult=(1, 2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10, label_dropout: float = 0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1, encoder_type: str = "standard",
                 decoder_type: str = "standard", resample_filter=(1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"SongUNet embedding_type must be 'fourier' or 'positional', got {embedding_type!r}.")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"SongUNet encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}.")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"SongUNet decoder_type must be 'standard' or 'skip', got {decoder_type!r}.")
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                                   resample_filter=resample_filter, fused_resample=True)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # DDPM++/NCSN++ order: sin before cos
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = normed = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                normed = block(x)
            elif "aux_conv" in name:
                out = block(F.silu(normed))
                aux = out if aux is None else out + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021) in EDM's formulation; arguments and defaults as EDM's ``DhariwalUNet``."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions=(32, 16, 8), dropout: float = 0.10, label_dropout: float = 0):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(label_dim, emb_channels, bias=False) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, 3)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(noise_labels))))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        emb = F.silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


NETWORKS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class _Precond(nn.Module):
    """Shared part of the preconditioners: the wrapped network ``model`` (named as in EDM) and its class labels."""

    default_model_type = "SongUNet"

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 model_type: str | None = None, **model_kwargs):
        super().__init__()
        model_type = model_type or self.default_model_type
        if model_type not in NETWORKS:
            raise ValueError(f"unknown EDM model_type {model_type!r}; known: {sorted(NETWORKS)}.")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.model_type = model_type
        self.model = NETWORKS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                          out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma: Tensor):
        """``(c_skip, c_out, c_in, c_noise)`` at [-1, 1]-scale ``sigma`` (EDM Table 1)."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``D(x, sigma)`` for [-1, 1] images ``x`` (N, C, H, W) and [-1, 1]-scale noise levels ``sigma`` (N,)."""
        if self.label_dim and class_labels is None:
            raise ValueError(f"this EDM network is class-conditional ({self.label_dim} labels): pass class_labels.")
        sigma = sigma.to(x.dtype).reshape(-1)
        c_skip, c_out, c_in, c_noise = (torch.as_tensor(c, dtype=x.dtype, device=x.device).expand(sigma.shape)
                                        for c in self.coefficients(sigma))
        per_image = (-1, 1, 1, 1)
        f = self.model(c_in.reshape(per_image) * x, c_noise, class_labels)
        return c_skip.reshape(per_image) * x + c_out.reshape(per_image) * f


class EDMPrecond(_Precond):
    """EDM's own preconditioning ("Ours" in Table 1), the one of the released ``edm-*.pkl`` networks."""

    default_model_type = "DhariwalUNet"

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str | None = None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, float(sigma_data)

    def coefficients(self, sigma: Tensor):
        return conventions.edm_preconditioning(sigma, self.sigma_data)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Table 1, "VP"): ``c_noise = (M - 1) t(sigma)``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str | None = None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), epsilon_t

    def coefficients(self, sigma: Tensor):
        return conventions.vp_preconditioning(sigma, self.beta_min, self.beta_d, self.M)


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Table 1, "VE"): ``c_noise = ln(sigma / 2)``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str | None = None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma: Tensor):
        return conventions.ve_preconditioning(sigma)


PRECONDITIONERS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond}
