"""The run manifest, `run.json`: status, config, per-epoch metrics and every artifact's URI.

Rank 0 of a training run writes it (through `dcgan_ray.train.recorder`); the driver, `dcgan-ray jobs`
and the study report read it. Where it lives: `dcgan_ray.storage.layout.RunLayout`.

It never claims more than is durable. An epoch's entry in `history` is written when the epoch is trained;
on checkpoint epochs its `checkpoint_durable` is false until the checkpoint's manifest is in the bucket.
`checkpoints.latest` and `checkpoints.durable_epoch` name the newest durable checkpoint only, and
`status` becomes `finished` once the last one is durable. Every restart of the workers (or resubmission)
appends to `restarts` (when, from which recorded epoch to which resumed one, why, the world size before
and after, and the history entries of the epochs trained again); a changed world size also to `resizes`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from dcgan_ray.config import JobConfig, StorageSection, config_from_dict, load_config, parse_override
from dcgan_ray.errors import DcganError, ObjectMissing, StorageError
from dcgan_ray.storage import checks, fence
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.s3 import Store, parse_s3_uri

log = logging.getLogger(__name__)


class RunManifestError(StorageError):
    """run.json is there but is not a run manifest this project wrote (damaged or planted)."""


def read_run_manifest(store: Store, layout: RunLayout) -> dict[str, Any] | None:
    """The run's manifest, or None for a run that has not started. Every field the readers use is checked
    (`check_run_manifest`): one that is not raises RunManifestError naming the object."""
    try:
        blob = store.get_bytes(layout.manifest_key)
    except ObjectMissing:
        return None
    try:
        return check_run_manifest(checks.parse_json(blob), layout)
    except checks.NotOurs as e:
        raise RunManifestError(
            f"{store.uri(layout.manifest_key)} is not a run manifest this code can use ({e}); move it away to "
            "start the run's record anew (its checkpoints are kept and resumed from), or choose another run name"
        ) from None


def check_run_manifest(manifest: Any, layout: RunLayout) -> dict[str, Any]:
    """The fields that the driver, the recorder, the reports and `dcgan-ray jobs` read, checked; artifact
    URIs must lie in the run's own folder. Raises checks.NotOurs."""
    m = checks.mapping(manifest, "the manifest")
    checks.text(m.get("status", ""), "status", 64)
    checks.integer(m.get("epochs_completed", 0), "epochs_completed", 0, 10**6)
    checks.integer(m.get("epochs_total", 0), "epochs_total", 0, 10**6)
    for i, entry in enumerate(checks.listing(m.get("history", []), "history")):
        checks.integer(checks.mapping(entry, f"history[{i}]").get("epoch"), f"history[{i}].epoch", 0, 10**6)
    checks.mapping(m.get("samples", {}), "samples")
    ckpts = checks.mapping(m.get("checkpoints", {}), "checkpoints")
    uris = [("checkpoints.latest", ckpts.get("latest"))]
    if ckpts.get("best") is not None:
        best = checks.mapping(ckpts["best"], "checkpoints.best")
        checks.integer(best.get("epoch"), "checkpoints.best.epoch", 0, 10**6)
        checks.number(best.get("value"), "checkpoints.best.value")
        checks.text(best.get("metric"), "checkpoints.best.metric", 64)
        uris.append(("checkpoints.best.uri", best.get("uri")))
    for what, uri in uris:
        if uri is not None and not (
            isinstance(uri, str) and uri.startswith(f"{layout.uri}/") and ".." not in uri.split("/")
        ):
            raise checks.NotOurs(f"{what} is not in the run's folder {layout.uri}")
    return m


def recorded_config(store: Store, uri: str) -> dict[str, Any]:
    """The job config recorded in the bucket folder `uri`: a run's (its run.json's `config`) or a study's (its
    study.json's), to submit it again from the bucket alone. Raises DcganError naming what is missing."""
    bucket, folder = parse_s3_uri(uri)
    for name in ("run.json", "study.json"):
        key = f"{folder}/{name}"
        try:
            blob = store.get_bytes(key)
        except ObjectMissing:
            continue
        try:
            return checks.mapping(checks.mapping(checks.parse_json(blob), name).get("config"), "config")
        except checks.NotOurs as e:
            raise RunManifestError(f"{store.uri(key)} records no job config this code can use ({e})") from None
    raise DcganError(
        f"{uri} holds neither a run.json nor a study.json on {store.endpoint}: give the s3:// URI of a run folder "
        "(s3://BUCKET/PREFIX/runs/NAME) or a study folder (s3://BUCKET/PREFIX/studies/NAME), or a job YAML"
    )


def load_job(config: str, overrides: list[str]) -> JobConfig:
    """A job from its YAML file, or from the bucket: the s3:// URI of a run folder (the config its run.json
    records) or of a study folder (its study.json's), as `dcgan-ray recover` submits them again; --set
    applies on top. Such a folder is read through --set storage.endpoint=..., else AWS_ENDPOINT_URL, else
    the dev stack's endpoint."""
    if not config.startswith("s3://"):
        return load_config(config, overrides)
    storage = StorageSection(bucket=parse_s3_uri(config)[0])
    endpoint = [parse_override(o)[1] for o in overrides if parse_override(o)[0] == "storage.endpoint"]
    if endpoint or os.environ.get("AWS_ENDPOINT_URL"):
        storage.endpoint = endpoint[-1] if endpoint else os.environ["AWS_ENDPOINT_URL"]
    return config_from_dict(recorded_config(Store(storage), config), f"the config recorded in {config}", overrides)


