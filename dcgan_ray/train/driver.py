"""The driver of a training run: checks everything that can fail early, then fits a TorchTrainer.

Run on the machine that submits the job (a `ray job submit` entrypoint or a shell). Before any
worker starts it checks the S3 endpoint, credentials and bucket, that the dataset is in the bucket,
and that the cluster can ever place the workers; each failure is a clear error, not a hang.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow.fs
import ray
import ray.exceptions
import ray.train
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dcgan_ray.config import JobConfig
from dcgan_ray.data.svhn import read_split_manifest
from dcgan_ray.errors import ConfigError, DcganError, LeaseLost, StorageError, StorageUnreachable
from dcgan_ray.gan.scaling import describe_job
from dcgan_ray.quality.metrics import check_classifier
from dcgan_ray.ray_internals import TorchTrainerStoppingOn, train_function_exception
from dcgan_ray.storage.arrowfs import ArrowS3FileSystem
from dcgan_ray.storage.layout import RunLayout, runs_prefix, scratch_prefix
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.lease_status import check_conditional_writes
from dcgan_ray.storage.runs import (
    epochs_durable,
    merge_results,
    new_run_manifest,
    read_run_manifest,
    unscored_epochs,
    write_run_manifest,
)
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.board import ProgressBoard
from dcgan_ray.train.interruptions import PREEMPTED
from dcgan_ray.train.ownership import lost_lease, own
from dcgan_ray.train.placement import ensure_placeable, placement_strategy
from dcgan_ray.train.recorder import commit_end
from dcgan_ray.train.stall import StallWatch, stall_error
from dcgan_ray.train.validation import validation_config, warn_if_scoring_waits
from dcgan_ray.train.watch import publish_after_training
from dcgan_ray.train.worker import train_worker

log = logging.getLogger(__name__)

ELASTIC_RESIZE_CHECK_S = 30.0
"""How often an elastic run that lost workers looks for capacity to grow back (Ray's default: 60 s)."""


def s3_filesystem(cfg: JobConfig) -> pyarrow.fs.S3FileSystem:
    """pyarrow's S3 filesystem for Ray Train's storage, on the configured endpoint, retrying through
    outages of up to storage.retry_budget_s (see `ArrowS3FileSystem`)."""
    return ArrowS3FileSystem(cfg.storage)


def connect_ray(address: str | None = None) -> None:
    """Join the cluster this process belongs to (RAY_ADDRESS, a `ray start` node, the job's own) or start one."""
    if ray.is_initialized():
        return
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)


def preflight(cfg: JobConfig) -> Store:
    """Storage, dataset and batch checks that need no cluster."""
    store = Store(cfg.storage)
    store.check()
    if cfg.storage.conditional_writes:
        check_conditional_writes(store, scratch_prefix(cfg))
    manifest = read_split_manifest(store, cfg, cfg.data.split)
    count = manifest["count"] if cfg.data.max_images is None else min(cfg.data.max_images, manifest["count"])
    check_classifier(store, cfg)
    if count < cfg.train.batch_size * cfg.scaling.max_workers:
        raise ConfigError(
            f"{count} images cannot fill one batch of train.batch_size={cfg.train.batch_size} on "
            f"each of scaling.num_workers={cfg.scaling.max_workers} workers; lower them or use more data"
        )
    return store


def our_error(error: BaseException | None) -> DcganError | None:
    """The DcganError inside Ray's structured failure, if any: the per-worker exceptions of a worker
    group error, a controller's failure, a remote task's cause, and each exception's chain.

    Found by type, never by message text, so the user gets the worker's own one-line message.
    """
    queue, seen = [error], set()
    while queue:
        e = queue.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:  # (some Ray errors keep their cause as text)
            continue
        seen.add(id(e))
        if isinstance(e, ray.exceptions.RayTaskError):
            # Ray's error class derives from the cause's class too, but its text is the remote traceback.
            queue.append(e.cause)
            continue
        if isinstance(e, DcganError):
            return e
        if isinstance(e, ray.train.WorkerGroupError):
            queue.extend(e.worker_failures[rank] for rank in sorted(e.worker_failures))
        elif isinstance(e, ray.train.ControllerError):
            queue.append(e.controller_failure)
        elif (raised := train_function_exception(e)) is not None:
            queue.append(raised)
        queue.extend([e.__cause__, e.__context__])
    return None


