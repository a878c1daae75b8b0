"""Offline stand-in for the SVHN cropped-digits data set.

The training machines cannot download SVHN, so this module renders
street-view-like house-number crops and writes them in SVHN's "format 2"
layout (``train_32x32.mat``: ``X`` uint8 ``(32, 32, 3, N)``, ``y`` uint8
``(N, 1)`` with label 10 meaning digit 0).  Demo runs and tests then load the
data through exactly the same code path as real SVHN.

Each image shows one dominant, centred digit (the label) whose font, size,
stroke weight, rotation, shear and position vary, on a plain or gradient
coloured background, with parts of neighbouring digits cut off at the left
and right edges, blur, noise and occasionally low contrast - the nuisances
that make SVHN harder than MNIST.  Glyphs are drawn at twice the output
resolution and box-downsampled so their edges are antialiased like a resized
photo crop.

Output is deterministic for a given ``(n, seed)`` on a given machine; the set
of usable system fonts can differ between machines, in which case Pillow's
built-in scalable font is always among the choices.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.io
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

OUT_SIZE = 32
# Glyphs are rendered at 2x so the box downsample antialiases their edges.
_SCALE = 2
_CANVAS = OUT_SIZE * _SCALE
# Furthest inside the canvas edge a neighbouring digit's ink centre may sit.
_NEIGHBOUR_INSET = 0.03 * _CANVAS

# Digit frequencies of SVHN's train split (index = digit), so class balance
# matches what a model trained on real SVHN would see.
_SVHN_DIGIT_COUNTS = np.array([4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659], dtype=np.float64)
_DIGIT_PROBS = _SVHN_DIGIT_COUNTS / _SVHN_DIGIT_COUNTS.sum()

_FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
)
# Hairline and symbol/CJK faces either make illegible digits or lack them.
_FONT_SKIP_WORDS = (
    "light",
    "thin",
    "hairline",
    "math",
    "symbol",
    "emoji",
    "dingbat",
    "wingding",
    "icon",
    "awesome",
    "cjk",
    "braille",
)
# Bounds start-up cost on machines with huge font collections.
_MAX_SYSTEM_FONTS = 24

_CHUNK = 2048
# Large renders log a progress line about every this many images.
_PROGRESS_EVERY = 10_000

# A font source is a TrueType path, or None for Pillow's built-in font.
FontSource = str | None


class _Layout(NamedTuple):
    """Geometry of one crop, in canvas (2x) pixels."""

    digit: int
    font: FontSource
    size: int
    stroke: int
    left: int | None  # neighbouring digit cut off at the left edge, if any
    right: int | None
    gap: float
    angle_deg: float
    shear: float
    dx: float
    dy: float


# ---------------------------------------------------------------- fonts


@functools.lru_cache(maxsize=512)
def _font(source: FontSource, size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size) if source is None else ImageFont.truetype(source, size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType; scalable fonts are required")
    return font


def _has_distinct_digits(source: str) -> bool:
    """Reject fonts that fail to load or render digits as blanks/tofu boxes."""
    try:
        font = _font(source, 40)
        masks = [font.getmask(d) for d in "018"]
    except OSError:
        return False
    if any(m.getbbox() is None for m in masks):
        return False
    return len({bytes(m) for m in masks}) == len(masks)


def _system_fonts() -> list[str]:
    candidates: set[str] = set()
    for directory in _FONT_DIRS:
        root = Path(directory).expanduser()
        if root.is_dir():
            candidates.update(str(p) for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
    usable = [p for p in sorted(candidates) if not any(w in Path(p).stem.lower() for w in _FONT_SKIP_WORDS)]
    return [p for p in usable if _has_distinct_digits(p)][:_MAX_SYSTEM_FONTS]


@functools.lru_cache(maxsize=1)
def _font_sources() -> tuple[FontSource, ...]:
    sources: tuple[FontSource, ...] = (None, *_system_fonts())
    logger.debug("synthetic SVHN uses %d fonts", len(sources))
    return sources


@functools.lru_cache(maxsize=64)
def _digit_height_ratio(source: FontSource) -> float:
    """Digit ink height per point of font size, to pick sizes by ink height."""
    _, top, _, bottom = _font(source, 100).getbbox("8")
    return (bottom - top) / 100.0


# ---------------------------------------------------------------- layout


def _draw_layouts(digits: np.ndarray, rng: np.random.Generator) -> list[_Layout]:
    n = len(digits)
    sources = _font_sources()
    font_idx = rng.integers(len(sources), size=n)
    # SVHN crops are square boxes around the digit, so its ink spans most of
    # the height; smaller digits appear where the box was padded.
    ink_height = rng.uniform(0.5, 0.82, size=n) * _CANVAS
    stroke_frac = rng.choice([0.0, 0.0, 0.03, 0.06], size=n)
    has_left = rng.random(n) < 0.7
    has_right = rng.random(n) < 0.7
    neighbours = rng.integers(10, size=(n, 2))
    gap = rng.uniform(0.02, 0.12, size=n) * _CANVAS
    angle = np.clip(rng.normal(0.0, 4.0, size=n), -10.0, 10.0)
    shear = rng.uniform(-0.2, 0.2, size=n)
    dx = rng.uniform(-0.07, 0.07, size=n) * _CANVAS
    dy = rng.uniform(-0.05, 0.05, size=n) * _CANVAS
    layouts = []
    for i in range(n):
        source = sources[font_idx[i]]
        # Even sizes only, so the font cache stays small.
        size = max(8, 2 * round(ink_height[i] / _digit_height_ratio(source) / 2))
        layouts.append(
            _Layout(
                digit=int(digits[i]),
                font=source,
                size=size,
                stroke=round(stroke_frac[i] * size),
                left=int(neighbours[i, 0]) if has_left[i] else None,
                right=int(neighbours[i, 1]) if has_right[i] else None,
                gap=float(gap[i]),
                angle_deg=float(angle[i]),
                shear=float(shear[i]),
                dx=float(dx[i]),
                dy=float(dy[i]),
            )
        )
    return layouts


def _inverse_affine(layout: _Layout) -> tuple[float, ...]:
    """PIL's AFFINE maps output pixels back to input pixels, so build the
    inverse of rotate-and-shear about the centre, followed by the jitter."""
    theta = np.deg2rad(layout.angle_deg)
    rotate = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    shear = np.array([[1.0, layout.shear], [0.0, 1.0]])
    inverse = np.linalg.inv(rotate @ shear)
    centre = np.array([_CANVAS / 2, _CANVAS / 2])
    offset = centre - inverse @ (centre + np.array([layout.dx, layout.dy]))
    return (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])


def _glyph_mask(layout: _Layout) -> np.ndarray:
    """Ink coverage (uint8, canvas size) of the centred digit and neighbours."""
    font = _font(layout.font, layout.size)
    image = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(image)

    def ink(x: float, y: float, text: str) -> None:
        draw.text((x, y), text, font=font, fill=255, stroke_width=layout.stroke, stroke_fill=255)

    # Centre the digit's ink box (not its advance box) on the canvas.
    left, top, right, bottom = font.getbbox(str(layout.digit), stroke_width=layout.stroke)
    x = (_CANVAS - (left + right)) / 2
    y = (_CANVAS - (top + bottom)) / 2
    ink(x, y, str(layout.digit))

    # Neighbours share the baseline and sit one gap away from the centre ink,
    # but are pushed out until at most about half of them shows, so the label
    # digit stays the dominant one (around a narrow "1" the gap widens).
    if layout.left is not None:
        n_left, _, n_right, _ = font.getbbox(str(layout.left), stroke_width=layout.stroke)
        x_left = min(x + left - layout.gap - n_right, _NEIGHBOUR_INSET - (n_left + n_right) / 2)
        ink(x_left, y, str(layout.left))
    if layout.right is not None:
        n_left, _, n_right, _ = font.getbbox(str(layout.right), stroke_width=layout.stroke)
        x_right = max(x + right + layout.gap - n_left, _CANVAS - _NEIGHBOUR_INSET - (n_left + n_right) / 2)
        ink(x_right, y, str(layout.right))

    image = image.transform(
        (_CANVAS, _CANVAS), Image.Transform.AFFINE, _inverse_affine(layout), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(image)


# ---------------------------------------------------------------- colour


def _random_colours(lum: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB colours (n, 3) in [0, 1] with the given mean brightness and random hue."""
    direction = rng.random((len(lum), 3))
    direction -= direction.mean(axis=1, keepdims=True)
    # Squared so most colours are muted (paint, brick, metal) and few are vivid.
    saturation = 1.2 * rng.random((len(lum), 1)) ** 2
    return np.clip(lum[:, None] + saturation * direction, 0.0, 1.0)


