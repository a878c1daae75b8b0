"""No secret anywhere: a training job and a study submitted with `ray job submit` to the real head,
then every place Ray and the project keep things is searched for the test's secret key."""

import dataclasses
import gzip
import io
import json
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from dcgan_ray.errors import ObjectMissing
from dcgan_ray.ray_internals import session_dir
from dcgan_ray.storage.checkpoint import load_checkpoint
from dcgan_ray.storage.s3 import Store
from helpers import BUCKET, REPO, SMALL_NETWORK_SETS, TEST_KEY, TEST_SECRET, make_config

pytestmark = pytest.mark.ray

SECRET = TEST_SECRET.encode()
RAY = str(Path(sys.executable).parent / "ray")


def count_in_object(data: bytes) -> int:
    """Occurrences in the object's bytes and in whatever it packs: zip members (torch checkpoints,
    .npz), gzip streams, and a checkpoint's loaded contents."""
    found = data.count(SECRET)
    if data[:2] == b"\x1f\x8b":
        found += gzip.decompress(data).count(SECRET)
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            found += sum(read_member(z, name).count(SECRET) for name in z.namelist())
        try:
            found += repr(load_checkpoint(data)).encode().count(SECRET)
        except Exception:  # noqa: BLE001 -- not every zip is a checkpoint
            pass
    return found


def read_member(z: zipfile.ZipFile, name: str) -> bytes:
    """A member's bytes; b"" for one that other tests damaged on purpose (test_checkpoint's torn and
    byte-flipped checkpoints stay in the shared bucket). Torch checkpoints are stored uncompressed, so
    the raw-byte count above still sees what such a member holds."""
    try:
        return z.read(name)
    except (zipfile.BadZipFile, EOFError, ValueError):
        return b""


def scan_bucket(store: Store) -> tuple[int, int]:
    """(objects scanned, occurrences) over the whole test bucket."""
    keys = store.list_keys("")
    return len(keys), sum(count_in_object(data) for k in keys if (data := get_if_there(store, k)) is not None)


def get_if_there(store: Store, key: str) -> bytes | None:
    """The object's bytes; None for one deleted since the listing (checkpoint retention), which holds nothing."""
    try:
        return store.get_bytes(key)
    except ObjectMissing:
        return None


def is_copy_of_test_source(path: Path) -> bool:
    """A copy of this checkout's own tests/ (conftest.py holds the test secret), uploaded by an earlier
    `ray job submit --working-dir`: the test's source, not a leak."""
    parts = path.parts
    if "working_dir_files" not in parts or "tests" not in parts:
        return False
    relative = Path(*parts[parts.index("tests") :])
    return (REPO / relative).is_file() and (REPO / relative).read_bytes() == path.read_bytes()


def ray_cli(*args: str) -> str:
    result = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=600)
    return result.stdout + result.stderr


def submit(ray_head, submission_id: str, *entrypoint: str) -> str:
    # No --working-dir: the head's PYTHONPATH has this checkout, and two jobs with the same working dir
    # share one package in Ray's GCS, which Ray 2.60 may delete when the first ends while the second
    # starts ("Failed to download runtime_env file package ... prematurely been deleted").
    out = ray_cli(
        "job",
        "submit",
        "--address",
        ray_head.dashboard_url,
        "--submission-id",
        submission_id,
        "--",
        sys.executable,
        "-m",
        "dcgan_ray",
        *entrypoint,
    )
    assert f"Job '{submission_id}' succeeded" in out, out[-8000:]
    return out


def test_no_secret_in_bucket_logs_runtime_envs_or_session(ray_head, s3_server, data_prefix, tmp_path):
    from ray.util.state import list_actors, list_jobs, list_runtime_envs, list_tasks

    store = Store(make_config(s3_server.endpoint, data_prefix).storage)
    # The scanner finds what is there (a planted canary), so the zeros below mean something.
    store.put_bytes("canary/obj", b"x" + SECRET + b"x")
    assert scan_bucket(store)[1] == 1
    store.delete(["canary/obj"])

    sets = [
        f"storage.endpoint={s3_server.endpoint}",
        f"storage.bucket={BUCKET}",
        f"storage.prefix={data_prefix}",
        "storage.create_bucket=false",
        *SMALL_NETWORK_SETS,
    ]
    run = f"secrets-{uuid.uuid4().hex[:6]}"
    study = make_config(
        s3_server.endpoint,
        data_prefix,
        name=run,
        train={"epochs": 1, "batch_size": 16, "log_every_steps": 100},
        data={"max_images": 64},
        eval={"every_epochs": 1, "num_samples": 64},
        tune={"study": f"{run}-study", "space": {"train.lr": {"grid": [0.0002]}}},
    )
    job = tmp_path / "study.yaml"
    job.write_text(study.to_yaml())
    ids = [f"{run}-train", f"{run}-study"]
    outputs = [
        submit(
            ray_head,
            ids[0],
            "train",
            str(REPO / "jobs/smoke.yaml"),
            *[a for s in sets for a in ("--set", s)],
            "--set",
            f"name={run}",
            "--set",
            "data.max_images=64",
        ),
        submit(ray_head, ids[1], "tune", str(job)),
    ]
    assert "latest checkpoint: s3://" in outputs[0] and "report: s3://" in outputs[1]

    found: dict[str, int] = {}
    # 1. Every object in the bucket: data, checkpoints (unzipped and loaded), run.json, reports, Tune's state.
    objects, found["bucket"] = scan_bucket(store)
    assert store.list_keys(f"{data_prefix}/studies/{run}-study/tune/")  # Tune's experiment state is among them
    # 2. What `ray job` shows: the jobs' logs and the job list.
    found["ray job logs/list"] = sum(
        text.encode().count(SECRET)
        for text in [
            *outputs,
            *(ray_cli("job", "logs", "--address", ray_head.dashboard_url, i) for i in ids),
            ray_cli("job", "list", "--address", ray_head.dashboard_url),
        ]
    )
    # 3. Runtime envs (and everything else) of every job, actor, task and runtime env through the state API.
    states = [
        list_fn(address=ray_head.dashboard_url, detail=True, limit=10_000, raise_on_missing_output=False)
        for list_fn in (list_jobs, list_actors, list_tasks, list_runtime_envs)
    ]
    text = json.dumps(
        [[dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s for s in rows] for rows in states], default=str
    )
    assert f"{run}-study" in text  # the study's job is there to be searched
    found["state API"] = text.encode().count(SECRET)
    found["state API (access key id)"] = text.encode().count(TEST_KEY.encode())
    # 4. The head's session folder: every log of every Ray process, runtime_env_agent.log among them.
    session = Path(session_dir())
    files = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink() and not is_copy_of_test_source(p)]
    assert any(p.name.startswith("runtime_env_agent") for p in files)
    found["session folder"] = sum(p.read_bytes().count(SECRET) for p in files)
    print(f"searched {objects} objects, {len(files)} files under {session}: {found}")
    assert found == dict.fromkeys(found, 0)
