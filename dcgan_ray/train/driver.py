"""The driver of a training run: checks everything that can fail early, then fits a TorchTrainer.

Run on the machine that submits the job (a `ray job submit` entrypoint or a shell). Before any
worker starts it checks the S3 endpoint, credentials and bucket, that the dataset is in the bucket,
and that the cluster can ever place the workers; each failure is a clear error, not a hang.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

import pyarrow.fs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from dcgan_ray.config import JobConfig
from dcgan_ray.data.svhn import read_split_manifest
from dcgan_ray.errors import ConfigError, DcganError
from dcgan_ray.storage.layout import RunLayout, classifier_key, runs_prefix
from dcgan_ray.storage.runs import read_run_manifest, set_run_status, write_run_manifest
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.placement import ensure_placeable
from dcgan_ray.train.runlock import RunLock
from dcgan_ray.train.worker import train_worker

log = logging.getLogger(__name__)

ELASTIC_RESIZE_CHECK_S = 30.0
"""How often an elastic run that lost workers looks for capacity to grow back (Ray's default: 60 s)."""


def s3_filesystem(cfg: JobConfig) -> pyarrow.fs.S3FileSystem:
    """pyarrow's S3 filesystem for Ray Train's storage, on the configured endpoint.

    Credentials are not passed: each process resolves them from its own environment, so they are
    never pickled into what Ray ships to the controller and the workers.
    """
    if cfg.storage.endpoint is None:
        return pyarrow.fs.S3FileSystem(region=cfg.storage.region)
    url = urlparse(cfg.storage.endpoint)
    return pyarrow.fs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme, region=cfg.storage.region)


def connect_ray(address: str | None = None) -> None:
    """Join the cluster this process belongs to (RAY_ADDRESS, a `ray start` node, the job's own) or start one."""
    if ray.is_initialized():
        return
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)


def preflight(cfg: JobConfig) -> Store:
    """Storage, dataset and batch checks that need no cluster."""
    store = Store(cfg.storage)
    store.check()
    manifest = read_split_manifest(store, cfg, cfg.data.split)
    count = manifest["count"] if cfg.data.max_images is None else min(cfg.data.max_images, manifest["count"])
    if cfg.eval.every_epochs and "digit" in cfg.eval.extractors and not store.exists(classifier_key(cfg)):
        raise DcganError(
            f"evaluation needs the digit classifier at {store.uri(classifier_key(cfg))}: train it once with "
            f"`dcgan-ray classifier train {{config}}`, or turn evaluation off with --set eval.every_epochs=0"
        )
    if count < cfg.train.batch_size * cfg.scaling.max_workers:
        raise ConfigError(
            f"{count} images cannot fill one batch of train.batch_size={cfg.train.batch_size} on "
            f"each of scaling.num_workers={cfg.scaling.max_workers} workers; lower them or use more data"
        )
    return store


def make_trainer(cfg: JobConfig, store_path: str | None = None, **run_kwargs) -> TorchTrainer:
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            # An int, or (min, max): Ray Train V2's elastic form, which restarts with the workers it can
            # place when a node is lost and grows back when capacity returns.
            num_workers=cfg.scaling.num_workers if isinstance(cfg.scaling.num_workers, int) else
            (cfg.scaling.min_workers, cfg.scaling.max_workers),
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.worker_resources,
            elastic_resize_monitor_interval_s=ELASTIC_RESIZE_CHECK_S,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=store_path or f"{cfg.storage.bucket}/{runs_prefix(cfg)}",
            storage_filesystem=s3_filesystem(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            **run_kwargs,
        ),
    )


def train(cfg: JobConfig, address: str | None = None) -> dict:
    """Run (or resume) the job; returns the final run manifest."""
    store = preflight(cfg)
    layout = RunLayout.of(cfg)
    previous = read_run_manifest(store, layout)
    if previous and previous.get("epochs_completed", 0) >= cfg.train.epochs:
        log.info("run %s already completed %d of %d epochs: nothing to train (raise train.epochs to go on)",
                 layout.uri, previous["epochs_completed"], cfg.train.epochs)
        return previous
    connect_ray(address)
    with RunLock(layout):
        ensure_placeable(cfg.scaling)
        if previous:
            log.info("run %s exists with %d epochs done: resuming from its latest checkpoint",
                     layout.uri, previous.get("epochs_completed", 0))
        s = cfg.scaling
        log.info("training %s on %s %s worker(s); artifacts under %s", cfg.name,
                 s.max_workers if s.min_workers == s.max_workers else f"{s.min_workers}-{s.max_workers}",
                 "GPU" if s.use_gpu else "CPU", layout.uri)
        try:
            result = make_trainer(cfg).fit()
        except ray.train.TrainingFailedError as e:
            set_run_status(store, layout, "failed")
            raise DcganError(f"training of {cfg.name} failed after {cfg.scaling.max_failures} restart(s): "
                             f"{_root_cause(e)}. Artifacts so far: {layout.uri}; resubmit to resume") from None
    manifest = read_run_manifest(store, layout) or {}
    if result.checkpoint is not None:
        manifest.setdefault("checkpoints", {})["latest"] = f"s3://{result.checkpoint.path}"
        manifest["checkpoints"]["kept"] = [f"s3://{c.path}" for c, _ in (result.best_checkpoints or [])]
        write_run_manifest(store, layout, manifest)
    return manifest


def _root_cause(error: BaseException) -> str:
    """The innermost message of a Ray failure, which is the one a user can act on."""
    text = str(error)
    for marker in ("DcganError", "CheckpointError", "DatasetError", "StorageError"):
        if marker in text:
            tail = text[text.rindex(marker):].splitlines()[0]
            return tail.partition(": ")[2] or tail
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__


def describe(manifest: dict) -> str:
    """The lines a user reads at the end: where everything is, and how to open it."""
    samples = manifest.get("samples", {})
    ckpt = manifest.get("checkpoints", {}).get("latest")
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    ep = f" --endpoint-url {endpoint}" if endpoint else ""
    lines = [
        f"run:               {manifest.get('run_uri')}  ({manifest.get('epochs_completed')}/{manifest.get('epochs_total')} epochs, {manifest.get('status')})",
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