def write_run_manifest(store: Store, layout: RunLayout, manifest: dict[str, Any]) -> None:
    """Write run.json, stamped with the lease generation that writes it (under a lease): readers take the lease
    log's end state over a run.json an older generation wrote (`Ownership.status_of`)."""
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    generation = fence.generation_for(store.bucket, layout.manifest_key)
    if generation is not None:
        manifest["generation"] = generation
        manifest["authority"] = AUTHORITY
    store.put_bytes(layout.manifest_key, json.dumps(manifest, indent=2).encode(), "application/json")


AUTHORITY = (
    "the run's lease log (lease/log/ in this folder) decides its state: a commit there of a later generation than "
    "this file's outranks this file (dcgan-ray runs shows the log's word)"
)


def new_run_manifest(cfg: JobConfig, layout: RunLayout) -> dict[str, Any]:
    return {
        "name": cfg.name,
        "run_uri": layout.uri,
        "status": "running",
        "epochs_total": cfg.train.epochs,
        "epochs_completed": 0,
        "config": cfg.to_dict(),
        "history": [],
        "samples": {"latest": None, "epochs": [], "gif": None},
        "checkpoints": {"latest": None, "durable_epoch": 0},
    }


def epochs_durable(manifest: dict[str, Any]) -> int:
    """Epochs a restart would not train again: the newest durable checkpoint's epoch (`epochs_completed`
    for a run.json written before durability was recorded)."""
    checkpoints = manifest.get("checkpoints") or {}
    return checkpoints.get("durable_epoch", manifest.get("epochs_completed", 0))


# With eval.in_task each scoring task writes its result to `validations/epoch_NNNN.json` (see
# dcgan_ray.train.validation); what follows folds those into run.json, which only its writers call.


def epoch_of_key(folder_or_key: str) -> int:
    """The epoch in `.../checkpoint_epoch_NNNN[_sKKKKK][_rK]` or `.../validations/epoch_NNNN.json`."""
    name = folder_or_key.rstrip("/").rsplit("/", 1)[-1]
    return int(name.removesuffix(".json").rsplit("epoch_", 1)[1][:4])


def steps_of_key(folder: str) -> int | None:
    """The steps into its epoch of a mid-epoch checkpoint, `.../checkpoint_epoch_NNNN_sKKKKK[_rK]` (a
    preemption's: NNNN epochs done, KKKKK steps of the next); None for an epoch's own checkpoint."""
    found = re.search(r"_s(\d+)", folder.rstrip("/").rsplit("/", 1)[-1])
    return int(found.group(1)) if found else None


def merge_results(store: Store, layout: RunLayout, manifest: dict[str, Any]) -> list[int]:
    """Fold the scoring tasks' results into `manifest` (run.json): each into its epoch's history entry
    (`scored: "task"`, or `"failed"` with `score_error`), and the best record. Returns the epochs merged."""
    history = {h["epoch"]: h for h in manifest["history"]}
    merged = []
    for key in sorted(store.list_keys(layout.validations_prefix)):
        entry = history.get(epoch_of_key(key))
        if entry is None or "scored" in entry:  # not recorded yet (or a discarded attempt's), or done
            continue
        result = read_result(store, layout, key)
        if result is None:
            continue
        if "error" in result:
            entry.update(scored="failed", score_error=result["error"])
            log.warning("scoring epoch %d failed: %s", result["epoch"], result["error"])
        else:
            entry.update(result["metrics"], scored="task")
        best, current = result.get("best"), manifest["checkpoints"].get("best")
        if best is not None and (current is None or current["epoch"] <= best["epoch"]):
            manifest["checkpoints"]["best"] = best
        merged.append(result["epoch"])
    return merged


def read_result(store: Store, layout: RunLayout, key: str) -> dict[str, Any] | None:
    """A scoring task's result (`validations/epoch_NNNN.json`), checked; None (with a warning) for one this
    code did not write, which is then left out as if its task had not run."""
    try:
        return check_result(checks.parse_json(store.get_bytes(key)), layout)
    except checks.NotOurs as e:
        log.warning("%s is not a scoring result this code can use (%s): left out", store.uri(key), e)
    except ObjectMissing:
        pass
    return None


def check_result(result: Any, layout: RunLayout) -> dict[str, Any]:
    """The fields of a scoring result that run.json takes over, checked. Raises checks.NotOurs."""
    result = checks.mapping(result, "the result")
    checks.integer(result.get("epoch"), "epoch", 0, 10**6)
    if "error" in result:
        checks.text(result["error"], "error")
    else:
        for name, value in checks.mapping(result.get("metrics"), "metrics").items():
            checks.number(value, checks.member("metrics", name))
    if result.get("best") is not None:
        best = checks.mapping(result["best"], "best")
        checks.integer(best.get("epoch"), "best.epoch", 0, 10**6)
        checks.number(best.get("value"), "best.value")
        checks.text(best.get("metric"), "best.metric", 64)
        if not isinstance(best.get("uri"), str) or not best["uri"].startswith(f"{layout.uri}/"):
            raise checks.NotOurs("best.uri is not in the run's folder")
    return result


def discard_results_after(store: Store, layout: RunLayout, epoch: int) -> None:
    """A run resumed at `epoch` redoes the epochs after it: their results (of the attempt that is being
    discarded) must not be merged into the new ones' history."""
    stale = [k for k in store.list_keys(layout.validations_prefix) if epoch_of_key(k) > epoch]
    if stale:
        store.delete(stale)


def unscored_epochs(cfg: JobConfig, manifest: dict[str, Any]) -> list[int]:
    """Eval epochs in run.json without a result: their task timed out or never ran."""
    return [
        h["epoch"]
        for h in manifest["history"]
        if h["epoch"] > 0 and cfg.is_eval_epoch(h["epoch"]) and "scored" not in h
    ]
