"""Training checkpoints: the format, and a run's checkpoints behind one interface.

A checkpoint is one `checkpoint.pt` (torch.save of plain tensors and dicts) inside a directory:
G, D, both Adam states, epochs completed, optimizer steps, the fixed sampling noise and the resolved
job config. It is read with `weights_only=True`, so loading one never runs code. This module is the
only writer of that format. (Training noise and permutations come from generators seeded by
(seed, epoch, rank), so no global RNG state needs saving.)

`Checkpointer` is what the training loop sees: `restore` (Ray's latest registered checkpoint, with a
fallback to older ones when it is damaged), `dir_name` (a folder name never used twice), `save` and
`keep_if_best` (the best checkpoint by the quality metric, kept apart at <run>/best/).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dcgan_ray.config import JobConfig, StorageConfig, config_from_dict
from dcgan_ray.errors import CheckpointError, ObjectMissing
from dcgan_ray.gan.models import Generator, build_models
from dcgan_ray.gan.sync import broadcast_from_rank_zero
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store, parse_s3_uri

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
_REQUIRED = ("format", "netG", "netD", "optG", "optD", "epoch", "step", "fixed_noise", "config")


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """The checkpoint file's bytes for `state` (G, D, optimizers, epoch, step, fixed_noise, config)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buf)
    return buf.getvalue()


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to directory/checkpoint.pt, atomically (temp file, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(checkpoint_bytes(state))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(source: str | Path | bytes, label: str | None = None) -> dict[str, Any]:
    """Read a checkpoint file (or its bytes) safely; a damaged one raises CheckpointError naming it."""
    label = label or str(source if not isinstance(source, bytes) else "checkpoint")
    try:
        f = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        with f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {label} does not exist") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"checkpoint {label} is damaged or truncated and cannot be read "
                              f"({type(e).__name__}: {detail})") from None
    except Exception as e:  # torch's weights-only unpickler raises UnpicklingError and others
        raise CheckpointError(f"checkpoint {label} is not a dcgan-ray checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {label} lacks {', '.join(missing)}: not a dcgan-ray checkpoint")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {label} has format {state['format']}, this code reads {FORMAT_VERSION}")
    return state


def generator_from_checkpoint(state: dict[str, Any]) -> tuple[Generator, JobConfig]:
    """The trained G in eval mode (BatchNorm running statistics) and the config it was trained with."""
    cfg = config_from_dict(state["config"], "the checkpoint's config")
    netG, _ = build_models(cfg.model.z_dim, cfg.model.g_features, cfg.model.d_features, cfg.model.alpha)
    netG.load_state_dict(state["netG"])
    return netG.eval(), cfg


def read_checkpoint_uri(uri: str, storage: StorageConfig) -> dict[str, Any]:
    """Load a checkpoint from a local path or an s3:// URI.

    The URI may name the checkpoint.pt file, its checkpoint directory, or a run folder
    (`s3://BUCKET/PREFIX/runs/NAME`), which means the run's latest checkpoint per its run.json.
    """
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if path.is_dir():
            path = path / CHECKPOINT_FILE
        return load_checkpoint(path)
    bucket, key = parse_s3_uri(uri)
    store = Store(dataclasses.replace(storage, bucket=bucket))
    candidates = [key] if key.endswith(".pt") else [f"{key}/{CHECKPOINT_FILE}"]
    if not key.endswith(".pt"):
        run = read_run_manifest(store, RunLayout(bucket, key))
        latest = (run or {}).get("checkpoints", {}).get("latest")
        if latest:
            candidates.insert(0, f"{parse_s3_uri(latest)[1]}/{CHECKPOINT_FILE}")
    for candidate in candidates:
        try:
            data = store.get_bytes(candidate)
        except ObjectMissing:
            continue
        return load_checkpoint(data, store.uri(candidate))
    raise CheckpointError(f"no checkpoint at {uri} on {store.endpoint}: give the URI of a checkpoint.pt, its "
                          "checkpoint_epoch_NNNN folder, or a run folder with a run.json")


