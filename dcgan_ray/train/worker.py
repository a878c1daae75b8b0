"""The per-worker training function that Ray Train runs on every DDP rank.

Ray does the distributed set-up (process group, device, DDP wrapping); the GAN math is
`dcgan_ray.gan.step`. Each rank holds the whole split in memory (on the GPU when there is one) and
trains on its disjoint slice of a per-epoch permutation. `train.batch_size` is per worker; the global
batch is batch_size x world_size. Rank 0's side effects (run manifest, sample grids, checkpoints) go
through `dcgan_ray.train.recorder`; the other ranks' recorder does nothing.

  train_worker:  [1] set up (data, models, resume, DDP)  [2] epoch 0's samples
                 [3] each epoch: train, then `end_epoch`  [4] finish
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointUploadMode

from dcgan_ray import faults
from dcgan_ray.config import JobConfig, config_from_dict
from dcgan_ray.data.svhn import load_split
from dcgan_ray.errors import DcganError
from dcgan_ray.gan.ddp import compress_gradients, ddp_kwargs
from dcgan_ray.gan.models import build_models
from dcgan_ray.gan.step import (
    EpochStats,
    load_optimizer_state,
    make_optimizers,
    noise_generator,
    prepare_models,
    rank_batches,
    run_epoch,
    unwrap,
)
from dcgan_ray.gan.sync import average, average_bn_buffers, buffers, gather, load_buffers
from dcgan_ray.logs import setup_logging
from dcgan_ray.quality.metrics import Evaluator
from dcgan_ray.ray_internals import RAY_TRAIN_FUNCTION_ERRORS_LOGGER
from dcgan_ray.storage.checkpointer import Checkpointer
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.runs import epoch_of_key
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.interruptions import PREEMPTED, MidEpoch, Preempted, PreemptionCheck
from dcgan_ray.train.recorder import Recorder, recorder_for
from dcgan_ray.train.stall import RankBeat

log = logging.getLogger(__name__)


def train_worker(loop_config: dict[str, Any]) -> str | None:
    """Every rank's training; returns PREEMPTED when it ended the attempt for a preemption, after its
    checkpoint (the driver then starts the next attempt), None when the run is trained."""
    setup_logging()
    try:
        cfg = config_from_dict(loop_config["config"], "the job's config")
        lease = join_lease(cfg, loop_config.get("lease"))
        with lease.fencing() if lease is not None else contextlib.nullcontext():
            w = Worker.set_up(cfg, lease, loop_config.get("board"))
            if w.start_epoch == 0 and w.mid_epoch is None:  # (not a run resumed in its first epoch)
                w.recorder.first_samples(w.netG, w.evaluate())
            for epoch in range(w.start_epoch, w.cfg.train.epochs):
                w.end_epoch(epoch, w.train_epoch(epoch))
            w.recorder.finished()
        return None
    except Preempted:
        return PREEMPTED
    except DcganError as e:
        # An expected failure whose message says what to do; the driver prints it as `error: ...`.
        # Ray Train would log it here once more with a traceback: one line is enough.
        log.error("rank %d stopped: %s", ray.train.get_context().get_world_rank(), e.for_job(None))
        logging.getLogger(RAY_TRAIN_FUNCTION_ERRORS_LOGGER).addFilter(lambda record: record.levelno < logging.ERROR)
        raise


def join_lease(cfg: JobConfig, generation: int | None) -> Lease | None:
    """Rank 0's view of its driver's lease `generation` on the run folder (None elsewhere, and without
    conditional writes): rank 0, the one writer, checks it before its writes, commits each checkpoint to it,
    and every write of its process into the run folder goes through its gate."""
    if generation is None or ray.train.get_context().get_world_rank() != 0:
        return None
    layout = RunLayout.of(cfg)
    return Lease.join(Store(cfg.storage), layout.prefix, layout.uri, "run", generation)


@dataclass
class Worker:
    """One rank's training state, and the three things it does: set up, train an epoch, end it."""

    cfg: JobConfig
    rank: int
    world: int
    device: torch.device
    images: torch.Tensor  # uint8 (N, 3, 32, 32), resident on the device
    netG: torch.nn.Module  # DDP-wrapped
    netD: torch.nn.Module
    optG: torch.optim.Optimizer
    optD: torch.optim.Optimizer
    fixed_noise: torch.Tensor
    start_epoch: int
    step: int
    evaluator: Evaluator | None
    recorder: Recorder
    checkpointer: Checkpointer
    mid_epoch: MidEpoch | None  # where a mid-epoch checkpoint stopped, until this attempt's first epoch resumes
    beat: RankBeat | None  # tells the driver's stall watch where this rank is
    preemptions: PreemptionCheck | None = None

    @classmethod
    def set_up(cls, cfg: JobConfig, lease: Lease | None = None, board: Any = None) -> Worker:
        """`lease`: rank 0's view of the driver's hold on the run folder (`join_lease`); `board`: where every
        rank says how it is doing, for the driver's stall watch."""
        ctx = ray.train.get_context()
        rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
        store = Store(cfg.storage)
        node = ray.get_runtime_context().get_node_id()
        images = torch.from_numpy(load_split(store, cfg, max_images=cfg.data.max_images, node=node).images).to(device)
        log.debug(
            "rank %d/%d on %s: %d images resident (%.0f MiB)", rank, world, device, len(images), images.numel() / 2**20
        )

        # [1] Build, move to the device, apply speed.* (memory format, compile), make optimizers, load
        # state (Adam's follows its parameters).
        torch.manual_seed(cfg.train.seed)
        netG: torch.nn.Module
        netD: torch.nn.Module
        netG, netD = (
            net.to(device)
            for net in build_models(cfg.model.z_dim, cfg.model.g_features, cfg.model.d_features, cfg.model.alpha)
        )
        prepare_models(netG, netD, cfg.speed)
        optG, optD = make_optimizers(
            netG,
            netD,
            cfg.train.lr_generator,
            cfg.train.lr_discriminator,
            cfg.train.beta1,
            cfg.train.beta2,
            fused=cfg.speed.fused_adam,
        )
        fixed_noise = torch.randn(
            cfg.sample.grid_size**2, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.train.seed)
        )
        layout = RunLayout.of(cfg)
        checkpointer = Checkpointer(store, layout, cfg.eval.metric, lease)
        registered = ray.train.get_checkpoint()
        state, resumed_from = checkpointer.restore(registered.path if registered is not None else None, rank)
        start_epoch, step, mid_epoch = 0, 0, MidEpoch.of(state)
        if state is not None:
            netG.load_state_dict(state["netG"])
            netD.load_state_dict(state["netD"])
            load_optimizer_state(optG, state["optG"], cfg.speed.fused_adam)
            load_optimizer_state(optD, state["optD"], cfg.speed.fused_adam)
            fixed_noise, start_epoch, step = state["fixed_noise"], state["epoch"], state["step"]

        # [2] DDP last: it broadcasts rank 0's parameters, which every rank already has. It calls the
        # modules compiled in place above (see prepare_models for why not compile(DDP(...))).
        # speed.ddp_bucket_mb and speed.grad_compression set how it all-reduces (dcgan_ray.gan.ddp).
        netG = ray.train.torch.prepare_model(netG, parallel_strategy_kwargs=ddp_kwargs(cfg.speed))
        netD = ray.train.torch.prepare_model(netD, parallel_strategy_kwargs=ddp_kwargs(cfg.speed))
        compress_gradients(netG, cfg.speed)
        compress_gradients(netD, cfg.speed)
        if mid_epoch is not None and mid_epoch.world_size == world:
            load_buffers(mid_epoch.buffers[rank], netG, netD)  # this rank's own, as they were (after DDP's sync)

        # With eval.in_task a Ray task scores the checkpoints (dcgan_ray.train.validation): no evaluator here.
        inline = cfg.eval.every_epochs and not cfg.eval.in_task
        evaluator = Evaluator(store, cfg, images, device, rank, world) if inline else None
        recorder = recorder_for(rank, store, cfg, checkpointer, fixed_noise.to(device), start_step=step)
        recorder.started(start_epoch, world, resumed_from, len(images) // (world * cfg.train.batch_size), mid_epoch)
        return cls(
            cfg,
            rank,
            world,
            device,
            images,
            netG,
            netD,
            optG,
            optD,
            fixed_noise.to(device),
            start_epoch,
            step,
            evaluator,
            recorder,
            checkpointer,
            mid_epoch,
            RankBeat(board, rank, store, step) if board is not None else None,
        )

    def train_epoch(self, epoch: int) -> EpochStats:
        cfg = self.cfg
        start, position = 0, None
        if self.mid_epoch is not None:  # the first epoch of an attempt resumed mid-way
            start, position, _ = self.mid_epoch.resume(self.rank, self.world, cfg.train.batch_size)
            self.mid_epoch = None
        batches = rank_batches(
            len(self.images), cfg.train.batch_size, self.rank, self.world, cfg.train.seed, epoch, start
        )
        first = position.steps if position is not None else 0

        def save(steps: int, sums: torch.Tensor, info: Any) -> None:
            self.save_for_preemption(epoch, MidEpoch(start, steps, self.world, [], []), sums, steps - first, info)

        def on_log(i: int, m: dict[str, float]) -> None:
            log.info(
                "epoch %d/%d step %d/%d  loss_d %.3f  loss_g %.3f  D(x) %.3f  D(G(z)) %.3f  %.0f img/s",
                epoch + 1,
                cfg.train.epochs,
                i,
                len(batches),
                m["loss_d"],
                m["loss_g"],
                m["d_real"],
                m["d_fake"],
                m["images_per_s"] * self.world,
            )
            self.recorder.progress(self.step + i, {**m, "images_per_s": m["images_per_s"] * self.world})

        return run_epoch(
            self.netG,
            self.netD,
            self.optG,
            self.optD,
            self.images,
            batches,
            cfg.model.z_dim,
            noise_generator(cfg.train.seed, epoch, self.rank, self.device),
            real_target=1.0 - cfg.train.label_smoothing,
            log_every=cfg.train.log_every_steps if self.rank == 0 else 0,
            on_log=on_log,
            speed=cfg.speed,
            position=position,
            after_step=self.after_step(save, first),
        )

    def after_step(
        self, save: Callable[[int, torch.Tensor, Any], None], first: int
    ) -> Callable[[int, torch.Tensor], None]:
        """What happens between two steps: the stall watch hears where this rank is, and every so often all ranks
        ask Ray for a preemption notice."""
        check = self.preemption_check(save).after_step

        def between(steps: int, sums: torch.Tensor) -> None:
            if self.beat is not None:
                self.beat.at(self.step + steps - first)
            faults.reached("mid_epoch", steps)
            check(steps, sums)

        return between

    def preemption_check(self, save: Callable[[int, torch.Tensor, Any], None]) -> PreemptionCheck:
        if self.preemptions is None:  # one per attempt: its cadence is timed once
            self.preemptions = PreemptionCheck(self.cfg.checkpoint.preemption_check_s, self.device, save, self.rank)
        self.preemptions.save = save
        return self.preemptions

    def save_for_preemption(self, epoch: int, where: MidEpoch, sums: torch.Tensor, taken: int, info: Any) -> None:
        """A preemption notice: a checkpoint at this step, uploaded before anything else (a collective).
        `taken`: steps of this epoch that this attempt took (the rest were resumed)."""
        mine = gather({"totals": sums.tolist(), "buffers": buffers(self.netG, self.netD)})
        where.totals, where.buffers = [r["totals"] for r in mine], [r["buffers"] for r in mine]
        step = self.step + taken
        saved = self.recorder.preempted(info, epoch, where.steps, step, lambda: self.state(epoch, where, step))
        ray.train.report(
            {"epoch": epoch, "step": step, "preempted": 1.0},
            checkpoint=ray.train.Checkpoint.from_directory(saved) if saved else None,
            checkpoint_dir_name=saved.name if saved else None,
            checkpoint_upload_mode=CheckpointUploadMode.SYNC,  # durable before the deadline, or not at all
            checkpoint_upload_fn=self.upload_checkpoint if saved else None,
            delete_local_checkpoint_after_upload=False,
        )

    def end_epoch(self, epoch: int, stats: EpochStats) -> None:
        """Agree on the epoch's numbers and BatchNorm statistics, evaluate, record, report (with a
        checkpoint on checkpoint epochs). Every step up to `report` is a collective."""
        cfg, completed = self.cfg, epoch + 1
        self.step += stats.steps
        loss_d, loss_g, d_real, d_fake, seconds = average(
            [stats.loss_d, stats.loss_g, stats.d_real, stats.d_fake, stats.seconds], self.device
        )
        average_bn_buffers(self.netG, self.netD)
        metrics = {
            "epoch": completed,
            "step": self.step,
            "loss_d": loss_d,
            "loss_g": loss_g,
            "d_real": d_real,
            "d_fake": d_fake,
            "images_per_s": stats.images * self.world / seconds,
            "epoch_seconds": seconds,
            "world_size": self.world,
            "global_batch": cfg.train.batch_size * self.world,
            "finite": float(np.isfinite([loss_d, loss_g]).all()),
        }
        last = completed == cfg.train.epochs
        if self.evaluator is not None and cfg.is_eval_epoch(completed):
            metrics.update(self.evaluate())
        save_now = completed % cfg.checkpoint.every_epochs == 0 or last
        saved = self.recorder.epoch_done(metrics, self.netG, lambda: self.state(completed), save_now)
        # Every rank reports (it is a barrier); only rank 0 hands over a checkpoint, uploaded by our store
        # (outage retries, manifest last) rather than by Ray's pyarrow copy, in the background by default.
        # With eval.in_task, eval epochs' checkpoints (the config makes them checkpoint epochs) are scored
        # by Ray's validation task once uploaded, while the next epoch trains.
        mode = CheckpointUploadMode.ASYNC if cfg.checkpoint.async_upload else CheckpointUploadMode.SYNC
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(saved) if saved else None,
            checkpoint_dir_name=saved.name if saved else None,
            checkpoint_upload_mode=mode,
            checkpoint_upload_fn=self.upload_checkpoint if saved else None,
            delete_local_checkpoint_after_upload=False,
            validation=bool(saved and cfg.eval.in_task and cfg.is_eval_epoch(completed)),
        )

    def upload_checkpoint(self, checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        """Ray's `checkpoint_upload_fn`: upload the local folder, mark it durable in run.json, return it as a
        checkpoint in the run's storage."""
        local = Path(checkpoint.path)
        folder = self.checkpointer.upload(local, dir_name)
        shutil.rmtree(local.parent, ignore_errors=True)  # the recorder's temporary folder around it
        self.recorder.checkpoint_durable(epoch_of_key(folder), self.checkpointer.store.uri(folder))
        return ray.train.Checkpoint(
            f"{self.cfg.storage.bucket}/{folder}", filesystem=ray.train.get_context().get_storage().storage_filesystem
        )

    def evaluate(self) -> dict[str, float]:
        """Quality metrics of G (rank 0; {} elsewhere, and without evaluation). A collective."""
        return self.evaluator(self.netG, seed=self.cfg.train.seed) if self.evaluator is not None else {}

    def state(self, epoch: int, mid_epoch: MidEpoch | None = None, step: int | None = None) -> dict[str, Any]:
        """What a checkpoint holds (see dcgan_ray.storage.checkpoint); a mid-epoch one also where in its
        epoch it stopped (see dcgan_ray.train.interruptions)."""
        state = {
            "netG": unwrap(self.netG).state_dict(),
            "netD": unwrap(self.netD).state_dict(),
            "optG": self.optG.state_dict(),
            "optD": self.optD.state_dict(),
            "epoch": epoch,
            "step": self.step if step is None else step,
            "fixed_noise": self.fixed_noise.cpu(),
            "config": self.cfg.to_dict(),
        }
        if mid_epoch is not None:
            state["within_epoch"] = dataclasses.asdict(mid_epoch)
        return state
