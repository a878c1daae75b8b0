"""Shared fixtures: one real SeaweedFS S3 server and one real Ray head per test session.

Both run on free loopback ports with test credentials set in this process's environment, which the
Ray head (and so every worker) inherits. Each test gets its own key prefix in the one bucket.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from pathlib import Path

import pytest

# Ray reads its auth mode once per process, so this must be set before anything imports ray.
os.environ["RAY_AUTH_MODE"] = "token"

from dcgan_ray.cli import main as cli_main  # noqa: E402
from dcgan_ray.config import JobConfig, config_from_dict  # noqa: E402
from dcgan_ray.data.svhn import prepare_split  # noqa: E402
from dcgan_ray.data.synth import synth_svhn_mat  # noqa: E402
from dcgan_ray.dev.ray_nodes import RayHead  # noqa: E402
from dcgan_ray.dev.seaweed import SeaweedPorts, SeaweedServer  # noqa: E402
from dcgan_ray.faults import FAULT_FILE_ENV, STEPS  # noqa: E402
from dcgan_ray.jobs import JOB_SLOT  # noqa: E402
from dcgan_ray.storage.layout import RunLayout  # noqa: E402
from dcgan_ray.storage.runs import read_run_manifest  # noqa: E402
from dcgan_ray.storage.s3 import Store  # noqa: E402

TEST_KEY = "dcgan-test-key"
TEST_SECRET = "dcgan-test-secret-0123456789"
BUCKET = "dcgan-test"
REPO = Path(__file__).resolve().parents[1]


S3_FIXTURES = {"s3_server", "private_s3"}


def pytest_collection_modifyitems(items):
    """Mark what each test needs, from the fixtures it uses (directly or through others): `s3` (a SeaweedFS
    server), `ray` (a Ray cluster; modules that start their own say so with `pytestmark`). The fast lane,
    `pytest -m "not s3 and not ray"`, runs everything else."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & S3_FIXTURES:
            item.add_marker(pytest.mark.s3)
        if "ray_head" in used:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session", autouse=True)
def test_env(tmp_path_factory):
    """Credentials and caches for the whole session; the real user's settings are put back after."""
    saved = dict(os.environ)
    os.environ.update({
        "AWS_ACCESS_KEY_ID": TEST_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "DCGAN_RAY_CACHE": str(tmp_path_factory.mktemp("cache")),
        # Read by every Ray process the tests start (they inherit this environment): see the `fault` fixture.
        FAULT_FILE_ENV: str(tmp_path_factory.mktemp("faults") / "fault.json"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })
    for var in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        os.environ.pop(var, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> SeaweedServer:
    base = tmp_path_factory.mktemp("seaweedfs")
    server = SeaweedServer(base / "data", SeaweedPorts.free(), base / "weed.log", buckets=(BUCKET,))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory) -> SeaweedServer:
    """A SeaweedFS server of the module's own, for tests that stop and restart it (outages) without
    disturbing the session's server."""
    base = tmp_path_factory.mktemp("private-seaweedfs")
    server = SeaweedServer(base / "data", SeaweedPorts.free(), base / "weed.log", buckets=(BUCKET,))
    server.start()
    yield server
    server.stop()


def make_config(endpoint: str, prefix: str, **sections) -> JobConfig:
    data = {
        "name": "test-run",
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


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def cfg(s3_server, prefix) -> JobConfig:
    return make_config(s3_server.endpoint, prefix)


@pytest.fixture
def store(cfg) -> Store:
    return Store(cfg.storage)


@pytest.fixture(scope="session")
def svhn_dir(tmp_path_factory) -> Path:
    """Offline SVHN-format train and test files, as `data prepare --from DIR` expects them."""
    d = tmp_path_factory.mktemp("svhn")
    synth_svhn_mat(d / "train_32x32.mat", 1200, seed=1)
    synth_svhn_mat(d / "test_32x32.mat", 400, seed=2)
    return d


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, test_env) -> RayHead:
    # One job slot: jobs submitted with `dcgan-ray submit` queue, one at a time (tests/test_queue.py).
    head = RayHead(tmp_path_factory.mktemp("ray") / "head.log", num_cpus=4, resources={JOB_SLOT: 1},
                   env={"RAY_JOB_START_TIMEOUT_SECONDS": "600"})
    # Ray processes that use the state API without an address (Ray Train's PlacementGroupCleaner asks
    # it whether the controller lives) take RAY_API_SERVER_ADDRESS, else the machine's most recently
    # started Ray. On a machine shared with other Ray heads that was another cluster, which had never
    # heard of our controller: the cleaner removed our workers' placement group mid-run.
    head.env["RAY_API_SERVER_ADDRESS"] = head.dashboard_url
    head.start()
    import ray

    try:
        ray.init(address=head.address, logging_level="WARNING")
        yield head
    finally:
        ray.shutdown()
        head.stop()


@pytest.fixture(scope="session")
def data_prefix(s3_server, svhn_dir, tmp_path_factory):
    """Train and test splits in the bucket, and the digit classifier trained on them by the real CLI
    (shared by the training, fault and secret tests)."""
    prefix = "train-tests"
    cfg = make_config(s3_server.endpoint, prefix)
    for split in ("train", "test"):
        prepare_split(Store(cfg.storage), cfg, split, from_=str(svhn_dir))
    job = tmp_path_factory.mktemp("jobs") / "job.yaml"
    job.write_text(cfg.to_yaml())
    assert cli_main(["classifier", "train", str(job)]) == 0
    return prefix


def run_cfg(endpoint, prefix, name, eval_every=0, **train):
    """A small 2-worker training job on the shared data (256 images, batch 16: 8 steps an epoch)."""
    return make_config(
        endpoint, prefix, name=name,
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
        deadline = time.monotonic() + timeout_s
        while (done := (read_run_manifest(self.store, self.layout) or {}).get("epochs_completed", 0)) < epochs:
            assert time.monotonic() < deadline, f"run.json still records {done} epochs after {timeout_s:.0f} s"
            time.sleep(0.2)
        return done

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

    def set(self, step: str, action: str) -> None:
        part = self.path.with_suffix(".part")
        part.write_text(json.dumps({"step": step, "action": action}))
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

    def clear(self) -> None:
        for path in (self.path, Path(f"{self.path}.fired"), Path(f"{self.path}.held")):
            path.unlink(missing_ok=True)


@pytest.fixture
def fault() -> Fault:
    f = Fault(Path(os.environ[FAULT_FILE_ENV]))
    f.clear()
    yield f
    f.clear()


def fault_cfg(endpoint: str, prefix: str, name: str) -> JobConfig:
    """The run the fault tests lose rank 0 of: 2 epochs of 2 steps on 2 workers, with the reference
    network's real 68 MiB checkpoints (a multipart upload), uploaded in the background."""
    cfg = run_cfg(endpoint, prefix, name, epochs=2)
    cfg.data.max_images = 64
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


def assert_recovered(cfg: JobConfig, manifest: dict, log: str, step: str, world_before: int,
                     world_after: int) -> None:
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
    assert (f"resumes from {layout.uri}/checkpoint_epoch_0001 (epoch 1)" if resumed else "starts over from epoch 0") \
        in restarted, restarted
    assert len(log_messages(log, f"{layout.uri}/checkpoint_epoch_0001 has no manifest.json: its upload was cut")) \
        == (step == "before_manifest")
    # Nothing torn is left behind for a later restore to trip on.
    for folder in store.list_keys(f"{layout.prefix}/checkpoint_epoch_"):
        assert store.exists(f"{folder.rsplit('/', 1)[0]}/manifest.json"), folder
