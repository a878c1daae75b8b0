"""Rank 0's side effects of a training run, behind one object: the run manifest, sample grids, the
animation, the best checkpoint, the checkpoint handed to Ray.

`recorder_for(rank, ...)` gives rank 0 a `RunRecorder` and every other rank a plain `Recorder` whose
methods do nothing, so the training loop has no `if rank == 0:` branches. Nothing here is a
collective: rank 0 may take as long as it needs while the others wait at the next `report`. With
asynchronous uploads `checkpoint_durable` comes from Ray's upload thread while the loop goes on, so every
change to run.json is made under one lock.
"""

from __future__ import annotations

import io
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dcgan_ray import faults
from dcgan_ray.config import JobConfig
from dcgan_ray.gan.step import to_pixels, unwrap
from dcgan_ray.quality.metrics import describe_metrics
from dcgan_ray.storage.checkpointer import Checkpointer
from dcgan_ray.storage.images import gif_bytes, grid_image, png_bytes
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.runs import (
    discard_results_after,
    merge_results,
    new_run_manifest,
    read_run_manifest,
    steps_of_key,
    write_run_manifest,
)
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.interruptions import MidEpoch
from dcgan_ray.train.watch import RunWatch

log = logging.getLogger(__name__)

State = Callable[[], dict[str, Any]]
"""Builds the checkpoint state on demand (only rank 0 ever calls it)."""


class Recorder:
    """The recorder of ranks other than 0: every method is a no-op."""

    def started(
        self,
        start_epoch: int,
        world: int,
        resumed_from: str | None,
        steps_per_epoch: int,
        mid_epoch: MidEpoch | None = None,
    ) -> None:
        pass

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def first_samples(self, netG: torch.nn.Module, quality: dict[str, float]) -> None:
        pass

    def epoch_done(self, metrics: dict[str, Any], netG: torch.nn.Module, state: State, checkpoint: bool) -> Path | None:
        return None

    def checkpoint_durable(self, epoch: int, uri: str) -> None:
        pass

    def preempted(self, info: Any, epoch: int, steps: int, step: int, state: State) -> Path | None:
        return None

    def finished(self) -> None:
        pass


GIF_FRAMES = 101
"""The animation holds at most this many grids (all of them are in memory while it is made)."""


def gif_epochs(epochs: int) -> list[int]:
    """The epochs the animation shows: all of them, or GIF_FRAMES evenly spread from 0 to the last."""
    if epochs < GIF_FRAMES:
        return list(range(epochs + 1))
    return sorted({round(i * epochs / (GIF_FRAMES - 1)) for i in range(GIF_FRAMES)})


