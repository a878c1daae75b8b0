"""What became of each trial of a study: outcome, best and final metric, the table and the log summary.

GANs are very sensitive to their hyperparameters, so a study is judged by how its trials *fail* as much
as by its best metric. This module holds the plain trial record the report reads (`TrialRecord`), the
thresholds that name a failure (`Thresholds`), `classify` (converged, diverged, d_won, mode_collapse,
or no_data; also what the hopeless-trial stopper asks, through `is_hopeless`), the best and final value
of a metric, the rows of trials.csv (`trials_table`), the pick of the best trial and the fixed-width
summary for the job log (`summary_text`). Every metric is a distance: lower is better.

Nothing here imports Ray or matplotlib; it is tested on synthetic records.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

# Display order: the outcome a person hopes for first, then failures from "trained but poor" to "broken".
STATUSES = ("converged", "mode_collapse", "d_won", "diverged", "error", "no_data")
LOSS_KEYS = ("loss_d", "loss_g", "d_real", "d_fake")
DIRECTION = "lower is better"  # every metric is a distance (`config.METRICS`)
ACCURACY = "classifier_accuracy"
"""The digit classifier's test accuracy, reported with every digit_fd: what that distance is worth."""


def classifier_accuracy(record: TrialRecord, metric: str) -> float | None:
    """The accuracy of the classifier behind the trial's digit_fd (None for other metrics)."""
    return final_value(record.history, ACCURACY) if metric == "digit_fd" else None


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
class AssessedTrial:
    """A record with its outcome and best metric, computed once per report."""

    record: TrialRecord
    status: str
    reason: str
    best: float | None


def entry_value(entry: dict[str, float], key: str) -> float | None:
    """One epoch report's `key` as a float; None when the epoch did not report it."""
    value = entry.get(key)
    return None if value is None else float(value)


