"""Many jobs, one cluster: `dcgan-ray submit` queues jobs on the head's job slots (the session head has
one), `dcgan-ray jobs` shows them, and a run name is never trained by two drivers at once."""

from __future__ import annotations

import time

import pytest

from conftest import make_config
from dcgan_ray.cli import main as cli_main
from dcgan_ray.errors import ClusterError
from dcgan_ray.jobs import list_jobs, submit
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.runlock import DriverLock

pytestmark = pytest.mark.ray


def tiny_job(endpoint, prefix, name):
    """jobs/smoke.yaml's job, tiny; what `--set` must change for it to run against the test bucket."""
    overrides = [f"storage.endpoint={endpoint}", "storage.bucket=dcgan-test", f"storage.prefix={prefix}",
                 f"name={name}", "data.max_images=64", "train.batch_size=16", "train.epochs=1",
                 "storage.create_bucket=false"]
    cfg = make_config(endpoint, prefix, name=name, train={"epochs": 1, "batch_size": 16}, data={"max_images": 64})
    return cfg, overrides


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
    assert max_running == 1  # one job slot: never two at once
    assert len(seen_queued) >= 2  # the ones waiting said so in run.json
    for cfg, _ in jobs:
        run = read_run_manifest(Store(cfg.storage), RunLayout.of(cfg))
        assert run["status"] == "finished" and run["submission_id"] in ids
    capsys.readouterr()
    assert cli_main(["jobs", "--address", ray_head.dashboard_url]) == 0
    table = capsys.readouterr().out
    for submission_id, name in zip(ids, names):
        line = next(line for line in table.splitlines() if line.startswith(submission_id))
        assert name in line and "finished" in line and "1/1" in line


def test_the_same_run_name_twice_is_refused(ray_head, s3_server, data_prefix):
    cfg, overrides = tiny_job(s3_server.endpoint, data_prefix, "twice")
    overrides = overrides + ["train.epochs=3"]
    first = submit(cfg, "jobs/smoke.yaml", overrides, address=ray_head.dashboard_url)
    with pytest.raises(ClusterError, match=rf"twice already has an active submission {first} \((queued|running)\)"):
        submit(cfg, "jobs/smoke.yaml", overrides, address=ray_head.dashboard_url)
    from ray.job_submission import JobSubmissionClient

    JobSubmissionClient(ray_head.dashboard_url).stop_job(first)


def test_two_drivers_never_train_one_run_folder(ray_head, s3_server, prefix):
    layout = RunLayout.of(make_config(s3_server.endpoint, prefix, name="locked"))
    with DriverLock("run", layout.uri):
        with pytest.raises(ClusterError, match=r"run s3://dcgan-test/.*/locked is being trained by driver pid \d+"):
            with DriverLock("run", layout.uri):
                pass
    with DriverLock("run", layout.uri):  # released: the next driver takes it
        pass