class RunRecorder(Recorder):
    """Rank 0: keeps run.json current and writes every artifact a person looks at."""

    def __init__(
        self, store: Store, cfg: JobConfig, checkpointer: Checkpointer, fixed_noise: torch.Tensor, start_step: int = 0
    ):
        self.store, self.cfg, self.checkpointer, self.fixed_noise = store, cfg, checkpointer, fixed_noise
        self.layout = RunLayout.of(cfg)
        self.manifest: dict[str, Any] = {}
        self.lease = checkpointer.lease  # the run's lease in the bucket: checked before every write
        self.start_step = start_step  # optimizer steps of the checkpoint this attempt resumed from
        self.watch = RunWatch(cfg, start_step, self.lease)  # TensorBoard events and the run page, off the path
        self._lock = threading.Lock()
        self._trained = False  # every epoch trained; the run is finished once the last checkpoint is durable

    def started(
        self,
        start_epoch: int,
        world: int,
        resumed_from: str | None,
        steps_per_epoch: int,
        mid_epoch: MidEpoch | None = None,
    ) -> None:
        cfg, layout = self.cfg, self.layout
        m = read_run_manifest(self.store, layout) or new_run_manifest(cfg, layout)
        if m.get("world_size") is not None or resumed_from is not None:  # workers of this run have started before
            self._record_restart(m, start_epoch, world, resumed_from, mid_epoch)
        m.update(
            status="running",
            epochs_total=cfg.train.epochs,
            config=cfg.to_dict(),
            world_size=world,
            global_batch=cfg.train.batch_size * world,
            epochs_completed=start_epoch,
        )
        if cfg.eval.in_task:
            discard_results_after(self.store, layout, start_epoch)
        if resumed_from is not None:
            m["resumed_from"] = {"epoch": start_epoch, "checkpoint": resumed_from}
        self.manifest = m
        self._save()
        self.store.put_bytes(layout.config_key, cfg.to_yaml().encode(), "text/yaml")
        log.info(
            "run %s: %d workers x batch %d = global batch %d; %d steps per epoch",
            layout.uri,
            world,
            cfg.train.batch_size,
            cfg.train.batch_size * world,
            steps_per_epoch,
        )

    def _record_restart(
        self, m: dict[str, Any], start_epoch: int, world: int, resumed_from: str | None, mid_epoch: MidEpoch | None
    ) -> None:
        """A restart (Ray restarting the workers, or a resubmission): a record in `restarts` instead of
        overwritten history, a resize if the world size changed, and one line saying what it resumed from."""
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        before, recorded = m.get("world_size"), m.get("epochs_completed", 0)
        redone = [h for h in m["history"] if h["epoch"] > start_epoch]
        m["history"] = [h for h in m["history"] if h["epoch"] <= start_epoch]
        m.setdefault("checkpoints", {}).update(latest=resumed_from, durable_epoch=start_epoch if resumed_from else 0)
        if resumed_from is not None:  # (its upload may have ended after run.json was last written)
            for h in m["history"]:
                if h["epoch"] == start_epoch:
                    h["checkpoint_durable"] = True
        reason = None
        if redone:
            epoch, durable = redone[-1]["epoch"], redone[-1].get("checkpoint_durable", "unrecorded")
            reason = {
                False: f"the checkpoint of epoch {epoch} never finished uploading",
                True: f"the checkpoint of epoch {epoch} is damaged",
                None: f"epoch {epoch} had no checkpoint (checkpoint.every_epochs)",
                "unrecorded": f"the checkpoint of epoch {epoch} was not durable",
            }[durable]
        resized = before not in (None, world)
        saved_world = mid_epoch.world_size if mid_epoch is not None else before
        restart = {
            "at": at,
            "from_epoch": recorded,
            "to_epoch": start_epoch,
            "checkpoint": resumed_from,
            "reason": reason,
            "world_size_before": before,
            "world_size_after": world,
            "redone": redone,
            # Resumed on the world size it was saved with, a run ends bit-identical to an uninterrupted one.
            "exact": saved_world in (None, world),
        }
        if mid_epoch is not None:
            restart["step_in_epoch"] = mid_epoch.steps
        m.setdefault("restarts", []).append(restart)
        self._record_resumption(m, resumed_from)
        if resized:  # an elastic run going on after a node was lost or came back
            m.setdefault("resizes", []).append({"epoch": start_epoch, "from": before, "to": world, "at": at})
        source = f"resumes from {resumed_from} (epoch {start_epoch})" if resumed_from else "starts over from epoch 0"
        if mid_epoch is not None:
            source += f" at step {mid_epoch.steps + 1} of epoch {start_epoch + 1}"
        if not restart["exact"]:
            source += " (on another world size: not bit-identical to an uninterrupted run)"
        workers = f"{world} worker(s)" + (f" instead of {before}" if resized else "")
        lost = (
            f"epoch(s) {', '.join(str(h['epoch']) for h in redone)} recorded before are trained again: {reason}"
            if redone
            else "no epoch recorded in run.json is trained again"
        )
        log.log(
            logging.WARNING if redone or resized else logging.INFO,
            "run %s restarted: %s with %s, at epoch %d/%d; %s",
            self.layout.uri,
            source,
            workers,
            start_epoch + 1,
            self.cfg.train.epochs,
            lost,
        )

    def _record_resumption(self, m: dict[str, Any], resumed_from: str | None) -> None:
        """The preemption this restart follows, if any: what it resumed from, and the steps it lost (those
        since the checkpoint it resumed from; none when that is the preemption's own)."""
        waiting = [p for p in m.get("preemptions", []) if "resumed_from" not in p]
        if waiting:
            waiting[-1].update(resumed_from=resumed_from, steps_lost=max(0, waiting[-1]["step"] - self.start_step))

    def preempted(self, info: Any, epoch: int, steps: int, step: int, state: State) -> Path | None:
        """A preemption notice at step `steps` of epoch `epoch` + 1: run.json records it, and the checkpoint
        of this step goes into a fresh local folder, whose path is returned for Ray to upload at once."""
        self._check_lease()
        checkpoint_dir = Path(tempfile.mkdtemp(prefix="dcgan-ckpt-")) / self.checkpointer.dir_name(epoch, steps)
        self.checkpointer.save(checkpoint_dir, state())
        deadline = (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.deadline_ms / 1000)) if info.deadline_ms else None
        )
        record = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "nodes": info.preempted_node_ids,
            "ranks": info.preempted_ranks,
            "deadline": deadline,
            "epoch": epoch + 1,
            "step_in_epoch": steps,
            "step": step,
            "checkpoint": None,  # its URI once it is durable
        }
        with self._lock:
            self.manifest.setdefault("preemptions", []).append(record)
            self._save()
        log.warning(
            "preemption notice: node(s) %s, holding rank(s) %s, go %s; saving a checkpoint at step %d of epoch %d "
            "and training no further step until the run restarts",
            ", ".join(n[:12] for n in info.preempted_node_ids),
            ", ".join(map(str, info.preempted_ranks)),
            f"at {deadline}" if deadline else "without a deadline",
            steps,
            epoch + 1,
        )
        return checkpoint_dir

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        """A logged step's numbers (the progress line's), for TensorBoard."""
        self.watch.step(step, metrics)

    def first_samples(self, netG: torch.nn.Module, quality: dict[str, float]) -> None:
        """Epoch 0, the untrained G: the first frame of the animation and the far end of every curve."""
        self.manifest["samples"]["epochs"] = [self._write_grid(netG, 0)]
        self.manifest["history"] = [{"epoch": 0, **quality}] if quality else []
        self._save()
        self.watch.epoch_done(self.manifest)

    def epoch_done(self, metrics: dict[str, Any], netG: torch.nn.Module, state: State, checkpoint: bool) -> Path | None:
        """Samples, the best copy, run.json; with `checkpoint`, the checkpoint in a fresh local folder,
        whose path is returned for Ray to upload (Ray gives the other ranks rank 0's folder name). The
        upload removes the folder (`Worker.upload_checkpoint`) and then calls `checkpoint_durable`."""
        completed = metrics["epoch"]
        self._check_lease()
        sample_uri = self._write_grid(netG, completed)
        log.info(
            "epoch %d/%d done in %.1f s: loss_d %.3f loss_g %.3f D(x) %.3f D(G(z)) %.3f %.0f img/s; samples %s",
            completed,
            self.cfg.train.epochs,
            metrics["epoch_seconds"],
            metrics["loss_d"],
            metrics["loss_g"],
            metrics["d_real"],
            metrics["d_fake"],
            metrics["images_per_s"],
            sample_uri,
        )
        faults.reached("record_epoch")
        best = self.checkpointer.keep_if_best(
            self.manifest["checkpoints"].get("best"), completed, metrics.get(self.cfg.eval.metric), state
        )
        checkpoint_dir = None
        if checkpoint:
            checkpoint_dir = Path(tempfile.mkdtemp(prefix="dcgan-ckpt-")) / self.checkpointer.dir_name(completed)
            self.checkpointer.save(checkpoint_dir, state())
        with self._lock:
            m = self.manifest
            if best is not None:
                m["checkpoints"]["best"] = best
            m["history"].append({**metrics, "checkpoint_durable": False if checkpoint else None})
            m["epochs_completed"] = completed
            m["samples"]["latest"] = self.store.uri(self.layout.latest_sample_key)
            m["samples"]["epochs"] = sorted({*m["samples"]["epochs"], sample_uri})
            self._merge_scores()
            self._save()
            self.watch.epoch_done(m)
        return checkpoint_dir

    def checkpoint_durable(self, epoch: int, uri: str) -> None:
        """The checkpoint of `epoch` is in the bucket with its manifest (called by the upload, in Ray's
        background thread by default): mark it so in run.json, and finish the run if it was the last. A
        mid-epoch checkpoint (a preemption's) marks its preemption instead of the epoch."""
        with self._lock:
            m = self.manifest
            if steps_of_key(uri) is not None:
                for p in m.get("preemptions", []):
                    if p["checkpoint"] is None:
                        p["checkpoint"] = uri
            else:
                for h in m["history"]:
                    if h["epoch"] == epoch:
                        h["checkpoint_durable"] = True
            if epoch >= m["checkpoints"].get("durable_epoch", 0):
                m["checkpoints"].update(latest=uri, durable_epoch=epoch)
            self._finish_if_durable()
            self._save()

    def finished(self) -> None:
        self._check_lease()
        frames = [
            Image.open(io.BytesIO(self.store.get_bytes(self.layout.sample_key(e)))).convert("RGB")
            for e in gif_epochs(self.cfg.train.epochs)
        ]
        self.store.put_bytes(self.layout.gif_key, gif_bytes(frames), "image/gif")
        with self._lock:
            self.manifest["samples"]["gif"] = self.store.uri(self.layout.gif_key)
            self._merge_scores()
            self._trained = True
            self._finish_if_durable()
            self._save()

    def _finish_if_durable(self) -> None:
        """Once every epoch is trained and the last checkpoint is durable: the run's final status. (With
        eval.in_task the last scores may still be coming: the driver marks the run finished once Ray has
        waited for them and it has merged them.)"""
        m = self.manifest
        if (
            not self._trained
            or m["checkpoints"].get("durable_epoch") != self.cfg.train.epochs
            or m.get("status") in ("finished", "scoring")
        ):  # (already finished by the other caller)
            return
        m["status"] = "scoring" if self.cfg.eval.in_task else "finished"
        if m["status"] == "finished":
            commit_end(self.lease, "finished", m)
        self.watch.finished(m)
        log.info(
            "training finished: %d epochs; samples %s, animation %s, latest checkpoint %s",
            self.cfg.train.epochs,
            m["samples"]["latest"],
            m["samples"]["gif"],
            m["checkpoints"]["latest"],
        )

    def _write_grid(self, netG: torch.nn.Module, epoch: int) -> str:
        """G in eval mode (BatchNorm running statistics) on the fixed noise, as epoch_NNNN.png and latest.png."""
        bare = unwrap(netG)
        bare.eval()
        with torch.no_grad():
            pixels = to_pixels(bare(self.fixed_noise))
        bare.train()
        png = png_bytes(grid_image(pixels, columns=self.cfg.sample.grid_size, scale=self.cfg.sample.scale))
        self.store.put_bytes(self.layout.sample_key(epoch), png, "image/png")
        self.store.put_bytes(self.layout.latest_sample_key, png, "image/png")
        self.watch.grid(epoch, png)
        return self.store.uri(self.layout.sample_key(epoch))

    def _merge_scores(self) -> None:
        """With eval.in_task: fold in the scoring tasks' results that arrived since the last write."""
        if self.cfg.eval.in_task:
            for epoch in merge_results(self.store, self.layout, self.manifest):
                log.info(
                    "epoch %d scored: %s",
                    epoch,
                    describe_metrics(next(h for h in self.manifest["history"] if h["epoch"] == epoch)),
                )

    def _check_lease(self) -> None:
        """A driver that lost the run (LeaseLost) stops before it writes: the new holder's files stay its own."""
        if self.lease is not None:
            self.lease.check()

    def _save(self) -> None:
        self._check_lease()
        write_run_manifest(self.store, self.layout, self.manifest)


def commit_end(lease: Lease | None, state: str, manifest: dict[str, Any]) -> None:
    """Commit the run's end state to its lease log, before run.json says it: the log is what readers believe
    when a run.json an older generation wrote landed late (`Ownership.status_of`)."""
    if lease is not None:
        lease.commit({"state": state, "epochs_completed": manifest.get("epochs_completed", 0)})


def recorder_for(
    rank: int, store: Store, cfg: JobConfig, checkpointer: Checkpointer, fixed_noise: torch.Tensor, start_step: int = 0
) -> Recorder:
    return RunRecorder(store, cfg, checkpointer, fixed_noise, start_step) if rank == 0 else Recorder()
