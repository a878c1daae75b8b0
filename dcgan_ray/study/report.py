"""The study report: the folder a person opens after a study, written by `write_report`.

  index.html                         the page to open: counts, table, plots, mosaic, links
  trials.csv                         one row per trial (`outcomes.trials_table`)
  metric_vs_<param>.png              best metric per trial against each searched parameter (`plots`)
  heatmap_<p1>_x_<p2>.png            mean best metric over the first two parameters' grid
  learning_curves.png                metric and losses per epoch, coloured by outcome
  mosaic.png                         each trial's last sample grid
  best.yaml                          a job file for the best trial's configuration

This module writes the CSV, best.yaml and index.html and calls `plots` for the pictures; what became of
each trial is `outcomes`' business. Every link in index.html is relative, so the folder works from the
bucket and after a download. Nothing here imports Ray: it reads plain trial records and is tested on
synthetic ones.
"""

from __future__ import annotations

import copy
import csv
import html
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dcgan_ray.config import config_from_dict, set_dotted
from dcgan_ray.errors import ConfigError
from dcgan_ray.report.style import PAGE_CSS
from dcgan_ray.study.outcomes import (
    DIRECTION,
    STATUSES,
    AssessedTrial,
    Thresholds,
    TrialRecord,
    assess,
    classifier_accuracy,
    epochs_reported,
    final_value,
    first_line,
    fmt,
    param_names,
    pick_best,
    table_rows,
)
from dcgan_ray.study.plots import (
    STATUS_COLOURS,
    plot_heatmap,
    plot_learning_curves,
    plot_metric_vs_param,
    write_mosaic,
)

log = logging.getLogger(__name__)


def _file_stem(key: str) -> str:
    """Dotted config key -> a file-name part: train.lr_d -> train_lr_d."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def _plain(value: Any) -> Any:
    """numpy scalars (Tune samples them) -> Python values that yaml.safe_dump can write."""
    return value.item() if isinstance(value, np.generic) else value


def _best_config(base_config: dict[str, Any], best: AssessedTrial | None, study_name: str) -> dict[str, Any]:
    """The study's job with the best trial's values and seed, without the study's `tune` section."""
    config = copy.deepcopy(base_config)
    config.pop("tune", None)  # the search space is the study's, not a single job's
    if best is not None:
        for key, value in best.record.params.items():
            set_dotted(config, key, _plain(value))
        set_dotted(config, "train.seed", best.record.seed)
    config["name"] = f"{study_name}-best"
    return config


def _write_best_yaml(
    base_config: dict[str, Any], trials: list[AssessedTrial], metric: str, study_name: str, path: Path
) -> AssessedTrial | None:
    best, note = pick_best(trials, metric)
    config = _best_config(base_config, best, study_name)
    header = [f"# Best configuration of study {study_name}: {note}."]
    if best is not None:
        header.append(
            f"# From trial {best.record.trial_id} (seed {best.record.seed}, status {best.status}): "
            f"best {metric} {best.best:.6g} ({DIRECTION})."
        )
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


