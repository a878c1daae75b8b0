"""The lease log's format: its entries, each created once with If-None-Match and checked on every read,
and what they say replayed (`LeaseState`). How a driver holds a folder with it: `dcgan_ray.storage.lease`."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from dcgan_ray.errors import ObjectMissing, StorageError
from dcgan_ray.storage import checks
from dcgan_ray.storage.s3 import Store

KINDS = ("acquire", "commit", "renew", "release")


class LeaseLogError(StorageError):
    """An object in the lease log is not an entry this project wrote (damaged or planted)."""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LeaseLog:
    """The log of one folder (a run's or a study's): reading entries, creating the next one."""

    def __init__(self, store: Store, folder: str):
        self.store, self.folder = store, folder.rstrip("/")
        self.prefix = f"{self.folder}/lease/log/"

    def key(self, seq: int) -> str:
        return f"{self.prefix}{seq:08d}.json"

    def renewal_key(self, generation: int) -> str:
        return f"{self.folder}/lease/renewed/{generation:08d}.json"

    def entries(self, after: int = 0) -> list[dict[str, Any]]:
        """The entries after number `after`, in order, each checked."""
        keys = self.store.list_keys(self.prefix, start_after=self.key(after) if after else "")
        return [entry for entry in (self.read(key) for key in keys) if entry is not None]

    def read(self, key: str) -> dict[str, Any] | None:
        try:
            blob = self.store.get_bytes(key)
        except ObjectMissing:  # (never deleted by this project: someone removed it since the listing)
            return None
        try:
            return self.check(checks.parse_json(blob), key)
        except checks.NotOurs as e:
            raise LeaseLogError(
                f"{self.store.uri(key)} is not a lease log entry this code wrote ({e}); who may write "
                f"{self.store.uri(self.folder)} cannot be decided while it is there. Remove it, when no driver "
                "is running there, to go on"
            ) from None

    def check(self, entry: Any, key: str) -> dict[str, Any]:
        e = checks.mapping(entry, "the entry")
        if key != self.key(checks.integer(e.get("seq"), "seq", 1, 10**8 - 1)):
            raise checks.NotOurs("its seq is not the number in its name")
        if e.get("kind") not in KINDS:
            raise checks.NotOurs(f"kind is not one of {', '.join(KINDS)}")
        checks.integer(e.get("generation"), "generation", 1, 10**8 - 1)
        checks.text(e.get("writer", ""), "writer", 200)
        if e["kind"] == "acquire":
            holder = checks.mapping(e.get("holder"), "holder")
            checks.number(holder.get("ttl_s"), "holder.ttl_s")
            for name in ("host", "since", "cluster", "submission_id", "machine"):
                if holder.get(name) is not None:
                    checks.text(holder[name], checks.member("holder", name), 300)
        return e

    def append(self, entry: dict[str, Any]) -> bool:
        """Create entry number entry["seq"]; False when that number is taken."""
        return self.store.create_bytes(self.key(entry["seq"]), json.dumps(entry, indent=1).encode(), "application/json")

    def is_own(self, seq: int, writer: str) -> bool:
        """Entry `seq` is `writer`'s (a create whose answer was lost, and whose retry found it there)."""
        found = self.read(self.key(seq))
        return found is not None and found.get("writer") == writer

    def age_s(self, state: LeaseState) -> float:
        """Seconds since the holder last showed it was alive, by the server's clock: its renewal object or its
        newest entry in the log (its acquire, a commit, a `renew`), whichever is younger."""
        assert state.holder is not None
        try:
            renewed = self.store.age_s(self.renewal_key(state.holder["generation"]))
        except ObjectMissing:
            renewed = math.inf
        if renewed <= state.holder["holder"]["ttl_s"]:  # (alive by the renewal alone: no second request)
            return renewed
        try:
            return min(renewed, self.store.age_s(self.key(state.holder_newest)))
        except ObjectMissing:  # (removed since it was read)
            return renewed


@dataclass
class LeaseState:
    """What the log says, replayed: who holds the folder and what was committed."""

    last_seq: int = 0
    holder: dict[str, Any] | None = None  # the acquire entry of the current holder; None when free
    released: dict[str, Any] | None = None  # the release that freed it, if the last holder released
    commits: list[dict[str, Any]] = field(default_factory=list)  # every commit entry, in order
    holder_newest: int = 0  # the number of the holder's newest entry (its acquire, a commit, a renew)

    @classmethod
    def of(cls, entries: list[dict[str, Any]], state: LeaseState | None = None) -> LeaseState:
        state = state or cls()
        for e in entries:
            state.last_seq = e["seq"]
            if e["kind"] == "acquire":
                state.holder, state.released = e, None
            elif e["kind"] == "release":
                state.holder, state.released = None, e
            elif e["kind"] == "commit":
                state.commits.append(e)
            if state.holder is not None and e["generation"] == state.holder["generation"]:
                state.holder_newest = e["seq"]
        return state

    def checkpoints(self) -> list[dict[str, Any]]:
        """The committed checkpoints, newest first."""
        return [c for c in reversed(self.commits) if "checkpoint" in c]

    def committed_sha(self, folder: str) -> str | None:
        """The manifest sha256 the newest commit of checkpoint `folder` recorded (None: never committed)."""
        return next((c["manifest_sha256"] for c in self.checkpoints() if c["checkpoint"] == folder), None)

    def best(self) -> dict[str, Any] | None:
        """The newest commit of the run's best copy (`best/`), if any."""
        return next((c for c in reversed(self.commits) if "best" in c), None)

    def durable_epoch(self) -> int | None:
        """The newest committed checkpoint's epoch (None: nothing committed, e.g. a run from before the lease)."""
        return max((c["epoch"] for c in self.checkpoints()), default=None)
