"""Hyperparameter-study report: what became of each trial, and files a person opens afterwards.

GANs are very sensitive to their hyperparameters, so a study is judged by how its trials *fail* as much
as by its best metric. `classify` names each trial's outcome from its per-epoch metrics (it is also what
the hopeless-trial stopper asks, through `is_hopeless`), and `write_report` writes, into one folder:

  index.html                         the page to open: counts, table, plots, mosaic, links
  trials.csv                         one row per trial (`trials_table`)
  metric_vs_<param>.png              best metric per trial against each searched parameter
  heatmap_<p1>_x_<p2>.png            mean best metric over the first two parameters' grid
  learning_curves.png                metric and losses per epoch, coloured by outcome
  mosaic.png                         each trial's last sample grid
  best.yaml                          a job file for the best trial's configuration

Every link in index.html is relative, so the folder works from the bucket and after a download. Nothing
here imports Ray: the module reads plain trial records and is tested on synthetic ones.
"""

from __future__ import annotations

import copy
import csv
import html
import io
import logging
import math
import numbers
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.patheffects import withStroke
from matplotlib.ticker import MaxNLocator, NullLocator
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from dcgan_ray.config import config_from_dict
from dcgan_ray.errors import ConfigError

log = logging.getLogger(__name__)

# Display order: the outcome a person hopes for first, then failures from "trained but poor" to "broken".
STATUSES = ("converged", "mode_collapse", "d_won", "diverged", "error", "no_data")
STATUS_COLOURS = {
    "converged": "#2e7d32", "mode_collapse": "#8e24aa", "d_won": "#ef6c00",
    "diverged": "#c62828", "error": "#455a64", "no_data": "#9e9e9e",
}
STATUS_MARKERS = {"converged": "o", "mode_collapse": "^", "d_won": "s", "diverged": "X", "error": "D", "no_data": "v"}
LOSS_KEYS = ("loss_d", "loss_g", "d_real", "d_fake")
TILE_PX = 256  # the sample grids are 8x8 tiles of 32 px
LABELLED_CURVES_MAX = 12  # beyond this many trials, ids at the line ends overlap into a smear


@dataclass
class TrialRecord:
    """One Tune trial as the report sees it; `history` has one dict per epoch report (epoch 0: before training)."""

    trial_id: str
    params: dict[str, Any]
    seed: int
    history: list[dict[str, float]]
    state: str
    stopped_early: bool
    sample_png: bytes | None
    error: str | None = None


@dataclass(frozen=True)
class Thresholds:
    d_won_d_fake: float = 0.02
    """Mean D(G(z)) below this ...  (the generator's samples are all recognised as fake)"""
    d_won_d_real: float = 0.98
    """... with D(x) above this, for the last `patience` reports -> the discriminator won."""
    collapse_tv: float = 0.5
    """Class-histogram total variation above this at the last evaluated epoch -> mode collapse."""
    patience: int = 2
    """Reports in a row the discriminator must dominate; one bad epoch early in training is normal."""
    exploded_loss: float = 100.0
    """A mean BCE loss above this means logits in the hundreds: the weights blew up (diverged), even
    while the numbers are still finite. Healthy DCGAN losses stay below ~10."""


@dataclass(frozen=True)
class _Trial:
    """A record with its outcome and best metric, computed once per report."""

    record: TrialRecord
    status: str
    reason: str
    best: float | None


def _value(entry: dict[str, float], key: str) -> float | None:
    value = entry.get(key)
    return None if value is None else float(value)


