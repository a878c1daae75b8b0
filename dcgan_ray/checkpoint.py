"""Training checkpoints: what goes in, how it is read back, and where a URI points.

A checkpoint is one `checkpoint.pt` (torch.save of plain tensors and dicts) inside a directory:
G, D, both Adam states, epochs completed, optimizer steps, RNG state, the fixed sampling noise and
the resolved job config. It is read with `weights_only=True`, so loading one never runs code.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from dcgan_ray.config import JobConfig, StorageConfig, config_from_dict
from dcgan_ray.errors import CheckpointError, ObjectMissing
from dcgan_ray.models import Generator, build_models
from dcgan_ray.storage import Store, parse_s3_uri

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
_REQUIRED = ("format", "netG", "netD", "optG", "optD", "epoch", "step", "fixed_noise", "config")


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to directory/checkpoint.pt, atomically (temp file, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT_VERSION, **state}, f)
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
        try:
            run = json.loads(store.get_bytes(f"{key}/run.json"))
            latest = run.get("checkpoints", {}).get("latest")
            if latest:
                candidates.insert(0, f"{parse_s3_uri(latest)[1]}/{CHECKPOINT_FILE}")
        except (ObjectMissing, json.JSONDecodeError):
            pass
    for candidate in candidates:
        try:
            data = store.get_bytes(candidate)
        except ObjectMissing:
            continue
        return load_checkpoint(data, store.uri(candidate))
    raise CheckpointError(f"no checkpoint at {uri} on {store.endpoint}: give the URI of a checkpoint.pt, its "
                          "checkpoint_epoch_NNNN folder, or a run folder with a run.json")
