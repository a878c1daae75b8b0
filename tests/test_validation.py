"""eval.in_task: quality scored in Ray Train's validation task, on a real local Ray cluster and the real
SeaweedFS server."""

import json
import math

import pytest

from dcgan_ray.storage.checkpoint import read_checkpoint_dir
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.driver import train
from dcgan_ray.train.validation import scoring_room
from helpers import run_cfg

pytestmark = pytest.mark.ray


def test_scores_from_the_task_reach_run_json_and_best(ray_head, s3_server, data_prefix):
    cfg = run_cfg(s3_server.endpoint, data_prefix, "in-task", eval_every=1, epochs=3)
    cfg.eval.in_task = True
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    manifest = train(cfg)

    # Finished only once every epoch's score is in: the last one arrives after the workers are done.
    assert manifest["status"] == "finished" and manifest == read_run_manifest(store, layout)
    history = manifest["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # no epoch 0: the untrained G has no checkpoint to score
    for h in history:
        assert h["scored"] == "task", h
        assert math.isfinite(h["digit_fd"]) and h["digit_fd"] > 0
        assert 1.0 <= h["digit_is"] <= 10.0 and 0 <= h["class_hist_tv"] <= 1 and h["classifier_accuracy"] > 0.9
        assert h["loss_d"] > 0  # the training numbers of the epoch stay beside the scores

    # Each task wrote its epoch's result, naming the checkpoint it scored.
    for epoch in (1, 2, 3):
        result = json.loads(store.get_bytes(layout.validation_key(epoch)))
        assert result["epoch"] == epoch and result["checkpoint"].endswith(f"checkpoint_epoch_{epoch:04d}")
        assert result["metrics"]["digit_fd"] == history[epoch - 1]["digit_fd"]

    # best/ follows the scores: the lowest digit_fd's epoch, and the checkpoint there is that epoch's.
    fds = {h["epoch"]: h["digit_fd"] for h in history}
    best = manifest["checkpoints"]["best"]
    assert best["metric"] == "digit_fd" and best["value"] == min(fds.values())
    assert fds[best["epoch"]] == best["value"]
    assert read_checkpoint_dir(store, layout.best_dir_key)["epoch"] == best["epoch"]


def test_no_room_for_the_scoring_task_is_named(s3_server):
    """A fixed cluster whose workers take every GPU (or CPU) leaves the task nothing until training ends."""
    cfg = run_cfg(s3_server.endpoint, "room", "room", eval_every=1)
    cfg.eval.in_task = True
    assert scoring_room(cfg, {"CPU": 4.0}) is None  # 2 workers x 1 CPU + the task's 1 CPU
    assert scoring_room(cfg, {"CPU": 2.0}) == "1 CPU (the cluster has 2, the workers take 2)"
    cfg.scaling.use_gpu = True  # the task then asks a GPU too (eval.task_gpus: null)
    assert scoring_room(cfg, {"CPU": 16.0, "GPU": 2.0}) == "1 GPU (the cluster has 2, the workers take 2)"
    assert scoring_room(cfg, {"CPU": 16.0, "GPU": 3.0}) is None
    cfg.eval.task_gpus = 0.0  # scored on a CPU instead
    assert scoring_room(cfg, {"CPU": 16.0, "GPU": 2.0}) is None
