"""The study report's pictures: one PNG per question a person asks of a study.

  metric_vs_<param>.png     `plot_metric_vs_param`: best metric per trial against one searched parameter,
                            with the mean and min-max spread per value (the seed noise to compare against)
  heatmap_<p1>_x_<p2>.png   `plot_heatmap`: mean best metric over the first two parameters' grid
  learning_curves.png       `plot_learning_curves`: metric and losses per epoch, coloured by outcome
  mosaic.png                `write_mosaic`: each trial's last sample grid, framed in its outcome's colour

Each outcome has one colour and marker (`STATUS_COLOURS`, `STATUS_MARKERS`), shared with index.html.
Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot), the mosaic with PIL.
"""

from __future__ import annotations

import io
import logging
import math
import numbers
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.patheffects import withStroke
from matplotlib.ticker import MaxNLocator, NullLocator
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from dcgan_ray.report.style import new_figure
from dcgan_ray.study.outcomes import (
    DIRECTION,
    STATUSES,
    AssessedTrial,
    TrialRecord,
    entry_value,
    fmt,
    fmt_short,
)

log = logging.getLogger(__name__)

STATUS_COLOURS = {
    "converged": "#2e7d32",
    "mode_collapse": "#8e24aa",
    "d_won": "#ef6c00",
    "diverged": "#c62828",
    "error": "#455a64",
    "no_data": "#9e9e9e",
}
STATUS_MARKERS = {"converged": "o", "mode_collapse": "^", "d_won": "s", "diverged": "X", "error": "D", "no_data": "v"}
TILE_PX = 256  # the sample grids are 8x8 tiles of 32 px
LABELLED_CURVES_MAX = 12  # beyond this many trials, ids at the line ends overlap into a smear


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_numeric(levels: list[Any]) -> bool:
    return all(_is_number(v) for v in levels)


def _levels(values: list[Any]) -> list[Any]:
    """Distinct values in axis order: numeric order when all are numbers, else by their text (categories)."""
    if _is_numeric(values):
        return sorted(set(values))
    return sorted({str(v) for v in values})


def _level_index(value: Any, levels: list[Any]) -> int:
    return levels.index(value if _is_numeric(levels) else str(value))


def _position(value: Any, levels: list[Any]) -> float:
    """Where a value sits on a plot axis: itself on a numeric axis, its category's index otherwise."""
    return float(value) if _is_numeric(levels) else float(_level_index(value, levels))


def _label_axis(axis: Any, levels: list[Any]) -> None:
    """Ticks at the searched values: a grid search has few, and in-between ticks read as tested values."""
    if _is_numeric(levels) and len(levels) > 8:
        return
    positions = [_position(v, levels) for v in levels]
    axis.set_ticks(positions, labels=[fmt(v) for v in levels])
    axis.set_minor_locator(NullLocator())


def plot_metric_vs_param(trials: list[AssessedTrial], param: str, n_params: int, metric: str, path: Path) -> None:
    """Best metric per trial against `param`: converged trials coloured by seed, failures by outcome, and the
    mean with its min-max bar per value (over seeds, and over the other params when `n_params` > 1)."""
    points = [(t, t.record.params[param]) for t in trials if param in t.record.params]
    levels = _levels([v for _, v in points])
    numeric = _is_numeric(levels)
    fig = new_figure(9.5, 4.8)
    ax = fig.add_subplot()
    if numeric and min(levels) > 0 and max(levels) / min(levels) >= 100:
        ax.set_xscale("log")
    # Converged trials are coloured by seed (the spread to compare against), failures by their outcome.
    seeds = sorted({t.record.seed for t, _ in points if t.status == "converged" and t.best is not None})
    seed_colour = {s: matplotlib.colormaps["tab10"](i % 10) for i, s in enumerate(seeds)}
    groups: dict[float, list[float]] = {}
    for t, value in points:
        x = _position(value, levels)
        if t.best is None:
            # No metric to place: mark the trial on the bottom edge so its failure still shows at this value.
            ax.scatter(
                [x],
                [0.02],
                transform=ax.get_xaxis_transform(),
                marker=STATUS_MARKERS[t.status],
                color=STATUS_COLOURS[t.status],
                s=70,
                clip_on=False,
                zorder=3,
            )
            continue
        groups.setdefault(x, []).append(t.best)
        if t.status == "converged":
            ax.scatter([x], [t.best], color=seed_colour[t.record.seed], marker="o", s=40, zorder=3)
        else:
            ax.scatter([x], [t.best], color=STATUS_COLOURS[t.status], marker=STATUS_MARKERS[t.status], s=70, zorder=3)
    spread = "seeds and other params" if n_params > 1 else "seeds"
    handles = [Line2D([], [], color=seed_colour[s], marker="o", linestyle="", label=f"seed {s}") for s in seeds]
    if groups:
        xs = sorted(groups)
        means = np.array([np.mean(groups[x]) for x in xs])
        lows = means - np.array([min(groups[x]) for x in xs])
        highs = np.array([max(groups[x]) for x in xs]) - means
        ax.errorbar(
            xs,
            means,
            yerr=[lows, highs],
            fmt="-" if numeric else "none",
            marker="_",
            markersize=18,
            color="black",
            capsize=5,
            linewidth=1.2,
            zorder=2,
        )
        handles.append(
            Line2D([], [], color="black", marker="_", markersize=12, label=f"mean, bar: min-max over {spread}")
        )
    else:
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.text(0.5, 0.5, f"no trial reported a finite {metric}", transform=ax.transAxes, ha="center", color="dimgrey")
    unplaced = {t.status for t, _ in points if t.best is None}
    outcomes = sorted({t.status for t, _ in points if t.status != "converged"} | unplaced, key=STATUSES.index)
    handles += [
        Line2D(
            [],
            [],
            color=STATUS_COLOURS[s],
            marker=STATUS_MARKERS[s],
            linestyle="",
            markersize=8,
            label=f"{s} (bottom edge: no {metric})" if s in unplaced else s,
        )
        for s in outcomes
    ]
    if not numeric:
        ax.set_xlim(-0.5, len(levels) - 0.5)
    _label_axis(ax.xaxis, levels)
    ax.set_xlabel(param)
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"best {metric} per trial vs {param} ({DIRECTION})")
    ax.grid(alpha=0.3)
    # Outside the axes: inside, it would cover the points whichever corner it picks.
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=100)