def first_failure(error: BaseException) -> str:
    """One line for a failure that is not ours (a crash, a bug): the first failed worker's exception."""
    failures = [error]
    if isinstance(error, ray.train.WorkerGroupError) and error.worker_failures:
        failures = [error.worker_failures[min(error.worker_failures)]]
    e = train_function_exception(failures[0]) or failures[0]
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}".rstrip(": ")


def restart_cannot_fix(error: BaseException) -> str | None:
    """Why the workers are not restarted after `error`: one of our errors (a missing object, refused
    credentials, a torn run, an outage past its budget) stays the same after a restart. None for crashes
    and killed workers, which are restarted up to scaling.max_failures."""
    ours = our_error(error)
    return ours.for_job(None) if ours is not None else None


def fit(cfg: JobConfig, lease: Lease | None = None, **run_kwargs) -> ray.train.Result:
    """The run's TorchTrainer, fitted, attempt after attempt while its attempts end for preemptions
    (dcgan_ray.train.interruptions), at most scaling.max_preemptions of them; a stall watch looks over the
    workers of each (dcgan_ray.train.stall)."""
    layout, preemptions = RunLayout.of(cfg), 0
    while True:
        try:
            result = _fit_once(cfg, lease, **run_kwargs)
            if result.return_value != PREEMPTED:  # type: ignore[attr-defined]  # (mypy sees Train v1's Result)
                return result
            why = "it saved a checkpoint for a preemption notice"
        except ray.train.TrainingFailedError as e:
            # A worker lost while the preemption's checkpoint uploaded (its node went first): Ray 2.60 may
            # count that death as a failure, but it is the preemption's.
            if our_error(e) is not None or not _preemption_pending(Store(cfg.storage), layout):
                raise
            why = "a worker was lost before the preemption's checkpoint was durable"
        preemptions += 1
        if 0 <= cfg.scaling.max_preemptions < preemptions:
            raise DcganError(
                f"run {layout.uri} was preempted {preemptions} times, more than scaling.max_preemptions = "
                f"{cfg.scaling.max_preemptions}; its checkpoints are kept: resubmit to resume"
            )
        log.warning("run %s: the attempt ended because %s; starting the next on the nodes that stay", layout.uri, why)


def _fit_once(cfg: JobConfig, lease: Lease | None, **run_kwargs) -> ray.train.Result:
    # On the driver's own node: a node that is preempted or lost must not take the board with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ProgressBoard.options(scheduling_strategy=here).remote()  # type: ignore[attr-defined]
    watch = StallWatch(cfg, board)
    try:
        return make_trainer(cfg, lease, board, **run_kwargs).fit()
    except ray.train.TrainingFailedError as e:
        watch.stop()
        if watch.ended is not None and our_error(e) is None:
            # The watch killed the last attempt's workers, which Ray reports as "actor killed": the stall is
            # the cause, and our_error finds it there (after a worker's own error and a lost lease).
            raise e from stall_error(watch.ended, cfg)
        raise
    finally:
        watch.stop()
        ray.kill(board)


def _preemption_pending(store: Store, layout: RunLayout) -> bool:
    """run.json's last preemption has not been resumed from (this attempt's, whose checkpoint may be torn)."""
    try:
        notices = (read_run_manifest(store, layout) or {}).get("preemptions") or []
    except StorageError:
        return False
    return bool(notices) and "resumed_from" not in notices[-1]


