"""The lease in the bucket (dcgan_ray.storage.lease) against the real SeaweedFS: one holder per folder
whoever races for it, takeover only after the holder's ttl (or at once when its process is gone), and a
stale holder's commits refused by the server. No Ray: the drivers here are threads and processes of the
test, each saying it runs on another cluster, as drivers of two RayJobs would."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dcgan_ray.errors import DatasetMissing, LeaseHeld, LeaseLost, StorageError
from dcgan_ray.storage import fence
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.lease_log import LeaseLog, LeaseLogError
from dcgan_ray.storage.lease_status import check_conditional_writes, ownership, release_folder
from dcgan_ray.storage.s3 import Store
from helpers import make_config
from standin_s3 import NoConditionalWritesServer


def holder(cluster: str) -> dict:
    return {"cluster": cluster, "submission_id": f"dcgan-train-x-{cluster}", "ray_job_id": "01000000"}


def take(store: Store, folder: str, cluster: str, ttl_s: float = 60, wait: bool = False) -> Lease:
    return Lease.acquire(store, folder, store.uri(folder), "run", holder(cluster), ttl_s, wait)


def test_twenty_races_for_one_lease_have_one_winner_each(store, prefix):
    rounds = 20
    start = threading.Barrier(2 * rounds)
    outcomes: dict[int, list[str]] = {i: [] for i in range(rounds)}

    def race(i: int, cluster: str) -> None:
        start.wait()
        try:
            take(store, f"{prefix}/runs/r{i}", cluster)
            outcomes[i].append(f"won on {cluster}")
        except LeaseHeld as e:
            assert "\n" not in str(e)
            outcomes[i].append("refused: " + str(e))

    threads = [threading.Thread(target=race, args=(i, c)) for i in range(rounds) for c in ("A:6379", "B:6379")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, outcome in outcomes.items():
        won = [o for o in outcome if o.startswith("won")]
        refused = [o for o in outcome if o.startswith("refused")]
        assert len(won) == 1 and len(refused) == 1, outcome
        winner = won[0].removeprefix("won on ")
        # The refusal names the holder: its cluster and submission, when it took the lease, what to do.
        assert f"submission dcgan-train-x-{winner} on cluster {winner}" in refused[0], refused[0]
        assert "--wait-for-lease" in refused[0] and "since 20" in refused[0]
        (acquire,) = LeaseLog(store, f"{prefix}/runs/r{i}").entries()
        assert acquire["holder"]["cluster"] == winner and acquire["generation"] == 1


def test_a_lease_just_taken_by_another_thread_of_this_process_is_held(store, prefix, monkeypatch):
    """Two drivers in one process (the races above are threads): the second reads the first's acquire entry
    the moment it is written. It must see a live holder, not a leftover of this process to take over (a
    fresh-clone CI run saw both threads of one round win)."""
    folder = f"{prefix}/runs/r"
    append, seen = LeaseLog.append, []

    def append_then_race(log, entry):
        created = append(log, entry)
        if created and not seen:  # the first acquire is in the bucket: the other thread looks now
            seen.append(entry)
            with pytest.raises(LeaseHeld, match="held by submission dcgan-train-x-A on cluster A"):
                take(store, folder, "B")
        return created

    monkeypatch.setattr(LeaseLog, "append", append_then_race)
    first = take(store, folder, "A")
    assert seen and ownership(store, folder).state == "held"
    assert [e["holder"]["cluster"] for e in LeaseLog(store, folder).entries()] == ["A"]
    first.release()


def test_a_released_lease_is_taken_at_once_an_unrenewed_one_after_its_ttl(store, prefix, caplog):
    folder = f"{prefix}/runs/r"
    first = take(store, folder, "A", ttl_s=10)
    assert ownership(store, folder).state == "held"
    with pytest.raises(LeaseHeld, match=r"renewed \d+ s ago, expires after 10 s without renewal"):
        take(store, folder, "B", ttl_s=10)
    first.release()
    assert ownership(store, folder).state == "released"
    second = take(store, folder, "B", ttl_s=10)  # at once
    assert second.generation == 3  # 1: A's acquire, 2: its release, 3: B's acquire
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "dcgan_ray"):
        third = take(store, folder, "C", ttl_s=10, wait=True)  # B never renews: C waits out its ttl
    waited = time.monotonic() - started
    assert waited >= 10 - 2 * fence.ROUNDING_S, waited  # (the server's ages are whole seconds)
    assert ownership(store, folder).holder["generation"] == third.generation == 4
    assert any("took over from submission dcgan-train-x-B on cluster B" in r.getMessage() for r in caplog.records)
    assert LeaseLog(store, folder).entries(3)[0]["took_over_from"] == 3


def test_a_renewed_lease_is_not_taken_over(store, prefix):
    folder = f"{prefix}/runs/r"
    lease = take(store, folder, "A", ttl_s=10)
    lost = []
    lease.keep_renewed(lost.append)  # every 2.5 s
    time.sleep(12)
    with pytest.raises(LeaseHeld):
        take(store, folder, "B", ttl_s=10)
    assert ownership(store, folder).state == "held" and lost == [] and lease.left_s() > 0
    lease.release()


def test_a_holder_and_its_workers_commit_in_turn(store, prefix):
    """The driver and rank 0 of one holder both append: a number one of them took sends the other to the next."""
    folder = f"{prefix}/runs/r"
    driver = take(store, folder, "A")
    rank0 = Lease.join(store, folder, store.uri(folder), "run", driver.generation)
    seqs = [rank0.commit({"epoch": 1, "checkpoint": f"{folder}/c1", "manifest_sha256": "0" * 64})]
    seqs.append(driver.commit({"note": "from the driver"}))  # the driver has not read rank 0's: it takes the next
    seqs.append(rank0.commit({"epoch": 2, "checkpoint": f"{folder}/c2", "manifest_sha256": "1" * 64}))
    assert seqs == [2, 3, 4]
    rank0.check()
    driver.check()  # its own generation's commits never count as a takeover
    state = LeaseLog(store, folder).entries()
    assert [e["kind"] for e in state] == ["acquire", "commit", "commit", "commit"]
    assert rank0.state.durable_epoch() == 2


def test_a_stale_writer_is_refused_by_the_server(store, prefix, monkeypatch):
    """A holder that went unrenewed past its ttl (paused) and was taken over: its next commit goes to the
    number the takeover took, the server refuses the create, and the entry found there says who took it."""
    folder = f"{prefix}/runs/r"
    stale = take(store, folder, "A", ttl_s=10)
    rank0 = Lease.join(store, folder, store.uri(folder), "run", stale.generation)
    successor = take(store, folder, "B", ttl_s=60, wait=True)  # A never renews: B takes over after 10 s
    created = []
    real = rank0.log.store.create_bytes

    def create_bytes(key, data, content_type="application/octet-stream"):
        created.append((key, real(key, data, content_type)))
        return created[-1][1]

    monkeypatch.setattr(rank0.log.store, "create_bytes", create_bytes)
    before = {e["seq"]: e for e in LeaseLog(store, folder).entries()}
    with pytest.raises(LeaseLost, match=r"no longer holds it: it was taken over by submission dcgan-train-x-B"):
        rank0.commit({"epoch": 3, "checkpoint": f"{folder}/c3", "manifest_sha256": "2" * 64})
    assert created == [(LeaseLog(store, folder).key(successor.generation), False)]  # the server said no
    with pytest.raises(LeaseLost):
        rank0.check()
    with pytest.raises(LeaseLost):
        stale.renew()
    assert {e["seq"]: e for e in LeaseLog(store, folder).entries()} == before  # nothing of A's got in
    successor.commit({"epoch": 3, "checkpoint": f"{folder}/c3b", "manifest_sha256": "3" * 64})
    with pytest.raises(LeaseLost):
        Lease.join(store, folder, store.uri(folder), "run", stale.generation)


HOLD = """
import sys, time
from dcgan_ray.config import StorageSection
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.s3 import Store
store = Store(StorageSection(endpoint=sys.argv[1], bucket=sys.argv[2]))
Lease.acquire(store, sys.argv[3], "s3://x", "run", {"cluster": "A"}, 600)
print("held", flush=True)
time.sleep(600)
"""


def test_a_holder_whose_process_is_gone_is_taken_over_at_once(store, prefix, cfg):
    folder = f"{prefix}/runs/r"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, cfg.storage.endpoint, cfg.storage.bucket, folder],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=rf"pid {proc.pid};"):
            take(store, folder, "B")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    started = time.monotonic()
    lease = take(store, folder, "B")  # its ttl is 600 s: taken because its pid is gone from this machine
    assert time.monotonic() - started < 10 and lease.generation == 2
    assert ownership(store, folder).holder["holder"]["cluster"] == "B"


def test_stop_releases_the_lease_of_a_holder_that_is_gone(store, prefix):
    folder = f"{prefix}/runs/r"
    lease = take(store, folder, "A")
    assert release_folder(store, folder, "stopped by dcgan-ray stop")
    assert not release_folder(store, folder, "again")  # nobody holds it now
    with pytest.raises(LeaseLost, match=r"released at .* \(stopped by dcgan-ray stop\)"):
        lease.check()
    take(store, folder, "B")


def test_a_planted_log_entry_is_one_clear_line(store, prefix):
    folder = f"{prefix}/runs/r"
    take(store, folder, "A").release()
    store.put_bytes(f"{folder}/lease/log/00000003.json", json.dumps({"seq": 3, "kind": "steal"}).encode())
    with pytest.raises(LeaseLogError, match=r"00000003.json is not a lease log entry this code wrote \(kind") as e:
        take(store, folder, "B")
    assert "\n" not in str(e.value)
    store.put_bytes(f"{folder}/lease/log/00000003.json", b"\x00not json")
    with pytest.raises(LeaseLogError, match=r"it is not JSON"):
        ownership(store, folder)


def test_pre_flight_refuses_an_endpoint_that_ignores_conditional_writes(store, prefix, tmp_path):
    check_conditional_writes(store, f"{prefix}/probes")  # the real server honours them
    assert store.list_keys(f"{prefix}/probes/") == []  # and the probe leaves nothing behind
    with NoConditionalWritesServer("dcgan-test") as endpoint:
        cfg = make_config(endpoint, prefix)
        from dcgan_ray.train.driver import preflight

        with pytest.raises(StorageError) as e:
            preflight(cfg)
        message = str(e.value)
        assert f"the S3 endpoint {endpoint} ignores conditional writes" in message
        assert "storage.conditional_writes: false" in message and "\n" not in message
        cfg.storage.conditional_writes = False  # the setting that accepts protection within one cluster only
        with pytest.raises(DatasetMissing):
            preflight(cfg)  # past the probe: it stops at the dataset this empty server does not have
