"""Sample grids (PNG) and the training animation (GIF), with PIL and numpy only."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def grid_image(
    pixels: torch.Tensor | np.ndarray, columns: int | None = None, scale: int = 1, pad: int = 0
) -> Image.Image:
    """uint8 images (N, 3, H, W) -> one RGB image of `columns` tiles per row, upscaled `scale` times."""
    arr = np.asarray(pixels)
    n, _, h, w = arr.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * (h + pad) - pad, columns * (w + pad) - pad, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = arr[i].transpose(1, 2, 0)
    image = Image.fromarray(canvas, "RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def gif_bytes(frames: list[Image.Image], frame_ms: int = 400, last_frame_ms: int = 2000) -> bytes:
    """An endlessly looping GIF that lingers on the last frame."""
    buf = io.BytesIO()
    durations = [frame_ms] * (len(frames) - 1) + [last_frame_ms]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return buf.getvalue()
