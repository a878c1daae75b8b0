"""Training checkpoints: the format, its checks, reading one from anywhere, and uploading one.

A checkpoint is a folder holding one `checkpoint.pt` (torch.save of plain tensors and dicts: G, D, both
Adam states, epochs completed, optimizer steps, the fixed sampling noise and the resolved job config)
and a `manifest.json` that lists each file with its size and sha256. The manifest is written last and
checked on every load from the bucket, so a checkpoint whose upload was cut (a truncated or missing
file, no manifest) is never taken for good. `checkpoint.pt` is read with `weights_only=True`, so loading
one never runs code. This module is the only writer of that format. (Training noise and permutations
come from generators seeded by (seed, epoch, rank), so no global RNG state needs saving.)

`dcgan_ray.storage.checkpointer.Checkpointer` is what the training loop sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from dcgan_ray import faults
from dcgan_ray.config import JobConfig, StorageSection, config_from_dict
from dcgan_ray.errors import CheckpointError, ObjectMissing
from dcgan_ray.gan.models import Generator, build_models
from dcgan_ray.storage import checks
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.lease_log import LeaseLog, LeaseState
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store, parse_s3_uri

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_REQUIRED = ("format", "netG", "netD", "optG", "optD", "epoch", "step", "fixed_noise", "config")


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """The checkpoint file's bytes for `state` (G, D, optimizers, epoch, step, fixed_noise, config)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buf)
    return buf.getvalue()


def save_checkpoint(directory: str | Path, state: dict[str, Any], generation: int | None = None) -> Path:
    """Write `state` to directory/checkpoint.pt and then its manifest.json (naming the lease generation that
    wrote it, if any), each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = checkpoint_bytes(state)
    _write_atomically(directory / CHECKPOINT_FILE, data)
    _write_atomically(directory / MANIFEST_FILE, manifest_bytes({CHECKPOINT_FILE: data}, state["epoch"], generation))
    return directory / CHECKPOINT_FILE


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def manifest_bytes(files: dict[str, bytes], epoch: int, generation: int | None = None) -> bytes:
    """The manifest of a checkpoint folder: each file's size and sha256, and the lease generation of its writer."""
    listed = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    manifest: dict[str, Any] = {"format": FORMAT_VERSION, "epoch": epoch, "files": listed}
    if generation is not None:
        manifest["generation"] = generation
    return json.dumps(manifest, indent=2).encode()


def manifest_generation(manifest: bytes | None) -> int | None:
    """The lease generation a checkpoint's manifest names (None: none, or not a manifest this code reads)."""
    try:
        generation = checks.mapping(checks.parse_json(manifest or b""), MANIFEST_FILE).get("generation")
        return checks.integer(generation, "generation", 1)
    except checks.NotOurs:
        return None


def verify(files: dict[str, bytes | None], manifest: bytes | None, label: str) -> None:
    """Raise CheckpointError unless `files` (name -> bytes, None when missing) match the folder's manifest."""
    torn = f"checkpoint {label} is torn (its upload was cut or it was changed since)"
    if manifest is None:
        raise CheckpointError(f"{torn}: it has no {MANIFEST_FILE}, which is written last")
    try:
        listed = checks.mapping(checks.mapping(checks.parse_json(manifest), MANIFEST_FILE).get("files"), "files")
        if set(listed) != set(files):
            raise checks.NotOurs(f"it lists {sorted(listed)[:3]}, not {sorted(files)}")
        for name, expected in listed.items():
            checks.mapping(expected, name)
            checks.integer(expected.get("bytes"), f"{name}.bytes")
            checks.sha256(expected.get("sha256"), f"{name}.sha256")
    except checks.NotOurs as e:
        raise CheckpointError(f"{torn}: its {MANIFEST_FILE} cannot be read ({e})") from None
    for name, expected in listed.items():
        data = files.get(name)
        if data is None:
            raise CheckpointError(f"{torn}: {name} is missing")
        if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(
                f"{torn}: {name} has {len(data)} bytes and another sha256 than the "
                f"{expected['bytes']} bytes its manifest lists"
            )


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
        detail = str(e).splitlines()[0].split(". ")[0][:200] if str(e) else ""  # torch's first sentence says it
        raise CheckpointError(
            f"checkpoint {label} is damaged or truncated and cannot be read ({type(e).__name__}: {detail})"
        ) from None
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


