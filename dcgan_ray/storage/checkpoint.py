"""Training checkpoints: the format, and a run's checkpoints behind one interface.

A checkpoint is a folder holding one `checkpoint.pt` (torch.save of plain tensors and dicts: G, D, both
Adam states, epochs completed, optimizer steps, the fixed sampling noise and the resolved job config)
and a `manifest.json` that lists each file with its size and sha256. The manifest is written last and
checked on every load from the bucket, so a checkpoint whose upload was cut (a truncated or missing
file, no manifest) is never taken for good. `checkpoint.pt` is read with `weights_only=True`, so loading
one never runs code. This module is the only writer of that format. (Training noise and permutations
come from generators seeded by (seed, epoch, rank), so no global RNG state needs saving.)

`Checkpointer` is what the training loop sees: `restore` (Ray's latest registered checkpoint, falling
back to the previous intact one when it is torn or damaged), `dir_name` (a folder name never used
twice), `save`, `upload` (rank 0's upload, with the store's outage retries, manifest last) and
`keep_if_best` (the best checkpoint by the quality metric, kept apart at <run>/best/).

A folder without its manifest is one of two things. Newer than every checkpoint known to have been
durable (one with a manifest, the one Ray Train registered, the one run.json records as durable), it is
an upload that was cut: its worker or node was lost at the end of an epoch, which is what an elastic run
exists to survive. `restore` removes it with one warning and goes on. Anywhere else its manifest went
missing later, as did the bytes of a checkpoint that fails its manifest's checks: that is damage, and a
run whose every checkpoint is damaged is refused rather than silently started over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dcgan_ray import faults
from dcgan_ray.config import JobConfig, StorageSection, config_from_dict
from dcgan_ray.errors import CheckpointError, ObjectMissing
from dcgan_ray.gan.models import Generator, build_models
from dcgan_ray.gan.sync import broadcast_from_rank_zero
from dcgan_ray.storage import checks
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.runs import epoch_of_key, read_run_manifest
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


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to directory/checkpoint.pt and then its manifest.json, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = checkpoint_bytes(state)
    _write_atomically(directory / CHECKPOINT_FILE, data)
    _write_atomically(directory / MANIFEST_FILE, manifest_bytes({CHECKPOINT_FILE: data}, state["epoch"]))
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


def manifest_bytes(files: dict[str, bytes], epoch: int) -> bytes:
    """The manifest of a checkpoint folder: each file's size and sha256."""
    listed = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    return json.dumps({"format": FORMAT_VERSION, "epoch": epoch, "files": listed}, indent=2).encode()


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
    folders = [key]
    latest = ((read_run_manifest(store, RunLayout(bucket, key)) or {}).get("checkpoints") or {}).get("latest")
    if latest:
        folders.insert(0, parse_s3_uri(latest)[1])
    for folder in folders:
        if store.exists(f"{folder}/{CHECKPOINT_FILE}") or store.exists(f"{folder}/{MANIFEST_FILE}"):
            return read_checkpoint_dir(store, folder)
    raise CheckpointError(
        f"no checkpoint at {uri} on {store.endpoint}: give the URI of a checkpoint.pt, its "
        "checkpoint_epoch_NNNN folder, or a run folder with a run.json"
    )


def read_checkpoint_dir(store: Store, folder: str) -> dict[str, Any]:
    """The checkpoint in the bucket folder `folder`, checked against its manifest (CheckpointError if torn)."""
    files = {CHECKPOINT_FILE: _get_or_none(store, f"{folder}/{CHECKPOINT_FILE}")}
    verify(files, _get_or_none(store, f"{folder}/{MANIFEST_FILE}"), store.uri(folder))
    return load_checkpoint(_verified(files), store.uri(f"{folder}/{CHECKPOINT_FILE}"))


def _verified(files: dict[str, bytes | None]) -> bytes:
    """The checkpoint's bytes from `files` once `verify` passed (it raises when a listed file is missing)."""
    data = files[CHECKPOINT_FILE]
    assert data is not None
    return data


def upload_checkpoint(store: Store, local_dir: Path, folder: str) -> None:
    """Upload a folder written by `save_checkpoint`: every file first, its manifest last."""
    listed = json.loads((local_dir / MANIFEST_FILE).read_bytes())["files"]
    for name, entry in listed.items():
        store.upload_file(
            local_dir / name,
            f"{folder}/{name}",
            label=f"upload {folder.rsplit('/', 1)[-1]}/{name}",
            on_bytes=faults.halfway("upload_checkpoint_file", entry["bytes"]),
        )
    faults.reached("before_manifest")
    store.put_bytes(f"{folder}/{MANIFEST_FILE}", (local_dir / MANIFEST_FILE).read_bytes(), "application/json")
    faults.reached("after_manifest")


def _get_or_none(store: Store, key: str) -> bytes | None:
    try:
        return store.get_bytes(key)
    except ObjectMissing:
        return None