def _fg_bg_colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Digit and background colours with a guaranteed brightness gap, so the
    digit stays readable whatever the polarity or hue."""
    low_contrast = rng.random(n) < 0.12
    gap = np.where(low_contrast, rng.uniform(0.14, 0.26, size=n), rng.uniform(0.3, 0.8, size=n))
    dark = rng.uniform(0.03, 0.97 - gap)
    light = dark + gap
    dark_on_light = rng.random(n) < 0.6
    fg = _random_colours(np.where(dark_on_light, dark, light), rng)
    bg = _random_colours(np.where(dark_on_light, light, dark), rng)
    return fg, bg


def _backgrounds(bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 32, 32, 3) backgrounds: plain, or a linear gradient (uneven light,
    plates of two tones) in a random direction."""
    n = len(bg)
    is_gradient = rng.random(n) < 0.5
    delta = rng.normal(0.0, 0.12, size=(n, 3)) * is_gradient[:, None]
    angle = rng.uniform(0.0, 2 * np.pi, size=n)
    coords = (np.arange(OUT_SIZE) - (OUT_SIZE - 1) / 2) / OUT_SIZE
    t = np.cos(angle)[:, None, None] * coords[None, None, :] + np.sin(angle)[:, None, None] * coords[None, :, None]
    return bg[:, None, None, :] + t[..., None] * delta[:, None, None, :]


