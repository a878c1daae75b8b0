"""The study report's refresh runs beside Tune's event loop, coalesces, and never fails the study
(StudyReport against the real SeaweedFS, with stand-ins for Tune's trial objects: no Ray cluster)."""

import threading
import time
from types import SimpleNamespace

import pytest

import dcgan_ray.study.tuner as tuner
from dcgan_ray.study.tuner import StudyReport


def fake_trials(n: int) -> list:
    return [
        SimpleNamespace(
            trial_id=f"t{i}", config={"trial": {"params": {"train__lr": 0.001}, "seed": i}}, status="TERMINATED"
        )
        for i in range(n)
    ]


@pytest.fixture
def report(cfg):
    return StudyReport(cfg.to_dict())


def test_refresh_returns_at_once_and_coalesces(report, monkeypatch):
    gate = threading.Event()
    written = []

    def slow_write_report(records, out_dir, *args):
        gate.wait(10)  # a report that takes as long as the test wants
        written.append(len(records))
        return []

    monkeypatch.setattr(tuner, "write_report", slow_write_report)
    start = time.monotonic()
    for n in range(1, 6):
        report.on_trial_complete(n, fake_trials(n), None)
    assert time.monotonic() - start < 0.5  # Tune's loop never waited for a report
    gate.set()
    report.close()
    # The first refresh saw some trials; the four asked for while it ran became one, of all 5 trials.
    assert len(written) <= 2 and written[-1] == 5
    assert report.refreshes == len(written)


def test_a_failing_report_never_fails_the_study(report, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("plotting bug")

    monkeypatch.setattr(tuner, "write_report", broken)
    report.on_trial_error(1, fake_trials(2), None)
    report.close()
    assert report.refreshes == 0
    assert any(
        "could not be written (the study goes on): RuntimeError: plotting bug" in r.getMessage() for r in caplog.records
    )
    assert report.publish() == (None, report.publish()[1])  # the final one does not raise either


def test_tune_restores_the_live_report(report):
    import pickle

    assert pickle.loads(pickle.dumps(report)) is report
