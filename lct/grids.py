"""Sample grids with their captions, as PNGs people can look at."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lct.files import write_atomic


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images [N,3,H,W] -> uint8 [N,H,W,3] (round to nearest, clamp)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


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
    if title:
        draw.text((4, 3), title, fill="black", font=font)
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
