"""Image grids as PNG files, with NumPy and the standard library only (no plotting package)."""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (the diffusion models' range) as bytes: round((x + 1) * 127.5), clipped."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """[N, C, H, W] bytes (C = 1 or 3) -> one [rows * (H + pad) + pad, cols * (W + pad) + pad, C] tiling."""
    n, c, h, w = images.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        out[y0:y0 + h, x0:x0 + w] = images[i].transpose(1, 2, 0)
    return out


def write_png(path, pixels: np.ndarray) -> None:
    """8-bit grayscale ([H, W] or [H, W, 1]) or RGB ([H, W, 3]) pixels as a PNG file."""
    px = np.asarray(pixels, np.uint8)
    if px.ndim == 2:
        px = px[:, :, None]
    if px.ndim != 3 or px.shape[2] not in (1, 3):
        raise ValueError(f"pixels must be [H, W], [H, W, 1] or [H, W, 3], got shape {px.shape}")
    h, w, c = px.shape
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(h))  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                + chunk(b"IEND", b""))
