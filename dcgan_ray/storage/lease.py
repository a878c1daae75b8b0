"""The bucket decides who writes a run or a study: a lease, and a log that fences every commit.

Clusters are disposable (on Kubernetes every RayJob, retry and Kueue readmission is a new one); what all of
them share is the bucket, so ownership lives there. It is built on the one conditional write that every
S3-compatible server supported here makes atomic, create-if-absent (PutObject with If-None-Match: *).
Compare-and-swap (If-Match) is not enough: on SeaweedFS 4.48, 20 concurrent swaps of one key let 2 win.

  <folder>/lease/log/00000001.json ...   the log: each entry created once, never replaced
  <folder>/lease/renewed/00000007.json   rewritten by the holder of generation 7 every ttl/4 (its own key)

Entries (`kind`):
  acquire   a driver takes the folder; the entry's number is the *generation* it writes as, `holder` says
            who it is (cluster, submission, host, pid) and `ttl_s` how long it may go without renewing
  commit    what a holder made durable: a checkpoint (epoch, folder, its manifest's sha256) or a study's state
  release   the holder is done (or `dcgan-ray stop` ended it): the next driver takes over at once

The holder is the author of the last `acquire` that no `release` follows. It is alive while its renewal
object (or, before the first renewal, its acquire entry) is younger than its `ttl_s` by the server's
clock; past that, any driver may take over by appending an `acquire`.

Fencing. Every append creates the next number with If-None-Match, so two appends never share a number. A
writer that finds its number taken reads what is there: a commit of its own generation (the driver and
rank 0 of one holder both append) sends it to the next number; anything else means the lease was taken
over or released, and it stops with `LeaseLost`. So a driver paused past its ttl (a long GC, a
partition, SIGSTOP) whose successor appended an `acquire` has its next commit refused by the server, not
by a check that could race; and the successor, which reads the log after its own `acquire` is in place,
sees every commit the old holder made before that fence. Writes that are not commits (grids, run.json,
the run page) are preceded by `check`, which reads the log's new entries: it stops a stale writer before
it writes, except in the moment between its check and its write.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgan_ray.errors import LeaseHeld, LeaseLost, StorageError
from dcgan_ray.storage.lease_log import LeaseLog, LeaseState, utc_now
from dcgan_ray.storage.s3 import Store

log = logging.getLogger(__name__)

WAIT_POLL_S = 5.0
"""How often a driver that waits for a lease (`--wait-for-lease`) looks again."""


def this_process() -> dict[str, Any]:
    """Who this process is, for a lease entry: host and pid for people, and `machine` (the kernel's boot id
    and this process's pid namespace) so that a reader on the same machine can tell a holder whose process
    is gone without waiting for its lease to expire (the pid alone means nothing across containers)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "machine": _machine()}


def _machine() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


_held: set[str] = set()
"""The writers (Lease.writer) of the leases this process holds or is taking now: a lease that names this very
process but is not here was left by a driver of this process that ended without releasing it (in a storage
outage). A writer is added before its acquire entry is written, so another thread of this process that reads
the entry at once does not take it for a leftover."""


def _process_gone(acquire: dict[str, Any]) -> bool:
    """The holder of this acquire entry ran on this machine and its process no longer exists (or is this one,
    done with it)."""
    holder = acquire["holder"]
    pid, machine = holder.get("pid"), holder.get("machine")
    if not machine or machine != _machine() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return acquire.get("writer") not in _held
    return not process_alive(pid)


