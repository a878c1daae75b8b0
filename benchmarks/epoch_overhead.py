"""Seconds per epoch the training loop waits on anything but training steps, old path against new.

Against a private local SeaweedFS, with the project's own pieces (no Ray: rank 0's end of an epoch is
the same code in a Ray worker), this times what rank 0 does after an epoch's steps while the other ranks
wait at `ray.train.report`:
  eval        the Evaluator on `--num-samples` generated images (eval.num_samples, default 10,000)
  record      sample grid + latest.png + run.json, and the best copy when the metric improved
  save        the checkpoint written to local disk (G, D, both Adams: ~72 MB)
  upload      that checkpoint uploaded with the store, manifest last
and prints the wait of
  (sync)  the synchronous path: eval + record + save + upload
  (async) the default path (checkpoint.async_upload): eval + record + save; the upload runs while the
          next epoch trains, and is waited for only where it outlasts that epoch
  (task)  eval.in_task with the async upload: record (no best copy: the task keeps best/; run.json merges
          the results that arrived) + save; the upload, then the scoring task (load the checkpoint, score
          it, keep best/, write its result) run while the next epochs train; the task never blocks the loop
each against the GPU epoch projected from the step benchmark: 73,257 SVHN images at --gpu-img-per-s
(150,000 img/s per H100, the target of benchmarks/train_step.py --device cuda). Run on a CPU the eval
numbers are a CPU's; `bash benchmarks/gpu.sh` measures the device parts on a GPU.

  python benchmarks/epoch_overhead.py                   # 10,000 eval samples, as jobs/svhn.yaml
  python benchmarks/epoch_overhead.py --num-samples 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan_ray.cli import main as cli_main  # noqa: E402
from dcgan_ray.config import config_from_dict  # noqa: E402
from dcgan_ray.data.svhn import load_split, prepare_split  # noqa: E402
from dcgan_ray.data.synth import synth_svhn_mat  # noqa: E402
from dcgan_ray.dev.seaweed import scratch_server  # noqa: E402
from dcgan_ray.gan.models import build_models  # noqa: E402
from dcgan_ray.gan.step import make_optimizers, to_model_input, train_step  # noqa: E402
from dcgan_ray.quality.metrics import Evaluator  # noqa: E402
from dcgan_ray.storage.checkpoint import generator_from_checkpoint, read_checkpoint_dir
from dcgan_ray.storage.checkpointer import Checkpointer  # noqa: E402
from dcgan_ray.storage.layout import RunLayout  # noqa: E402
from dcgan_ray.storage.s3 import Store  # noqa: E402
from dcgan_ray.train.recorder import RunRecorder  # noqa: E402

SVHN_TRAIN = 73_257


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=10_000, help="eval.num_samples (default 10000)")
    parser.add_argument("--gpu-img-per-s", type=float, default=150_000, help="projected GPU step rate")
    args = parser.parse_args()
    with scratch_server("bench") as (server, tmp):
        os.environ["DCGAN_RAY_CACHE"] = str(tmp / "cache")
        cfg = config_from_dict(
            {
                "name": "overhead",
                "storage": {"endpoint": server.endpoint, "bucket": "bench", "prefix": "bench"},
                "data": {"prepare_splits": ["train", "test"]},
                "eval": {"num_samples": args.num_samples},
                "classifier": {"epochs": 2},
            }
        )
        for split, n, seed in (("train", 4096, 1), ("test", 1024, 2)):
            synth_svhn_mat(tmp / f"{split}_32x32.mat", n, seed=seed)
        store = Store(cfg.storage)
        for split in ("train", "test"):
            prepare_split(store, cfg, split, from_=str(tmp))
        job = tmp / "job.yaml"
        job.write_text(cfg.to_yaml())
        assert cli_main(["classifier", "train", str(job)]) == 0
        images = torch.from_numpy(load_split(store, cfg).images)
        device = torch.device("cpu")

        netG, netD = build_models(cfg.model.z_dim, cfg.model.g_features, cfg.model.d_features, cfg.model.alpha)
        optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999)
        # One step, so both Adams hold their moments: the checkpoint has its real size.
        train_step(netG, netD, optG, optD, to_model_input(images[:16]), torch.randn(16, cfg.model.z_dim))
        fixed = torch.randn(64, cfg.model.z_dim)

        def state():
            return {
                "netG": netG.state_dict(),
                "netD": netD.state_dict(),
                "optG": optG.state_dict(),
                "optD": optD.state_dict(),
                "epoch": 1,
                "step": 1,
                "fixed_noise": fixed,
                "config": cfg.to_dict(),
            }

        checkpointer = Checkpointer(store, RunLayout.of(cfg), cfg.eval.metric)
        recorder = RunRecorder(store, cfg, checkpointer, fixed)
        recorder.started(0, 1, None, 1)
        evaluator = Evaluator(store, cfg, images, device)  # reference statistics computed here, once
        metrics = {
            "epoch": 1,
            "epoch_seconds": 1.0,
            "loss_d": 1.0,
            "loss_g": 1.0,
            "d_real": 0.5,
            "d_fake": 0.5,
            "images_per_s": 1.0,
        }

        t_eval = timed(lambda: metrics.update(evaluator(netG, seed=0)))
        t_record = timed(lambda: recorder.epoch_done(dict(metrics), netG, state, checkpoint=False))
        folder = tmp / checkpointer.dir_name(1)
        t_save = timed(lambda: checkpointer.save(folder, state()))
        t_upload = timed(lambda: checkpointer.upload(folder, folder.name))
        size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20

        # eval.in_task: rank 0 records without a metric (so no best copy) and merges results.
        task_cfg = config_from_dict({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "in_task": True}})
        task_recorder = RunRecorder(store, task_cfg, checkpointer, fixed)
        task_recorder.started(0, 1, None, 1)
        plain = {
            k: v
            for k, v in metrics.items()
            if k in ("epoch", "epoch_seconds", "loss_d", "loss_g", "d_real", "d_fake", "images_per_s")
        }
        t_task_record = timed(lambda: task_recorder.epoch_done(dict(plain), netG, state, checkpoint=False))

        def score_in_task() -> None:  # what dcgan_ray.train.validation.score_checkpoint does, without Ray
            scored_state = read_checkpoint_dir(store, checkpointer.layout.checkpoint_dir_key(folder.name))
            netG_task, _ = generator_from_checkpoint(scored_state)
            Evaluator(store, task_cfg, images, device)(netG_task, seed=0)

        t_task = timed(score_in_task)

    epoch = SVHN_TRAIN / args.gpu_img_per_s
    sync = t_eval + t_record + t_save + t_upload
    new = t_eval + t_record + t_save + max(0.0, t_upload - epoch)
    print(
        f"eval {args.num_samples} samples {t_eval:6.2f} s | record {t_record:5.2f} s | save {size_mb:.0f} MB "
        f"{t_save:5.2f} s | upload {t_upload:5.2f} s   (this machine: {torch.get_num_threads()} threads, CPU)"
    )
    print(f"projected GPU epoch: {SVHN_TRAIN} images / {args.gpu_img_per_s:,.0f} img/s = {epoch:.2f} s")
    print(f"(sync)  the loop waits {sync:6.2f} s per epoch = {sync / epoch:6.1f} x the projected epoch")
    print(
        f"(async) the loop waits {new:6.2f} s per epoch = {new / epoch:6.1f} x the projected epoch   "
        f"async/sync = {new / sync:.2f}"
    )
    in_task = t_task_record + t_save + max(0.0, t_upload - epoch)
    print(
        f"(task)  the loop waits {in_task:6.2f} s per epoch = {in_task / epoch:6.1f} x the projected epoch   "
        f"task/sync = {in_task / sync:.2f}   (record {t_task_record:.2f} s)"
    )
    print(
        f"        off the path: the scoring task {t_task:.2f} s per eval epoch = {t_task / epoch:.1f} x the epoch "
        "(Ray runs one at a time: a task longer than the epoch makes scores lag and the run's end wait for them)"
    )
    print(
        f"without eval: sync {t_record + t_save + t_upload:5.2f} s, async {t_record + t_save:5.2f} s "
        f"({(t_record + t_save) / epoch:.1f} x the epoch); goal: <= 0.1 x"
    )


if __name__ == "__main__":
    main()