def _html_table(trials: list[AssessedTrial], params: list[str], metric: str, best: AssessedTrial | None) -> str:
    accuracy = metric == "digit_fd"
    header = [
        "trial",
        *params,
        "seed",
        "status",
        "reason",
        "stopped early",
        "epochs",
        f"best {metric}",
        f"final {metric}",
    ] + (["classifier accuracy"] if accuracy else [])
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for t in trials:
        r = t.record
        reason = html.escape(t.reason)
        if r.error:
            reason += f'<br><small title="{html.escape(r.error)}">{html.escape(first_line(r.error)[:160])}</small>'
        cells = [
            f"<td>{html.escape(r.trial_id)}</td>",
            *(f'<td class="num">{html.escape(fmt(r.params.get(p)))}</td>' for p in params),
            f'<td class="num">{r.seed}</td>',
            f'<td class="status" style="background:{STATUS_COLOURS[t.status]}">{t.status}</td>',
            f"<td>{reason}</td>",
            f"<td>{'yes' if r.stopped_early else 'no'}</td>",
            f'<td class="num">{epochs_reported(r.history)}</td>',
            f'<td class="num">{fmt(t.best)}</td>',
            f'<td class="num">{html.escape(fmt(final_value(r.history, metric)))}</td>',
        ]
        if accuracy:
            cells.append(f'<td class="num">{html.escape(fmt(classifier_accuracy(r, metric)))}</td>')
        row_class = ' class="best"' if best is not None and t is best else ""
        lines.append(f"<tr{row_class}>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _accuracy_note(trials: list[AssessedTrial], metric: str) -> str:
    """What digit_fd is worth: the test accuracy of the classifier it was measured with."""
    if metric != "digit_fd":
        return ""
    values = sorted({v for t in trials if (v := classifier_accuracy(t.record, metric)) is not None})
    if not values:
        return " The digit classifier's test accuracy was not reported."
    shown = " to ".join(f"{v:.3f}" for v in (values[0], values[-1])[: len(values)])
    return (
        f" Measured with a digit classifier of test accuracy {html.escape(shown)} (a classifier near 0.1 makes "
        "digit_fd meaningless)."
    )


def _write_index(
    path: Path,
    study_name: str,
    metric: str,
    trials: list[AssessedTrial],
    params: list[str],
    best: AssessedTrial | None,
    figures: list[tuple[Path, str]],
) -> None:
    counts = Counter(t.status for t in trials)
    badges = "".join(
        f'<span class="badge" style="background:{STATUS_COLOURS[s]}">{s}: {counts[s]}</span>'
        for s in STATUSES
        if counts[s]
    )
    best_line = (
        "No trial reported a finite metric; best.yaml is the base configuration."
        if best is None
        else f"Best: trial <b>{html.escape(best.record.trial_id)}</b> ({best.status}), best {html.escape(metric)} "
        f"{fmt(best.best)}, highlighted in the table."
    )
    figure_html = "\n".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for p, caption in figures
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Study {html.escape(study_name)}</title>
<style>{PAGE_CSS}</style></head>
<body>
<h1>Hyperparameter study: {html.escape(study_name)}</h1>
<p class="sub">Metric: <b>{html.escape(metric)}</b> ({DIRECTION}), the best value over each trial's evaluated
epochs. {len(trials)} trials.{_accuracy_note(trials, metric)}</p>
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


def write_report(
    records: list[TrialRecord],
    out_dir: Path,
    metric: str,
    base_config: dict[str, Any],
    study_name: str,
    thresholds: Thresholds = Thresholds(),
) -> list[Path]:
    """Write the study report into `out_dir` (created) and return the paths written, index.html last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = assess(records, metric, thresholds)
    params = param_names(records)
    written: list[Path] = []

    csv_path = out_dir / "trials.csv"
    _write_csv(table_rows(trials, params, metric), csv_path)
    written.append(csv_path)

    figures: list[tuple[Path, str]] = []
    for param in params:
        path = out_dir / f"metric_vs_{_file_stem(param)}.png"
        plot_metric_vs_param(trials, param, len(params), metric, path)
        figures.append(
            (
                path,
                f"Best {metric} per trial against {param}: one point per trial, black: mean and "
                "min-max spread per value.",
            )
        )
    # A conditional search space may give no trial both of the first two params: no grid to draw then.
    if len(params) >= 2 and any(params[0] in r.params and params[1] in r.params for r in records):
        p1, p2 = params[:2]
        path = out_dir / f"heatmap_{_file_stem(p1)}_x_{_file_stem(p2)}.png"
        plot_heatmap(trials, p1, p2, metric, path)
        figures.append((path, f"Mean best {metric} per ({p1}, {p2}) cell, over seeds and any other parameters."))
    path = out_dir / "learning_curves.png"
    plot_learning_curves(trials, metric, path)
    figures.append((path, f"{metric} and the losses per epoch, coloured by outcome."))
    path = out_dir / "mosaic.png"
    write_mosaic(trials, params, path)
    figures.append((path, "Each trial's last sample grid (fixed noise), framed in its outcome's colour."))
    written += [p for p, _ in figures]

    best_path = out_dir / "best.yaml"
    best = _write_best_yaml(base_config, trials, metric, study_name, best_path)
    written.append(best_path)

    index_path = out_dir / "index.html"
    _write_index(index_path, study_name, metric, trials, params, best, figures)
    written.append(index_path)
    log.debug("study %s: report of %d trials written to %s", study_name, len(records), out_dir)
    return written