def _cell_text(members: list[AssessedTrial], mean: float) -> str:
    """Mean, then how many trials converged, then what became of the others."""
    if not members:
        return "no trial"
    counts = Counter(t.status for t in members)
    lines = [fmt_short(mean) if np.isfinite(mean) else "no metric", f"{counts['converged']}/{len(members)} converged"]
    failures = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s != "converged" and counts[s])
    return "\n".join(lines + [failures] if failures else lines)


def plot_heatmap(trials: list[AssessedTrial], p1: str, p2: str, metric: str, path: Path) -> None:
    """Mean best metric per (p1, p2) cell, each cell saying how many of its trials converged; cells where
    none did are hatched."""
    both = [t for t in trials if p1 in t.record.params and p2 in t.record.params]
    rows = _levels([t.record.params[p1] for t in both])
    cols = _levels([t.record.params[p2] for t in both])
    cells: dict[tuple[int, int], list[AssessedTrial]] = {}
    for t in both:
        cell = (_level_index(t.record.params[p1], rows), _level_index(t.record.params[p2], cols))
        cells.setdefault(cell, []).append(t)
    grid = np.full((len(rows), len(cols)), np.nan)
    for (i, j), members in cells.items():
        values = [t.best for t in members if t.best is not None]
        if values:
            grid[i, j] = np.mean(values)
    fig = new_figure(1.6 * len(cols) + 3.2, 1.0 * len(rows) + 2.4)
    ax = fig.add_subplot()
    # Reversed, so the better (lower) cells take the bright end.
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="#eeeeee")
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=cmap,
        origin="lower",
        aspect="auto",
        vmin=finite.min() if finite.size else 0,
        vmax=finite.max() if finite.size else 1,
    )
    if finite.size:
        fig.colorbar(image, ax=ax, label=f"mean best {metric} ({DIRECTION})")
    outline = [withStroke(linewidth=2.5, foreground="white")]
    for i in range(len(rows)):
        for j in range(len(cols)):
            members = cells.get((i, j), [])
            ax.text(j, i, _cell_text(members, grid[i, j]), ha="center", va="center", fontsize=9, path_effects=outline)
            if members and not any(t.status == "converged" for t in members):
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5),
                        1,
                        1,
                        facecolor=(0.6, 0.6, 0.6, 0.55),
                        hatch="//",
                        edgecolor="dimgrey",
                        linewidth=0,
                    )
                )
    ax.set_xticks(range(len(cols)), labels=[fmt(v) for v in cols])
    ax.set_yticks(range(len(rows)), labels=[fmt(v) for v in rows])
    ax.set_xlabel(p2)
    ax.set_ylabel(p1)
    ax.set_title(f"mean best {metric} over seeds ({DIRECTION})\nhatched grey: no converged trial", fontsize=10)
    fig.savefig(path, dpi=100)


