"""Faults on the real local Ray cluster: an S3 server stopped mid-run (waited out, or past the budget
and resumed by a resubmission), a worker's own error reaching the user as its one line, and rank 0's
worker process killed at each step of an epoch's end while its checkpoint uploads in the background.
(Its node lost at the same steps: tests/test_cluster.py.)"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcgan_ray.data.svhn import prepare_split
from dcgan_ray.errors import StorageUnreachable
from dcgan_ray.storage.checkpoint import read_checkpoint_dir
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.driver import train
from helpers import EPOCH_RESUMED_AFTER, TrainInThread, assert_recovered, fault_cfg, make_config, run_cfg, wait_until

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def outage_data(private_s3, svhn_dir):
    """The train split in a server of this module's own, which the tests stop and restart."""
    cfg = make_config(private_s3.endpoint, "outage")
    Store(cfg.storage).check()
    prepare_split(Store(cfg.storage), cfg, "train", from_=str(svhn_dir))
    return "outage"


OUTAGE_S = 10
"""How long each outage lasts: long enough for several of the store's backed-off retries (and Ray Train's
own storage writes) to fail, well inside storage.retry_budget_s (300 s)."""


def test_an_outage_twice_is_waited_out_without_a_restart(ray_head, private_s3, outage_data, capfd):
    """Stopped as epoch 1's checkpoint goes up, and again while epoch 3 trains: the run finishes with
    every epoch's artifacts, no worker restarted, and each outage is two lines in the job's log. Each outage
    outlasts the stall window (8 s here) with scaling.max_failures 0: rank 1, waiting for rank 0 while it
    retries, is not taken for stalled (an outage is not a stall), or the run would fail."""
    cfg = run_cfg(private_s3.endpoint, outage_data, "survives", epochs=3)
    cfg.scaling.stall_timeout_s = 8.0
    assert OUTAGE_S > cfg.scaling.stall_timeout_s and cfg.scaling.max_failures == 0
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    run = TrainInThread(cfg)
    outages = []
    try:
        # Rank 0 writes run.json for epoch 1 and then hands its checkpoint to Ray to upload.
        wait_until(lambda: run.epochs_recorded() >= 1, 300, "epoch 1 in run.json")
        # Epoch 2's checkpoint is complete (its manifest is written last): the second outage comes while
        # epoch 3 trains.
        for wait_for_next in (lambda: store.exists(f"{layout.prefix}/checkpoint_epoch_0002/manifest.json"), None):
            private_s3.stop()
            started = time.monotonic()
            time.sleep(OUTAGE_S)
            private_s3.start()
            outages.append(time.monotonic() - started)
            if wait_for_next:
                wait_until(wait_for_next, 300, "epoch 2's checkpoint")
    finally:
        if private_s3.proc is None or private_s3.proc.poll() is not None:
            private_s3.start()
    manifest = run.finished(timeout_s=900)
    log = capfd.readouterr()
    log = log.out + log.err
    assert manifest["status"] == "finished" and "resumed_from" not in manifest
    assert [h["epoch"] for h in manifest["history"]] == [1, 2, 3]
    for epoch in (0, 1, 2, 3):
        assert store.exists(layout.sample_key(epoch))
    assert store.exists(layout.gif_key)
    assert read_checkpoint_dir(store, f"{layout.prefix}/checkpoint_epoch_0003")["epoch"] == 3
    # (The first failure is a refused connection, or the server's 500 while it shuts down: "the server answered
    # InternalError while trying to write ...".)
    started = re.findall(r"is not answering \(([^()]+?) while trying to (\w+ \S+)\)", log)
    ended = re.findall(r"answers again after (\d+\.\d) s \((\d+) retries\)", log)
    print(f"outages {[round(o) for o in outages]} s; started: {started}; ended: {ended}")
    assert len(started) == len(ended) == 2, (started, ended)
    assert all(OUTAGE_S - 5 < float(seconds) < 2 * OUTAGE_S + 30 for seconds, _ in ended), ended
    assert "not restarting" not in log and "restarted: " not in log


