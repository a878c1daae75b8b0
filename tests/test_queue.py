"""Many jobs, one cluster: `dcgan-ray submit` queues jobs on the head's job slots (the session head has
one), `dcgan-ray jobs` shows them, and a run name is never trained by two drivers at once."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest

from dcgan_ray.cli import main as cli_main
from dcgan_ray.errors import ClusterError
from dcgan_ray.jobs import list_jobs, submit
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.lease_log import LeaseLog
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.runlock import GONE_HOLDER_WAIT_S, DriverLock
from helpers import SMALL_NETWORK_SETS, make_config, wait_until

pytestmark = pytest.mark.ray


def tiny_job(endpoint, prefix, name):
    """jobs/smoke.yaml's job, tiny; what `--set` must change for it to run against the test bucket."""
    overrides = [
        f"storage.endpoint={endpoint}",
        "storage.bucket=dcgan-test",
        f"storage.prefix={prefix}",
        f"name={name}",
        "data.max_images=64",
        "train.batch_size=16",
        "train.epochs=1",
        "storage.create_bucket=false",
        *SMALL_NETWORK_SETS,
    ]
    cfg = make_config(endpoint, prefix, name=name, train={"epochs": 1, "batch_size": 16}, data={"max_images": 64})
    return cfg, overrides


def held_span(client, cfg, submission_id: str) -> tuple[int, int, str]:
    """When the job's driver held its run, in ms since the epoch: from when its driver set out to take the run's
    lease (the acquire entry's `since`, to the second, rounded down: never after that moment) to when Ray ended
    the job (JobDetails.end_time, set once the entrypoint has exited; Ray's start_time is the submission's, not
    the start of its run). One clock: Ray's head and the drivers run on this machine."""
    (acquire,) = [
        e
        for e in LeaseLog(Store(cfg.storage), RunLayout.of(cfg).prefix).entries()
        if e["kind"] == "acquire" and e["holder"]["submission_id"] == submission_id
    ]
    since = datetime.strptime(acquire["holder"]["since"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return int(since.timestamp() * 1000), client.get_job_info(submission_id).end_time, submission_id


def test_three_jobs_queue_one_at_a_time(ray_head, s3_server, data_prefix, capsys):
    names = ["queue-a", "queue-b", "queue-c"]
    jobs = [tiny_job(s3_server.endpoint, data_prefix, n) for n in names]
    ids = [submit(cfg, "jobs/smoke.yaml", overrides, address=ray_head.dashboard_url) for cfg, overrides in jobs]
    seen_queued, max_running, states = set(), 0, {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        states = {r.submission_id: r.state for r in list_jobs(ray_head.dashboard_url) if r.submission_id in ids}
        max_running = max(max_running, sum(s == "running" for s in states.values()))
        for cfg, _ in jobs:
            run = read_run_manifest(Store(cfg.storage), RunLayout.of(cfg)) or {}
            if run.get("status") == "queued":
                seen_queued.add(cfg.name)
        if all(s in ("finished", "failed", "stopped") for s in states.values()):
            break
        time.sleep(1)
    assert list(states.values()) == ["finished"] * 3, states
    assert max_running == 1  # one job slot: never two at once (as sampled, once a second)
    # And between the samples: each driver took its run only after Ray had ended the job before it. (The next
    # job's driver starts Python, connects to Ray and checks the bucket before it asks: seconds, not the one
    # second that `since` may be rounded down by.)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url)
    spans = sorted(held_span(client, cfg, i) for (cfg, _), i in zip(jobs, ids, strict=True))
    assert all(start <= end for start, end, _ in spans), spans
    for (_, ended, first), (started, _, then) in itertools.pairwise(spans):
        assert started >= ended, f"{then}'s driver took its run {ended - started} ms before Ray ended {first}"
    assert len(seen_queued) >= 2  # the ones waiting said so in run.json
    for cfg, _ in jobs:
        run = read_run_manifest(Store(cfg.storage), RunLayout.of(cfg))
        assert run["status"] == "finished" and run["submission_id"] in ids
    capsys.readouterr()
    assert cli_main(["jobs", "--address", ray_head.dashboard_url]) == 0
    table = capsys.readouterr().out
    for submission_id, name in zip(ids, names, strict=True):
        line = next(line for line in table.splitlines() if line.startswith(submission_id))
        assert name in line and "finished" in line and "1/1" in line


def test_the_same_run_name_twice_is_refused(ray_head, s3_server, data_prefix):
    cfg, overrides = tiny_job(s3_server.endpoint, data_prefix, "twice")
    overrides = overrides + ["train.epochs=3"]
    first = submit(cfg, "jobs/smoke.yaml", overrides, address=ray_head.dashboard_url)
    with pytest.raises(ClusterError, match=rf"twice already has an active submission {first} \((queued|running)\)"):
        submit(cfg, "jobs/smoke.yaml", overrides, address=ray_head.dashboard_url)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url)
    client.stop_job(first)
    # Ended before the next test: a queued job takes its stop only when it would start, and one left
    # running would keep writing (and retention deleting) checkpoints in the shared bucket.
    wait_until(lambda: client.get_job_status(first).is_terminal(), 300, f"the end of {first}")


def test_two_drivers_never_train_one_run_folder(ray_head, s3_server, prefix):
    layout = RunLayout.of(make_config(s3_server.endpoint, prefix, name="locked"))
    with DriverLock("run", layout.uri):
        with pytest.raises(ClusterError, match=r"run s3://dcgan-test/.*/locked is being trained by driver pid \d+"):
            with DriverLock("run", layout.uri):
                pass
    with DriverLock("run", layout.uri):  # released: the next driver takes it
        pass


def test_twenty_races_for_one_lock_have_one_winner_each(ray_head):
    pairs = 20
    start = threading.Barrier(2 * pairs)
    outcomes: dict[int, list[str]] = {i: [] for i in range(pairs)}
    locks: list[DriverLock] = []

    def race(i: int) -> None:
        lock = DriverLock("run", f"s3://race/runs/r{i}")
        start.wait()
        try:
            lock.__enter__()
            outcomes[i].append("won")
            locks.append(lock)
        except ClusterError as e:
            outcomes[i].append("refused" if "is being trained by driver pid" in str(e) else str(e))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(pairs) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    try:
        assert {i: sorted(o) for i, o in outcomes.items()} == {i: ["refused", "won"] for i in range(pairs)}
    finally:
        for lock in locks:
            lock.__exit__(None, None, None)


HOLD_LOCK = """
import sys, time, ray
from dcgan_ray.train.runlock import GONE_HOLDER_WAIT_S, DriverLock
ray.init(address=sys.argv[1], logging_level="ERROR")
lock = DriverLock("run", sys.argv[2]).__enter__()  # held while this reference lives (Ray collects unreferenced actors)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_killed_drivers_lock_is_taken_over_by_the_next(ray_head):
    uri = f"s3://race/runs/killed-{uuid.uuid4().hex[:6]}"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, ray_head.address, uri],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ClusterError, match=rf"run {uri} is being trained by driver pid {holder.pid} "):
            DriverLock("run", uri).__enter__()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # no cleanup of any kind, as a lost driver
        holder.wait()
    start = time.monotonic()
    with DriverLock("run", uri):  # no manual step: Ray removes the dead driver's lock actor
        taken = time.monotonic() - start
    print(f"a SIGKILLed driver's lock was taken over after {taken:.1f} s")
    assert taken < GONE_HOLDER_WAIT_S
