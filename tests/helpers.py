"""What the tests share besides fixtures (tests/conftest.py): the test credentials and bucket, job configs
for small runs, a training run on a thread of the test, the fault switch of dcgan_ray.faults, and the
checks of a run that lost rank 0."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcgan_ray.config import JobConfig, ModelSection, config_from_dict
from dcgan_ray.errors import StorageUnreachable
from dcgan_ray.faults import STEPS
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store

TEST_KEY = "dcgan-test-key"
TEST_SECRET = "dcgan-test-secret-0123456789"
BUCKET = "dcgan-test"
REPO = Path(__file__).resolve().parents[1]


def checkout_files() -> list[str]:
    """The files of this checkout that git tracks or would (untracked, not ignored): what a clone or
    `docker build .` gets."""
    return subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def wait_until(condition: Callable[[], Any], timeout_s: float = 60, what: str = "the condition", every_s: float = 0.2):
    """Poll `condition` until it returns something true, which is returned; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout_s:.0f} s"
        time.sleep(every_s)
    return value


SMALL_NETWORK = {"g_features": 16, "d_features": 16}
"""The width of the test runs' G and D: 1/8 and 1/4 of the reference network's, so a run tests the plumbing
(Ray, the bucket, checkpoints) in less time, with 1 MiB checkpoints instead of 68 MiB. The reference network
is checked layer by layer in tests/test_models.py, and trained by test_train's artifacts run and by the fault
runs cut halfway through a checkpoint's upload (`fault_cfg`)."""

