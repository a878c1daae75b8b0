"""The holder's clock (dcgan_ray.storage.fence, dcgan_ray.storage.lease) at the defaults, with a fake clock:
the margin and the attempt bound, when a write is admitted, when the holder renews first, what a worker's
view believes, and the last look before a request leaves. No S3 server, no Ray."""

from __future__ import annotations

import socket
import threading

import pytest

from dcgan_ray.config import StorageSection
from dcgan_ray.errors import LeaseLost, StorageUnreachable
from dcgan_ray.storage import fence
from dcgan_ray.storage import lease as lease_module
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.lease_log import LeaseLog, LeaseState
from dcgan_ray.storage.s3 import Store

TTL_S = 60.0  # storage.lease_ttl_s's default


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(lease_module, "time", fake)
    return fake


def a_lease(holding: bool, ttl_s: float = TTL_S) -> Lease:
    acquire = {"seq": 1, "kind": "acquire", "generation": 1, "holder": {"ttl_s": ttl_s}}
    store = Store(StorageSection(endpoint="http://127.0.0.1:1", bucket="b"))
    return Lease(LeaseLog(store, "p/runs/r"), "s3://b/p/runs/r", "run", 1, LeaseState.of([acquire]), holding)


def test_the_margin_and_the_attempt_at_the_default_ttl():
    assert fence.margin_s(TTL_S) == pytest.approx(1.6)  # 1 s of the server's rounding, 1% drift over 60 s
    assert fence.attempt_s(TTL_S) == pytest.approx(27.4)
    for ttl in (10, 60, 600, 3600):  # a renewal every quarter ttl always leaves room for one attempt
        assert 0.75 * ttl - fence.margin_s(ttl) - fence.ROUNDING_S > fence.attempt_s(ttl) > 0


def test_the_holder_writes_until_an_attempt_would_end_past_its_deadline_then_renews_first(clock, monkeypatch):
    lease = a_lease(holding=True)
    renewals = []

    def renew():  # what a renewal that landed does: the deadline moves to its sending + ttl - margin
        renewals.append(clock.now)
        lease._until = clock.now + TTL_S - fence.margin_s(TTL_S)

    monkeypatch.setattr(lease, "renew", renew)
    renew()
    renewals.clear()
    clock.now += 30.0  # 28.4 s left: an attempt of 27.4 s ends in time
    lease.admit()
    assert renewals == []
    clock.now += 2.0  # 26.4 s left: it would not
    lease.admit()
    assert renewals == [clock.now] and lease.left_s() == pytest.approx(58.4)


def test_past_its_deadline_the_holder_waits_for_its_renewal_and_stops_on_an_outage_past_the_budget(clock, monkeypatch):
    lease = a_lease(holding=True)
    lease._until = clock.now - 1  # in jeopardy
    tries = []

    def renew():
        tries.append(clock.now)
        if len(tries) < 3:
            return  # the log could not be reached this time: no renewal
        raise StorageUnreachable("the S3 endpoint did not answer for 300 s")

    monkeypatch.setattr(lease, "renew", renew)
    with pytest.raises(StorageUnreachable):
        lease.admit()
    assert len(tries) == 3 and tries[1] > tries[0]  # it waited between tries, and never wrote


def test_a_holder_that_finds_a_successor_stops(clock, monkeypatch):
    lease = a_lease(holding=True)

    def renew():
        lease._lose({"kind": "acquire", "generation": 2, "holder": {"ttl_s": 60, "cluster": "B", "pid": 7}})

    monkeypatch.setattr(lease, "renew", renew)
    with pytest.raises(LeaseLost, match=r"no longer holds it: it was taken over by a driver \(pid 7\) on cluster B"):
        lease.admit()
    with pytest.raises(LeaseLost):  # and every later write too
        lease.admit()