# ---------------------------------------------------------------- post-processing


def _downsample(masks: np.ndarray) -> np.ndarray:
    """Box-average canvas masks to output size: float coverage in [0, 1]."""
    n = len(masks)
    blocks = masks.reshape(n, OUT_SIZE, _SCALE, OUT_SIZE, _SCALE).astype(np.float32)
    return blocks.mean(axis=(2, 4)) / 255.0


def _blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur with a per-image sigma (<= ~1.3 px), done as a
    weighted sum of shifted copies so the whole batch blurs at once."""
    radius = 3
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * images.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(images, pad, mode="edge")
        out = np.zeros_like(images)
        for k in range(len(offsets)):
            window = np.take(padded, np.arange(k, k + OUT_SIZE), axis=axis)
            out += weights[:, k, None, None, None] * window
        images = out
    return images


def _render_chunk(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 32, 32, 3) uint8 crops of the given digits."""
    n = len(digits)
    coverage = _downsample(np.stack([_glyph_mask(lay) for lay in _draw_layouts(digits, rng)]))
    fg, bg = _fg_bg_colours(n, rng)
    background = _backgrounds(bg, rng).astype(np.float32)
    alpha = coverage[..., None]
    images = background * (1.0 - alpha) + fg[:, None, None, :].astype(np.float32) * alpha
    images = _blur(images, rng.uniform(0.35, 1.3, size=n))
    noise_std = rng.uniform(0.004, 0.03, size=(n, 1, 1, 1))
    images += rng.standard_normal(images.shape, dtype=np.float32) * noise_std.astype(np.float32)
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def _render(n: int, seed: int, log_progress: bool) -> tuple[np.ndarray, np.ndarray]:
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = np.random.default_rng(seed)
    digits = rng.choice(10, size=n, p=_DIGIT_PROBS)
    images = np.empty((n, OUT_SIZE, OUT_SIZE, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        images[start:stop] = _render_chunk(digits[start:stop], rng)
        if log_progress and (stop // _PROGRESS_EVERY > start // _PROGRESS_EVERY or stop == n):
            logger.info("rendered %d/%d synthetic SVHN digits", stop, n)
    X = np.ascontiguousarray(images.transpose(1, 2, 3, 0))
    y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
    return X, y


# ---------------------------------------------------------------- public API


def render_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (X, y): X uint8 of shape (32, 32, 3, n), y uint8 of shape (n, 1)
    with labels 1..10 where 10 means digit 0 (SVHN's convention)."""
    return _render(n, seed, log_progress=False)


def write_svhn_mat(path: str | os.PathLike, X: np.ndarray, y: np.ndarray) -> None:
    """Write a MATLAB 5 file with variables X and y laid out like SVHN's
    train_32x32.mat.  The write is atomic (temp file in the same directory,
    then os.replace) so a crashed or concurrent writer never leaves a
    truncated file for a reader to trip over."""
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[:3] != (OUT_SIZE, OUT_SIZE, 3):
        raise ValueError(f"X must be uint8 (32, 32, 3, N), got {X.dtype} {X.shape}")
    if y.dtype != np.uint8 or y.shape != (X.shape[3], 1):
        raise ValueError(f"y must be uint8 ({X.shape[3]}, 1), got {y.dtype} {y.shape}")
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            scipy.io.savemat(f, {"X": X, "y": y}, do_compression=True, format="5")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        os.unlink(tmp_name)
        raise


def synth_svhn_mat(path: str | os.PathLike, n: int, seed: int = 0) -> None:
    """Render n synthetic SVHN crops and write them to path as a format-2 .mat."""
    log_progress = n >= _PROGRESS_EVERY
    if log_progress:
        logger.info("rendering %d synthetic SVHN digits (seed %d) to %s", n, seed, path)
    started = time.perf_counter()
    X, y = _render(n, seed, log_progress)
    write_svhn_mat(path, X, y)
    logger.info("wrote %d synthetic SVHN digits to %s in %.1fs", n, path, time.perf_counter() - started)