def _is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _trained(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Reports after at least one epoch of training; epoch 0 describes the untrained networks."""
    return [entry for entry in history if entry["epoch"] >= 1]


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max' (the direction in which the metric is better), got {mode!r}")


def _direction(mode: str) -> str:
    return "lower is better" if mode == "min" else "higher is better"


def _non_finite_reason(history: list[dict[str, float]], exploded_loss: float) -> str | None:
    for entry in history:
        bad = [f"{key} {value}" for key in ("loss_d", "loss_g")
               if (value := _value(entry, key)) is not None and not math.isfinite(value)]
        if bad:
            return f"non-finite {', '.join(bad)} at epoch {int(entry['epoch'])}"
        if entry.get("finite", 1.0) == 0:
            return f"the trainer reported non-finite values at epoch {int(entry['epoch'])}"
        huge = [f"{key} {value:.3g}" for key in ("loss_d", "loss_g")
                if (value := _value(entry, key)) is not None and value > exploded_loss]
        if huge:
            return f"exploding {', '.join(huge)} at epoch {int(entry['epoch'])} (above {exploded_loss:g})"
    return None


def _d_won_reason(trained: list[dict[str, float]], thresholds: Thresholds) -> str | None:
    window = [entry for entry in trained if entry.get("d_fake") is not None and entry.get("d_real") is not None]
    window = window[-thresholds.patience:]
    if not window:
        return None
    fakes = [float(entry["d_fake"]) for entry in window]
    reals = [float(entry["d_real"]) for entry in window]
    if all(f < thresholds.d_won_d_fake for f in fakes) and all(r > thresholds.d_won_d_real for r in reals):
        epochs = "epoch" if len(window) == 1 else "epochs"
        return f"D(G(z)) {max(fakes):.3g}, D(x) {min(reals):.3g} over the last {len(window)} {epochs}"
    return None


def _collapse_reason(trained: list[dict[str, float]], thresholds: Thresholds) -> str | None:
    evaluated = [entry for entry in trained if _is_finite(_value(entry, "class_hist_tv"))]
    if not evaluated:
        return None
    last = evaluated[-1]
    tv = float(last["class_hist_tv"])
    if tv > thresholds.collapse_tv:
        return (f"class-histogram TV {tv:.3g} > {thresholds.collapse_tv:g} at epoch {int(last['epoch'])}: "
                "the samples cover few digit classes")
    return None


def classify(history: list[dict[str, float]], thresholds: Thresholds = Thresholds()) -> tuple[str, str]:
    """(status, reason) of one trial; precedence diverged > d_won > mode_collapse > converged.

    `no_data` means nothing to judge: no report at all, or none after an epoch of training.
    """
    if not history:
        return "no_data", "no metrics were reported"
    if reason := _non_finite_reason(history, thresholds.exploded_loss):
        return "diverged", reason
    trained = _trained(history)
    if not trained:
        return "no_data", "no epoch finished training"
    if reason := _d_won_reason(trained, thresholds):
        return "d_won", reason
    if reason := _collapse_reason(trained, thresholds):
        return "mode_collapse", reason
    last = trained[-1]
    return "converged", (f"finite losses over {int(last['epoch'])} epochs; last D(x) {_g(_value(last, 'd_real'))}, "
                         f"D(G(z)) {_g(_value(last, 'd_fake'))}")


def is_hopeless(history: list[dict[str, float]], thresholds: Thresholds = Thresholds()) -> bool:
    """True when training on cannot help: the losses blew up, or D wins every comparison and G gets no gradient."""
    return classify(history, thresholds)[0] in ("diverged", "d_won")


def best_value(history: list[dict[str, float]], metric: str, mode: str) -> float | None:
    """Best finite `metric` over the evaluated epochs >= 1; None when there is none."""
    _check_mode(mode)
    values = [value for entry in _trained(history) if _is_finite(value := _value(entry, metric))]
    if not values:
        return None
    return min(values) if mode == "min" else max(values)


def final_value(history: list[dict[str, float]], metric: str) -> float | None:
    """`metric` at the last epoch >= 1 that reported it; kept when NaN, as that shows where a trial broke."""
    values = [value for entry in _trained(history) if (value := _value(entry, metric)) is not None]
    return values[-1] if values else None


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def _trial_status(record: TrialRecord, thresholds: Thresholds) -> tuple[str, str]:
    """classify(), except that a crash outranks a history that looks healthy (or is empty)."""
    status, reason = classify(record.history, thresholds)
    if record.state == "ERROR" and status in ("converged", "no_data"):
        return "error", f"the trial raised an error: {_first_line(record.error) or 'no message'}"
    return status, reason


def _assess(records: list[TrialRecord], metric: str, mode: str, thresholds: Thresholds) -> list[_Trial]:
    _check_mode(mode)
    return [_Trial(r, *_trial_status(r, thresholds), best_value(r.history, metric, mode)) for r in records]


def _param_names(records: list[TrialRecord]) -> list[str]:
    """Searched parameters in first-seen order (a trial may lack one when the search space is conditional)."""
    return list(dict.fromkeys(key for r in records for key in r.params))


def _epochs(history: list[dict[str, float]]) -> int:
    return max((int(entry["epoch"]) for entry in history), default=0)


def _table_rows(trials: list[_Trial], params: list[str], metric: str) -> list[dict[str, Any]]:
    rows = []
    for t in trials:
        r = t.record
        row: dict[str, Any] = {"trial_id": r.trial_id, "seed": r.seed}
        row.update({p: r.params.get(p) for p in params})
        row.update({"status": t.status, "reason": t.reason, "stopped_early": r.stopped_early,
                    "epochs": _epochs(r.history), f"final_{metric}": final_value(r.history, metric),
                    f"best_{metric}": t.best})
        row.update({f"final_{key}": final_value(r.history, key) for key in LOSS_KEYS})
        row["error"] = r.error
        rows.append(row)
    return rows


def trials_table(records: list[TrialRecord], metric: str, mode: str,
                 thresholds: Thresholds = Thresholds()) -> list[dict[str, Any]]:
    """One row per trial: id, seed, each param (by dotted key), outcome, epochs, final/best metric, final losses."""
    return _table_rows(_assess(records, metric, mode, thresholds), _param_names(records), metric)


def _pick_best(trials: list[_Trial], metric: str, mode: str) -> tuple[_Trial | None, str]:
    """The best converged trial by metric, else the best of all; the note says which rule chose it."""
    scored = [t for t in trials if t.best is not None]
    converged = [t for t in scored if t.status == "converged"]
    if converged:
        pool, note = converged, "the best converged trial"
    elif scored:
        pool, note = scored, "no trial converged; this is the best by metric among all trials, and it failed too"
    else:
        return None, f"no trial reported a finite {metric}; this is the base configuration unchanged"
    pick = min(pool, key=lambda t: t.best) if mode == "min" else max(pool, key=lambda t: t.best)
    return pick, note


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{value:.4g}"
    return str(value)


def summary_text(records: list[TrialRecord], metric: str, mode: str, thresholds: Thresholds = Thresholds()) -> str:
    """A fixed-width table for the job log, the counts per status, then the best configuration."""
    trials = _assess(records, metric, mode, thresholds)
    params = _param_names(records)
    header = ["trial", *params, "seed", "status", f"best {metric}"]
    cells = [[t.record.trial_id, *(_fmt(t.record.params.get(p)) for p in params), str(t.record.seed), t.status,
              _fmt(t.best)] for t in trials]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *cells]]
    counts = Counter(t.status for t in trials)
    lines.append("")
    lines.append("trials per status: " + ", ".join(f"{s}: {counts[s]}" for s in STATUSES if counts[s]))
    best, note = _pick_best(trials, metric, mode)
    if best is None:
        lines.append(f"best configuration: none ({note})")
    else:
        settings = ", ".join(f"{k}={_fmt(v)}" for k, v in best.record.params.items())
        lines.append(f"best configuration: {best.record.trial_id} ({note}): {metric} {_fmt(best.best)} "
                     f"({_direction(mode)}) with {settings or 'no searched parameters'}, seed {best.record.seed}")
    return "\n".join(lines)


def _file_stem(key: str) -> str:
    """Dotted config key -> a file-name part: train.lr_d -> train_lr_d."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


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


def _figure(width: float, height: float) -> Figure:
    # No pyplot: its global figure registry and backend switch do not belong in a long-lived driver process.
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label_axis(axis: Any, levels: list[Any]) -> None:
    """Ticks at the searched values: a grid search has few, and in-between ticks read as tested values."""
    if _is_numeric(levels) and len(levels) > 8:
        return
    positions = [_position(v, levels) for v in levels]
    axis.set_ticks(positions, labels=[_fmt(v) for v in levels])
    axis.set_minor_locator(NullLocator())


def _plot_metric_vs_param(trials: list[_Trial], param: str, n_params: int, metric: str, mode: str,
                          path: Path) -> None:
    points = [(t, t.record.params[param]) for t in trials if param in t.record.params]
    levels = _levels([v for _, v in points])
    numeric = _is_numeric(levels)
    fig = _figure(9.5, 4.8)
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
            ax.scatter([x], [0.02], transform=ax.get_xaxis_transform(), marker=STATUS_MARKERS[t.status],
                       color=STATUS_COLOURS[t.status], s=70, clip_on=False, zorder=3)
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
        ax.errorbar(xs, means, yerr=[lows, highs], fmt="-" if numeric else "none", marker="_", markersize=18,
                    color="black", capsize=5, linewidth=1.2, zorder=2)
        handles.append(Line2D([], [], color="black", marker="_", markersize=12,
                              label=f"mean, bar: min-max over {spread}"))
    else:
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.text(0.5, 0.5, f"no trial reported a finite {metric}", transform=ax.transAxes, ha="center", color="dimgrey")
    unplaced = {t.status for t, _ in points if t.best is None}
    outcomes = sorted({t.status for t, _ in points if t.status != "converged"} | unplaced, key=STATUSES.index)
    handles += [Line2D([], [], color=STATUS_COLOURS[s], marker=STATUS_MARKERS[s], linestyle="", markersize=8,
                       label=f"{s} (bottom edge: no {metric})" if s in unplaced else s) for s in outcomes]
    if not numeric:
        ax.set_xlim(-0.5, len(levels) - 0.5)
    _label_axis(ax.xaxis, levels)
    ax.set_xlabel(param)
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"best {metric} per trial vs {param} ({_direction(mode)})")
    ax.grid(alpha=0.3)
    # Outside the axes: inside, it would cover the points whichever corner it picks.
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=100)


