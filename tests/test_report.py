"""Tests for the study report (dcgan_ray.study.outcomes, .plots, .report) on synthetic trial records: no Ray, no S3."""

from __future__ import annotations

import csv
import io
import math
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from dcgan_ray.config import JobConfig, config_from_dict
from dcgan_ray.study.outcomes import (
    Thresholds,
    TrialRecord,
    best_value,
    classify,
    final_value,
    is_hopeless,
    summary_text,
    trials_table,
)
from dcgan_ray.study.report import write_report

METRIC = "digit_fd"
LR, BETA1 = "train.lr_d", "train.beta1"


def sample_png(seed: int) -> bytes:
    """A 256x256 PNG like the trainer's 8x8 grid of 32 px tiles."""
    tiles = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(tiles.repeat(32, axis=0).repeat(32, axis=1), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def epoch(
    n: int,
    fd: float,
    *,
    loss_d: float = 0.6,
    loss_g: float = 2.0,
    d_real: float = 0.7,
    d_fake: float = 0.3,
    tv: float = 0.1,
) -> dict[str, float]:
    finite = float(math.isfinite(loss_d) and math.isfinite(loss_g))
    return {
        "epoch": n,
        "loss_d": loss_d,
        "loss_g": loss_g,
        "d_real": d_real,
        "d_fake": d_fake,
        "finite": finite,
        "digit_fd": fd,
        "class_hist_tv": tv,
        "digit_is": 3.0 + n,
        "classifier_accuracy": 0.953,
    }


def healthy(fds: tuple[float, float, float]) -> list[dict[str, float]]:
    return [epoch(n, fd) for n, fd in enumerate(fds)]


def record(
    trial_id: str,
    lr: float,
    beta1: float,
    seed: int,
    history: list[dict[str, float]],
    state: str = "TERMINATED",
    **kwargs,
) -> TrialRecord:
    return TrialRecord(
        trial_id,
        {LR: lr, BETA1: beta1},
        seed,
        history,
        state,
        kwargs.pop("stopped_early", False),
        kwargs.pop("sample_png", sample_png(len(trial_id) + seed)),
        **kwargs,
    )


DIVERGED = [
    epoch(0, 90.0),
    epoch(1, 70.0, loss_d=5.0, loss_g=40.0),
    epoch(2, math.nan, loss_d=math.nan, loss_g=math.inf),
]
D_WON = [
    epoch(0, 90.0),
    epoch(1, 65.0, d_real=0.999, d_fake=0.001, loss_d=0.002, loss_g=8.0),
    epoch(2, 60.0, d_real=0.999, d_fake=0.001, loss_d=0.001, loss_g=9.0),
]
COLLAPSED = [epoch(0, 90.0), epoch(1, 45.0, tv=0.9), epoch(2, 40.0, tv=0.9)]


@pytest.fixture
def records() -> list[TrialRecord]:
    """2 configs x 2 seeds that converge (t002, seed 7, is best), then one of each failure."""
    return [
        record("t000", 1e-4, 0.5, 7, healthy((80.0, 30.0, 20.0))),
        record("t001", 1e-4, 0.5, 8, healthy((80.0, 31.0, 22.0))),
        record("t002", 1e-3, 0.9, 7, healthy((80.0, 25.0, 15.0))),
        record("t003", 1e-3, 0.9, 8, healthy((80.0, 24.0, 17.0)), stopped_early=True),
        record("t004", 1e-2, 0.9, 7, DIVERGED, state="ERROR", error="FloatingPointError: loss is nan"),
        record("t005", 1e-2, 0.5, 7, D_WON, stopped_early=True),
        record("t006", 1e-3, 0.5, 7, COLLAPSED),
    ]


@pytest.fixture
def base_config() -> dict:
    data = JobConfig(name="study").to_dict()
    data["eval"]["metric"] = METRIC
    data["tune"] = {"num_samples": 2}
    return data


def test_classify_statuses_and_reasons():
    assert classify(healthy((80.0, 30.0, 20.0)))[0] == "converged"
    status, reason = classify(DIVERGED)
    assert status == "diverged" and "epoch 2" in reason and "nan" in reason
    status, reason = classify(D_WON)
    assert (status, reason) == ("d_won", "D(G(z)) 0.001, D(x) 0.999 over the last 2 epochs")
    status, reason = classify(COLLAPSED)
    assert status == "mode_collapse" and "0.9" in reason
    assert classify([])[0] == "no_data"
    assert classify([epoch(0, 90.0)])[0] == "no_data"  # nothing trained yet


def test_classify_precedence_and_thresholds():
    # non-finite beats D winning, D winning beats a collapsed class histogram
    both = D_WON + [epoch(3, 60.0, d_real=0.999, d_fake=0.001, loss_d=math.nan)]
    assert classify(both)[0] == "diverged"
    flagged = [epoch(0, 90.0), epoch(1, 50.0, loss_d=0.4, loss_g=1.0)]
    flagged[1]["finite"] = 0.0
    assert classify(flagged)[0] == "diverged"
    won_and_collapsed = [dict(e, class_hist_tv=0.95) for e in D_WON]
    assert classify(won_and_collapsed)[0] == "d_won"
    # one dominated epoch is enough while the history is shorter than `patience`
    assert classify(D_WON[:2])[0] == "d_won"
    # D dominating once, then G recovering, is not a win
    recovered = D_WON[:2] + [epoch(2, 50.0)]
    assert classify(recovered)[0] == "converged"
    assert classify(COLLAPSED, Thresholds(collapse_tv=0.95))[0] == "converged"
    assert classify(D_WON, Thresholds(d_won_d_fake=0.0005))[0] == "converged"


def test_is_hopeless():
    assert is_hopeless(DIVERGED) and is_hopeless(D_WON)
    assert not is_hopeless(COLLAPSED) and not is_hopeless(healthy((80.0, 30.0, 20.0))) and not is_hopeless([])


def test_best_and_final_values_skip_epoch_zero_and_nan():
    assert best_value(healthy((10.0, 30.0, 20.0)), METRIC) == 20.0  # epoch 0's 10 is before training
    assert best_value(DIVERGED, METRIC) == 70.0
    assert math.isnan(final_value(DIVERGED, METRIC))
    assert final_value(D_WON, "d_fake") == 0.001
    assert best_value([epoch(0, 10.0)], METRIC) is None and final_value([], METRIC) is None


def test_trials_table_rows(records):
    rows = trials_table(records, METRIC)
    assert [r["trial_id"] for r in rows] == [f"t00{i}" for i in range(7)]
    assert [r["status"] for r in rows] == ["converged"] * 4 + ["diverged", "d_won", "mode_collapse"]
    t003 = rows[3]
    assert (t003[LR], t003[BETA1], t003["seed"], t003["epochs"], t003["stopped_early"]) == (1e-3, 0.9, 8, 2, True)
    assert (t003["best_digit_fd"], t003["final_digit_fd"], t003["final_loss_d"]) == (17.0, 17.0, 0.6)
    assert rows[4]["error"].startswith("FloatingPointError")


def test_write_report_files(records, base_config, tmp_path):
    out = tmp_path / "report"
    paths = write_report(records, out, METRIC, base_config, "lr-study")
    names = {p.name for p in paths}
    assert names == {
        "trials.csv",
        "metric_vs_train_lr_d.png",
        "metric_vs_train_beta1.png",
        "heatmap_train_lr_d_x_train_beta1.png",
        "learning_curves.png",
        "mosaic.png",
        "best.yaml",
        "index.html",
    }
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)
    assert names == {p.name for p in out.iterdir()}

    for p in paths:
        if p.suffix == ".png":
            with Image.open(p) as image:
                image.load()
                assert 200 <= image.width <= 4000 and 50 <= image.height <= 4000, (p.name, image.size)
    with Image.open(out / "mosaic.png") as mosaic:
        assert mosaic.width >= 3 * 256 and mosaic.height >= 3 * 256  # 7 tiles -> 3 x 3

    with (out / "trials.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial_id"] for r in rows] == [r.trial_id for r in records]
    assert all(r["best_digit_fd"] and r["final_digit_fd"] and r["status"] for r in rows)
    assert {LR, BETA1, "final_loss_d", "final_d_fake", "reason", "error"} <= set(rows[0])
    assert float(rows[2]["best_digit_fd"]) == 15.0
    # What each digit_fd is worth stands beside it.
    assert list(rows[0])[list(rows[0]).index("best_digit_fd") + 1] == "classifier_accuracy"
    assert all(float(r["classifier_accuracy"]) == 0.953 for r in rows)

    text = (out / "best.yaml").read_text()
    assert text.startswith("#") and "t002" in text.splitlines()[0] + text.splitlines()[1]
    data = yaml.safe_load(text)
    assert "tune" not in data
    cfg = config_from_dict(data, "best.yaml")
    assert (cfg.name, cfg.train.lr_d, cfg.train.beta1, cfg.train.seed) == ("lr-study-best", 1e-3, 0.9, 7)
    assert cfg.train.epochs == JobConfig().train.epochs  # everything not searched comes from the base

    page = (out / "index.html").read_text()
    referenced = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert referenced == names - {"index.html"}
    assert not any("/" in ref for ref in referenced)  # relative: works from the bucket and after a download
    for status in ("converged: 4", "diverged: 1", "d_won: 1", "mode_collapse: 1"):
        assert status in page
    assert "lr-study" in page and "lower is better" in page
    assert "digit classifier of test accuracy 0.953" in page and "<th>classifier accuracy</th>" in page


