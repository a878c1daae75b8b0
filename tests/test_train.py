"""Training on a real local Ray cluster (2 CPU workers, gloo) and the real SeaweedFS server."""

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan_ray.cli import main as cli_main
from dcgan_ray.config import ModelSection
from dcgan_ray.dev.seaweed import SeaweedPorts
from dcgan_ray.errors import ClusterError, DatasetMissing, DcganError, StorageUnreachable
from dcgan_ray.storage.checkpoint import load_checkpoint, read_checkpoint_dir
from dcgan_ray.storage.checkpointer import Checkpointer
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.driver import train
from helpers import REPO, TrainInThread, make_config, run_cfg

pytestmark = pytest.mark.ray


def png(store, key):
    return Image.open(io.BytesIO(store.get_bytes(key)))


@pytest.fixture(scope="module")
def resume_run(ray_head, s3_server, data_prefix):
    """One 2-epoch run of the reference network with evaluation, which the tests below only read (the ones
    that resume or damage a run train their own, so no test depends on another's order)."""
    cfg = run_cfg(s3_server.endpoint, data_prefix, "resume", eval_every=1)
    cfg.model = ModelSection()  # (the small test network's samples are still flat grey after 8 steps)
    manifest = train(cfg)
    return cfg, Store(cfg.storage), RunLayout.of(cfg), manifest


def test_train_writes_artifacts(resume_run):
    cfg, store, layout, manifest = resume_run
    assert manifest["status"] == "finished" and manifest["epochs_completed"] == 2
    assert [h["epoch"] for h in manifest["history"]] == [0, 1, 2]
    # Quality measured across both workers, from epoch 0 (untrained G) on; the best checkpoint is kept apart.
    fds = [h["digit_fd"] for h in manifest["history"]]
    assert all(np.isfinite(fds)) and fds[-1] < fds[0]
    assert all(1.0 <= h["digit_is"] <= 10.0 and 0 <= h["class_hist_tv"] <= 1 for h in manifest["history"])
    best = manifest["checkpoints"]["best"]
    assert best["metric"] == "digit_fd" and best["value"] == min(fds[1:])
    assert read_checkpoint_dir(store, layout.best_dir_key)["epoch"] == best["epoch"]
    assert store.list_keys("train-tests/data/svhn/train/stats-digit-")  # reference statistics, stored once
    assert manifest["world_size"] == 2 and manifest["global_batch"] == 32
    for key in (layout.sample_key(1), layout.sample_key(2), layout.latest_sample_key):
        image = png(store, key)
        assert image.size == (256, 256)
        assert np.asarray(image).std() > 1.0  # not a constant picture
    gif = png(store, layout.gif_key)
    assert gif.n_frames == 3  # epochs 0, 1, 2
    ckpt2 = read_checkpoint_dir(store, f"{layout.prefix}/checkpoint_epoch_0002")  # checked against its manifest
    assert ckpt2["epoch"] == 2 and ckpt2["step"] == 2 * 256 // 32
    assert set(ckpt2) >= {"netG", "netD", "optG", "optD", "fixed_noise", "config"}
    assert manifest["checkpoints"]["latest"].endswith("checkpoint_epoch_0002")


def small_run(endpoint: str, prefix: str, name: str, epochs: int):
    """A run of its own for a test to resume or damage: 64 images (2 steps an epoch), no evaluation."""
    cfg = run_cfg(endpoint, prefix, name, epochs=epochs)
    cfg.data.max_images = 64
    manifest = train(cfg)
    assert manifest["status"] == "finished" and manifest["epochs_completed"] == epochs
    return cfg, Store(cfg.storage), RunLayout.of(cfg)


