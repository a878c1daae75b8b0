"""run.json as rank 0's recorder keeps it, against the real SeaweedFS and without Ray: it never claims a
checkpoint durable before its manifest is in the bucket, and a restart appends to its history instead of
overwriting it. (The same on real clusters, with workers and nodes lost: test_faults.py, test_cluster.py.)"""

import logging

import torch

from dcgan_ray.gan.models import build_models
from dcgan_ray.storage.checkpointer import Checkpointer
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import epochs_durable, read_run_manifest
from dcgan_ray.train.recorder import RunRecorder
from helpers import make_config


def recorder_and_netG(cfg, store):
    netG, _ = build_models(cfg.model.z_dim, cfg.model.g_features, cfg.model.d_features, cfg.model.alpha)
    checkpointer = Checkpointer(store, RunLayout.of(cfg), cfg.eval.metric)
    return RunRecorder(store, cfg, checkpointer, torch.zeros(4, cfg.model.z_dim)), netG


def metrics(epoch: int, world: int) -> dict:
    return {
        "epoch": epoch,
        "step": 8 * epoch,
        "loss_d": 1.0,
        "loss_g": 2.0,
        "d_real": 0.5,
        "d_fake": 0.5,
        "images_per_s": 100.0,
        "epoch_seconds": 1.0,
        "world_size": world,
        "global_batch": 16 * world,
    }


def train_epoch(recorder, netG, epoch: int, world: int):
    """One epoch's end on rank 0: the record, and the checkpoint it hands to Ray to upload."""
    state = {
        "netG": netG.state_dict(),
        "netD": {},
        "optG": {},
        "optD": {},
        "epoch": epoch,
        "step": 8 * epoch,
        "fixed_noise": torch.zeros(4, 4),
        "config": recorder.cfg.to_dict(),
    }
    return recorder.epoch_done(metrics(epoch, world), netG, lambda: state, checkpoint=True)


def upload(recorder, local) -> None:
    """What `Worker.upload_checkpoint` does (in Ray's background thread): upload, then say it is durable."""
    folder = recorder.checkpointer.upload(local, local.name)
    recorder.checkpoint_durable(int(local.name[-4:]), recorder.store.uri(folder))


def small_config(s3_server, prefix):
    return make_config(
        s3_server.endpoint,
        prefix,
        name="recorded",
        train={"epochs": 2},
        model={"g_features": 8, "d_features": 8, "z_dim": 4},
        sample={"grid_size": 2},
    )


def test_run_json_claims_a_checkpoint_only_once_its_manifest_is_in(s3_server, prefix, store):
    cfg = small_config(s3_server, prefix)
    store.check()
    recorder, netG = recorder_and_netG(cfg, store)
    read = lambda: read_run_manifest(store, RunLayout.of(cfg))  # noqa: E731
    recorder.started(0, 2, None, 8)
    recorder.first_samples(netG, {})
    local = train_epoch(recorder, netG, 1, 2)
    m = read()
    assert m["epochs_completed"] == 1 and m["history"][-1]["checkpoint_durable"] is False
    assert m["checkpoints"] == {"latest": None, "durable_epoch": 0} and epochs_durable(m) == 0
    upload(recorder, local)
    m = read()
    assert m["history"][-1]["checkpoint_durable"] is True and m["checkpoints"]["durable_epoch"] == 1
    assert m["checkpoints"]["latest"] == f"{RunLayout.of(cfg).uri}/checkpoint_epoch_0001"
    # The last epoch trained while its checkpoint still uploads: not finished yet.
    local = train_epoch(recorder, netG, 2, 2)
    recorder.finished()
    assert read()["status"] == "running" and epochs_durable(read()) == 1
    upload(recorder, local)
    assert read()["status"] == "finished" and epochs_durable(read()) == 2


def test_a_restart_appends_to_the_history_and_says_so_in_one_line(s3_server, prefix, store, caplog):
    """Epoch 2 recorded, its checkpoint never uploaded, then the workers restart on one node from epoch 1."""
    cfg = small_config(s3_server, prefix)
    store.check()
    recorder, netG = recorder_and_netG(cfg, store)
    recorder.started(0, 2, None, 8)
    recorder.first_samples(netG, {})
    upload(recorder, train_epoch(recorder, netG, 1, 2))
    train_epoch(recorder, netG, 2, 2)
    origin = read_run_manifest(store, RunLayout.of(cfg))["checkpoints"]["latest"]

    restarted, _ = recorder_and_netG(cfg, store)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        restarted.started(1, 1, origin, 16)
    m = read_run_manifest(store, RunLayout.of(cfg))
    assert [h["epoch"] for h in m["history"]] == [1] and m["epochs_completed"] == 1
    (restart,) = m["restarts"]
    assert {
        k: restart[k] for k in ("from_epoch", "to_epoch", "checkpoint", "world_size_before", "world_size_after")
    } == {"from_epoch": 2, "to_epoch": 1, "checkpoint": origin, "world_size_before": 2, "world_size_after": 1}
    assert restart["reason"] == "the checkpoint of epoch 2 never finished uploading" and not restart["exact"]
    assert [h["epoch"] for h in restart["redone"]] == [2] and restart["redone"][0]["world_size"] == 2
    assert [(r["epoch"], r["from"], r["to"]) for r in m["resizes"]] == [(1, 2, 1)]
    lines = [r.getMessage() for r in caplog.records if "restarted" in r.getMessage()]
    assert lines == [
        f"run {RunLayout.of(cfg).uri} restarted: resumes from {origin} (epoch 1) (on another world size: not "
        "bit-identical to an uninterrupted run) with 1 worker(s) instead of 2, at epoch 2/2; epoch(s) 2 recorded "
        "before are trained again: the checkpoint of epoch 2 never finished uploading"
    ]
