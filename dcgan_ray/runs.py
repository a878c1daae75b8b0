"""Where a run's artifacts live in the bucket, and the run manifest that lists them.

  s3://<bucket>/<prefix>/runs/<name>/
    run.json                          the manifest: status, config, per-epoch metrics, artifact URIs
    config.yaml                       the resolved job config
    samples/epoch_0001.png ...        G on the fixed noise after each epoch (8x8 grid, 32 px tiles)
    samples/latest.png                the newest of those
    samples/progress.gif              all epochs, animated (written at the end)
    checkpoint_epoch_0001/checkpoint.pt ...   Ray Train's checkpoints, the last `checkpoint.keep`
    best/checkpoint.pt                the checkpoint with the best `eval.metric`, kept apart from those
    checkpoint_manager_snapshot.json  Ray Train's record of the registered checkpoints
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from dcgan_ray.config import JobConfig
from dcgan_ray.errors import ObjectMissing
from dcgan_ray.storage import Store


@dataclass(frozen=True)
class RunLayout:
    bucket: str
    prefix: str  # key prefix of the run folder, no trailing '/'

    @classmethod
    def of(cls, cfg: JobConfig) -> "RunLayout":
        return cls(cfg.storage.bucket, f"{runs_prefix(cfg)}/{cfg.name}")

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def manifest_key(self) -> str:
        return f"{self.prefix}/run.json"

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config.yaml"

    def sample_key(self, epoch: int) -> str:
        return f"{self.prefix}/samples/epoch_{epoch:04d}.png"

    @property
    def latest_sample_key(self) -> str:
        return f"{self.prefix}/samples/latest.png"

    @property
    def gif_key(self) -> str:
        return f"{self.prefix}/samples/progress.gif"

    @property
    def best_key(self) -> str:
        return f"{self.prefix}/best/checkpoint.pt"

    @staticmethod
    def checkpoint_dir_name(epoch: int) -> str:
        return f"checkpoint_epoch_{epoch:04d}"

    def checkpoint_keys(self, store: Store) -> list[str]:
        """Keys of the run's checkpoint files, newest epoch first."""
        keys = [k for k in store.list_keys(f"{self.prefix}/checkpoint_epoch_") if k.endswith("/checkpoint.pt")]
        return sorted(keys, reverse=True)


def runs_prefix(cfg: JobConfig) -> str:
    return cfg.storage.runs_prefix or f"{cfg.storage.prefix}/runs".lstrip("/")


def read_manifest(store: Store, layout: RunLayout) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_bytes(layout.manifest_key))
    except (ObjectMissing, json.JSONDecodeError):
        return None


def write_manifest(store: Store, layout: RunLayout, manifest: dict[str, Any]) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.put_bytes(layout.manifest_key, json.dumps(manifest, indent=2).encode(), "application/json")


def new_manifest(cfg: JobConfig, layout: RunLayout) -> dict[str, Any]:
    return {
        "name": cfg.name,
        "run_uri": layout.uri,
        "status": "running",
        "epochs_total": cfg.train.epochs,
        "epochs_completed": 0,
        "config": cfg.to_dict(),
        "history": [],
        "samples": {"latest": None, "epochs": [], "gif": None},
        "checkpoints": {"latest": None},
    }