def test_an_outage_past_the_budget_stops_and_the_resubmission_resumes(ray_head, private_s3, outage_data):
    cfg = run_cfg(private_s3.endpoint, outage_data, "past-budget", epochs=3)
    cfg.storage.retry_budget_s = 5
    cfg.scaling.max_failures = 2  # the outage is not a crash: no restart may be spent on it
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    run = TrainInThread(cfg)
    try:
        wait_until(
            lambda: store.exists(f"{layout.prefix}/checkpoint_epoch_0001/manifest.json"), 300, "epoch 1's checkpoint"
        )
        private_s3.stop()
        start = time.monotonic()
        run.thread.join(timeout=300)
        stopped_after = time.monotonic() - start
    finally:
        private_s3.start()
    # Whoever met the outage first gave up: a worker (its write) or Ray Train's controller (its run state).
    error = run.error
    assert isinstance(error, StorageUnreachable), repr(error)
    assert "\n" not in str(error) and "storage.retry_budget_s = 5" in str(error), str(error)
    assert "Everything written before is kept" in str(error) and "resumes from its last checkpoint" in str(error)
    assert stopped_after < 120
    print(f"stopped {stopped_after:.0f} s into the outage: {error}")
    # The resubmission resumes from the last checkpoint and loses no epoch.
    manifest = train(cfg)
    assert manifest["status"] == "finished" and manifest["resumed_from"]["epoch"] >= 1
    assert [h["epoch"] for h in manifest["history"]] == [1, 2, 3]


@pytest.fixture(scope="module")
def shard_deleted(s3_server, svhn_dir, tmp_path_factory):
    """A split prepared into the bucket, then one of its shards deleted: the driver's checks pass (the
    manifest is there), the workers' reads fail. Small shards, so no node cache already holds them."""
    cfg = make_config(
        s3_server.endpoint,
        "noshard",
        name="noshard",
        data={"shard_images": 128, "max_images": 256},
        scaling={"num_workers": 2, "max_failures": 2},
    )
    store = Store(cfg.storage)
    manifest = prepare_split(store, cfg, "train", from_=str(svhn_dir))
    store.delete([manifest["objects"][1]["key"]])
    job = tmp_path_factory.mktemp("noshard") / "noshard.yaml"
    job.write_text(cfg.to_yaml())
    return cfg, job, manifest["objects"][1]["key"]


def test_a_workers_error_ends_the_job_in_one_line_without_restarts(ray_head, shard_deleted):
    """A worker's own error (a shard deleted from the bucket) is raised as is, through Ray's structured failure,
    and the job ends in its one line; no restart is tried, though scaling.max_failures allows two (a restart
    cannot bring the shard back). One run through `ray job submit`, as users run it."""
    cfg, job, missing = shard_deleted
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            ray_head.dashboard_url,
            "--",
            sys.executable,
            "-m",
            "dcgan_ray",
            "train",
            str(job),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    # `ray job submit` streams the logs, then repeats their end when the job fails: one distinct line.
    errors = {line for line in output.splitlines() if line.startswith("error: ")}
    assert errors == {
        f"error: s3://dcgan-test/{missing} is listed in the split's manifest but is not in the bucket "
        f"(deleted since it was prepared?): prepare the split again with `dcgan-ray data prepare {job} "
        "--split train --force`"
    }, output[-4000:]
    assert "dcgan_ray.errors." not in output and "exit code 2" in output
    assert not [line for line in output.splitlines() if "RayTrainWorker" in line and "Traceback" in line]
    assert "not restarting the workers: a restart cannot fix this" in output, output[-4000:]
    assert "[FailurePolicy] RETRY" not in output


@pytest.mark.parametrize("step", list(EPOCH_RESUMED_AFTER))
def test_rank_0_killed_at_the_end_of_an_epoch(ray_head, s3_server, data_prefix, fault, step, capfd):
    """Rank 0's process SIGKILLs itself at `step` of epoch 1's end (the upload runs in Ray's background
    thread, checkpoint.async_upload): Ray restarts the workers once, and the run finishes both epochs."""
    cfg = fault_cfg(s3_server.endpoint, data_prefix, step, "killed")
    cfg.scaling.max_failures = 1
    assert cfg.checkpoint.async_upload
    fault.set(step, "kill")
    start = time.monotonic()
    manifest = train(cfg)
    assert fault.fired
    log = capfd.readouterr()
    assert_recovered(cfg, manifest, log.out + log.err, step, world_before=2, world_after=2)
    print(f"killed at {step}: run finished in {time.monotonic() - start:.0f} s")
