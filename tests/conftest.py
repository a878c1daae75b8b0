"""Shared fixtures: one real SeaweedFS S3 server and one real Ray head per test session.

Both run on free loopback ports with test credentials set in this process's environment, which the
Ray head (and so every worker) inherits. Each test gets its own key prefix in the one bucket.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

# Ray reads its auth mode once per process, so this must be set before anything imports ray.
os.environ["RAY_AUTH_MODE"] = "token"

from dcgan_ray.cli import main as cli_main  # noqa: E402
from dcgan_ray.config import JobConfig  # noqa: E402
from dcgan_ray.data.svhn import prepare_split  # noqa: E402
from dcgan_ray.data.synth import synth_svhn_mat  # noqa: E402
from dcgan_ray.dev.ray_nodes import RayHead  # noqa: E402
from dcgan_ray.dev.seaweed import SeaweedPorts, SeaweedServer  # noqa: E402
from dcgan_ray.faults import FAULT_FILE_ENV  # noqa: E402
from dcgan_ray.jobs import JOB_SLOT  # noqa: E402
from dcgan_ray.storage.s3 import Store  # noqa: E402
from helpers import BUCKET, REPO, TEST_KEY, TEST_RAY_ENV, TEST_SECRET, Fault, make_config  # noqa: E402

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
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": TEST_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "DCGAN_RAY_CACHE": str(tmp_path_factory.mktemp("cache")),
            # Read by every Ray process the tests start (they inherit this environment): see the `fault` fixture.
            FAULT_FILE_ENV: str(tmp_path_factory.mktemp("faults") / "fault.json"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **TEST_RAY_ENV,
        }
    )
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
    head = RayHead(
        tmp_path_factory.mktemp("ray") / "head.log",
        num_cpus=4,
        resources={JOB_SLOT: 1},
        env={"RAY_JOB_START_TIMEOUT_SECONDS": "600"},
    )
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


@pytest.fixture
def fault() -> Fault:
    f = Fault(Path(os.environ[FAULT_FILE_ENV]))
    f.clear()
    yield f
    f.clear()


@pytest.fixture(autouse=True)
def no_log_handler_left_behind():
    """A test that runs the CLI in-process installs its log handler on the root logger (`setup_logging`):
    it goes with the test, so no later test's lines pass through it."""
    import logging

    from dcgan_ray.logs import StderrHandler

    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)
