"""The ADM U-Net of guided-diffusion (Dhariwal & Nichol, NeurIPS 2021), written from the paper and checked against
openai/guided-diffusion ``guided_diffusion/unet.py`` (read, not copied): same module tree and parameter names
(``input_blocks``, ``middle_block``, ``output_blocks``, ``out``, ``time_embed``), so the released state_dicts load one
to one. Inference in float32 (fp16 checkpoints are cast on loading).

The network takes [-1, 1] images and an (integer or fractional) DDPM timestep and returns epsilon and, when
``learn_sigma``, the interpolation weights of the learned variance as channels 3..5.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

Tensor = torch.Tensor

# guided-diffusion's README flags per released diffusion checkpoint (model_channels is its --num_channels). The 64x64
# and 128x128 networks are class-conditional (1000 ImageNet classes), so they are recognised but not usable as priors.
PRESETS = {
    "256x256_uncond": dict(image_size=256, model_channels=256, num_res_blocks=2, learn_sigma=True,
                           attention_resolutions=(32, 16, 8), num_head_channels=64, resblock_updown=True,
                           use_scale_shift_norm=True),
    "128x128_cond": dict(image_size=128, model_channels=256, num_res_blocks=2, learn_sigma=True, num_classes=1000,
                         attention_resolutions=(32, 16, 8), num_heads=4, resblock_updown=True,
                         use_scale_shift_norm=True),
    "64x64_cond": dict(image_size=64, model_channels=192, num_res_blocks=3, learn_sigma=True, num_classes=1000,
                       attention_resolutions=(32, 16, 8), num_head_channels=64, resblock_updown=True,
                       use_new_attention_order=True, use_scale_shift_norm=True, dropout=0.1),
}
# Channel multipliers guided-diffusion picks from the image size when none is given.
DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


class GroupNorm32(nn.GroupNorm):
    """32-group normalisation computed in float32 whatever the input dtype (as the reference does for fp16)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period^(-i / (dim/2))``; timesteps may be fractional."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class EmbedSequential(nn.Sequential):
    """A sequence of layers; the residual blocks among them also receive the timestep embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then an optional 3x3 convolution (``conv``)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution, or by average pooling (``op`` either way)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (as a bias, or as a scale and shift of the second
    normalisation with ``use_scale_shift_norm``), optionally resampling (``up``/``down``) both branches."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out_channels = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            # Resample between the activation and the convolution of the input branch.
            h = self.in_layers[2](self.h_upd(self.in_layers[1](self.in_layers[0](x))))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions, with a residual. ``legacy_order``: each head's channels
    hold its (q, k, v) consecutively (guided-diffusion's default); otherwise q, k, v are split first."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, legacy_order: bool = True):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.legacy_order = legacy_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length, ch = qkv.shape[-1], c // self.num_heads
        if self.legacy_order:
            q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, v = (t.reshape(b * self.num_heads, ch, length) for t in qkv.chunk(3, dim=1))
        scale = ch ** -0.25  # on q and k each: 1/sqrt(ch) overall
        weights = torch.einsum("bct,bcs->bts", q * scale, k * scale).float().softmax(dim=-1).to(q.dtype)
        h = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (unconditional, 2-D), with ``create_model``'s arguments:

    :param image_size: side of the square images (picks the default ``channel_mult``).
    :param model_channels: base width (guided-diffusion's ``--num_channels``).
    :param num_res_blocks: residual blocks per resolution.
    :param attention_resolutions: image sides at which blocks get self-attention (``--attention_resolutions``).
    :param learn_sigma: 6 output channels (epsilon, then the learned variance) instead of 3.
    :param num_classes: class-conditional with this many labels (``--class_cond``: 1000); ``None``: unconditional.
    :param use_new_attention_order: split q, k, v before the heads (``--use_new_attention_order``).
    """

    def __init__(self, image_size: int, model_channels: int, num_res_blocks: int, attention_resolutions=(16,),
                 learn_sigma: bool = False, num_classes: int | None = None, in_channels: int = 3,
                 dropout: float = 0.0, channel_mult=None, conv_resample: bool = True, num_heads: int = 1,
                 num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        if channel_mult is None:
            if image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(f"no default channel_mult for image_size {image_size}; pass channel_mult.")
            channel_mult = DEFAULT_CHANNEL_MULT[image_size]
        self.in_channels, self.model_channels, self.num_classes = in_channels, model_channels, num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        attention_ds = {image_size // res for res in attention_resolutions}  # downsampling factors with attention
        emb_dim = model_channels * 4

        def res_block(cin, cout, **kw):
            return ResBlock(cin, emb_dim, dropout, cout, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attention(ch, heads):
            return AttentionBlock(ch, heads, num_head_channels, legacy_order=not use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)
        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        block_channels, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                block_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(EmbedSequential(down))
                block_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch))

        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + block_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, self.out_channels, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Output (N, 3 or 6, H, W) for [-1, 1] images ``x``, DDPM ``timesteps`` (N,) and, when class-conditional,
        integer ``class_labels`` (N,)."""
        if (class_labels is None) != (self.num_classes is None):
            raise ValueError("pass class_labels exactly when the network is class-conditional "
                             f"(num_classes={self.num_classes}).")
        emb = self.time_embed(timestep_embedding(timesteps.reshape(-1).expand(x.shape[0]), self.model_channels))
        if class_labels is not None:
            emb = emb + self.label_emb(class_labels)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
