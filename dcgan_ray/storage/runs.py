"""The run manifest, `run.json`: status, config, per-epoch metrics and every artifact's URI.

Rank 0 of a training run writes it (through `dcgan_ray.train.recorder`); the driver, `dcgan-ray jobs`
and the study report read it. Where it lives: `dcgan_ray.storage.layout.RunLayout`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from dcgan_ray.config import JobConfig
from dcgan_ray.errors import ObjectMissing
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.s3 import Store


def read_run_manifest(store: Store, layout: RunLayout) -> dict[str, Any] | None:
    """The run's manifest, or None for a run that has not started (or whose manifest is unreadable)."""
    try:
        return json.loads(store.get_bytes(layout.manifest_key))
    except (ObjectMissing, json.JSONDecodeError):
        return None


def write_run_manifest(store: Store, layout: RunLayout, manifest: dict[str, Any]) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.put_bytes(layout.manifest_key, json.dumps(manifest, indent=2).encode(), "application/json")


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
        "checkpoints": {"latest": None},
    }


def set_run_status(store: Store, layout: RunLayout, status: str) -> None:
    """Mark an existing run (e.g. `failed` when the driver sees the fit fail); a missing run stays missing."""
    manifest = read_run_manifest(store, layout)
    if manifest:
        manifest["status"] = status
        write_run_manifest(store, layout, manifest)
