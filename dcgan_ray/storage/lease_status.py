"""What commands other than the holder see and do with a folder's lease (`dcgan_ray.storage.lease`): who
holds it (`ownership`, for `dcgan-ray runs` and `recover`), `dcgan-ray stop`'s release, and the pre-flight
probe that the endpoint honours the conditional writes the lease is built on."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from dcgan_ray.errors import StorageError
from dcgan_ray.storage.lease import process_gone
from dcgan_ray.storage.lease_log import LeaseLog, LeaseState, utc_now
from dcgan_ray.storage.s3 import Store


def release_folder(store: Store, folder: str, reason: str, submissions: set[str] | None = None) -> bool:
    """`dcgan-ray stop`: append a release for the holder of the folder (its job is already gone), so a
    resubmission takes it at once instead of waiting out the ttl. With `submissions`, only a holder that is one
    of them (the jobs `stop` ended): a driver that took the run over since keeps it. False when nothing was
    released."""
    log_ = LeaseLog(store, folder)
    while True:
        state = LeaseState.of(log_.entries())
        if state.holder is None:
            return False
        if submissions is not None and state.holder["holder"].get("submission_id") not in submissions:
            return False
        seq = state.last_seq + 1
        entry = {
            "seq": seq,
            "kind": "release",
            "generation": state.holder["generation"],
            "writer": f"{socket.gethostname()}:{os.getpid()}:stop",
            "at": utc_now(),
            "reason": reason,
        }
        if log_.append(entry):
            return True


@dataclass
class Ownership:
    """What `dcgan-ray runs` and `recover` need to know of a folder's lease: who holds it, and the end state
    its log records last (a `commit` with `state`: finished or failed)."""

    state: str  # "none" (no log), "held", "released", "expired"
    holder: dict[str, Any] | None = None
    age_s: float | None = None
    ended: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.state == "held" and self.holder is not None:
            h = self.holder["holder"]
            return f"held by {h.get('submission_id') or 'pid ' + str(h.get('pid'))} ({self.age_s:.0f}s ago)"
        if self.state == "expired" and self.holder is not None:
            return f"expired {self.age_s:.0f}s ago"
        return self.state

    def status_of(self, record: dict[str, Any]) -> str:
        """The status of the run (or study) whose run.json (study.json) is `record`: the record's, unless an
        older generation wrote it than the one whose end state the log records last (a stale driver's write
        that landed late): then the log's, which the server fenced."""
        status = str(record.get("status", "?"))
        written_by = record.get("generation")
        if self.ended is not None and isinstance(written_by, int) and written_by < self.ended["generation"]:
            return str(self.ended["state"])
        return status


def ownership(store: Store, folder: str) -> Ownership:
    log_ = LeaseLog(store, folder)
    entries = log_.entries()
    if not entries:
        return Ownership("none")
    state = LeaseState.of(entries)
    ended = next((c for c in reversed(state.commits) if c.get("state") in END_STATES), None)
    if state.holder is None:
        return Ownership("released", ended=ended)
    age = log_.age_s(state)
    expired = age > state.holder["holder"]["ttl_s"] or process_gone(state.holder)
    return Ownership("expired" if expired else "held", state.holder, age, ended)


END_STATES = ("finished", "failed")
"""The end states a driver commits to the lease log before it writes them into run.json."""


def check_conditional_writes(store: Store, scratch_prefix: str) -> None:
    """Pre-flight: an endpoint that ignores If-None-Match would let two drivers both take one lease. Create a
    scratch key twice; the second must be refused. Raises StorageError naming the endpoint and the setting."""
    key = f"{scratch_prefix}/conditional-write-probe-{uuid.uuid4().hex}"
    try:
        first = store.create_bytes(key, b"1")
        second = store.create_bytes(key, b"2")
    finally:
        store.delete([key])
    if first and not second:
        return
    raise StorageError(
        f"the S3 endpoint {store.endpoint} ignores conditional writes (If-None-Match: a second create of one key "
        "was accepted), so the bucket cannot decide which driver writes a run: use a server that supports them "
        "(AWS S3, MinIO, SeaweedFS, GCS, R2 do), or set storage.conditional_writes: false to accept protection "
        "within one Ray cluster only"
    )