def _is_finite(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


def _trained(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Reports after at least one epoch of training; epoch 0 describes the untrained networks."""
    return [entry for entry in history if entry["epoch"] >= 1]


def fmt_short(value: float | None) -> str:
    """Three significant digits, for reasons and plot labels."""
    return "n/a" if value is None else f"{value:.3g}"


def _non_finite_reason(history: list[dict[str, float]], exploded_loss: float) -> str | None:
    for entry in history:
        bad = [
            f"{key} {value}"
            for key in ("loss_d", "loss_g")
            if (value := entry_value(entry, key)) is not None and not math.isfinite(value)
        ]
        if bad:
            return f"non-finite {', '.join(bad)} at epoch {int(entry['epoch'])}"
        if entry.get("finite", 1.0) == 0:
            return f"the trainer reported non-finite values at epoch {int(entry['epoch'])}"
        huge = [
            f"{key} {value:.3g}"
            for key in ("loss_d", "loss_g")
            if (value := entry_value(entry, key)) is not None and value > exploded_loss
        ]
        if huge:
            return f"exploding {', '.join(huge)} at epoch {int(entry['epoch'])} (above {exploded_loss:g})"
    return None


def _d_won_reason(trained: list[dict[str, float]], thresholds: Thresholds) -> str | None:
    window = [entry for entry in trained if entry.get("d_fake") is not None and entry.get("d_real") is not None]
    window = window[-thresholds.patience :]
    if not window:
        return None
    fakes = [float(entry["d_fake"]) for entry in window]
    reals = [float(entry["d_real"]) for entry in window]
    if all(f < thresholds.d_won_d_fake for f in fakes) and all(r > thresholds.d_won_d_real for r in reals):
        epochs = "epoch" if len(window) == 1 else "epochs"
        return f"D(G(z)) {max(fakes):.3g}, D(x) {min(reals):.3g} over the last {len(window)} {epochs}"
    return None


def _collapse_reason(trained: list[dict[str, float]], thresholds: Thresholds) -> str | None:
    evaluated = [entry for entry in trained if _is_finite(entry_value(entry, "class_hist_tv"))]
    if not evaluated:
        return None
    last = evaluated[-1]
    tv = float(last["class_hist_tv"])
    if tv > thresholds.collapse_tv:
        return (
            f"class-histogram TV {tv:.3g} > {thresholds.collapse_tv:g} at epoch {int(last['epoch'])}: "
            "the samples cover few digit classes"
        )
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
    return "converged", (
        f"finite losses over {int(last['epoch'])} epochs; "
        f"last D(x) {fmt_short(entry_value(last, 'd_real'))}, "
        f"D(G(z)) {fmt_short(entry_value(last, 'd_fake'))}"
    )


def is_hopeless(history: list[dict[str, float]], thresholds: Thresholds = Thresholds()) -> bool:
    """True when training on cannot help: the losses blew up, or D wins every comparison and G gets no gradient."""
    return classify(history, thresholds)[0] in ("diverged", "d_won")


def best_value(history: list[dict[str, float]], metric: str) -> float | None:
    """Lowest finite `metric` over the evaluated epochs >= 1; None when there is none."""
    values = [value for entry in _trained(history) if _is_finite(value := entry_value(entry, metric))]
    return min(values) if values else None


def final_value(history: list[dict[str, float]], metric: str) -> float | None:
    """`metric` at the last epoch >= 1 that reported it; kept when NaN, as that shows where a trial broke."""
    values = [value for entry in _trained(history) if (value := entry_value(entry, metric)) is not None]
    return values[-1] if values else None


def first_line(text: str | None) -> str:
    """The first line of an error message, for a one-line reason."""
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def _trial_status(record: TrialRecord, thresholds: Thresholds) -> tuple[str, str]:
    """classify(), except that a crash outranks a history that looks healthy (or is empty)."""
    status, reason = classify(record.history, thresholds)
    if record.state == "ERROR" and status in ("converged", "no_data"):
        return "error", f"the trial raised an error: {first_line(record.error) or 'no message'}"
    return status, reason


def assess(records: list[TrialRecord], metric: str, thresholds: Thresholds = Thresholds()) -> list[AssessedTrial]:
    """Each record with its outcome and best metric."""
    return [AssessedTrial(r, *_trial_status(r, thresholds), best_value(r.history, metric)) for r in records]


def param_names(records: list[TrialRecord]) -> list[str]:
    """Searched parameters in first-seen order (a trial may lack one when the search space is conditional)."""
    return list(dict.fromkeys(key for r in records for key in r.params))


def epochs_reported(history: list[dict[str, float]]) -> int:
    """The last epoch the trial reported (0 when none)."""
    return max((int(entry["epoch"]) for entry in history), default=0)


def table_rows(trials: list[AssessedTrial], params: list[str], metric: str) -> list[dict[str, Any]]:
    """The rows of `trials_table` from trials already assessed."""
    rows = []
    for t in trials:
        r = t.record
        row: dict[str, Any] = {"trial_id": r.trial_id, "seed": r.seed}
        row.update({p: r.params.get(p) for p in params})
        row.update(
            {
                "status": t.status,
                "reason": t.reason,
                "stopped_early": r.stopped_early,
                "epochs": epochs_reported(r.history),
                f"final_{metric}": final_value(r.history, metric),
                f"best_{metric}": t.best,
            }
        )
        if metric == "digit_fd":
            row[ACCURACY] = classifier_accuracy(r, metric)
        row.update({f"final_{key}": final_value(r.history, key) for key in LOSS_KEYS})
        row["error"] = r.error
        rows.append(row)
    return rows


def trials_table(
    records: list[TrialRecord], metric: str, thresholds: Thresholds = Thresholds()
) -> list[dict[str, Any]]:
    """One row per trial: id, seed, each param (by dotted key), outcome, epochs, final/best metric, final losses."""
    return table_rows(assess(records, metric, thresholds), param_names(records), metric)


def pick_best(trials: list[AssessedTrial], metric: str) -> tuple[AssessedTrial | None, str]:
    """The best converged trial by metric, else the best of all; the note says which rule chose it."""
    scored = [t for t in trials if t.best is not None]
    converged = [t for t in scored if t.status == "converged"]
    if converged:
        pool, note = converged, "the best converged trial"
    elif scored:
        pool, note = scored, "no trial converged; this is the best by metric among all trials, and it failed too"
    else:
        return None, f"no trial reported a finite {metric}; this is the base configuration unchanged"
    return min(pool, key=lambda t: cast(float, t.best)), note  # `scored` keeps only trials with a best


def fmt(value: Any) -> str:
    """A table cell: floats to four significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{value:.4g}"
    return str(value)


def summary_text(records: list[TrialRecord], metric: str, thresholds: Thresholds = Thresholds()) -> str:
    """A fixed-width table for the job log, the counts per status, then the best configuration."""
    trials = assess(records, metric, thresholds)
    params = param_names(records)
    header = ["trial", *params, "seed", "status", f"best {metric}"] + (
        ["classifier accuracy"] if metric == "digit_fd" else []
    )
    cells = [
        [t.record.trial_id, *(fmt(t.record.params.get(p)) for p in params), str(t.record.seed), t.status, fmt(t.best)]
        + ([fmt(classifier_accuracy(t.record, metric))] if metric == "digit_fd" else [])
        for t in trials
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *cells]]
    counts = Counter(t.status for t in trials)
    lines.append("")
    lines.append("trials per status: " + ", ".join(f"{s}: {counts[s]}" for s in STATUSES if counts[s]))
    best, note = pick_best(trials, metric)
    if best is None:
        lines.append(f"best configuration: none ({note})")
    else:
        settings = ", ".join(f"{k}={fmt(v)}" for k, v in best.record.params.items())
        lines.append(
            f"best configuration: {best.record.trial_id} ({note}): {metric} {fmt(best.best)} "
            f"({DIRECTION}) with {settings or 'no searched parameters'}, seed {best.record.seed}"
        )
    return "\n".join(lines)
