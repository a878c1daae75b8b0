"""Interruptions that cost a step, not an epoch, on a local cluster of real raylets: a head with 0 CPUs and
three 1-CPU worker nodes on loopback (a 2-worker run and a spare). Ray Train's preemption watcher is on
(polling every second, as the driver's environment tells it), and a drained node goes 10 s after its notice
(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S on the nodes).

- SIGTERM to the `ray start --block` of a node holding a worker (Kubernetes deleting its pod), after the
  run was killed once at an epoch's end: it checkpoints at its next step, resumes on the spare at the step
  after, and ends bit-identical to the same run never interrupted, its one allowed failure not spent twice;
- `ray drain-node` with a deadline, from `dcgan-ray spot-watch` and a stand-in of AWS's instance metadata;
- a deadline too short for the checkpoint's upload: the restart takes the newest durable one, nothing torn;
- a worker stopped (SIGSTOP) mid-epoch: seen within the window, stacks in the bucket, the run restarts.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

import pytest
import ray
import torch

from dcgan_ray.dev.ray_nodes import RayNode
from dcgan_ray.spot import Metadata, watch
from dcgan_ray.storage.checkpoint import read_checkpoint_dir
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store, parse_s3_uri
from dcgan_ray.train.driver import train
from helpers import TrainInThread, node_cluster, run_cfg, wait_until
from standin_imds import StandInMetadata

pytestmark = pytest.mark.ray

DRAIN_S = 10
"""A node's drain deadline after SIGTERM (Ray's default is 30 s; Kubernetes pods here get 90 s of grace)."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, test_env, data_prefix):
    """A head that runs no training and three 1-CPU nodes (helpers.node_cluster), each drained for DRAIN_S."""
    drain = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(DRAIN_S)}
    ips = [f"127.0.0.{20 + i}" for i in range(3)]
    with node_cluster(tmp_path_factory.mktemp("preemption"), ips, drain) as cluster:
        yield cluster


@pytest.fixture
def preemption_watcher(monkeypatch):
    """Ray Train's preemption watcher, on and polling every second (the tests' session switches it off;
    Ray Train passes these from the driver's environment to its controller)."""
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")


def job(endpoint, prefix, name, epochs=3, **scaling):
    """3 epochs of 32 steps on 2 workers (1,024 images, batch 16): an epoch lasts a few seconds, long enough for
    a notice (Ray's watcher looks every second) to reach the epoch it was given in."""
    cfg = run_cfg(endpoint, prefix, name, epochs=epochs)
    cfg.data.max_images = 1024
    cfg.checkpoint.preemption_check_s = 0.05  # ask at every step: the tests' steps take ~0.05 s
    cfg.checkpoint.async_upload = False
    for key, value in scaling.items():
        setattr(cfg.scaling, key, value)
    return cfg


def final_state(cfg) -> dict[str, torch.Tensor]:
    store = Store(cfg.storage)
    latest = read_run_manifest(store, RunLayout.of(cfg))["checkpoints"]["latest"]
    state = read_checkpoint_dir(store, parse_s3_uri(latest)[1])
    return {f"{part}.{k}": v for part in ("netG", "netD", "optG", "optD") for k, v in _flat(state[part]).items()}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items() if isinstance(d, dict) else enumerate(d):
        if isinstance(v, dict | list):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


@pytest.fixture(scope="module")
def straight(cluster, s3_server, data_prefix):
    """The run none of the tests' runs interrupt: their weights and optimizer states are compared with its."""
    cfg = job(s3_server.endpoint, data_prefix, "straight")
    assert train(cfg)["status"] == "finished"
    return final_state(cfg)


def assert_bit_identical(cfg, straight) -> None:
    mine = final_state(cfg)
    assert mine.keys() == straight.keys()
    assert [k for k in mine if not torch.equal(mine[k], straight[k])] == []


def node_of(nodes, node_id: str) -> RayNode:
    ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
    return next(node for node in nodes if node.ip == ip)