def process_alive(pid: Any) -> bool:
    """Whether a process `pid` exists on this machine."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def describe_holder(acquire: dict[str, Any], age_s: float | None = None) -> str:
    h = acquire["holder"]
    who = f"submission {h['submission_id']}" if h.get("submission_id") else f"a driver (pid {h.get('pid')})"
    where = f" on cluster {h['cluster']}" if h.get("cluster") else ""
    renewed = f", renewed {age_s:.0f} s ago" if age_s is not None else ""
    return (
        f"{who}{where} (host {h.get('host')}, pid {h.get('pid')}; generation {acquire['generation']}, since "
        f"{h.get('since')}{renewed}, expires after {h['ttl_s']:g} s without renewal)"
    )


class Lease:
    """A driver's hold on a folder (`acquire`), or a worker's view of its driver's (`join`): `check` before
    writes, `commit` for what must be fenced; the driver also renews and releases it."""

    def __init__(self, log: LeaseLog, uri: str, what: str, generation: int, state: LeaseState):
        self.log, self.uri, self.what = log, uri, what
        self.generation, self.state = generation, state
        self.writer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost: LeaseLost | None = None
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None
        self._renewals = 0

    # --- taking it --------------------------------------------------------------------------------------

    @classmethod
    def acquire(
        cls, store: Store, folder: str, uri: str, what: str, holder: dict[str, Any], ttl_s: float, wait: bool = False
    ) -> Lease:
        """Take the folder's lease, or raise LeaseHeld naming the live holder (with `wait`: wait for it to be
        released or to expire, then take it)."""
        log_ = LeaseLog(store, folder)
        me = {**this_process(), **holder, "since": utc_now(), "ttl_s": float(ttl_s)}
        announced = False
        while True:
            state = LeaseState.of(log_.entries())
            current = state.holder
            if current is not None:
                age = log_.age_s(current)
                gone = _process_gone(current)
                if age <= current["holder"]["ttl_s"] and not gone:
                    if not wait:
                        raise LeaseHeld(
                            f"{what} {uri} is held by {describe_holder(current, age)}: two drivers must not write "
                            f"one {what}; wait for it to end (--wait-for-lease waits for you), stop it "
                            "(`dcgan-ray stop` for a run), or choose another name"
                        )
                    if not announced:
                        log.info("%s %s is held by %s; waiting for it to end", what, uri, describe_holder(current, age))
                        announced = True
                    time.sleep(min(WAIT_POLL_S, current["holder"]["ttl_s"] / 4))
                    continue
            seq = state.last_seq + 1
            lease = cls(log_, uri, what, seq, state)
            entry = {"seq": seq, "kind": "acquire", "generation": seq, "writer": lease.writer, "holder": me}
            entry["at"] = utc_now()
            if current is not None:
                entry["took_over_from"] = current["generation"]
            _held.add(lease.writer)
            if not log_.append(entry):
                _held.discard(lease.writer)
                continue  # another driver took that number first: look again
            LeaseState.of([entry], state)
            if current is not None:
                log.warning("%s %s: took over from %s", what, uri, describe_holder(current, log_.age_s(current)))
            return lease

    @classmethod
    def join(cls, store: Store, folder: str, uri: str, what: str, generation: int) -> Lease:
        """A worker's view of its driver's lease `generation`; LeaseLost if that is no longer the holder."""
        log_ = LeaseLog(store, folder)
        lease = cls(log_, uri, what, generation, LeaseState.of(log_.entries()))
        if lease.state.holder is None or lease.state.holder["generation"] != generation:
            lease._lose(lease.state.released or lease.state.holder)
        return lease

    # --- using it ---------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise LeaseLost if the log holds an entry since the last look that ends this generation's hold."""
        self._read_new()

    def _read_new(self) -> None:
        if self.lost is not None:
            raise self.lost
        for entry in self.log.entries(self.state.last_seq):
            LeaseState.of([entry], self.state)
            self._stop_if_not_ours(entry)

    def _stop_if_not_ours(self, entry: dict[str, Any]) -> None:
        """After this generation's acquire, only its own commits may follow."""
        if entry["kind"] != "commit" or entry["generation"] != self.generation:
            self._lose(entry)

    def _lose(self, entry: dict[str, Any] | None) -> None:
        if entry is None:
            why = "its lease log has no holder"
        elif entry["kind"] == "acquire":
            why = f"it was taken over by {describe_holder(entry)}"
        else:
            why = f"it was released at {entry.get('at')} ({entry.get('reason', 'done')})"
        self.lost = LeaseLost(
            f"{self.what} {self.uri}: this driver (lease generation {self.generation}) no longer holds it: {why}. "
            "It stops without writing anything more; what the holder commits stays as it is"
        )
        raise self.lost

    def commit(self, body: dict[str, Any]) -> int:
        """Append a commit: its number, or LeaseLost when the log moved past this generation (the server
        refuses the number, and the entry found there says why)."""
        return self._append({"kind": "commit", **body})

    def _append(self, body: dict[str, Any]) -> int:
        if self.lost is not None:
            raise self.lost
        while True:
            seq = self.state.last_seq + 1
            entry = {"seq": seq, "generation": self.generation, "writer": self.writer, "at": utc_now(), **body}
            if self.log.append(entry):
                LeaseState.of([entry], self.state)
                return seq
            found = self.log.read(self.log.key(seq))
            if found is None:
                continue
            LeaseState.of([found], self.state)
            if found.get("writer") == self.writer:  # our own create, whose answer was lost and retried
                return seq
            self._stop_if_not_ours(found)

    # --- keeping it -------------------------------------------------------------------------------------

    def renew(self) -> None:
        """Look for a takeover first (LeaseLost), then rewrite this generation's renewal object."""
        self.check()
        self._renewals += 1
        self.log.store.put_bytes(
            self.log.renewal_key(self.generation),
            json.dumps({"generation": self.generation, "renewals": self._renewals, "at": utc_now()}).encode(),
            "application/json",
        )

    def keep_renewed(self, on_lost: Callable[[LeaseLost], None]) -> None:
        """Renew every ttl/4 from a thread of its own until `release`; `on_lost` once if it is lost."""
        every = max(0.5, self.state.holder["holder"]["ttl_s"] / 4 if self.state.holder else 15.0)

        def run() -> None:
            while not self._stop_renewing.wait(every):
                try:
                    self.renew()
                except LeaseLost as e:
                    on_lost(e)
                    return
                except StorageError as e:  # an outage: the log decides, so try again at the next beat
                    log.warning("could not renew the lease of %s %s: %s", self.what, self.uri, e)

        self._renewer = threading.Thread(target=run, name="lease-renewal", daemon=True)
        self._renewer.start()

    def stop_renewing(self) -> None:
        """Renew no more (the driver is done with the folder, released or not)."""
        _held.discard(self.writer)
        self._stop_renewing.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()

    def release(self, reason: str = "done") -> None:
        """Stop renewing and, if still the holder, append a release so the next driver need not wait."""
        self.stop_renewing()
        if self.lost is None:
            try:
                self._append({"kind": "release", "reason": reason})
            except LeaseLost:
                pass