def test_resubmission_resumes_then_is_a_no_op(ray_head, s3_server, data_prefix):
    cfg, store, layout = small_run(s3_server.endpoint, data_prefix, "resubmitted", epochs=2)
    ckpt2 = load_checkpoint(store.get_bytes(f"{layout.prefix}/checkpoint_epoch_0002/checkpoint.pt"))
    # Resubmitting the same name with more epochs continues where it stopped.
    cfg.train.epochs = 3
    manifest = train(cfg)
    assert [h["epoch"] for h in manifest["history"]] == [1, 2, 3]
    assert manifest["resumed_from"]["epoch"] == 2
    ckpt3 = load_checkpoint(store.get_bytes(f"{layout.prefix}/checkpoint_epoch_0003/checkpoint.pt"))
    assert ckpt3["step"] == 3 * 2
    assert torch.equal(ckpt3["fixed_noise"], ckpt2["fixed_noise"])
    assert not store.exists(f"{layout.prefix}/checkpoint_epoch_0001/checkpoint.pt")  # checkpoint.keep = 2

    # Same epochs again: nothing to do, nothing overwritten.
    before = store.head(f"{layout.prefix}/checkpoint_epoch_0003/checkpoint.pt")["LastModified"]
    train(cfg)
    assert store.head(f"{layout.prefix}/checkpoint_epoch_0003/checkpoint.pt")["LastModified"] == before


def test_sample_and_eval_without_ray(resume_run, s3_server, tmp_path, capsys):
    cfg, store, layout, manifest = resume_run
    # `dcgan-ray sample` makes a PNG from the checkpoint without Ray.
    out = tmp_path / "grid.png"
    rc = cli_main(
        [
            "sample",
            f"{layout.uri}/checkpoint_epoch_0002",
            "--n",
            "16",
            "--seed",
            "1",
            "--scale",
            "1",
            "--out",
            str(out),
            "--endpoint",
            s3_server.endpoint,
        ]
    )
    assert rc == 0 and Image.open(out).size == (128, 128)
    assert np.asarray(Image.open(out)).std() > 1.0

    # `dcgan-ray eval` measures the best checkpoint without Ray, against the stored reference statistics.
    capsys.readouterr()
    assert cli_main(["eval", f"{layout.uri}/best", "--num-samples", "128", "--endpoint", s3_server.endpoint]) == 0
    measured = json.loads(capsys.readouterr().out)
    best = read_run_manifest(store, layout)["checkpoints"]["best"]
    assert measured["epoch"] == best["epoch"] and np.isfinite(measured["digit_fd"]) and measured["digit_fd"] > 0


def test_damaged_checkpoints_never_start_over(ray_head, s3_server, data_prefix):
    cfg, store, layout = small_run(s3_server.endpoint, data_prefix, "damaged", epochs=3)
    # A damaged latest checkpoint: resume from the previous one, with a warning, never from scratch.
    key3 = f"{layout.prefix}/checkpoint_epoch_0003/checkpoint.pt"
    store.put_bytes(key3, store.get_bytes(key3)[:5000])
    cfg.train.epochs = 4
    manifest = train(cfg)
    assert manifest["resumed_from"]["epoch"] == 2
    assert [h["epoch"] for h in manifest["history"]] == [1, 2, 3, 4]
    # The new epoch-3 checkpoint went to a fresh folder; Ray's retention (keep 2) removed the damaged one.
    assert manifest["checkpoints"]["latest"].endswith("checkpoint_epoch_0004")
    checkpoints = Checkpointer(store, layout, cfg.eval.metric)
    kept = checkpoints.folders()
    assert [k.split("/")[-1] for k in kept] == ["checkpoint_epoch_0004", "checkpoint_epoch_0003_r1"]
    assert read_checkpoint_dir(store, kept[1])["epoch"] == 3

    # Every checkpoint damaged: a clear error, and the run is left as it was.
    for folder in checkpoints.folders():
        store.put_bytes(f"{folder}/checkpoint.pt", b"garbage")
    cfg.train.epochs = 5
    with pytest.raises(DcganError, match="none is intact; refusing to start over"):
        train(cfg)


def test_dataset_missing_fails_before_workers(ray_head, s3_server, prefix):
    cfg = run_cfg(s3_server.endpoint, prefix, "nodata")
    Store(cfg.storage).check()
    with pytest.raises(DatasetMissing, match="dcgan-ray data prepare"):
        train(cfg)
    assert not Store(cfg.storage).list_keys(f"{prefix}/runs/")


def test_s3_down_at_start(ray_head, data_prefix):
    cfg = run_cfg(f"http://127.0.0.1:{SeaweedPorts.free().s3}", data_prefix, "down")
    with pytest.raises(StorageUnreachable, match="cannot reach the S3 endpoint"):
        train(cfg)