class Checkpointer:
    """One run's checkpoints in the bucket: resume with fallback, unique folders, the best copy."""

    def __init__(self, store: Store, layout: RunLayout, metric: str):
        self.store, self.layout, self.metric = store, layout, metric

    def keys(self) -> list[str]:
        """Keys of the run's checkpoint files, newest epoch first."""
        keys = self.store.list_keys(f"{self.layout.prefix}/{RunLayout.CHECKPOINT_DIR_PREFIX}")
        return sorted((k for k in keys if k.endswith(f"/{CHECKPOINT_FILE}")), reverse=True)

    def restore(self, handed: str | None, rank: int = 0) -> tuple[dict[str, Any] | None, str | None]:
        """The newest readable checkpoint and its folder URI, or (None, None) for a fresh run.

        `handed` is Ray's latest registered checkpoint (`Checkpoint.path`: bucket/key, no scheme). Rank 0
        picks: if the handed one is damaged it falls back to older ones with a warning, and if checkpoints
        exist but none is readable it stops (starting from scratch would silently overwrite a run). The
        other ranks then load the very checkpoint rank 0 picked (a collective): ranks that resumed from
        different epochs would deadlock in their first all-reduce.
        """
        if handed is None:
            return None, None
        if rank == 0:
            state, key = self._newest_readable(f"{handed.split('/', 1)[1].rstrip('/')}/{CHECKPOINT_FILE}")
        key = broadcast_from_rank_zero(key if rank == 0 else None)
        if rank != 0:
            state = load_checkpoint(self.store.get_bytes(key), self.store.uri(key))
        return state, self.store.uri(key.rsplit("/", 1)[0])

    def _newest_readable(self, first: str) -> tuple[dict[str, Any], str]:
        for key in [first] + [k for k in self.keys() if k != first]:
            try:
                state = load_checkpoint(self.store.get_bytes(key), self.store.uri(key))
            except (CheckpointError, ObjectMissing) as e:
                log.warning("%s; trying the run's older checkpoints", e)
                continue
            if key != first:
                log.warning("resuming from the older checkpoint %s (epoch %d)", self.store.uri(key), state["epoch"])
            return state, key
        raise CheckpointError(
            f"run {self.layout.uri} has checkpoints but none can be read; refusing to start over and overwrite it. "
            "Delete the damaged checkpoint folders or choose a new `name`"
        )

    def dir_name(self, epoch: int) -> str:
        """checkpoint_epoch_NNNN, or checkpoint_epoch_NNNN_rK when a run resumed from an older checkpoint
        finds that name taken (by the damaged one it skipped): Ray deletes old checkpoints by folder, so
        two registered checkpoints must never share one."""
        base = name = f"{RunLayout.CHECKPOINT_DIR_PREFIX}{epoch:04d}"
        k = 0
        while self.store.list_keys(f"{self.layout.checkpoint_dir_key(name)}/"):
            k += 1
            name = f"{base}_r{k}"
        return name

    save = staticmethod(save_checkpoint)

    def keep_if_best(self, best: dict[str, Any] | None, epoch: int, value: float | None,
                     state: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Copy the checkpoint to <run>/best/ when `value` of the metric beats `best` (lower is better).

        Returns the new best record ({uri, epoch, metric, value}) or None when `best` stands.
        """
        if value is None or not math.isfinite(value):
            return None
        if best is not None and best.get("metric") == self.metric and best["value"] <= value:
            return None
        self.store.put_bytes(self.layout.best_key, checkpoint_bytes(state()))
        record = {"uri": self.store.uri(self.layout.best_key.rsplit("/", 1)[0]), "epoch": epoch,
                  "metric": self.metric, "value": value}
        log.info("new best %s %.3f at epoch %d: %s", self.metric, value, epoch, record["uri"])
        return record