def _cell_text(members: list[_Trial], mean: float) -> str:
    """Mean, then how many trials converged, then what became of the others."""
    if not members:
        return "no trial"
    counts = Counter(t.status for t in members)
    lines = [_g(mean) if np.isfinite(mean) else "no metric", f"{counts['converged']}/{len(members)} converged"]
    failures = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s != "converged" and counts[s])
    return "\n".join(lines + [failures] if failures else lines)


def _plot_heatmap(trials: list[_Trial], p1: str, p2: str, metric: str, mode: str, path: Path) -> None:
    both = [t for t in trials if p1 in t.record.params and p2 in t.record.params]
    rows = _levels([t.record.params[p1] for t in both])
    cols = _levels([t.record.params[p2] for t in both])
    cells: dict[tuple[int, int], list[_Trial]] = {}
    for t in both:
        cell = (_level_index(t.record.params[p1], rows), _level_index(t.record.params[p2], cols))
        cells.setdefault(cell, []).append(t)
    grid = np.full((len(rows), len(cols)), np.nan)
    for (i, j), members in cells.items():
        values = [t.best for t in members if t.best is not None]
        if values:
            grid[i, j] = np.mean(values)
    fig = _figure(1.6 * len(cols) + 3.2, 1.0 * len(rows) + 2.4)
    ax = fig.add_subplot()
    # Reversed for "min" so the better cells take the same (bright) colour whatever the direction.
    cmap = matplotlib.colormaps["viridis_r" if mode == "min" else "viridis"].with_extremes(bad="#eeeeee")
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, origin="lower", aspect="auto",
                      vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    if finite.size:
        fig.colorbar(image, ax=ax, label=f"mean best {metric} ({_direction(mode)})")
    outline = [withStroke(linewidth=2.5, foreground="white")]
    for i in range(len(rows)):
        for j in range(len(cols)):
            members = cells.get((i, j), [])
            ax.text(j, i, _cell_text(members, grid[i, j]), ha="center", va="center", fontsize=9,
                    path_effects=outline)
            if members and not any(t.status == "converged" for t in members):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=(0.6, 0.6, 0.6, 0.55), hatch="//",
                                       edgecolor="dimgrey", linewidth=0))
    ax.set_xticks(range(len(cols)), labels=[_fmt(v) for v in cols])
    ax.set_yticks(range(len(rows)), labels=[_fmt(v) for v in rows])
    ax.set_xlabel(p2)
    ax.set_ylabel(p1)
    ax.set_title(f"mean best {metric} over seeds ({_direction(mode)})\nhatched grey: no converged trial", fontsize=10)
    fig.savefig(path, dpi=100)