def test_more_workers_than_the_cluster_can_place(ray_head, s3_server, data_prefix):
    cfg = run_cfg(s3_server.endpoint, data_prefix, "huge", epochs=1)
    cfg.scaling.num_workers, cfg.data.max_images = 64, None
    with pytest.raises(ClusterError, match=r"needs 64 worker\(s\) x 1 CPU = 64 CPU, but the cluster has \d+ CPU"):
        train(cfg)


def test_gpu_requested_without_gpus(ray_head, s3_server, data_prefix):
    cfg = run_cfg(s3_server.endpoint, data_prefix, "gpu")
    cfg.scaling.use_gpu = True
    with pytest.raises(
        ClusterError,
        match=r"needs 2 worker\(s\) x 1 CPU, 1 GPU = 2 CPU, 2 GPU, "
        r"but the cluster has .*set scaling.use_gpu=false",
    ):
        train(cfg)


def test_compression_small_buckets_one_node_through_ray(ray_head, s3_server, data_prefix, caplog):
    """speed.grad_compression and speed.ddp_bucket_mb reach the DDP that Ray's prepare_model builds (a
    kwarg or hook DDP refused would fail the workers), scaling.one_node places both workers with
    STRICT_PACK, and the driver logs its prediction from the live cluster's nodes."""
    cfg = run_cfg(s3_server.endpoint, data_prefix, "compressed", epochs=1)
    cfg.speed.grad_compression, cfg.speed.ddp_bucket_mb, cfg.scaling.one_node = "bf16", 1.0, True
    with caplog.at_level(logging.INFO, logger="dcgan_ray.train.driver"):
        manifest = train(cfg)
    assert manifest["status"] == "finished" and manifest["history"][-1]["finite"] == 1.0
    lines = [r.getMessage() for r in caplog.records if r.name == "dcgan_ray.train.driver"]
    assert any(
        line.startswith("predicted: 2 CPU workers, ") and "over loopback" in line and "auto: scaling.one_node" in line
        for line in lines
    ), lines


def test_ray_job_submit_cli(ray_head, s3_server, data_prefix):
    """The real `ray job submit` against the `ray start` head; credentials come from the nodes' env."""
    env_sets = [
        f"storage.endpoint={s3_server.endpoint}",
        "storage.bucket=dcgan-test",
        f"storage.prefix={data_prefix}",
        "name=submitted",
        "data.max_images=64",
        "train.batch_size=16",
        "storage.create_bucket=false",
    ]
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        ray_head.dashboard_url,
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        "-m",
        "dcgan_ray",
        "train",
        "jobs/smoke.yaml",
    ]
    for s in env_sets:
        cmd += ["--set", s]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "latest checkpoint: s3://dcgan-test/" in output
    cfg = make_config(s3_server.endpoint, data_prefix, name="submitted")
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    assert store.exists(f"{layout.prefix}/checkpoint_epoch_0001/checkpoint.pt")
    assert png(store, layout.latest_sample_key).size == (256, 256)


def test_killed_worker_restarts_from_last_checkpoint(ray_head, s3_server, data_prefix):
    """A worker process killed for real mid-run: Ray restarts the group (scaling.max_failures) and the
    run resumes from its last checkpoint, without repeating or losing an epoch."""
    import os
    import signal

    from ray.util.state import list_actors

    cfg = run_cfg(s3_server.endpoint, data_prefix, "killed", epochs=5)
    cfg.scaling.max_failures = 1
    run = TrainInThread(cfg)
    run.wait_for_epochs(2)
    workers = list_actors(
        address=ray_head.dashboard_url, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )
    assert workers, "no live training worker found"
    os.kill(workers[-1]["pid"], signal.SIGKILL)
    manifest = run.finished()
    store, layout = run.store, run.layout
    assert manifest["status"] == "finished"
    assert [h["epoch"] for h in manifest["history"]] == [1, 2, 3, 4, 5]
    assert manifest["resumed_from"]["epoch"] >= 1
    assert load_checkpoint(store.get_bytes(f"{layout.prefix}/checkpoint_epoch_0005/checkpoint.pt"))["step"] == 5 * 8
