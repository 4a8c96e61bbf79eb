"""Vision transformers of the ViT/DeiT family and the bundled 8x8-digits ViT."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIGITS_WEIGHTS = WEIGHTS_DIR / "digits_vit.npz"
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture hyper-parameters of a pre-LN ViT with a class token."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    qkv_bias: bool = True
    ln_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


DEIT_TINY = ViTConfig(embed_dim=192, depth=12, num_heads=3, mlp_dim=768)
DEIT_SMALL = ViTConfig(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536)
DIGITS = ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10,
                   embed_dim=64, depth=4, num_heads=4, mlp_dim=128)


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by a stride-p convolution."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head softmax self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT/DeiT classifier: patch embedding, class token, pre-LN blocks, head on the class token."""

    def __init__(self, cfg: ViTConfig = DEIT_SMALL):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None):
        """Truncated-normal init (std 0.02) as in DeiT; deterministic when seed is given."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() > 1 or name in ("cls_token", "pos_embed"):
                    p.copy_(torch.randn(p.shape, generator=gen).clamp_(-2, 2) * 0.02)
                elif name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()

    def forward(self, x):
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def deit_small(**overrides) -> ViT:
    return ViT(dataclasses.replace(DEIT_SMALL, **overrides))


def digits_split(seed: int = DIGITS_SEED):
    """scikit-learn 8x8 digits as float32 [N,1,8,8] in [0,1]: (x_train, y_train, x_test, y_test).

    Stratified held-out test split of DIGITS_TEST_FRACTION with a fixed seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def save_npz(model: ViT, path: Path, info: dict | None = None) -> None:
    """Store a state dict as float32 .npz with the config (and info) as a JSON string entry."""
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    meta = {"config": dataclasses.asdict(model.cfg), "info": info or {}}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def load_npz(path: Path) -> tuple[ViT, dict]:
    """Inverse of save_npz (no pickle): returns (model in eval mode, info)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    model = ViT(ViTConfig(**meta["config"]))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    return model.eval(), meta["info"]


def digits_vit() -> ViT:
    """The bundled trained digits ViT (eval mode)."""
    return load_npz(DIGITS_WEIGHTS)[0]