def _read_local(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class Checkpointer:
    """One run's checkpoints in the bucket: resume with fallback, unique folders, the best copy."""

    def __init__(self, store: Store, layout: RunLayout, metric: str):
        self.store, self.layout, self.metric = store, layout, metric

    def folders(self) -> list[str]:
        """Keys of the run's checkpoint folders (no trailing '/'), newest epoch first (`_rK` after its base)."""
        keys = self.store.list_keys(f"{self.layout.prefix}/{RunLayout.CHECKPOINT_DIR_PREFIX}")
        return sorted({k.rsplit("/", 1)[0] for k in keys}, reverse=True)

    def restore(self, registered: str | None, rank: int = 0) -> tuple[dict[str, Any] | None, str | None]:
        """The newest intact checkpoint and its folder URI, or (None, None) for a fresh run.

        `registered` is Ray's latest registered checkpoint (`Checkpoint.path`: bucket/key, no scheme), or None
        when Ray has none registered; intact folders of the run are used then too (Ray's record of them
        may not have been written, e.g. in a storage outage, or the upload ended just before the worker
        was lost). Rank 0 picks: uploads that were cut are removed with a warning (see the module's
        docstring); a damaged checkpoint is skipped for the previous intact one with a warning; and if
        checkpoints exist but every one is damaged it stops (starting from scratch would silently
        overwrite a run). What it resumed from, the recorder says in one line. The other ranks then load
        the very checkpoint rank 0 picked (a collective): ranks that resumed from different epochs would
        deadlock in their first all-reduce.
        """
        if rank == 0:
            first = registered.split("/", 1)[1].rstrip("/") if registered is not None else None
            state, folder = self._newest_intact(first)
        folder = broadcast_from_rank_zero(folder if rank == 0 else None)
        if folder is None:
            return None, None
        if rank != 0:
            state = read_checkpoint_dir(self.store, folder)
        return state, self.store.uri(folder)

    def _newest_intact(self, first: str | None) -> tuple[dict[str, Any] | None, str | None]:
        folders = self.folders()
        for folder in self._remove_cut_uploads(folders, first):
            folders.remove(folder)
        candidates = [first] + [f for f in folders if f != first] if first is not None else folders
        for folder in candidates:
            try:
                state = read_checkpoint_dir(self.store, folder)
            except CheckpointError as e:
                log.warning("%s; trying the run's older checkpoints", e)
                continue
            if first is None:
                log.debug(
                    "Ray Train has no checkpoint of run %s registered; its newest intact one is %s",
                    self.layout.uri,
                    self.store.uri(folder),
                )
            return state, folder
        if candidates:
            raise CheckpointError(
                f"run {self.layout.uri} has checkpoints but none is intact; refusing to start over and overwrite "
                "it. Delete the torn checkpoint folders or choose a new `name`"
            )
        return None, None

    def _remove_cut_uploads(self, folders: list[str], first: str | None) -> list[str]:
        """Remove the manifest-less folders newer than every checkpoint known durable; returns them.

        Known durable: Ray's registered `first`, the one run.json records as durable, and any folder with
        a manifest (intact or not). `folders` is newest first; one upload runs at a time, so a cut upload
        is the newest folder, or a few of them if the run was cut again while redoing an epoch.
        """
        durable = [k for k in (first, self._recorded_durable()) if k is not None]
        cut = []
        for folder in folders:
            if any(folder <= known for known in durable) or self.store.exists(f"{folder}/{MANIFEST_FILE}"):
                break
            cut.append(folder)
        for folder in cut:
            self.store.delete(self.store.list_keys(f"{folder}/"))
            log.warning(
                "checkpoint %s has no %s: its upload was cut (its worker or node was lost at the end of "
                "epoch %d); removed it, and that epoch is trained again",
                self.store.uri(folder),
                MANIFEST_FILE,
                epoch_of_key(folder),
            )
        return cut

    def _recorded_durable(self) -> str | None:
        """The key of the checkpoint run.json records as durable (None for none, or a run.json from before
        those records, whose `latest` was written before its upload)."""
        checkpoints = (read_run_manifest(self.store, self.layout) or {}).get("checkpoints") or {}
        if not checkpoints.get("durable_epoch") or not checkpoints.get("latest"):
            return None
        return parse_s3_uri(checkpoints["latest"])[1]

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

    def upload(self, local_dir: Path, dir_name: str) -> str:
        """Upload a folder written by `save` as the run's checkpoint `dir_name`; returns its key."""
        folder = self.layout.checkpoint_dir_key(dir_name)
        upload_checkpoint(self.store, local_dir, folder)
        return folder

    def keep_if_best(
        self, best: dict[str, Any] | None, epoch: int, value: float | None, state: Callable[[], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Copy the checkpoint to <run>/best/ when `value` of the metric beats `best` (lower is better).

        Returns the new best record ({uri, epoch, metric, value}) or None when `best` stands.
        """
        if value is None or not math.isfinite(value):
            return None
        if best is not None and best.get("metric") == self.metric and best["value"] <= value:
            return None
        data = checkpoint_bytes(state())
        # Overwritten in place, manifest last: in between, the old manifest does not match the new file,
        # so a reader sees a torn checkpoint, never a wrong one.
        self.store.put_bytes(self.layout.best_key, data)
        self.store.put_bytes(
            f"{self.layout.best_dir_key}/{MANIFEST_FILE}",
            manifest_bytes({CHECKPOINT_FILE: data}, epoch),
            "application/json",
        )
        record = {
            "uri": self.store.uri(self.layout.best_dir_key),
            "epoch": epoch,
            "metric": self.metric,
            "value": value,
        }
        log.info("new best %s %.3f at epoch %d: %s", self.metric, value, epoch, record["uri"])
        return record
