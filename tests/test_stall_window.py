"""The stall watch's decision at the users' defaults, with a fake clock: an outage is not a stall, and a
stall that ends the run says so in its own line (dcgan_ray.train.stall; issues 32 and 33)."""

from __future__ import annotations

from typing import Any

import pytest
import ray.train

from dcgan_ray.config import JobConfig
from dcgan_ray.errors import DcganError, Stalled, StorageUnreachable
from dcgan_ray.train import driver
from dcgan_ray.train.stall import (
    AFTER_OUTAGE_S,
    MIN_WINDOW_S,
    OUTAGE_SLACK_S,
    StallWatch,
    stall_error,
    stalled_ranks,
    window_s,
)

BUDGET = JobConfig().storage.retry_budget_s  # 300 s
NOW = 1_000_000.0  # the board's clock (time.time()), faked


def beat(idle_s: float, outage_s: float | None = None, ago: float = 1.0, step_s: float | None = 0.01) -> dict:
    """A rank's last beat as the board holds it, received `ago` seconds before NOW."""
    return {"idle_s": idle_s, "outage_s": outage_s, "step_s": step_s, "received": NOW - ago}


def default_window(ranks: dict[int, dict[str, Any]]) -> float:
    return window_s(ranks, JobConfig().scaling.stall_timeout_s, BUDGET)


def test_the_default_window_outlasts_the_retry_budget():
    ranks = {0: beat(0.5), 1: beat(0.5)}  # a 0.01 s step: 100 steps are far below the floors
    assert JobConfig().scaling.stall_timeout_s is None and BUDGET == 300
    assert default_window(ranks) == max(MIN_WINDOW_S, BUDGET + OUTAGE_SLACK_S) == 360
    assert window_s(ranks, None, 30) == MIN_WINDOW_S  # a short budget leaves the 3 minutes
    assert window_s({0: beat(0.5, step_s=5.0)}, None, BUDGET) == 500  # 100 slow steps
    assert window_s(ranks, 8, BUDGET) == 8  # the user's window stays theirs


def test_a_rank_waiting_for_one_that_retries_storage_is_not_stalled():
    # Rank 0 has retried storage for 200 s (and beats); rank 1 has waited 181 s for it in an all-reduce.
    ranks = {0: beat(1.0, outage_s=199.0), 1: beat(180.0)}
    assert stalled_ranks(ranks, default_window(ranks), NOW, BUDGET) == {}
    assert stalled_ranks(ranks, MIN_WINDOW_S, NOW, BUDGET) == {}  # the outage rule alone, at a 180 s window
    assert stalled_ranks(ranks, 8, NOW, BUDGET) == {}  # and under a user's short window


def test_a_rank_idle_past_the_window_with_no_outage_is_stalled():
    ranks = {0: beat(0.5), 1: beat(358.0)}
    assert stalled_ranks(ranks, default_window(ranks), NOW, BUDGET) == {}  # idle 359 s: within the window
    ranks[1] = beat(360.0)
    assert stalled_ranks(ranks, default_window(ranks), NOW, BUDGET) == {1: 361.0}
    ranks[1] = beat(180.0)
    assert stalled_ranks(ranks, MIN_WINDOW_S, NOW, BUDGET) == {1: 181.0}


def test_an_outage_past_the_budget_excuses_no_more():
    # Rank 0's outage passed the budget and its slack: its own error should have ended the attempt.
    outage = BUDGET + OUTAGE_SLACK_S + 1
    ranks = {0: beat(1.0, outage_s=outage - 1), 1: beat(358.0)}
    window = default_window(ranks)
    assert stalled_ranks(ranks, window, NOW, BUDGET) == {}  # idle 359 s: within the window
    ranks[1] = beat(360.0)
    assert stalled_ranks(ranks, window, NOW, BUDGET) == {1: 361.0}
    assert stalled_ranks(ranks, 8, NOW, BUDGET) == {1: 361.0}


def test_an_outage_ages_on_the_boards_clock():
    """A rank stopped while it retried beats no more: its outage grows from its last beat, and ends its excuse."""
    excused = {0: beat(1.0, outage_s=250.0, ago=BUDGET + OUTAGE_SLACK_S - 250.0), 1: beat(400.0)}
    assert stalled_ranks(excused, MIN_WINDOW_S, NOW, BUDGET) == {}
    spent = {0: beat(1.0, outage_s=250.0, ago=BUDGET + OUTAGE_SLACK_S - 249.0), 1: beat(400.0)}
    assert sorted(stalled_ranks(spent, MIN_WINDOW_S, NOW, BUDGET)) == [1]


STALL = {
    "rank": 1,
    "node": "3f2a9c1b7d4e5f60718293a4b5c6d7e8",
    "pid": 4242,
    "step": 1200,
    "idle_s": 361.4,
    "window_s": 360.0,
    "stopped": False,
    "stacks": "s3://dcgan-ray/dcgan-ray/runs/svhn/stalls/20261207T101500Z/",
}