TEST_RAY_ENV = {
    # Ray Train's controller polls its workers this often (Ray's default: 2 s): it sees a report, a
    # finished or a lost worker sooner, which each test run would otherwise wait for.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray Train's watcher of spot-instance preemption: an actor more per run, for a signal this machine
    # never sends.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
"""Ray settings of every Ray process the tests start (they inherit the session's environment)."""

SMALL_NETWORK_SETS = [f"model.{key}={value}" for key, value in SMALL_NETWORK.items()]
"""SMALL_NETWORK as `--set` overrides, for a job YAML of the repository (jobs/smoke.yaml) run by the tests."""


def make_config(endpoint: str, prefix: str, **sections) -> JobConfig:
    data = {
        "name": "test-run",
        "model": dict(SMALL_NETWORK),
        "train": {"epochs": 1, "batch_size": 16, "log_every_steps": 2},
        "storage": {"endpoint": endpoint, "bucket": BUCKET, "prefix": prefix},
        "scaling": {"num_workers": 1, "use_gpu": False},
        "eval": {"every_epochs": 0, "num_samples": 256, "batch_size": 256},
        # 150 steps: ~0.97 test accuracy on the synthetic digits (2 epochs of 1,200 alone give ~0.6).
        "classifier": {"epochs": 2, "batch_size": 64, "min_steps": 150},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return config_from_dict(data, "test config")


def run_cfg(endpoint, prefix, name, eval_every=0, **train):
    """A small 2-worker training job on the shared data (256 images, batch 16: 8 steps an epoch)."""
    return make_config(
        endpoint,
        prefix,
        name=name,
        train={"epochs": 2, "batch_size": 16, "log_every_steps": 4, **train},
        data={"max_images": 256},
        checkpoint={"keep": 2},
        scaling={"num_workers": 2, "use_gpu": False, "max_failures": 0},
        eval={"every_epochs": eval_every},
    )


class TrainInThread:
    """`train(cfg)` on a thread of the test, so the test can act on the cluster mid-run (kill a worker,
    lose a node) and then check what the driver returned."""

    def __init__(self, cfg: JobConfig):
        from dcgan_ray.train.driver import train

        self.store, self.layout, self.result = Store(cfg.storage), RunLayout.of(cfg), {}

        def run() -> None:
            try:
                self.result["manifest"] = train(cfg)
            except BaseException as e:  # shown by finished(), not lost in the thread
                self.result["error"] = e

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def wait_for_epochs(self, epochs: int, timeout_s: float = 300) -> int:
        """Until run.json records `epochs` epochs (rank 0 records epoch n only after epoch n-1's report
        returned, so Ray has registered that checkpoint); the count it then records."""
        return wait_until(
            lambda: (recorded := self.epochs_recorded()) >= epochs and recorded,
            timeout_s,
            f"run.json recording {epochs} epoch(s)",
        )

    def epochs_recorded(self) -> int:
        """Epochs run.json records now; 0 while the bucket does not answer (the outage tests stop it)."""
        try:
            return (read_run_manifest(self.store, self.layout) or {}).get("epochs_completed", 0)
        except StorageUnreachable:
            return 0

    @property
    def error(self) -> BaseException | None:
        """What train() raised, once it ended."""
        return self.result.get("error")

    def finished(self, timeout_s: float = 600) -> dict:
        """The run manifest train() returned; fails the test if it raised or is still running."""
        self.thread.join(timeout=timeout_s)
        assert not self.thread.is_alive(), f"train() still running after {timeout_s:.0f} s"
        assert "error" not in self.result, f"train() raised in the driver: {self.result.get('error')!r}"
        return self.result["manifest"]


class Fault:
    """A fault for the next Ray process that reaches `step` at an epoch's end (see dcgan_ray.faults): it
    kills itself, or holds still for the test to take its node down."""

    def __init__(self, path: Path):
        self.path = path

    def set(self, step: str, action: str, at: int | None = None) -> None:
        part = self.path.with_suffix(".part")
        part.write_text(json.dumps({"step": step, "action": action, **({"at": at} if at else {})}))
        part.rename(self.path)

    @property
    def fired(self) -> bool:
        return Path(f"{self.path}.fired").exists()

    def held_on(self, timeout_s: float = 300) -> str:
        """The Ray node id of the process that holds at the step, once one does."""
        held = Path(f"{self.path}.held")
        deadline = time.monotonic() + timeout_s
        while not held.exists():
            assert time.monotonic() < deadline, f"no process reached the fault's step in {timeout_s:.0f} s"
            time.sleep(0.05)
        return held.read_text()

    def marked(self, timeout_s: float = 300) -> str:
        """The Ray node id of the process that passed the step (action `mark`), once one has."""
        marked = Path(f"{self.path}.marked")
        wait_until(marked.exists, timeout_s, "a process passing the fault's step", every_s=0.05)
        return marked.read_text()

    def paused(self, timeout_s: float = 300) -> int:
        """The pid of the process that paused itself at the step (action `pause`), once one has."""
        paused = Path(f"{self.path}.paused")
        wait_until(paused.exists, timeout_s, "a process pausing at the fault's step", every_s=0.05)
        return int(paused.read_text())

    def clear(self) -> None:
        for suffix in ("", ".fired", ".held", ".paused", ".marked"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)


def fault_cfg(endpoint: str, prefix: str, step: str, what: str) -> JobConfig:
    """The run the fault tests lose rank 0 of at `step` (named `<what>-at-<step>`): 2 epochs of 2 steps on 2
    workers, checkpoints uploaded in the background. Cut halfway through its checkpoint's upload, it trains
    the reference network, whose real 68 MiB checkpoint goes up in parts (a multipart upload left unfinished);
    at the other steps the size of the checkpoint makes no difference, and it trains the small one."""
    cfg = run_cfg(endpoint, prefix, f"{what}-at-{step}".replace("_", "-"), epochs=2)
    cfg.data.max_images = 64
    if step == "upload_checkpoint_file":
        cfg.model = ModelSection()
    return cfg


EPOCH_RESUMED_AFTER = {
    "record_epoch": 0,  # epoch 1's run.json entry was never written, nor its checkpoint
    "upload_checkpoint_file": 0,  # run.json says epoch 1 was trained; its checkpoint never made it
    "before_manifest": 0,  # the same, and checkpoint.pt without its manifest is left in the bucket
    "after_manifest": 1,  # the checkpoint is durable, though Ray Train had not registered it
}
"""The epoch a 2-epoch run resumes from when rank 0 is lost at each step of epoch 1's end."""
assert list(EPOCH_RESUMED_AFTER) == list(STEPS), "a fault step without its expected outcome, or the other way"


def log_messages(log: str, text: str) -> set[str]:
    """The distinct lines of a driver's log that contain `text`, without Ray's prefix (the process and the
    node it was read on) and its `[repeated Nx across cluster]`: raylets sharing one machine share one
    session folder, so each forwards every worker's lines."""
    messages = set()
    for line in re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines():
        if text in line:
            messages.add(re.sub(r"^\(.*?\) ", "", line).split(" [repeated ")[0])
    return messages


def assert_recovered(cfg: JobConfig, manifest: dict, log: str, step: str, world_before: int, world_after: int) -> None:
    """A run of 2 epochs (2 workers) whose rank 0 was lost at `step` of epoch 1's end finished all its epochs
    once, says in run.json how it restarted and resized, and in its log, in one line each, what it did."""
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    assert manifest["status"] == "finished"
    assert [h["epoch"] for h in manifest["history"]] == [1, 2]
    assert all(h["checkpoint_durable"] for h in manifest["history"])
    assert manifest["checkpoints"]["durable_epoch"] == 2 and manifest["checkpoints"]["latest"].endswith("_0002")
    (restart,) = manifest["restarts"]
    resumed = EPOCH_RESUMED_AFTER[step]
    assert restart["to_epoch"] == resumed, restart
    assert [h["epoch"] for h in restart["redone"]] == list(range(resumed + 1, restart["from_epoch"] + 1)), restart
    assert (restart["world_size_before"], restart["world_size_after"]) == (world_before, world_after)
    resizes = [(r["from"], r["to"]) for r in manifest.get("resizes", [])]
    assert resizes == ([(world_before, world_after)] if world_before != world_after else [])
    assert manifest["history"][-1]["world_size"] == world_after
    (restarted,) = log_messages(log, f"run {layout.uri} restarted: ")
    assert (
        f"resumes from {layout.uri}/checkpoint_epoch_0001 (epoch 1)" if resumed else "starts over from epoch 0"
    ) in restarted, restarted
    assert len(log_messages(log, f"{layout.uri}/checkpoint_epoch_0001 has no manifest.json: its upload was cut")) == (
        step == "before_manifest"
    )
    # Nothing torn is left behind for a later restore to trip on.
    for folder in store.list_keys(f"{layout.prefix}/checkpoint_epoch_"):
        assert store.exists(f"{folder.rsplit('/', 1)[0]}/manifest.json"), folder


@contextlib.contextmanager
def driver_on(address: str):
    """This test process as the driver of another cluster, and back to the session's afterwards."""
    import ray

    previous = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    ray.shutdown()
    ray.init(address=address, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
        if previous:
            ray.init(address=previous, logging_level="WARNING")


@contextlib.contextmanager
def node_cluster(logs: Path, ips: list[str], node_env: dict[str, str] | None = None):
    """A head that runs no training (0 CPUs) and a 1-CPU worker node at each loopback address of `ips`, with
    this test process as its driver; yields (head, nodes). Its GCS declares a node dead after 3 missed health
    checks 1 s apart (Ray's defaults: 5, 3 s apart), so a restart after a lost node sees the cluster as it is
    sooner."""
    from dcgan_ray.dev.ray_nodes import RayHead, RayNode

    head = RayHead(
        logs / "head.log",
        num_cpus=0,
        env={"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"},
    )
    head.start()
    nodes = [RayNode(head, ip, logs / f"node{i}.log", num_cpus=1, env=node_env) for i, ip in enumerate(ips)]
    try:
        with driver_on(head.address):
            for node in nodes:
                node.start()
            yield head, nodes
    finally:
        for node in nodes:
            node.stop()
        head.stop()


def process_tree(roots: set[int]) -> set[int]:
    """`roots` and every process under them (from /proc's parent links)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
    pids, grew = set(roots), True
    while grew:
        before = len(pids)
        pids |= {pid for pid, ppid in parent.items() if ppid in pids}
        grew = len(pids) > before
    return pids
