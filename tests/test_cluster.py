"""The cluster path on real multi-node Ray clusters on this machine: each node its own raylet on its own
loopback address (127.0.0.2 head, 127.0.0.3... nodes, 127.0.0.1x autoscaled), the same S3 server.

- two fixed worker nodes: one worker per node, each node's own data cache, no connection off loopback;
  the node of rank 0 killed at each step of an epoch's end (its checkpoint uploading in the background)
  and the elastic job going on with the worker that is left.
- Ray's autoscaler (the fake multi-node provider, launching real raylets): a job placed on a cluster
  that starts with zero worker nodes; a job no node type can hold refused.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import ray

from dcgan_ray.dev.ray_nodes import RayHead, RayNode
from dcgan_ray.errors import ClusterError
from dcgan_ray.jobs import JOB_SLOT, list_jobs, submit
from dcgan_ray.ray_internals import elastic_view_refresh_s, has_launching_autoscaler
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.driver import train
from helpers import (
    EPOCH_RESUMED_AFTER,
    TrainInThread,
    assert_recovered,
    driver_on,
    fault_cfg,
    node_cluster,
    process_tree,
    run_cfg,
)

pytestmark = pytest.mark.ray

FAKE_HEAD_ID = "f" * 51 + "00000"  # Ray's fake provider names its head node so (autoscaler v2)


class ConnectionWatch:
    """Samples `ss -tnp` while a run goes on: both ends of every TCP connection of this cluster's processes
    (its nodes' `ray start` process trees, and this driver), to check they are all loopback. Other
    sessions' servers on the machine are not this cluster's business."""

    def __init__(self, *nodes):
        self.nodes = nodes
        self.addresses: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pids(self) -> set[int]:
        """This driver and every process under the nodes' `ray start`."""
        return process_tree({os.getpid(), *(node.pid for node in self.nodes)})

    def _run(self):
        while not self._stop.is_set():
            pids = self._pids()
            out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True).stdout
            for line in out.splitlines():
                if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids:
                    for end in line.split()[3:5]:
                        self.addresses.add(re.sub(r"^\[?(::ffff:)?|\]?:\d+$", "", end))
            self.samples += 1
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def off_loopback(self) -> set[str]:
        return {a for a in self.addresses if not (a.startswith("127.") or a == "::1")}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, test_env, data_prefix):
    """A head that runs no training and two worker nodes of 1 CPU each (helpers.node_cluster)."""
    with node_cluster(tmp_path_factory.mktemp("two-nodes"), ["127.0.0.3", "127.0.0.4"]) as cluster:
        yield cluster


def bring_back(node: RayNode) -> None:
    """Start a lost node again; once more if Ray's own start-up times out (it does on a busy machine)."""
    try:
        node.start()
    except ClusterError:
        node.start()


