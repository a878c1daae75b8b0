"""A run's checkpoints in the bucket behind one interface, for the training loop.

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

import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcgan_ray import faults
from dcgan_ray.errors import CheckpointError
from dcgan_ray.gan.sync import broadcast_from_rank_zero
from dcgan_ray.storage.checkpoint import (
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    checkpoint_bytes,
    get_or_none,
    manifest_bytes,
    manifest_generation,
    read_checkpoint_dir,
    save_checkpoint,
    upload_checkpoint,
)
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.runs import epoch_of_key, read_run_manifest, steps_of_key
from dcgan_ray.storage.s3 import Store, parse_s3_uri

log = logging.getLogger(__name__)


class Checkpointer:
    """One run's checkpoints in the bucket: resume with fallback, unique folders, the best copy.

    With the run's `lease` (rank 0's view of its driver's, `dcgan_ray.storage.lease`), each upload ends in a
    commit to the lease log, and `restore` resumes only from what belongs to the run's history: committed
    checkpoints (whose manifest must still be the one committed), this generation's own (a worker lost
    between its upload and its commit), and those of runs from before the lease (their manifests name no
    generation). A checkpoint another generation wrote and never committed is a stale driver's, or a dead
    one's last upload: it is removed."""

    def __init__(self, store: Store, layout: RunLayout, metric: str, lease: Lease | None = None):
        self.store, self.layout, self.metric, self.lease = store, layout, metric, lease
        self._own: list[str] = []  # this generation's uncommitted folders, as `_newest_first` found them

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
        committed = self._committed()
        folders = self.folders()
        for folder in self._remove_cut_uploads(folders, first, committed):
            folders.remove(folder)
        candidates = self._newest_first(folders, committed)
        if first is not None and first in candidates:
            candidates = [first] + [f for f in candidates if f != first]
        for folder in candidates:
            try:
                state = read_checkpoint_dir(self.store, folder, committed.get(folder))
            except CheckpointError as e:
                log.warning("%s; trying the run's older checkpoints", e)
                continue
            if self.lease is not None and folder not in committed and folder in self._own:
                self._commit(folder, epoch_of_key(folder))  # resumed from: part of the run's history now
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

    def _committed(self) -> dict[str, str]:
        """The lease log's committed checkpoints: folder key -> its manifest's sha256 ({} without a lease)."""
        if self.lease is None:
            return {}
        return {c["checkpoint"]: c["manifest_sha256"] for c in self.lease.state.checkpoints()}

    def _newest_first(self, folders: list[str], committed: dict[str, str]) -> list[str]:
        """The folders to resume from, newest first by the run's history, not by name (after an elastic resize
        a mid-epoch folder's step count restarts): this generation's uncommitted uploads (a worker lost between
        its upload and its commit), then the commits in the log's order, then folders from before the lease
        (their manifests name no generation). Another generation's uncommitted folder is a stale driver's, or
        a dead one's last upload: it is removed. Without a lease, by name."""
        if self.lease is None:
            return folders
        self._own, older = [], []
        for folder in [f for f in folders if f not in committed]:
            generation = manifest_generation(get_or_none(self.store, f"{folder}/{MANIFEST_FILE}"))
            if generation is None:
                older.append(folder)
            elif generation == self.lease.generation:
                self._own.append(folder)
            else:
                self._remove(
                    folder,
                    f"was written by lease generation {generation} and never committed (that driver lost the run's "
                    "lease, or died before its commit): removed it; the run resumes from its committed history",
                )
        in_log = [c["checkpoint"] for c in self.lease.state.checkpoints() if c["checkpoint"] in folders]
        return self._own + list(dict.fromkeys(in_log)) + older

    def _remove(self, folder: str, why: str) -> None:
        self.store.delete(self.store.list_keys(f"{folder}/"))
        log.warning("checkpoint %s %s", self.store.uri(folder), why)

    def _remove_cut_uploads(self, folders: list[str], first: str | None, committed: dict[str, str]) -> list[str]:
        """Remove the manifest-less folders newer than every checkpoint known durable; returns them.

        Known durable: Ray's registered `first`, those committed to the lease log (else the one run.json
        records as durable), and any folder with a manifest (intact or not). `folders` is newest first; one
        upload runs at a time, so a cut upload is the newest folder, or a few of them if the run was cut
        again while redoing an epoch.
        """
        cut = []
        if self.lease is not None:
            # By epoch, not by name: after an elastic resize a newer mid-epoch folder's name can sort below an
            # older one's. An upload is cut at or after the newest committed epoch; a folder of an older epoch
            # that lost its manifest is damage (a run from before the lease, say), which restore refuses.
            newest = max([epoch_of_key(f) for f in (first, *committed) if f is not None], default=0)
            for folder in folders:
                if folder != first and folder not in committed and epoch_of_key(folder) >= newest:
                    if not self.store.exists(f"{folder}/{MANIFEST_FILE}"):
                        cut.append(folder)
        else:
            durable = [k for k in (first, self._recorded_durable()) if k is not None]
            for folder in folders:
                if any(folder <= known for known in durable) or self.store.exists(f"{folder}/{MANIFEST_FILE}"):
                    break
                cut.append(folder)
        for folder in cut:
            self._remove(
                folder,
                f"has no {MANIFEST_FILE}: its upload was cut (its worker or node was lost at the end of epoch "
                f"{epoch_of_key(folder)}); removed it, and that epoch is trained again",
            )
        return cut

    def _recorded_durable(self) -> str | None:
        """The key of the checkpoint run.json records as durable (None for none, or a run.json from before
        those records, whose `latest` was written before its upload)."""
        checkpoints = (read_run_manifest(self.store, self.layout) or {}).get("checkpoints") or {}
        if not checkpoints.get("durable_epoch") or not checkpoints.get("latest"):
            return None
        return parse_s3_uri(checkpoints["latest"])[1]

    def dir_name(self, epoch: int, steps: int | None = None) -> str:
        """checkpoint_epoch_NNNN (a mid-epoch one: checkpoint_epoch_NNNN_sKKKKK, KKKKK steps into the next
        epoch: sorted after its epoch's and before the next), or ..._rK when a run resumed from an older
        checkpoint finds that name taken (by the damaged one it skipped): Ray deletes old checkpoints by
        folder, so two registered checkpoints must never share one."""
        base = name = f"{RunLayout.CHECKPOINT_DIR_PREFIX}{epoch:04d}" + (f"_s{steps:05d}" if steps is not None else "")
        k = 0
        while self.store.list_keys(f"{self.layout.checkpoint_dir_key(name)}/"):
            k += 1
            name = f"{base}_r{k}"
        return name

    def save(self, directory: Path, state: dict[str, Any]) -> Path:
        return save_checkpoint(directory, state, self.lease.generation if self.lease is not None else None)

    def upload(self, local_dir: Path, dir_name: str) -> str:
        """Upload a folder written by `save` as the run's checkpoint `dir_name` and commit it to the lease log
        (LeaseLost when the run was taken over: the commit is refused); returns its key."""
        folder = self.layout.checkpoint_dir_key(dir_name)
        if self.lease is not None:
            self.lease.check()  # a stale driver stops here, before it writes anything
        manifest = upload_checkpoint(
            self.store, local_dir, folder, "preemption_" if steps_of_key(folder) is not None else ""
        )
        if self.lease is not None:
            faults.reached("before_commit", epoch_of_key(folder))
            self._commit(folder, epoch_of_key(folder), manifest)
        return folder

    def _commit(self, folder: str, epoch: int, manifest: bytes | None = None) -> None:
        """Commit the checkpoint in `folder` to the lease log: its manifest's sha256 (read back when not given)."""
        assert self.lease is not None
        if manifest is None:
            manifest = self.store.get_bytes(f"{folder}/{MANIFEST_FILE}")
        self.lease.commit(
            {"epoch": epoch, "checkpoint": folder, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
        )

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
        manifest = manifest_bytes({CHECKPOINT_FILE: data}, epoch)
        self.store.put_bytes(self.layout.best_key, data)
        self.store.put_bytes(f"{self.layout.best_dir_key}/{MANIFEST_FILE}", manifest, "application/json")
        record = {
            "uri": self.store.uri(self.layout.best_dir_key),
            "epoch": epoch,
            "metric": self.metric,
            "value": value,
        }
        if self.lease is not None:  # readers (`sample`, `eval`) believe best/ only as committed
            self.lease.commit({"best": record, "manifest_sha256": hashlib.sha256(manifest).hexdigest()})
        log.info("new best %s %.3f at epoch %d: %s", self.metric, value, epoch, record["uri"])
        return record
