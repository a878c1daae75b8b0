"""TensorBoard event files of a run, written by rank 0 with tensorboardX (which Ray Tune brings).

One file per epoch, closed at the epoch's end and then uploaded once (`dcgan_ray.train.watch`) into the
run folder, where `tensorboard --logdir s3://BUCKET/PREFIX/runs` finds it as the run `<name>`. A closed
file never changes, and each new one sorts after the last (tensorboardX names them by the second they
were opened; the suffix adds the attempt's start and the file's number in it), which is what
TensorBoard's reader expects of a run's files.

The x axis of every curve and image is the training step (optimizer steps so far, of every worker
together): step-level numbers at the step they were logged, an epoch's numbers and its sample grid at
the step that ended it (`epoch/epoch` maps one to the other), epoch 0 (the untrained G) at step 0.

Resuming: the first file of an attempt that starts after step s carries tensorboardX's `purge_step`
s + 1, so TensorBoard drops whatever the interrupted attempt logged after the checkpoint it resumes
from, and the curves go on without a step twice. An attempt from step 0 purges from 0.

Every file of a run carries its hyperparameters (HParams' session start info), so one `--logdir` over
a study's trials, or over many runs, compares them in TensorBoard's HParams tab, with every scalar of
the run as a metric.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as hparams_summaries

from dcgan_ray.config import JobConfig

log = logging.getLogger(__name__)

STEP_KEYS = ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s")
"""What every logged step writes (under step/), as its progress line shows it: the losses, D(x) and D(G(z))
averaged over the steps since the last line, and images per second of all workers together."""

EPOCH_KEYS = (
    "loss_d",
    "loss_g",
    "d_real",
    "d_fake",
    "images_per_s",
    "epoch_seconds",
    "world_size",
    "global_batch",
    "finite",
)
"""An epoch's training numbers (under epoch/); every other number of its history entry is a quality
metric (under quality/): digit_fd, digit_is, class_hist_tv, classifier_accuracy, fid, eval_seconds."""

NOT_LOGGED = {"epoch", "step"}
GRID_TAG = "samples/fixed_noise"

HPARAM_KEYS = (
    "train.lr_generator",
    "train.lr_discriminator",
    "train.beta1",
    "train.beta2",
    "train.batch_size",
    "train.label_smoothing",
    "train.seed",
    "train.epochs",
    "model.z_dim",
    "model.g_features",
    "model.d_features",
    "model.alpha",
    "scaling.num_workers",
    "speed.autocast_bf16",
)
"""The settings every run shows in HParams; a study's trials add the keys their study searches."""


def dotted(cfg: JobConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def run_hparams(cfg: JobConfig) -> dict[str, float | str | bool]:
    """The run's hyperparameters as HParams shows them: numbers, text or booleans, never lists."""
    values = {}
    for key in (*HPARAM_KEYS, *cfg.tune.space):
        value = dotted(cfg, key)
        if isinstance(value, list):  # elastic num_workers [min, max]
            value = "-".join(map(str, value))
        if value is not None:
            values[key] = value
    return values


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class EventLog:
    """The run's event files in a local folder, one per epoch; `close_epoch` returns the finished file."""

    def __init__(self, cfg: JobConfig, start_step: int, purge: bool = True):
        """`start_step`: the steps already trained; `purge`: whether this attempt's first file drops what
        an earlier attempt logged after that (off only for the driver's late scores)."""
        self.cfg = cfg
        self.local = Path(tempfile.mkdtemp(prefix="dcgan-events-"))
        self.purge_step: int | None = (start_step + 1 if start_step else 0) if purge else None
        self.writer: SummaryWriter | None = None
        self.file_dir: Path | None = None
        # In every file name, after the second it was opened: the attempt (its start in ms), so an attempt
        # that starts within the second its predecessor's last file was opened still sorts after it and
        # never takes that file's name; then the file's number in the attempt.
        self.attempt = f"{time.time_ns() // 1_000_000:013d}"
        self.files = 0

    def _open(self, epoch: int) -> SummaryWriter:
        if self.writer is None:
            self.files += 1
            self.file_dir = self.local / f"{self.files:06d}"
            # flush_secs: the file is closed at the epoch's end anyway; nothing is read before then.
            self.writer = SummaryWriter(
                logdir=str(self.file_dir),
                purge_step=self.purge_step,
                flush_secs=3600,
                max_queue=1000,
                filename_suffix=f".{self.attempt}.{self.files:06d}.epoch{epoch:06d}",
            )
            self.purge_step = None
            _, session_start, _ = hparams_summaries(run_hparams(self.cfg), {})
            self.writer.file_writer.add_summary(session_start)
        return self.writer

    def step(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """A logged training step of `epoch` (1-based, the epoch being trained)."""
        writer = self._open(epoch)
        for key in STEP_KEYS:
            if is_number(metrics.get(key)):
                writer.add_scalar(f"step/{key}", metrics[key], step)

    def epoch(self, epoch: int, step: int, entry: dict[str, Any], grid_png: bytes | None) -> None:
        """An epoch's training numbers (from its history entry) and its sample grid, at the step that ended
        it; its quality metrics go through `quality`, as they may arrive later (eval.in_task)."""
        writer = self._open(epoch)
        writer.add_scalar("epoch/epoch", epoch, step)
        for key in EPOCH_KEYS:
            if is_number(entry.get(key)):
                writer.add_scalar(f"epoch/{key}", entry[key], step)
        if grid_png is not None:
            pixels = np.asarray(Image.open(io.BytesIO(grid_png)).convert("RGB"))
            writer.add_image(GRID_TAG, pixels, step, dataformats="HWC")

    def quality(self, epoch: int, step: int, entry: dict[str, Any]) -> None:
        """The quality metrics of a history entry, at its step, into the file of `epoch` (the epoch being
        logged, which is later than the entry's when a scoring task reported it late)."""
        writer = self._open(epoch)
        for key, value in entry.items():
            if key not in NOT_LOGGED and key not in EPOCH_KEYS and is_number(value):
                writer.add_scalar(f"quality/{key}", value, step)

    def finished(self, epoch: int) -> None:
        """HParams' session end: the run finished (TensorBoard shows the others as running or unknown)."""
        _, _, session_end = hparams_summaries(run_hparams(self.cfg), {})
        self._open(epoch).file_writer.add_summary(session_end)

    def close_epoch(self) -> Path | None:
        """Close the open file and return it (None when nothing was logged since the last one)."""
        if self.writer is None:
            return None
        self.writer.close()
        assert self.file_dir is not None  # `_open` sets it with the writer
        files = list(self.file_dir.glob("events.out.tfevents.*"))
        self.writer = None
        return files[0] if files else None

    def remove(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        shutil.rmtree(self.local, ignore_errors=True)


def quality_entries(history: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Epoch -> its history entry, for the entries that hold quality metrics."""
    return {
        int(h["epoch"]): h
        for h in history
        if any(is_number(v) for k, v in h.items() if k not in NOT_LOGGED and k not in EPOCH_KEYS)
    }