def wait_for_cpus(cpus: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < cpus:
        assert time.monotonic() < deadline, f"the cluster has not had {cpus} free CPUs for {timeout_s:.0f} s"
        time.sleep(0.5)


def node_ids() -> dict[str, str]:
    return {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_one_worker_per_node_each_with_its_own_cache_all_on_loopback(two_nodes, s3_server, data_prefix, test_env):
    cfg = run_cfg(s3_server.endpoint, data_prefix, "two-nodes", epochs=1)
    head, nodes = two_nodes
    with ConnectionWatch(head, *nodes) as watch:
        manifest = train(cfg)
    assert manifest["status"] == "finished" and manifest["world_size"] == 2
    assert len(watch.addresses) >= 3  # it did see the cluster's connections: head, two nodes
    # Each node fetched the split once, into its own cache: so both nodes ran a worker.
    store = Store(cfg.storage)
    split = read_split_objects(store, cfg)
    cache = Path(os.environ["DCGAN_RAY_CACHE"])
    for ip in ("127.0.0.3", "127.0.0.4"):
        node_cache = cache / f"node-{node_ids()[ip][:16]}" / "objects"
        assert sorted(p.name for p in node_cache.iterdir() if not p.name.endswith(".lock")) == split, ip
    assert watch.samples >= 5
    assert watch.off_loopback() == set(), f"connections off loopback: {watch.off_loopback()}"


def read_split_objects(store, cfg) -> list[str]:
    from dcgan_ray.data.svhn import read_split_manifest

    manifest = read_split_manifest(store, cfg, cfg.data.split)
    return sorted([o["sha256"] for o in manifest["objects"]] + [manifest["labels"]["sha256"]])


NODE_LOST_STEPS = ["upload_checkpoint_file", "after_manifest"]
"""The steps where losing the node differs from losing the worker (tests/test_faults.py has all four): a
multipart upload left unfinished, and a checkpoint durable in the bucket that Ray never registered. At the
other two the node's loss resumes exactly as a worker's does; the elastic resize is the same at every step."""
assert set(NODE_LOST_STEPS) <= set(EPOCH_RESUMED_AFTER)


@pytest.mark.parametrize("step", NODE_LOST_STEPS)
def test_rank_0s_node_lost_at_the_end_of_an_epoch(two_nodes, s3_server, data_prefix, fault, step, capfd, monkeypatch):
    """An elastic [1, 2] run loses the node of rank 0 at `step` of epoch 1's end (rank 0 holds there until
    its raylet and every process of the node are killed): it goes on with the worker that is left and
    finishes both epochs."""
    head, nodes = two_nodes
    for node in nodes:
        if node.proc.poll() is not None:  # lost by the previous case
            bring_back(node)
            # Ray Train's elastic policy counts only the nodes it has seen (see elastic_view_refresh_s):
            # let it see this one before the run asks for 2 workers.
            time.sleep(elastic_view_refresh_s() + 1)
    wait_for_cpus(2)
    # Ray Train restarts within a second of the loss, before Ray has declared the node dead, so it first
    # asks for both workers again and waits this long for their placement group (Ray's default: 60 s)
    # before it looks again and restarts with the one left. The driver passes the variable on to Ray Train.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    cfg = fault_cfg(s3_server.endpoint, data_prefix, step, "node-lost")
    cfg.scaling.num_workers, cfg.scaling.max_failures = [1, 2], 1
    fault.set(step, "hold")
    run = TrainInThread(cfg)
    node_id = fault.held_on()
    (lost,) = [node for node in nodes if node_ids().get(node.ip) == node_id]
    killed_at = time.monotonic()
    lost.kill()
    manifest = run.finished()
    log = capfd.readouterr()
    assert_recovered(cfg, manifest, log.out + log.err, step, world_before=2, world_after=1)
    print(f"rank 0's node lost at {step}: run finished {time.monotonic() - killed_at:.0f} s later")


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory, test_env):
    """A head with 0 CPUs and Ray's autoscaler (v2) over one node type: 1 CPU, at most 2 nodes; one job
    slot, and a queue deadline of 5 s."""
    head = RayHead(
        tmp_path_factory.mktemp("autoscaling") / "head.log",
        num_cpus=0,
        resources={JOB_SLOT: 1},
        autoscaling={"cpu1": {"resources": {"CPU": 1}, "max_workers": 2}},
        # The head's cloud instance and node type, as Ray's fake provider gives the nodes it
        # launches. Without the type, an autoscaler that sees the head's raylet before its
        # provider's list takes it for an unmanaged node it cannot record, and never reports.
        env={
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID,
            "RAY_NODE_TYPE_NAME": "ray.head.default",
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID,
            "RAY_JOB_START_TIMEOUT_SECONDS": "5",
        },
    )
    head.start()
    try:
        with driver_on(head.address):
            # The head answers before its autoscaler has reported; until then the cluster looks fixed (and
            # empty) to any driver. On a real cluster that is the first seconds of its life.
            deadline = time.monotonic() + 60
            while not has_launching_autoscaler():
                assert time.monotonic() < deadline, "the head's autoscaler did not report within 60 s"
                time.sleep(0.5)
            yield head
    finally:
        head.stop()


def test_the_autoscaler_places_a_job_from_zero_worker_nodes(autoscaling_head, s3_server, data_prefix):
    assert ray.cluster_resources().get("CPU", 0) == 0  # nothing to train on until the job asks
    cfg = run_cfg(s3_server.endpoint, data_prefix, "autoscaled", epochs=1)
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    start = time.monotonic()
    with ConnectionWatch(autoscaling_head) as watch:  # its autoscaled nodes run in the head's process tree
        manifest = train(cfg)
    assert manifest["status"] == "finished" and manifest["world_size"] == 2
    workers = [ip for ip in node_ids() if ip != "127.0.0.2"]
    assert len(workers) == 2 and all(ip.startswith("127.0.0.") for ip in workers)
    assert watch.off_loopback() == set(), f"connections off loopback: {watch.off_loopback()}"
    first_epoch = manifest["history"][0]["epoch_seconds"]
    print(
        f"submit to finish on an autoscaling cluster: {time.monotonic() - start:.0f} s "
        f"(one epoch {first_epoch:.1f} s); run {layout.uri}, {store.endpoint}"
    )


def test_a_job_no_node_type_can_hold_is_refused(autoscaling_head, s3_server, data_prefix):
    cfg = run_cfg(s3_server.endpoint, data_prefix, "too-big", epochs=1)
    cfg.scaling.cpus_per_worker = 2  # node type cpu1 has 1 CPU
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"no node type of this cluster can hold 2 worker\(s\) x 2 CPU"):
        train(cfg)
    assert time.monotonic() - start < 60  # refused on the autoscaler's word, not after the deadline


def test_a_job_waiting_past_the_queue_deadline_fails_clearly(autoscaling_head, s3_server, data_prefix):
    """The head's one job slot stays taken (by an actor holding it): the submission waits queued, then
    fails at the head's deadline, and `dcgan-ray jobs` says so."""

    @ray.remote(num_cpus=0, resources={JOB_SLOT: 1})
    class SlotHolder:
        def ready(self):
            return True

    holder = SlotHolder.remote()
    ray.get(holder.ready.remote())
    cfg = run_cfg(s3_server.endpoint, data_prefix, "never-starts", epochs=1)
    overrides = [
        f"storage.endpoint={s3_server.endpoint}",
        "storage.bucket=dcgan-test",
        f"storage.prefix={data_prefix}",
        "name=never-starts",
    ]
    submission = submit(cfg, "jobs/smoke.yaml", overrides, address=autoscaling_head.dashboard_url)
    assert read_run_manifest(Store(cfg.storage), RunLayout.of(cfg))["status"] == "queued"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        (row,) = [r for r in list_jobs(autoscaling_head.dashboard_url) if r.submission_id == submission]
        if row.state != "queued":
            break
        time.sleep(1)
    assert row.state == "failed" and row.message.startswith("timed out in the queue"), row
    # Its driver never started, so nothing else would ever update run.json: the listing that saw the end did.
    assert read_run_manifest(Store(cfg.storage), RunLayout.of(cfg))["status"] == "failed"
    ray.kill(holder)
