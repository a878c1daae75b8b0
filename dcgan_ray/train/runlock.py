"""One driver per run (and per study) folder: two submissions of one name must never train the same folder.

The lock is a named Ray actor (`dcgan-lock:<uri>` in the namespace `dcgan_ray`) that the driver creates.
Ray registers an actor name atomically in the GCS, so of two drivers that ask at once exactly one gets
it; and the actor is owned by its driver, so it dies with it: a driver that is killed without cleaning
up frees the name as soon as Ray notices its death, and the next submission takes the lock without any
manual step and without a read-check-delete that two drivers could both win. The actor names its
holder (the Ray job, the submission id, host and pid) for the refusal's message. The lock guards
drivers on one cluster; two clusters sharing one bucket are not coordinated (give their runs different
names or prefixes).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, cast

import ray

from dcgan_ray.errors import ClusterError
from dcgan_ray.storage.lease import process_alive

log = logging.getLogger(__name__)

NAMESPACE = "dcgan_ray"
GONE_HOLDER_WAIT_S = 30.0
"""How long a driver waits for the lock of a holder that no longer answers (a killed driver's lock actor
is removed once Ray notices the driver's death, which takes a moment)."""


def current_submission_id() -> str | None:
    """The Ray job submission this driver runs as (Ray hands it to the entrypoint in its job config)."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"].get("job_submission_id")
    except (KeyError, ValueError, TypeError):
        return None


@ray.remote(num_cpus=0, max_restarts=0)
class _LockHolder:
    """Holds the name while its driver lives; says who that driver is."""

    def __init__(self, holder: dict[str, Any]):
        self.holder = holder

    def who(self) -> dict[str, Any]:
        return self.holder


class DriverLock:
    """`with DriverLock("run", uri):` around a driver's work on the folder `uri`; refuses while another
    live driver holds it. The lock lives as long as this object does (Ray removes an actor no handle
    refers to), which a `with` block guarantees."""

    def __init__(self, kind: str, uri: str):
        self.kind, self.uri = kind, uri
        self.name = f"dcgan-lock:{uri}"
        self.actor: Any = None

    def __enter__(self) -> DriverLock:
        me = {
            "job_id": ray.get_runtime_context().get_job_id(),
            "submission_id": current_submission_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        deadline = time.monotonic() + GONE_HOLDER_WAIT_S
        while True:
            try:
                # Ray's stubs type a @ray.remote class as the class itself, not the ActorClass it becomes.
                self.actor = _LockHolder.options(  # type: ignore[attr-defined]
                    name=self.name, namespace=NAMESPACE
                ).remote(me)
                return self
            except ValueError:  # Ray: the name is taken
                holder = self._holder()
            if holder is not None:
                raise ClusterError(self._refusal(holder))
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{self.kind} {self.uri} is locked by a driver that no longer answers and Ray has not removed "
                    f"its lock in {GONE_HOLDER_WAIT_S:.0f} s; check `ray list actors --filter name={self.name}`"
                )
            time.sleep(0.5)

    def _holder(self) -> dict[str, Any] | None:
        """Who holds the name, or None when its holder is gone (or going) and the name will be free."""
        try:
            # An actor handle's method returns an untyped ObjectRef; `who` returns this dict.
            holder = cast(
                dict[str, Any], ray.get(ray.get_actor(self.name, namespace=NAMESPACE).who.remote(), timeout=20)
            )
        except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None
        # A driver on this machine that has died: its lock answers until Ray notices (seconds, more on a
        # busy head), and then goes.
        return None if holder.get("host") == socket.gethostname() and not process_alive(holder.get("pid")) else holder

    def _refusal(self, holder: dict[str, Any]) -> str:
        who = (
            f"submission {holder['submission_id']}"
            if holder.get("submission_id")
            else f"driver pid {holder['pid']} on {holder['host']}"
        )
        stop = f"`ray job stop {holder['submission_id']}`" if holder.get("submission_id") else "that driver"
        return (
            f"{self.kind} {self.uri} is being trained by {who} (since {holder['since']}); two drivers must "
            f"not write one {self.kind} folder: wait for it to end, stop it with {stop}, or choose another name"
        )

    def __exit__(self, *exc) -> None:
        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None
