"""Image forms (any batch of RGB images as uint8) and sample grids with their captions, as PNGs
people can look at."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lct.files import write_atomic


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images [N,3,H,W] -> uint8 [N,H,W,3] (round to nearest, clamp)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def images_to_uint8(images: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Any batch of RGB images as a uint8 numpy array `[N, H, W, 3]`.

    Accepted: a list/tuple of PIL images (any mode; converted to RGB) or of single images in the
    array forms below; a numpy array or torch tensor `[N,H,W,3]`, `[N,3,H,W]` (or one image
    `[H,W,3]` / `[3,H,W]`, or grey `[N,H,W]`/`[N,1,H,W]`). uint8 values are taken as they are.
    Floating values are in `value_range`; by default [-1, 1] when any value is below -0.01
    (generator outputs; a shapes image in [-1, 1] always has negative values), else [0, 1]. Values
    are clipped to the range and rounded.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        parts = [np.asarray(im.convert("RGB"))[None] if isinstance(im, Image.Image)
                 else images_to_uint8(im if _ndim(im) == 4 else im[None], value_range) for im in images]
        return np.concatenate(parts, 0)
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        images = images.numpy() if images.dtype != torch.bfloat16 else images.float().numpy()
    x = np.asarray(images)
    if x.ndim == 3:
        # One image [H,W,3] / [3,H,W], or a grey batch [N,H,W].
        x = x[None] if (x.shape[-1] in (1, 3) or x.shape[0] in (1, 3)) else x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected images [N,H,W,3] or [N,3,H,W], got shape {x.shape}")
    if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
        return np.clip(x, 0, 255).astype(np.uint8)
    x = x.astype(np.float64)
    if value_range is None:
        value_range = (-1.0, 1.0) if x.size and float(np.nanmin(x)) < -0.01 else (0.0, 1.0)
    lo, hi = value_range
    x = np.nan_to_num((x - lo) / (hi - lo), nan=0.0)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _ndim(x: Any) -> int:
    return len(getattr(x, "shape", ()))


def to_uint8_nchw(images: Any, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """`images_to_uint8` as a uint8 tensor `[N, 3, H, W]` (the form FID Inception takes)."""
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4 \
            and images.shape[1] == 3:
        return images
    return torch.from_numpy(images_to_uint8(images, value_range)).permute(0, 3, 1, 2).contiguous()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (FreeType)
    except (TypeError, ValueError, OSError):
        return None


def caption_grid(images: Sequence[np.ndarray], captions: Sequence[str], cols: int | None = None,
                 cell: int | None = None, title: str | None = None) -> Image.Image:
    """A grid of uint8 HxWx3 images, each with its caption underneath (wrapped)."""
    n = len(images)
    cols = cols or max(1, min(8, int(np.ceil(np.sqrt(n)))))
    rows = int(np.ceil(n / cols))
    h, w = images[0].shape[:2]
    cell = cell or max(128, w)
    scale = cell / w
    font = ImageFont.load_default()
    chars = max(12, int(cell / 6.5))
    wrapped = [textwrap.wrap(c or "", chars)[:4] for c in captions]
    text_h = 12 * max([len(t) for t in wrapped] + [1]) + 6
    title_h = 18 if title else 0
    grid = Image.new("RGB", (cols * (cell + 4) + 4, title_h + rows * (int(h * scale) + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    if title:  # 12 px: the default 10 px face draws a space 2 px wide ("step600")
        draw.text((4, 3), title, fill="black", font=_font(12) or font)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        r, c = divmod(i, cols)
        x0 = 4 + c * (cell + 4)
        y0 = title_h + 4 + r * (int(h * scale) + text_h + 4)
        tile = Image.fromarray(img).resize((cell, int(h * scale)), Image.NEAREST if scale >= 2 else Image.BICUBIC)
        grid.paste(tile, (x0, y0))
        for j, line in enumerate(lines):
            draw.text((x0, y0 + int(h * scale) + 2 + 12 * j), line, fill="black", font=font)
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    """A PNG written atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(Path(path), buf.getvalue())