def test_summary_text(records):
    text = summary_text(records, METRIC)
    for count in ("converged: 4", "diverged: 1", "d_won: 1", "mode_collapse: 1"):
        assert count in text
    header, *lines = text.splitlines()
    assert header.split() == ["trial", LR, BETA1, "seed", "status", "best", METRIC, "classifier", "accuracy"]
    assert lines[2].split() == ["t002", "0.001", "0.9", "7", "converged", "15", "0.953"]
    assert "best configuration: t002" in text


def test_single_trial_one_param(base_config, tmp_path):
    # Tune samples numpy scalars; best.yaml must still be plain YAML
    only = TrialRecord(
        "t000", {"train.lr": np.float64(2e-4)}, 3, healthy((80.0, 30.0, 20.0)), "TERMINATED", False, sample_png(0)
    )
    paths = write_report([only], tmp_path, METRIC, base_config, "one")
    names = {p.name for p in paths}
    assert names == {
        "trials.csv",
        "metric_vs_train_lr.png",
        "learning_curves.png",
        "mosaic.png",
        "best.yaml",
        "index.html",
    }
    cfg = config_from_dict(yaml.safe_load((tmp_path / "best.yaml").read_text()))
    assert (cfg.train.lr, cfg.train.seed) == (2e-4, 3)
    assert "converged: 1" in summary_text([only], METRIC)