def utc(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def assert_notice_names(notice: dict, node_id: str, cfg) -> None:
    """run.json's record of Ray's PreemptionInfo names the drained node, the one rank on it (a 1-CPU node holds one
    worker) and a deadline no earlier than when the loop saw the notice (`at`) and at most DRAIN_S after it: the
    drain, which set the deadline DRAIN_S ahead or less, began before. (Both times are to the second, rounded
    down.)"""
    assert notice["nodes"] == [node_id], notice
    (rank,) = notice["ranks"]
    assert rank in range(cfg.scaling.num_workers), notice
    at, deadline = utc(notice["at"]), utc(notice["deadline"])
    assert at <= deadline <= at + timedelta(seconds=DRAIN_S), notice


def test_a_preempted_node_costs_no_step(cluster, straight, s3_server, data_prefix, fault, preemption_watcher):
    head, nodes = cluster
    cfg = job(s3_server.endpoint, data_prefix, "sigterm", max_failures=1)
    fault.set("after_manifest", "kill")  # rank 0 lost at epoch 1's end: one restart, the one failure allowed
    run = TrainInThread(cfg)
    wait_until(lambda: fault.fired, 300, "the kill at epoch 1's end")
    fault.clear()
    fault.set("mid_epoch", "mark", at=3)  # the restarted run's first epoch (2), at step 3
    node_id = fault.marked()
    preempted = node_of(nodes, node_id)
    preempted.terminate()  # as Kubernetes deletes a pod: Ray drains the node, which goes DRAIN_S later
    manifest = run.finished()
    preempted.proc.wait(timeout=120)
    preempted.start()  # (the spare for the next test)
    assert manifest["status"] == "finished" and [h["epoch"] for h in manifest["history"]] == [1, 2, 3]
    (notice,) = manifest["preemptions"]
    assert_notice_names(notice, node_id, cfg)
    assert notice["epoch"] >= 2  # (given at epoch 2's step 3, seen within a second)
    assert notice["checkpoint"] and notice["resumed_from"] == notice["checkpoint"] and notice["steps_lost"] == 0
    failure, preemption = manifest["restarts"]
    assert failure["to_epoch"] == 1 and failure["exact"]
    assert preemption["checkpoint"] == notice["checkpoint"] and preemption["step_in_epoch"] == notice["step_in_epoch"]
    assert preemption["exact"] and preemption["redone"] == []
    # max_failures 1 went to the kill: the preemption was counted apart (Ray's max_preemption_failures).
    assert_bit_identical(cfg, straight)


def test_a_spot_notice_drains_the_node_and_costs_no_step(
    cluster, straight, s3_server, data_prefix, fault, preemption_watcher
):
    head, nodes = cluster
    cfg = job(s3_server.endpoint, data_prefix, "spot", max_failures=0)
    fault.set("mid_epoch", "mark", at=3)
    run = TrainInThread(cfg)
    node_id = fault.marked()
    spot = node_of(nodes, node_id)
    imds = StandInMetadata(ip=spot.ip, quiet=0, lead_s=DRAIN_S)
    try:
        notice = watch(head.address, Metadata(imds.url), poll_s=0.2, find_node=lambda gcs, ip: node_id, max_polls=5)
    finally:
        imds.close()
    assert notice is not None and notice["action"] == "terminate", notice
    time.sleep(DRAIN_S)
    spot.kill()  # the cloud takes the instance at the notice's time
    manifest = run.finished()
    spot.start()
    (preemption,) = manifest["preemptions"]
    assert_notice_names(preemption, node_id, cfg)
    # The spot notice's time, passed on: `ray drain-node` counts the whole seconds until it from its own start.
    assert utc(preemption["deadline"]) >= utc(notice["time"]) - timedelta(seconds=1), (notice, preemption)
    assert preemption["steps_lost"] == 0
    assert manifest["restarts"][-1]["checkpoint"] == preemption["checkpoint"]
    assert_bit_identical(cfg, straight)


def test_a_deadline_too_short_for_the_upload_falls_back_to_the_last_durable_checkpoint(
    cluster, s3_server, data_prefix, fault, preemption_watcher
):
    """The preemption's checkpoint never finishes uploading (its upload holds before the manifest): the
    restart resumes from epoch 1's checkpoint, and the torn folder is removed, never used."""
    head, nodes = cluster
    cfg = job(s3_server.endpoint, data_prefix, "short-deadline")
    run = TrainInThread(cfg)
    wait_until(lambda: run.epochs_recorded() >= 1, 300, "epoch 1")
    fault.set("mid_epoch", "mark", at=3)  # epoch 2
    node_id = fault.marked()
    preempted = node_of(nodes, node_id)
    fault.clear()
    fault.set("preemption_before_manifest", "hold")
    preempted.terminate()
    manifest = run.finished()
    preempted.proc.wait(timeout=120)
    preempted.start()
    (notice,) = manifest["preemptions"]
    assert_notice_names(notice, node_id, cfg)
    durable = f"checkpoint_epoch_{notice['epoch'] - 1:04d}"  # the epoch's before the one it was given in
    assert notice["checkpoint"] is None and notice["resumed_from"].endswith(durable), notice
    assert notice["steps_lost"] == notice["step_in_epoch"]
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    for key in store.list_keys(f"{layout.prefix}/checkpoint_epoch_"):
        assert store.exists(f"{key.rsplit('/', 1)[0]}/manifest.json"), key  # nothing torn is left, or used
    assert [h["epoch"] for h in manifest["history"]] == [1, 2, 3] and manifest["status"] == "finished"


def test_a_stopped_worker_is_seen_and_its_attempt_ended(cluster, s3_server, data_prefix, fault, caplog):
    cfg = job(s3_server.endpoint, data_prefix, "stalled", epochs=2, max_failures=1, stall_timeout_s=8)
    fault.set("mid_epoch", "pause", at=3)
    with caplog.at_level(logging.ERROR, "dcgan_ray"):
        run = TrainInThread(cfg)
        paused = fault.paused()  # one rank stopped: the other waits for it in the next all-reduce
        started = time.monotonic()
        manifest = run.finished()
    (line,) = [r.getMessage() for r in caplog.records if "made no progress for" in r.getMessage()]
    assert f"(pid {paused}) made no progress for" in line and "its process does not answer" in line, line
    assert "ending this attempt, which Ray Train restarts from the newest checkpoint" in line
    assert time.monotonic() - started < 300
    assert manifest["status"] == "finished" and [h["epoch"] for h in manifest["history"]] == [1, 2]
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    stacks = store.list_keys(f"{layout.prefix}/stalls/")
    assert stacks, "no rank wrote its stacks"
    text = store.get_bytes(stacks[0]).decode()
    assert "Thread" in text and "run_epoch" in text  # where the rank that could still write was waiting
    assert len(manifest["restarts"]) == 1