def release_folder(store: Store, folder: str, reason: str) -> bool:
    """`dcgan-ray stop`: append a release for whoever holds the folder (its job is already gone), so a
    resubmission takes it at once instead of waiting out the ttl. False when nobody held it."""
    log_ = LeaseLog(store, folder)
    while True:
        state = LeaseState.of(log_.entries())
        if state.holder is None:
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
    """What `dcgan-ray runs` and `recover` need to know of a folder's lease."""

    state: str  # "none" (no log), "held", "released", "expired"
    holder: dict[str, Any] | None = None
    age_s: float | None = None

    def describe(self) -> str:
        if self.state == "held" and self.holder is not None:
            h = self.holder["holder"]
            return f"held by {h.get('submission_id') or 'pid ' + str(h.get('pid'))} ({self.age_s:.0f}s ago)"
        if self.state == "expired" and self.holder is not None:
            return f"expired {self.age_s:.0f}s ago"
        return self.state


def ownership(store: Store, folder: str) -> Ownership:
    log_ = LeaseLog(store, folder)
    entries = log_.entries()
    if not entries:
        return Ownership("none")
    state = LeaseState.of(entries)
    if state.holder is None:
        return Ownership("released")
    age = log_.age_s(state.holder)
    expired = age > state.holder["holder"]["ttl_s"] or _process_gone(state.holder)
    return Ownership("expired" if expired else "held", state.holder, age)


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