def test_all_trials_diverged(records, base_config, tmp_path):
    broken = [record(f"t00{i}", 1e-2 * (i + 1), 0.5 + 0.1 * i, i, DIVERGED) for i in range(3)]
    paths = write_report(broken, tmp_path, METRIC, base_config, "broken")
    assert {p.name for p in paths} >= {"heatmap_train_lr_d_x_train_beta1.png", "best.yaml", "index.html"}
    text = (tmp_path / "best.yaml").read_text()
    assert "no trial converged" in text and "t000" in text
    cfg = config_from_dict(yaml.safe_load(text))
    assert (cfg.train.lr_d, cfg.train.seed) == (1e-2, 0)  # all tie at 70: the first
    assert "diverged: 3" in summary_text(broken, METRIC)
    assert is_hopeless(broken[0].history)


def test_robust_to_strings_nan_missing_data_and_errors(base_config, tmp_path):
    nan_metric = [epoch(0, math.nan), epoch(1, math.nan), epoch(2, math.nan)]
    no_eval = [
        {k: v for k, v in e.items() if k not in ("digit_fd", "class_hist_tv", "digit_is")}
        for e in healthy((0.0, 0.0, 0.0))
    ]
    trials = [
        TrialRecord("a", {"data.split": "train", "train.lr": 1e-4}, 0, nan_metric, "TERMINATED", False, None),
        TrialRecord("b", {"data.split": "extra", "train.lr": 1e-4}, 0, no_eval, "TERMINATED", True, b"not a png"),
        TrialRecord(
            "c",
            {"data.split": "extra", "train.lr": 2e-4},
            0,
            [],
            "ERROR",
            False,
            None,
            error="RuntimeError: worker died\ntraceback ...",
        ),
    ]
    rows = trials_table(trials, METRIC)
    assert [r["status"] for r in rows] == ["converged", "converged", "error"]
    assert [r["best_digit_fd"] for r in rows] == [None, None, None]
    assert "worker died" in rows[2]["reason"]
    paths = write_report(trials, tmp_path, METRIC, base_config, "robust")
    assert "heatmap_data_split_x_train_lr.png" in {p.name for p in paths}
    with Image.open(tmp_path / "mosaic.png") as mosaic:
        assert mosaic.size[0] > 0  # no readable sample: a placeholder image, not a crash
    text = (tmp_path / "best.yaml").read_text()
    assert "base configuration unchanged" in text
    assert config_from_dict(yaml.safe_load(text)).name == "robust-best"


def test_exploding_but_finite_losses_count_as_diverged():
    history = [{"epoch": 1, "loss_d": 15277.7, "loss_g": 52925.7, "d_real": 0.9, "d_fake": 0.09, "finite": 1.0}]
    status, reason = classify(history)
    assert status == "diverged" and "exploding" in reason
    assert classify([{**history[0], "loss_d": 1.2, "loss_g": 3.4}])[0] == "converged"