def _series(history: list[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """Epochs and values where `key` was reported; non-finite values become NaN so the line breaks there."""
    points = [(int(entry["epoch"]), value) for entry in history if (value := entry_value(entry, key)) is not None]
    return [e for e, _ in points], [v if math.isfinite(v) else math.nan for _, v in points]


def plot_learning_curves(trials: list[AssessedTrial], metric: str, path: Path) -> None:
    """The metric (left) and both losses (right) per epoch of every trial, coloured by outcome."""
    fig = new_figure(13, 4.8)
    ax_metric, ax_loss = fig.subplots(1, 2)
    any_metric = False
    positive_losses = True
    for t in trials:
        colour = STATUS_COLOURS[t.status]
        epochs, values = _series(t.record.history, metric)
        if epochs:
            any_metric = True
            ax_metric.plot(epochs, values, color=colour, marker="o", markersize=3, alpha=0.85)
            last = max((k for k, v in enumerate(values) if math.isfinite(v)), default=None)
            if last is not None and len(trials) <= LABELLED_CURVES_MAX:
                ax_metric.annotate(
                    t.record.trial_id,
                    (epochs[last], values[last]),
                    xytext=(4, 0),
                    textcoords="offset points",
                    fontsize=7,
                    color=colour,
                    va="center",
                )
        for key, style in (("loss_d", "-"), ("loss_g", "--")):
            epochs, values = _series(t.record.history, key)
            positive_losses &= all(v > 0 for v in values if math.isfinite(v))
            ax_loss.plot(epochs, values, color=colour, linestyle=style, alpha=0.85)
    if not any_metric:
        ax_metric.text(
            0.5, 0.5, f"no trial reported {metric}", transform=ax_metric.transAxes, ha="center", color="dimgrey"
        )
    if positive_losses:
        # A trial on its way to diverging reaches losses far above the rest; a log axis keeps both readable.
        ax_loss.set_yscale("log")
    present = sorted({t.status for t in trials}, key=STATUSES.index)
    status_handles = [Patch(color=STATUS_COLOURS[s], label=s) for s in present]
    ax_metric.legend(handles=status_handles, fontsize=8)
    ax_loss.legend(
        handles=status_handles
        + [
            Line2D([], [], color="black", linestyle="-", label="loss_d"),
            Line2D([], [], color="black", linestyle="--", label="loss_g"),
        ],
        fontsize=8,
    )
    ax_metric.set_title(f"{metric} per epoch ({DIRECTION})")
    ax_metric.set_ylabel(metric)
    ax_loss.set_title("discriminator and generator loss per epoch")
    ax_loss.set_ylabel("loss")
    for ax in (ax_metric, ax_loss):
        ax.set_xlabel("epoch (0 = before training)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(x=0.08)  # room for the trial ids at the line ends
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """Cut `text` to `width` pixels so a long value does not run into the neighbouring tile."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _sample_image(record: TrialRecord) -> Image.Image | None:
    if record.sample_png is None:
        return None
    try:
        image = Image.open(io.BytesIO(record.sample_png)).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        log.warning(
            "trial %s: its sample grid is not a readable PNG (%s); left out of the mosaic",
            record.trial_id,
            type(e).__name__,
        )
        return None
    # One tile size keeps the mosaic a regular grid even if a run used another sample.scale.
    return image if image.size == (TILE_PX, TILE_PX) else image.resize((TILE_PX, TILE_PX), Image.Resampling.NEAREST)


def write_mosaic(trials: list[AssessedTrial], params: list[str], path: Path) -> None:
    """Each trial's last sample grid with its id, outcome, seed and params; a placeholder when there is none."""
    font = ImageFont.load_default(size=13)
    tiles = [(t, image) for t in trials if (image := _sample_image(t.record)) is not None]
    if not tiles:
        canvas = Image.new("RGB", (420, 60), "white")
        ImageDraw.Draw(canvas).text((12, 20), "no trial reported a sample grid", fill="black", font=font)
        canvas.save(path)
        return
    line_px, pad, border = 17, 10, 4
    captions = [
        [
            f"{t.record.trial_id}  {t.status}",
            f"seed {t.record.seed}",
            *(f"{p}={fmt(t.record.params[p])}" for p in params if p in t.record.params),
        ]
        for t, _ in tiles
    ]
    caption_px = max(len(c) for c in captions) * line_px + 6
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    cell_w, cell_h = TILE_PX + 2 * pad, TILE_PX + caption_px + 2 * pad
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, ((t, image), caption) in enumerate(zip(tiles, captions, strict=True)):
        row, col = divmod(k, columns)
        x, y = col * cell_w + pad, row * cell_h + pad
        colour = STATUS_COLOURS[t.status]
        draw.rectangle((x - border, y - border, x + TILE_PX + border - 1, y + TILE_PX + border - 1), fill=colour)
        canvas.paste(image, (x, y))
        for n, line in enumerate(caption):
            draw.text(
                (x, y + TILE_PX + 6 + n * line_px),
                _fit(draw, line, font, TILE_PX),
                fill=colour if n == 0 else "black",
                font=font,
            )
    canvas.save(path)