def make_trainer(cfg: JobConfig, lease: Lease | None = None, board: Any = None, **run_kwargs) -> TorchTrainer:
    """The run's TorchTrainer. `lease`: the driver's hold on the run folder, whose generation the workers
    write as; `board`: where they say how they are doing (a ProgressBoard)."""
    generation = lease.generation if lease is not None else None
    return TorchTrainerStoppingOn(
        stop_reason=restart_cannot_fix,
        # eval.in_task: Ray runs dcgan_ray.train.validation.score_checkpoint on the checkpoints reported
        # with validation=True, in a task of its own, and waits for the last one before fit() returns.
        validation_config=validation_config(cfg, generation) if cfg.eval.in_task else None,
        train_loop_per_worker=train_worker,
        train_loop_config={"config": cfg.to_dict(), "lease": generation, "board": board},
        # mypy sees Train v1's ScalingSection; ray.train picks v2's (elastic num_workers, the monitor interval).
        scaling_config=ray.train.ScalingConfig(  # type: ignore[call-arg]
            # An int, or (min, max): Ray Train V2's elastic form, which restarts with the workers it can
            # place when a node is lost and grows back when capacity returns.
            num_workers=(
                cfg.scaling.num_workers
                if isinstance(cfg.scaling.num_workers, int)
                # type: ignore[arg-type]
                else (cfg.scaling.min_workers, cfg.scaling.max_workers)
            ),
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.worker_resources,
            placement_strategy=placement_strategy(cfg.scaling),
            elastic_resize_monitor_interval_s=ELASTIC_RESIZE_CHECK_S,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=f"{cfg.storage.bucket}/{runs_prefix(cfg)}",
            storage_filesystem=s3_filesystem(cfg),
            # mypy sees Train v1's FailureConfig; ray.train picks v2's (preemptions counted apart).
            failure_config=ray.train.FailureConfig(  # type: ignore[call-arg]
                max_failures=cfg.scaling.max_failures, max_preemption_failures=cfg.scaling.max_preemptions
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            **run_kwargs,
        ),
    )


def log_predicted_scaling(cfg: JobConfig) -> None:
    """Log what the job's workers are predicted to gain over one (dcgan_ray.gan.scaling), and warn in one
    line, with what to change, when the prediction is below half of the ideal."""
    line, warning = describe_job(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    log.info("%s", line)
    if warning:
        log.warning("%s", warning)


def train(
    cfg: JobConfig, address: str | None = None, wait_for_lease: bool = False, submitted: dict | None = None
) -> dict:
    """Run (or resume) the job; returns the final run manifest. The run's lease in the bucket is held from
    before the first write to the last (`wait_for_lease`: wait for another driver's to end instead of
    being refused); `submitted` (what the user submitted: config file, overrides) goes into run.json."""
    store = preflight(cfg)
    layout = RunLayout.of(cfg)
    connect_ray(address)
    previous = read_run_manifest(store, layout)
    if not (previous and epochs_durable(previous) >= cfg.train.epochs):
        ensure_placeable(cfg.scaling)  # before anything is written: a job this cluster cannot hold changes nothing
    with own(cfg, "run", layout.prefix, layout.uri, wait_for_lease) as lease:
        try:
            return _train_holding(cfg, store, layout, lease, submitted)
        except KeyboardInterrupt:  # the renewal thread's, when the lease was lost: say so in one line
            if lease is not None and lease.lost is not None:
                raise lease.lost from None
            raise


def _train_holding(
    cfg: JobConfig, store: Store, layout: RunLayout, lease: Lease | None, submitted: dict | None
) -> dict:
    previous = read_run_manifest(store, layout)
    durable = lease.state.durable_epoch() if lease is not None else None
    if previous and max(epochs_durable(previous), durable or 0) >= cfg.train.epochs:
        if previous.get("status") == "scoring":  # a driver that stopped before it merged the last scores
            previous = finish_scored_run(store, layout, cfg, previous, lease)
        elif previous.get("status") != "finished":  # e.g. `queued` by a resubmission of a finished run
            previous["status"] = "finished"
            commit_end(lease, "finished", previous)
            write_run_manifest(store, layout, previous)
        log.info(
            "run %s already completed %d of %d epochs: nothing to train (raise train.epochs to go on)",
            layout.uri,
            previous["epochs_completed"],
            cfg.train.epochs,
        )
        return previous
    log_predicted_scaling(cfg)
    warn_if_scoring_waits(cfg)
    if previous:
        log.info(
            "run %s exists with %d epochs done: resuming from its latest checkpoint",
            layout.uri,
            previous.get("epochs_completed", 0),
        )
    s = cfg.scaling
    log.info(
        "training %s on %s %s worker(s); artifacts under %s",
        cfg.name,
        s.max_workers if s.min_workers == s.max_workers else f"{s.min_workers}-{s.max_workers}",
        "GPU" if s.use_gpu else "CPU",
        layout.uri,
    )
    try:
        if submitted is not None:  # what to submit again from the bucket alone (`dcgan-ray recover`)
            manifest = previous or new_run_manifest(cfg, layout)
            write_run_manifest(store, layout, {**manifest, "submitted": submitted})
        result = fit(cfg, lease)
    except ray.train.TrainingFailedError as e:
        error = lost_lease(lease, our_error(e)) or our_error(e) or _storage_down(store, cfg)
        if isinstance(error, LeaseLost):  # the run goes on under another driver: write nothing, say so
            raise error from None
        if not isinstance(error, StorageUnreachable):  # (writing run.json would wait out the outage again)
            _mark_failed(store, layout, cfg, lease)
        if error is not None:
            raise error from None  # the worker's own error: the CLI prints its one line
        raise DcganError(
            f"training of {cfg.name} failed after {cfg.scaling.max_failures} restart(s): "
            f"{first_failure(e)}. Artifacts so far: {layout.uri}; resubmit to resume"
        ) from None
    if lease is not None:
        lease.check()  # the workers are done: a driver that lost the run meanwhile writes nothing more
    manifest = read_run_manifest(store, layout) or {}
    if result.checkpoint is not None:
        manifest.setdefault("checkpoints", {})["latest"] = f"s3://{result.checkpoint.path}"
        manifest["checkpoints"]["kept"] = [f"s3://{c.path}" for c, _ in (result.best_checkpoints or [])]
        write_run_manifest(store, layout, manifest)
    if manifest.get("status") == "scoring":
        manifest = finish_scored_run(store, layout, cfg, manifest, lease)
    else:
        publish_after_training(cfg, manifest)
    return manifest


def finish_scored_run(store: Store, layout: RunLayout, cfg: JobConfig, manifest: dict, lease: Lease | None) -> dict:
    """eval.in_task: fit() has returned, so Ray has waited for every scoring task; merge their last
    results into run.json (the workers, its other writer, are gone) and only then mark it finished."""
    scored_late = merge_results(store, layout, manifest)
    missing = unscored_epochs(cfg, manifest)
    if missing:
        log.warning(
            "epoch(s) %s of %s have no quality metrics: their scoring task timed out "
            "(eval.task_timeout_s = %s) or never ran; Ray's controller log says which",
            ", ".join(map(str, missing)),
            layout.uri,
            cfg.eval.task_timeout_s,
        )
    manifest["status"] = "finished"
    commit_end(lease, "finished", manifest)
    write_run_manifest(store, layout, manifest)
    publish_after_training(cfg, manifest, scored_late)
    best = manifest.get("checkpoints", {}).get("best")
    if best:
        log.info("best %s %.3f at epoch %d: %s", best["metric"], best["value"], best["epoch"], best["uri"])
    return manifest


def _storage_down(store: Store, cfg: JobConfig) -> StorageUnreachable | None:
    """After a failure that is not ours: is the storage down? Ray Train's own writes (its run state,
    through pyarrow) fail with an OSError that says no more than its text, so ask the endpoint itself."""
    try:
        store.check()
    except StorageUnreachable:
        return StorageUnreachable(
            f"training of {cfg.name} stopped because the S3 endpoint {store.endpoint} stopped answering (Ray "
            f"Train could not write its run state for storage.retry_budget_s = {cfg.storage.retry_budget_s:g} s). "
            "Everything written before is kept: once the endpoint is back, resubmit the job and it resumes from "
            "its last checkpoint"
        )
    return None


def _mark_failed(store: Store, layout: RunLayout, cfg: JobConfig, lease: Lease | None) -> None:
    try:
        manifest = read_run_manifest(store, layout)
        if manifest:
            manifest["status"] = "failed"
            commit_end(lease, "failed", manifest)
            write_run_manifest(store, layout, manifest)
    except StorageError as e:
        log.warning("could not mark %s as failed: %s", layout.uri, e)
        return
    if manifest:
        publish_after_training(cfg, manifest)


def describe(manifest: dict) -> str:
    """The lines a user reads at the end: where everything is, and how to open it."""
    samples = manifest.get("samples", {})
    ckpt = manifest.get("checkpoints", {}).get("latest")
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    ep = f" --endpoint-url {endpoint}" if endpoint else ""
    lines = [
        f"run:               {manifest.get('run_uri')}  "
        f"({manifest.get('epochs_completed')}/{manifest.get('epochs_total')} epochs, {manifest.get('status')})",
        f"latest samples:    {samples.get('latest')}",
        f"animation:         {samples.get('gif')}",
        f"latest checkpoint: {ckpt}",
        f"best checkpoint:   {(manifest.get('checkpoints', {}).get('best') or {}).get('uri')}",
        f"run manifest:      {manifest.get('run_uri')}/run.json",
        "open them with any S3 client, e.g.:",
        f"  aws s3 cp{ep} {samples.get('latest')} latest.png",
        f"  dcgan-ray sample {ckpt} --n 64 --out grid.png",
    ]
    return "\n".join(lines)