def _series(history: list[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """Epochs and values where `key` was reported; non-finite values become NaN so the line breaks there."""
    points = [(int(entry["epoch"]), value) for entry in history if (value := _value(entry, key)) is not None]
    return [e for e, _ in points], [v if math.isfinite(v) else math.nan for _, v in points]


def _plot_learning_curves(trials: list[_Trial], metric: str, mode: str, path: Path) -> None:
    fig = _figure(13, 4.8)
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
                ax_metric.annotate(t.record.trial_id, (epochs[last], values[last]), xytext=(4, 0),
                                   textcoords="offset points", fontsize=7, color=colour, va="center")
        for key, style in (("loss_d", "-"), ("loss_g", "--")):
            epochs, values = _series(t.record.history, key)
            positive_losses &= all(v > 0 for v in values if math.isfinite(v))
            ax_loss.plot(epochs, values, color=colour, linestyle=style, alpha=0.85)
    if not any_metric:
        ax_metric.text(0.5, 0.5, f"no trial reported {metric}", transform=ax_metric.transAxes, ha="center",
                       color="dimgrey")
    if positive_losses:
        # A trial on its way to diverging reaches losses far above the rest; a log axis keeps both readable.
        ax_loss.set_yscale("log")
    present = sorted({t.status for t in trials}, key=STATUSES.index)
    status_handles = [Patch(color=STATUS_COLOURS[s], label=s) for s in present]
    ax_metric.legend(handles=status_handles, fontsize=8)
    ax_loss.legend(handles=status_handles + [Line2D([], [], color="black", linestyle="-", label="loss_d"),
                                             Line2D([], [], color="black", linestyle="--", label="loss_g")], fontsize=8)
    ax_metric.set_title(f"{metric} per epoch ({_direction(mode)})")
    ax_metric.set_ylabel(metric)
    ax_loss.set_title("discriminator and generator loss per epoch")
    ax_loss.set_ylabel("loss")
    for ax in (ax_metric, ax_loss):
        ax.set_xlabel("epoch (0 = before training)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(x=0.08)  # room for the trial ids at the line ends
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
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
        log.warning("trial %s: its sample grid is not a readable PNG (%s); left out of the mosaic", record.trial_id,
                    type(e).__name__)
        return None
    # One tile size keeps the mosaic a regular grid even if a run used another sample.scale.
    return image if image.size == (TILE_PX, TILE_PX) else image.resize((TILE_PX, TILE_PX), Image.NEAREST)


def _write_mosaic(trials: list[_Trial], params: list[str], path: Path) -> None:
    font = ImageFont.load_default(size=13)
    tiles = [(t, image) for t in trials if (image := _sample_image(t.record)) is not None]
    if not tiles:
        canvas = Image.new("RGB", (420, 60), "white")
        ImageDraw.Draw(canvas).text((12, 20), "no trial reported a sample grid", fill="black", font=font)
        canvas.save(path)
        return
    line_px, pad, border = 17, 10, 4
    captions = [[f"{t.record.trial_id}  {t.status}", f"seed {t.record.seed}",
                 *(f"{p}={_fmt(t.record.params[p])}" for p in params if p in t.record.params)] for t, _ in tiles]
    caption_px = max(len(c) for c in captions) * line_px + 6
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    cell_w, cell_h = TILE_PX + 2 * pad, TILE_PX + caption_px + 2 * pad
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, ((t, image), caption) in enumerate(zip(tiles, captions)):
        row, col = divmod(k, columns)
        x, y = col * cell_w + pad, row * cell_h + pad
        colour = STATUS_COLOURS[t.status]
        draw.rectangle((x - border, y - border, x + TILE_PX + border - 1, y + TILE_PX + border - 1), fill=colour)
        canvas.paste(image, (x, y))
        for n, line in enumerate(caption):
            draw.text((x, y + TILE_PX + 6 + n * line_px), _fit(draw, line, font, TILE_PX),
                      fill=colour if n == 0 else "black", font=font)
    canvas.save(path)


def _plain(value: Any) -> Any:
    """numpy scalars (Tune samples them) -> Python values that yaml.safe_dump can write."""
    return value.item() if isinstance(value, np.generic) else value


def _best_config(base_config: dict[str, Any], best: _Trial | None, study_name: str) -> dict[str, Any]:
    config = copy.deepcopy(base_config)
    config.pop("tune", None)  # the search space is the study's, not a single job's
    if best is not None:
        for key, value in best.record.params.items():
            *sections, leaf = key.split(".")
            node = config
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = _plain(value)
        config.setdefault("train", {})["seed"] = best.record.seed
    config["name"] = f"{study_name}-best"
    return config


def _write_best_yaml(base_config: dict[str, Any], trials: list[_Trial], metric: str, mode: str, study_name: str,
                     path: Path) -> _Trial | None:
    best, note = _pick_best(trials, metric, mode)
    config = _best_config(base_config, best, study_name)
    header = [f"# Best configuration of study {study_name}: {note}."]
    if best is not None:
        header.append(f"# From trial {best.record.trial_id} (seed {best.record.seed}, status {best.status}): "
                      f"best {metric} {best.best:.6g} ({_direction(mode)}).")
    header.append("# Train it with: dcgan-ray train best.yaml")
    try:
        config_from_dict(config, str(path))
    except ConfigError as e:
        # Still write it: the numbers are worth having, and the header says what to fix.
        log.warning("best.yaml does not load as a job: %s", e)
        header.append(f"# WARNING: this does not load as a job yet: {e}")
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False))
    return best


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #555; margin-top: 0; }
.badge { display: inline-block; padding: 0.2em 0.6em; margin: 0 0.3em 0.3em 0; border-radius: 0.8em; color: #fff; }
.note { background: #f4f6f8; border-left: 4px solid #90a4ae; padding: 0.6em 1em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.status { color: #fff; font-weight: 600; } tr.best td { background: #fffde7; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _html_table(trials: list[_Trial], params: list[str], metric: str, best: _Trial | None) -> str:
    header = ["trial", *params, "seed", "status", "reason", "stopped early", "epochs", f"best {metric}",
              f"final {metric}"]
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for t in trials:
        r = t.record
        reason = html.escape(t.reason)
        if r.error:
            reason += f'<br><small title="{html.escape(r.error)}">{html.escape(_first_line(r.error)[:160])}</small>'
        cells = [f"<td>{html.escape(r.trial_id)}</td>",
                 *(f'<td class="num">{html.escape(_fmt(r.params.get(p)))}</td>' for p in params),
                 f'<td class="num">{r.seed}</td>',
                 f'<td class="status" style="background:{STATUS_COLOURS[t.status]}">{t.status}</td>',
                 f"<td>{reason}</td>", f"<td>{'yes' if r.stopped_early else 'no'}</td>",
                 f'<td class="num">{_epochs(r.history)}</td>', f'<td class="num">{_fmt(t.best)}</td>',
                 f'<td class="num">{html.escape(_fmt(final_value(r.history, metric)))}</td>']
        row_class = ' class="best"' if best is not None and t is best else ""
        lines.append(f"<tr{row_class}>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _write_index(path: Path, study_name: str, metric: str, mode: str, trials: list[_Trial], params: list[str],
                 best: _Trial | None, figures: list[tuple[Path, str]]) -> None:
    counts = Counter(t.status for t in trials)
    badges = "".join(f'<span class="badge" style="background:{STATUS_COLOURS[s]}">{s}: {counts[s]}</span>'
                     for s in STATUSES if counts[s])
    best_line = ("No trial reported a finite metric; best.yaml is the base configuration." if best is None else
                 f"Best: trial <b>{html.escape(best.record.trial_id)}</b> ({best.status}), best {html.escape(metric)} "
                 f"{_fmt(best.best)}, highlighted in the table.")
    figure_html = "\n".join(f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>" for p, caption in figures)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Study {html.escape(study_name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>Hyperparameter study: {html.escape(study_name)}</h1>
<p class="sub">Metric: <b>{html.escape(metric)}</b> ({_direction(mode)}), the best value over each trial's evaluated
epochs. {len(trials)} trials.</p>
<p>{badges}</p>
<p class="note">How to read sensitivity: a hyperparameter matters when the metric moves across its values by more than
it moves between seeds at one value. In each <i>metric vs</i> plot, compare the distance between the black means with
the height of their min-max bars (the spread over seeds, and over the other parameters when several were searched;
the heatmap separates the first two): differences smaller than the bars cannot be told apart from seed noise, and
call for more seeds. Failed trials (diverged, discriminator won, mode collapse) are marked apart; a value
where trials fail is a sensitive one even if its surviving trials score well.</p>
<p>{best_line} Downloads: <a href="best.yaml">best.yaml</a> (a job file for <code>dcgan-ray train</code>),
<a href="trials.csv">trials.csv</a>.</p>
<h2>Trials</h2>
{_html_table(trials, params, metric, best)}
<h2>Plots</h2>
{figure_html}
</body></html>
"""
    path.write_text(page)


def write_report(records: list[TrialRecord], out_dir: Path, metric: str, mode: str, base_config: dict[str, Any],
                 study_name: str, thresholds: Thresholds = Thresholds()) -> list[Path]:
    """Write the study report into `out_dir` (created) and return the paths written, index.html last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = _assess(records, metric, mode, thresholds)
    params = _param_names(records)
    written: list[Path] = []

    csv_path = out_dir / "trials.csv"
    _write_csv(_table_rows(trials, params, metric), csv_path)
    written.append(csv_path)

    figures: list[tuple[Path, str]] = []
    for param in params:
        path = out_dir / f"metric_vs_{_file_stem(param)}.png"
        _plot_metric_vs_param(trials, param, len(params), metric, mode, path)
        figures.append((path, f"Best {metric} per trial against {param}: one point per trial, black: mean and "
                              "min-max spread per value."))
    # A conditional search space may give no trial both of the first two params: no grid to draw then.
    if len(params) >= 2 and any(params[0] in r.params and params[1] in r.params for r in records):
        p1, p2 = params[:2]
        path = out_dir / f"heatmap_{_file_stem(p1)}_x_{_file_stem(p2)}.png"
        _plot_heatmap(trials, p1, p2, metric, mode, path)
        figures.append((path, f"Mean best {metric} per ({p1}, {p2}) cell, over seeds and any other parameters."))
    path = out_dir / "learning_curves.png"
    _plot_learning_curves(trials, metric, mode, path)
    figures.append((path, f"{metric} and the losses per epoch, coloured by outcome."))
    path = out_dir / "mosaic.png"
    _write_mosaic(trials, params, path)
    figures.append((path, "Each trial's last sample grid (fixed noise), framed in its outcome's colour."))
    written += [p for p, _ in figures]

    best_path = out_dir / "best.yaml"
    best = _write_best_yaml(base_config, trials, metric, mode, study_name, best_path)
    written.append(best_path)

    index_path = out_dir / "index.html"
    _write_index(index_path, study_name, metric, mode, trials, params, best, figures)
    written.append(index_path)
    log.debug("study %s: report of %d trials written to %s", study_name, len(records), out_dir)
    return written