def read_checkpoint_uri(uri: str, storage: StorageSection) -> dict[str, Any]:
    """Load a checkpoint from a local path or an s3:// URI.

    The URI may name the checkpoint.pt file, its checkpoint folder (checked against its manifest), or a
    run folder (`s3://BUCKET/PREFIX/runs/NAME`), which means the run's latest checkpoint per its run.json.
    A checkpoint.pt named directly is read without its manifest (it may come from elsewhere).
    """
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if not path.is_dir():
            return load_checkpoint(path)
        files = {CHECKPOINT_FILE: _read_local(path / CHECKPOINT_FILE)}
        verify(files, _read_local(path / MANIFEST_FILE), str(path))
        return load_checkpoint(_verified(files), str(path / CHECKPOINT_FILE))
    bucket, key = parse_s3_uri(uri)
    store = Store(dataclasses.replace(storage, bucket=bucket))
    if key.endswith(".pt"):
        try:
            return load_checkpoint(store.get_bytes(key), store.uri(key))
        except ObjectMissing:
            raise CheckpointError(f"no checkpoint at {uri} on {store.endpoint}") from None
    history = LeaseState.of(LeaseLog(store, key).entries())
    if history.last_seq:  # a run folder with a lease log: its newest committed checkpoint
        folders = [c["checkpoint"] for c in history.checkpoints()[:1]]
    else:
        history = LeaseState.of(LeaseLog(store, key.rsplit("/", 1)[0]).entries())  # a folder in such a run
        folders = []
    latest = ((read_run_manifest(store, RunLayout(bucket, key)) or {}).get("checkpoints") or {}).get("latest")
    folders += [parse_s3_uri(latest)[1]] if latest and not folders else []
    folders.append(key)
    for folder in folders:
        if store.exists(f"{folder}/{CHECKPOINT_FILE}") or store.exists(f"{folder}/{MANIFEST_FILE}"):
            return read_checkpoint_dir(store, folder, _committed_sha(store, folder, history))
    raise CheckpointError(
        f"no checkpoint at {uri} on {store.endpoint}: give the URI of a checkpoint.pt, its "
        "checkpoint_epoch_NNNN folder, or a run folder with a run.json"
    )


def _committed_sha(store: Store, folder: str, history: LeaseState) -> str | None:
    """The sha256 the run's lease log committed for `folder` (the best copy's: its newest best commit); None
    for a run without commits. A checkpoint folder the log never committed is refused: a stale driver's
    upload, or one whose driver died before its commit, is not the run's."""
    if folder.endswith(f"/{RunLayout.BEST_DIR}"):
        best = history.best()
        return best["manifest_sha256"] if best is not None else None
    sha = history.committed_sha(folder)
    if sha is None and history.checkpoints():
        raise CheckpointError(
            f"{store.uri(folder)} is not in its run's committed history (the lease log has no commit of it): an "
            "upload whose driver lost the run or died before committing it. Give the run folder (its newest "
            "committed checkpoint) or a committed checkpoint_epoch_NNNN folder"
        )
    return sha


def read_checkpoint_dir(store: Store, folder: str, manifest_sha256: str | None = None) -> dict[str, Any]:
    """The checkpoint in the bucket folder `folder`, checked against its manifest (CheckpointError if torn),
    and that manifest against the sha256 its commit in the lease log recorded, when given."""
    manifest = get_or_none(store, f"{folder}/{MANIFEST_FILE}")
    if manifest is not None and manifest_sha256 is not None and hashlib.sha256(manifest).hexdigest() != manifest_sha256:
        raise CheckpointError(
            f"checkpoint {store.uri(folder)} was replaced after its commit: its {MANIFEST_FILE} is not the one the "
            "run's lease log recorded"
        )
    files = {CHECKPOINT_FILE: get_or_none(store, f"{folder}/{CHECKPOINT_FILE}")}
    verify(files, manifest, store.uri(folder))
    return load_checkpoint(_verified(files), store.uri(f"{folder}/{CHECKPOINT_FILE}"))


def _verified(files: dict[str, bytes | None]) -> bytes:
    """The checkpoint's bytes from `files` once `verify` passed (it raises when a listed file is missing)."""
    data = files[CHECKPOINT_FILE]
    assert data is not None
    return data


def upload_checkpoint(store: Store, local_dir: Path, folder: str, fault_prefix: str = "") -> bytes:
    """Upload a folder written by `save_checkpoint`: every file first, its manifest (returned) last.
    (`fault_prefix`: the fault tests tell a preemption's uploads apart: dcgan_ray.faults.)"""
    listed = json.loads((local_dir / MANIFEST_FILE).read_bytes())["files"]
    for name, entry in listed.items():
        store.upload_file(
            local_dir / name,
            f"{folder}/{name}",
            label=f"upload {folder.rsplit('/', 1)[-1]}/{name}",
            on_bytes=faults.halfway("upload_checkpoint_file", entry["bytes"]),
        )
    faults.reached(f"{fault_prefix}before_manifest")
    manifest = (local_dir / MANIFEST_FILE).read_bytes()
    store.put_bytes(f"{folder}/{MANIFEST_FILE}", manifest, "application/json")
    faults.reached("after_manifest")
    return manifest


def get_or_none(store: Store, key: str) -> bytes | None:
    try:
        return store.get_bytes(key)
    except ObjectMissing:
        return None


def _read_local(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