def test_a_workers_view_believes_no_later_than_a_successor_could_take_over(clock, monkeypatch):
    lease = a_lease(holding=False)
    monkeypatch.setattr(lease, "check", lambda: None)  # no successor in the log
    monkeypatch.setattr(lease.log, "age_s", lambda state: 14.0)  # the holder renewed 14 s ago, by the server
    looked = clock.now
    lease.refresh()
    # A successor may take over once the age passes the ttl, read up to 1 s high: 60 - 14 - 1 s from the look,
    # and the view's own reading of the age may be 1 s low, less the drift.
    assert lease._until == pytest.approx(looked + TTL_S - 14.0 - 1.0 - fence.margin_s(TTL_S))
    lease.admit()  # 42.4 s left: room for an attempt


def test_the_innermost_fenced_folder_decides(monkeypatch):
    study, trial = a_lease(holding=True), a_lease(holding=True)
    trial.generation = 5
    with fence.fenced("b", "p/studies/s", study), fence.fenced("b", "p/studies/s/runs/t1", trial):
        assert fence.gate_for("b", "p/studies/s/state.json") is study
        assert fence.gate_for("b", "p/studies/s/runs/t1/run.json") is trial
        assert fence.generation_for("b", "p/studies/s/runs/t1/run.json") == 5
        assert fence.gate_for("b", "p/studies/s2/x") is None and fence.gate_for("other", "p/studies/s/x") is None
    assert fence.gate_for("b", "p/studies/s/state.json") is None


class PausedGate:
    """A gate that admits, and whose deadline then comes closer than an attempt before the request leaves (the
    process paused between the two), the first time only."""

    generation = 1
    attempt_s = 3.0

    def __init__(self) -> None:
        self.admitted = 0

    def left_s(self) -> float:
        return 1.0 if self.admitted == 1 else 100.0

    def admit(self) -> None:
        self.admitted += 1


def test_a_request_is_looked_at_once_more_just_before_it_leaves():
    """A process paused between the gate and the send: that request never connects, and the gate decides again.
    The endpoint counts connections and closes each at once (every later try fails there, until the budget)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    gate = PausedGate()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    store = Store(StorageSection(endpoint=endpoint, bucket="b", retry_budget_s=1.0))
    try:
        with fence.fenced("b", "p/runs/r", gate), pytest.raises(StorageUnreachable):
            store.put_bytes("p/runs/r/run.json", b"{}")
    finally:
        server.close()
    assert gate.admitted >= 2 and len(accepted) == gate.admitted - 1


def test_a_workers_view_whose_driver_never_renews_again_gives_up_after_the_retry_budget(clock, monkeypatch):
    """The bucket answers rank 0, but its driver is cut off for good and nobody takes over: rank 0's writes
    wait out the retry budget, then end in one line; they never land."""
    lease = a_lease(holding=False)
    monkeypatch.setattr(lease, "check", lambda: None)
    monkeypatch.setattr(lease.log, "age_s", lambda state: 61.0 + (clock.now - 1000.0))  # older every second
    with pytest.raises(StorageUnreachable, match=r"went unrenewed past its deadline for storage.retry_budget_s = 300"):
        lease.admit()
    assert clock.now - 1000.0 > 300.0


def test_a_lost_leases_gate_outlasts_its_block():
    """A thread still writing after the driver's block ended on a lost lease (a publisher, a clean-up) stays
    refused; a released lease's gate goes with its block."""
    lost, released = a_lease(holding=True), a_lease(holding=True)
    with pytest.raises(LeaseLost), fence.fenced("b", "p/runs/lost", lost):
        lost._lose({"kind": "acquire", "generation": 2, "holder": {"ttl_s": 60, "cluster": "B"}})
    with fence.fenced("b", "p/runs/done", released):
        pass
    assert fence.gate_for("b", "p/runs/lost/report/index.html") is lost
    assert fence.gate_for("b", "p/runs/done/run.json") is None
    with pytest.raises(LeaseLost):
        lost.admit()
