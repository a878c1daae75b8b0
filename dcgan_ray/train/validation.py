"""Scoring checkpoints in a Ray task of their own (`eval.in_task`), through Ray Train's ValidationConfig.

What Ray Train 2.60 does with it (alpha; read from ray/train/v2/_internal/execution/checkpoint/
validation_manager.py and checkpoint_manager.py):
- The trainer takes `validation_config=ValidationConfig(fn, task_config, ray_remote_kwargs)` (the trainer,
  not RunConfig). `ray.train.report(metrics, checkpoint, validation=True)` queues the checkpoint once it
  is uploaded; the controller runs `fn(checkpoint, **fn_kwargs)` as a Ray task with `ray_remote_kwargs`,
  one at a time (MAX_IN_FLIGHT_VALIDATIONS = 1) in report order, started and polled from its control loop.
- The dict `fn` returns is merged into that checkpoint's metrics in Ray's own records (what
  ray.train.CheckpointConfig's checkpoint_score_attribute ranks by); a checkpoint waiting for its
  validation is not deleted by num_to_keep.
- A task that raises is logged and marked VALIDATION_FAILED; one past `timeout_s` (counted from its launch,
  waiting for resources included) is cancelled (VALIDATION_TIMEOUT). Neither fails the run.
- When the workers are done, the controller waits for every queued and running validation before `fit()`
  returns. An aborted run cancels them; a run resumed on the same storage path queues them again.

Ray's merged metrics stay in Ray's records, so each task also writes its result to
`validations/epoch_NNNN.json` in the run folder (the task is that object's one writer) and keeps best/
(tasks run one at a time, in epoch order, so each compares with the results before it). Rank 0's
recorder folds the results into run.json at each of its writes; the driver folds the last ones in after
`fit()` and only then marks the run finished. Neither ever writes a result object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

import ray
import ray.train
import torch
from ray.train import ValidationConfig, ValidationTaskConfig

from dcgan_ray.config import JobConfig, config_from_dict
from dcgan_ray.data.svhn import load_split
from dcgan_ray.logs import setup_logging
from dcgan_ray.quality.metrics import Evaluator
from dcgan_ray.ray_internals import has_launching_autoscaler
from dcgan_ray.storage.checkpoint import generator_from_checkpoint, read_checkpoint_dir
from dcgan_ray.storage.checkpointer import Checkpointer
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.runs import epoch_of_key, read_result, read_run_manifest
from dcgan_ray.storage.s3 import Store

log = logging.getLogger(__name__)


def task_resources(cfg: JobConfig) -> dict[str, float]:
    """What one scoring task asks Ray for: a CPU, and a GPU with scaling.use_gpu (eval.task_gpus)."""
    gpus = cfg.eval.task_gpus if cfg.eval.task_gpus is not None else (1.0 if cfg.scaling.use_gpu else 0.0)
    return {"CPU": 1.0, **({"GPU": gpus} if gpus else {})}


def validation_config(cfg: JobConfig, lease_generation: int | None = None) -> ValidationConfig:
    """The trainer's ValidationConfig: `score_checkpoint` with the job's config (no secrets: credentials
    come from the nodes' environment) and the driver's lease generation, on a CPU or, with
    scaling.use_gpu, a GPU (eval.task_gpus)."""
    need = task_resources(cfg)
    return ValidationConfig(
        # Ray's ValidationFn protocol asks for **kwargs; Ray calls it with fn_kwargs: config= and lease=.
        score_checkpoint,  # type: ignore[arg-type]
        task_config=ValidationTaskConfig(
            fn_kwargs={"config": cfg.to_dict(), "lease": lease_generation}, timeout_s=cfg.eval.task_timeout_s
        ),
        ray_remote_kwargs={"num_cpus": need["CPU"], "num_gpus": need.get("GPU", 0.0)},
    )


def scoring_room(cfg: JobConfig, cluster: dict[str, float]) -> str | None:
    """Where `cluster` (a fixed cluster's resources) has no room for a scoring task beside the job's
    workers, what is short; None where it has. Ray runs the task outside the workers' placement group,
    so without room it waits until training ends, and that wait counts against eval.task_timeout_s."""
    workers = {k: v * cfg.scaling.max_workers for k, v in cfg.scaling.worker_resources.items()}
    short = {k: v for k, v in task_resources(cfg).items() if cluster.get(k, 0.0) - workers.get(k, 0.0) < v}
    if not short:
        return None
    return ", ".join(
        f"{v:g} {k} (the cluster has {cluster.get(k, 0.0):g}, the workers take {workers.get(k, 0.0):g})"
        for k, v in short.items()
    )


def warn_if_scoring_waits(cfg: JobConfig) -> None:
    """Say before training when eval.in_task's scores can only arrive after training: a fixed cluster
    without room for the scoring task beside the workers. (An autoscaling cluster adds a node for it.)"""
    if not cfg.eval.in_task or not cfg.eval.every_epochs or has_launching_autoscaler():
        return
    short = scoring_room(cfg, ray.cluster_resources())
    if short:
        log.warning(
            "eval.in_task: no room for the scoring task's %s beside the workers, so epochs are scored "
            "only when training ends, and eval.task_timeout_s (%s s) counts that wait; set "
            "eval.task_gpus: 0 to score on a CPU, lower scaling.num_workers, add a node, or set "
            "eval.in_task: false to score inline",
            short,
            cfg.eval.task_timeout_s,
        )


def score_checkpoint(
    checkpoint: ray.train.Checkpoint, config: dict[str, Any], lease: int | None = None
) -> dict[str, float]:
    """Ray's validation fn, in its own task: load the checkpoint's G (checked against its manifest), score
    it as the inline evaluation would on one rank, keep best/, and write the result next to run.json. A
    task of a driver that lost the run's lease (generation `lease`) writes nothing."""
    setup_logging()
    cfg = config_from_dict(config, "the job's config")
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    held = Lease.join(store, layout.prefix, layout.uri, "run", lease) if lease is not None else None
    with held.fencing() if held is not None else contextlib.nullcontext():
        return _score(checkpoint, cfg, store, layout, held)


def _score(
    checkpoint: ray.train.Checkpoint, cfg: JobConfig, store: Store, layout: RunLayout, held: Lease | None
) -> dict[str, float]:
    folder = checkpoint.path.split("/", 1)[1].rstrip("/")  # Ray's path is bucket/key
    epoch = epoch_of_key(folder)
    result: dict[str, Any] = {"epoch": epoch, "checkpoint": store.uri(folder)}
    try:
        # Checked against its commit too: rank 0 committed it before Ray handed it over.
        state = read_checkpoint_dir(store, folder, held.state.committed_sha(folder) if held is not None else None)
        device = torch.device("cuda") if torch.cuda.is_available() and ray.get_gpu_ids() else torch.device("cpu")
        netG, _ = generator_from_checkpoint(state)
        node = ray.get_runtime_context().get_node_id()
        images = torch.from_numpy(load_split(store, cfg, max_images=cfg.data.max_images, node=node).images)
        # Rank 0 of world 1: all eval.num_samples here; the reference statistics come from the bucket.
        metrics = Evaluator(store, cfg, images, device)(netG.to(device), seed=cfg.train.seed)
        result["best"] = Checkpointer(store, layout, cfg.eval.metric, held).keep_if_best(
            _best_before(store, layout, cfg.eval.metric, epoch), epoch, metrics.get(cfg.eval.metric), lambda: state
        )
        result["metrics"] = metrics
    except Exception as e:
        # Written for run.json, then raised for Ray (which logs it and goes on training).
        result["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        result["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if held is not None:
            held.check()
        store.put_bytes(layout.validation_key(epoch), json.dumps(result, indent=2).encode(), "application/json")
    return metrics


def _best_before(store: Store, layout: RunLayout, metric: str, epoch: int) -> dict[str, Any] | None:
    """The best record among the epochs before `epoch`: scored results in the bucket and run.json's best
    (a run that scored inline before). Later epochs' results are a discarded attempt's, not compared."""
    candidates = []
    recorded = ((read_run_manifest(store, layout) or {}).get("checkpoints") or {}).get("best")
    if recorded and recorded.get("metric") == metric and recorded["epoch"] < epoch:
        candidates.append(recorded)
    for key in store.list_keys(layout.validations_prefix):
        if epoch_of_key(key) < epoch:
            value = ((read_result(store, layout, key) or {}).get("metrics") or {}).get(metric)
            if value is not None:
                candidates.append({"epoch": epoch_of_key(key), "metric": metric, "value": value})
    return min(candidates, key=lambda c: c["value"], default=None)
