"""Diffusion UNet with the block types of the DDPM/DDIM CIFAR-10 model (PyTorch).

Concatenation protocol: a Conv2d/Linear whose input is ``cat([h, skip], dim=1)`` carries the attribute
``qsplit = h.shape[1]``; quantizers read it to quantize the two halves separately (split shortcut).
Attention matmuls run inside an :class:`AttnCore` module so a quantizer can replace them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters (same names as the DDPM/DDIM code)."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    dropout: float = 0.1
    in_channels: int = 3
    resolution: int = 32
    num_groups: int = 32
    resamp_with_conv: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        d["ch_mult"] = tuple(d["ch_mult"])
        d["attn_resolutions"] = tuple(d["attn_resolutions"])
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` [B] -> [B, dim] (DDPM layout: sin then cos)."""
    half = dim // 2
    freq = torch.from_numpy(np.exp(np.arange(half) * (-math.log(10000.0) / (half - 1))).astype(np.float32))
    arg = t.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a timestep projection; ``skip_ch`` > 0 marks a concatenated input."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int, skip_ch: int = 0):
        super().__init__()
        total = in_ch + skip_ch
        self.norm1 = nn.GroupNorm(groups, total, eps=1e-6)
        self.conv1 = nn.Conv2d(total, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(total, out_ch, 1) if total != out_ch else None
        if skip_ch:
            self.conv1.qsplit = in_ch
            self.nin_shortcut.qsplit = in_ch

    def forward(self, x: torch.Tensor, temb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnCore(nn.Module):
    """softmax(q^T k / sqrt(C)) applied to v, for q, k, v of shape [B, C, N]; returns [B, C, N]."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * (q.shape[1] ** -0.5), dim=2)
        return torch.bmm(v, w.transpose(1, 2))


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions with 1x1-conv q/k/v/proj and a residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.core = AttnCore()
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.q, self.k, self.v))
        return x + self.proj_out(self.core(q, k, v).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with (0, 1, 0, 1) padding, or 2x2 average pooling."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by an optional 3x3 conv."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class UNet(nn.Module):
    """eps-prediction UNet: ``forward(x [B,C,H,W], t [B]) -> eps``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, g = cfg.ch, cfg.num_groups
        self.temb_ch = 4 * ch
        self.temb_dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        res, block_in, skips = cfg.resolution, ch, [ch]
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResBlock(block_in, ch * mult, self.temb_ch, cfg.dropout, g))
                block_in = ch * mult
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, g))
                skips.append(block_in)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in, cfg.resamp_with_conv)
                res //= 2
                skips.append(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(block_in, block_in, self.temb_ch, cfg.dropout, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResBlock(block_in, block_in, self.temb_ch, cfg.dropout, g)
        ups = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                out = ch * cfg.ch_mult[i]
                level.block.append(ResBlock(block_in, out, self.temb_ch, cfg.dropout, g, skip_ch=skips.pop()))
                block_in = out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, g))
            if i != 0:
                level.upsample = Upsample(block_in, cfg.resamp_with_conv)
                res *= 2
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(g, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = timestep_embedding(t, self.cfg.ch)
        temb = self.temb_dense[1](F.silu(self.temb_dense[0](temb)))
        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h, temb, hs.pop())
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def ddpm_cifar10_unet() -> UNet:
    """The DDPM/DDIM CIFAR-10 configuration (35.7M parameters), randomly initialized."""
    return UNet(UNetConfig())


DIGITS_CONFIG = UNetConfig(ch=16, out_ch=1, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
                           dropout=0.1, in_channels=1, resolution=8, num_groups=8)


def state_to_npz(model: nn.Module, path, extra: dict | None = None) -> None:
    """Save a model's float32 state dict (and its config as JSON) to an .npz file."""
    import json
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    meta = {"config": model.cfg.to_dict(), **(extra or {})}
    np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), **arrays)


def load_npz_unet(path) -> UNet:
    """Load a UNet saved by :func:`state_to_npz` (no pickle)."""
    import json
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        state = {k: torch.from_numpy(z[k]) for k in z.files if k != "__meta__"}
    model = UNet(UNetConfig.from_dict(meta["config"]))
    model.load_state_dict(state)
    model.train_meta = meta
    return model.eval()


def load_digits_unet() -> UNet:
    """The bundled digits UNet (8x8, trained by scripts/train_digits_unet.py)."""
    return load_npz_unet(WEIGHTS_DIR / "digits_unet.npz")