def test_a_stall_that_ends_the_run_says_so_in_one_line():
    cfg = JobConfig()
    cfg.name, cfg.scaling.max_failures = "svhn", 0
    error = stall_error(STALL, cfg)
    line = str(error)
    assert isinstance(error, Stalled) and isinstance(error, DcganError) and "\n" not in line
    assert line.startswith(
        "training of svhn stopped: rank 1 on node 3f2a9c1b7d4e (pid 4242) made no progress for 361 s, at step "
        "1200 (its process answers, its training does not move; the window: 360 s, scaling.stall_timeout_s)"
    ), line
    assert "scaling.max_failures = 0 allowed no further restart" in line
    assert f"the ranks' Python stacks are in {STALL['stacks']}." in line
    assert "raise scaling.stall_timeout_s" in line and "raise scaling.max_failures" in line
    assert line.endswith("Artifacts so far: s3://dcgan-ray/dcgan-ray/runs/svhn; resubmit to resume"), line
    stopped = str(stall_error({**STALL, "stopped": True}, cfg))
    assert "(its process does not answer; the window: 360 s" in stopped


class FakeWatch:
    def __init__(self, ended: dict | None):
        self.ended = ended

    def stop(self) -> None:
        pass


def fit_once_failing_with(monkeypatch, failure: BaseException, ended: dict | None) -> BaseException:
    """driver._fit_once with Ray's trainer failing as given and a watch that recorded `ended`, no cluster."""

    class Board:
        @staticmethod
        def options(**_):
            return Board

        @staticmethod
        def remote():
            return "board"

    class Trainer:
        def fit(self):
            raise failure

    class Context:
        def get_node_id(self):
            return "0" * 56

    monkeypatch.setattr(driver.ray, "get_runtime_context", Context)
    monkeypatch.setattr(driver.ray, "kill", lambda actor: None)
    monkeypatch.setattr(driver, "NodeAffinitySchedulingStrategy", lambda node, soft: None)
    monkeypatch.setattr(driver, "ProgressBoard", Board)
    monkeypatch.setattr(driver, "StallWatch", lambda cfg, board: FakeWatch(ended))
    monkeypatch.setattr(driver, "make_trainer", lambda *args, **kwargs: Trainer())
    with pytest.raises(ray.train.TrainingFailedError) as raised:
        driver._fit_once(JobConfig(), None)
    return raised.value


def killed_by_the_watch() -> ray.train.WorkerGroupError:
    return ray.train.WorkerGroupError("actor killed", {1: RuntimeError("The actor is dead because of `ray.kill`")})


def test_the_driver_names_the_stall_behind_killed_workers(monkeypatch):
    error = driver.our_error(fit_once_failing_with(monkeypatch, killed_by_the_watch(), STALL))
    assert isinstance(error, Stalled) and "rank 1 on node 3f2a9c1b7d4e (pid 4242)" in str(error)
    # A worker's own error keeps its line, and killed workers with no stall stay Ray's failure.
    own = ray.train.WorkerGroupError("outage", {0: StorageUnreachable("the S3 endpoint did not answer")})
    assert isinstance(driver.our_error(fit_once_failing_with(monkeypatch, own, STALL)), StorageUnreachable)
    assert driver.our_error(fit_once_failing_with(monkeypatch, killed_by_the_watch(), None)) is None


class Probe:
    """The driver's look at the bucket: down or answering, as the test says."""

    def __init__(self) -> None:
        self.down = False

    def check(self) -> None:
        if self.down:
            raise StorageUnreachable("the S3 endpoint does not answer")


def a_watch(probe: Probe) -> StallWatch:
    watch = StallWatch.__new__(StallWatch)  # (its thread and Ray's board are not what is tested here)
    watch._outage, watch._probe = None, probe
    return watch


def test_an_outage_only_ray_trains_own_writes_wait_on_excuses_idle_ranks_until_their_retries_can_come():
    """Ray Train's controller writes its run state through pyarrow at each report, and every rank waits for it:
    no rank's beat sees that outage. The driver's own look does, and the excuse lasts past the outage's end
    for pyarrow's longest wait between tries; past the budget it excuses nothing."""
    probe = Probe()
    watch = a_watch(probe)
    assert not watch._outage_excuses(NOW, BUDGET)  # idle ranks, the bucket answers: a stall
    probe.down = True
    assert watch._outage_excuses(NOW, BUDGET) and watch._outage_excuses(NOW + 10, BUDGET)  # (it looks every 2 s)
    probe.down = False  # back after NOW + 10; pyarrow's next try may be 20 s away
    assert watch._outage_excuses(NOW + 10 + AFTER_OUTAGE_S - 1, BUDGET)
    assert not watch._outage_excuses(NOW + 10 + AFTER_OUTAGE_S + 1, BUDGET)
    probe.down = True  # down for good: excused for the budget and its slack, then not
    assert watch._outage_excuses(NOW + 100, BUDGET)
    assert watch._outage_excuses(NOW + 100 + BUDGET + OUTAGE_SLACK_S - 1, BUDGET)
    assert not watch._outage_excuses(NOW + 100 + BUDGET + OUTAGE_SLACK_S + 1, BUDGET)
