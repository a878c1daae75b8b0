"""One driver per run folder: two submissions of one run name must never train the same folder.

The lock is a key in the cluster's GCS key-value store, taken with a put that does not overwrite (atomic
in the GCS). It names its holder: the Ray job (driver) and, for `ray job submit`/`dcgan-ray submit`
jobs, the submission id. A holder whose Ray job is dead (a driver killed without cleaning up) no longer
counts: the next driver takes the lock over. The lock guards drivers on one cluster; two clusters
sharing one bucket are not coordinated (give their runs different names or prefixes).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

import ray
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_put

from dcgan_ray.errors import ClusterError
from dcgan_ray.storage.layout import RunLayout

log = logging.getLogger(__name__)

NAMESPACE = "dcgan_ray"


def current_submission_id() -> str | None:
    """The Ray job submission this driver runs as (Ray hands it to the entrypoint in its job config)."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"].get("job_submission_id")
    except (KeyError, ValueError, TypeError):
        return None


def _job_alive(job_id: str) -> bool:
    return any(j["JobID"] == job_id and not j["IsDead"] for j in ray._private.state.state.job_table())


class RunLock:
    """`with RunLock(layout):` around a run's training; refuses while another live driver holds it."""

    def __init__(self, layout: RunLayout):
        self.layout = layout
        self.key = f"run:{layout.uri}".encode()
        self.me: dict[str, Any] = {}

    def __enter__(self) -> RunLock:
        self.me = {"job_id": ray.get_runtime_context().get_job_id(), "submission_id": current_submission_id(),
                   "host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime())}
        value = json.dumps(self.me).encode()
        while _internal_kv_put(self.key, value, overwrite=False, namespace=NAMESPACE):
            raw = _internal_kv_get(self.key, namespace=NAMESPACE)
            holder = json.loads(raw) if raw else None
            if holder is not None and _job_alive(holder["job_id"]):
                who = (f"submission {holder['submission_id']}" if holder.get("submission_id")
                       else f"driver pid {holder['pid']} on {holder['host']}")
                stop = f"`ray job stop {holder['submission_id']}`" if holder.get("submission_id") else "that driver"
                raise ClusterError(
                    f"run {self.layout.uri} is being trained by {who} (since {holder['since']}); two drivers must "
                    f"not write one run folder: wait for it to end, stop it with {stop}, or choose another name"
                )
            log.warning("taking over the lock of run %s from a driver that is gone (%s)", self.layout.uri, holder)
            _internal_kv_del(self.key, namespace=NAMESPACE)
        return self

    def __exit__(self, *exc) -> None:
        raw = _internal_kv_get(self.key, namespace=NAMESPACE)
        if raw and json.loads(raw).get("job_id") == self.me["job_id"]:
            _internal_kv_del(self.key, namespace=NAMESPACE)
