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
  commit    what a holder made durable: a checkpoint (epoch, folder, its manifest's sha256), the best copy,
            the run's end state (finished, failed) or a study's state
  renew     the holder renewed past its deadline (after an outage), where only the server can fence it
  release   the holder is done (or `dcgan-ray stop` ended it): the next driver takes over at once

The holder is the author of the last `acquire` that no `release` follows. It is alive while its renewal
object or its newest entry (its acquire, a commit, a renew) is younger than its `ttl_s` by the server's
clock; past that, any driver may take over by appending an `acquire`.

Fencing. Every append creates the next number with If-None-Match, so two appends never share a number. A
writer that finds its number taken reads what is there: a commit of its own generation (the driver and
rank 0 of one holder both append) sends it to the next number; anything else means the lease was taken
over or released, and it stops with `LeaseLost`. So a driver paused past its ttl (a long GC, a
partition, SIGSTOP) whose successor appended an `acquire` has its next commit refused by the server, not
by a check that could race; and the successor, which reads the log after its own `acquire` is in place,
sees every commit the old holder made before that fence. Writes that are not commits (grids, run.json,
the run page) pass the lease's gate (`admit`, `dcgan_ray.storage.fence`): each must end before the holder's
own deadline, by which no successor can have taken over; `check`, which reads the log's new entries, stops
a stale writer earlier still.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcgan_ray import progress
from dcgan_ray.errors import LeaseHeld, LeaseLost, StorageError, StorageUnreachable
from dcgan_ray.storage import fence
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


def process_gone(acquire: dict[str, Any]) -> bool:
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
    writes, `commit` for what must be fenced, `admit` (the folder's gate, `dcgan_ray.storage.fence`) before
    every write; the driver also renews and releases it.

    Its clock: the lease is valid, for this process, until `_until` (monotonic). The holder sets it from each
    renewal that landed (sent + ttl - margin); a worker's view from the age of the holder's newest renewal,
    read from the server (`refresh`). Past it the lease is in jeopardy: writes wait (`admit`) until the
    holder renews again, now through a log entry the server fences (`renew`), or the log shows a successor
    (LeaseLost), or the storage outage that stopped the renewals outlasts its budget (StorageUnreachable).
    """

    def __init__(self, log: LeaseLog, uri: str, what: str, generation: int, state: LeaseState, holding: bool):
        self.log, self.uri, self.what = log, uri, what
        self.generation, self.state, self.holding = generation, state, holding
        self.writer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost: LeaseLost | None = None
        self.ttl_s = float(state.holder["holder"]["ttl_s"]) if state.holder else 60.0
        self._until = -math.inf
        self._renewing = threading.Lock()
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None
        self._renewals = 0

    @property
    def attempt_s(self) -> float:
        return fence.attempt_s(self.ttl_s)

    def fencing(self) -> contextlib.AbstractContextManager[None]:
        """For the block, every write of this process into the folder goes through this lease's gate."""
        return fence.fenced(self.log.store.bucket, self.log.folder, self)

    def left_s(self) -> float:
        """Seconds until this lease's deadline, for this process (negative: in jeopardy)."""
        return self._until - time.monotonic()

    # --- taking it --------------------------------------------------------------------------------------

    @classmethod
    def acquire(
        cls, store: Store, folder: str, uri: str, what: str, holder: dict[str, Any], ttl_s: float, wait: bool = False
    ) -> Lease:
        """Take the folder's lease, or raise LeaseHeld naming the live holder (with `wait`: wait for it to be
        released or to expire, then take it)."""
        log_ = LeaseLog(store.for_lease(fence.attempt_s(ttl_s)), folder)
        me = {**this_process(), **holder, "since": utc_now(), "ttl_s": float(ttl_s)}
        announced = False
        while True:
            state = LeaseState.of(log_.entries())
            current = state.holder
            if current is not None:
                age = log_.age_s(state)
                gone = process_gone(current)
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
            entry = {"seq": seq, "kind": "acquire", "generation": seq, "holder": me, "at": utc_now()}
            if current is not None:
                entry["took_over_from"] = current["generation"]
            lease = cls(log_, uri, what, seq, LeaseState.of([entry], copy.deepcopy(state)), holding=True)
            entry["writer"] = lease.writer
            _held.add(lease.writer)
            sent = time.monotonic()
            if not log_.append(entry) and not log_.is_own(seq, lease.writer):  # (own: a lost answer, retried)
                _held.discard(lease.writer)
                continue  # another driver took that number first: look again
            lease._until = sent + ttl_s - fence.margin_s(ttl_s)
            if current is not None:
                log.warning("%s %s: took over from %s", what, uri, describe_holder(current, log_.age_s(state)))
            return lease

    @classmethod
    def join(cls, store: Store, folder: str, uri: str, what: str, generation: int) -> Lease:
        """A worker's view of its driver's lease `generation`; LeaseLost if that is no longer the holder."""
        state = LeaseState.of(LeaseLog(store, folder).entries())
        ttl_s = float(state.holder["holder"]["ttl_s"]) if state.holder else 60.0
        lease = cls(LeaseLog(store.for_lease(fence.attempt_s(ttl_s)), folder), uri, what, generation, state, False)
        if lease.state.holder is None or lease.state.holder["generation"] != generation:
            lease._lose(lease.state.released or lease.state.holder)
        lease.refresh()
        return lease

    # --- using it ---------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise LeaseLost if the log holds an entry since the last look that ends this generation's hold."""
        if self.lost is not None:
            raise self.lost
        for entry in self.log.entries(self.state.last_seq):
            LeaseState.of([entry], self.state)
            self._stop_if_not_ours(entry)

    def _stop_if_not_ours(self, entry: dict[str, Any]) -> None:
        """After this generation's acquire, only its own commits and renewals may follow."""
        if entry["kind"] not in ("commit", "renew") or entry["generation"] != self.generation:
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

    def admit(self) -> None:
        """The folder's gate (`dcgan_ray.storage.fence`): return once a write of `attempt_s` ends before the
        deadline. Short of that, the holder renews now and a worker's view looks again; in jeopardy this waits,
        beating (an outage is not a stall), until the lease is renewed, lost (LeaseLost), or the outage that
        keeps it from renewing outlasts storage.retry_budget_s (StorageUnreachable; a worker's view gives up
        after that long too, when the bucket answers it but its driver does not renew)."""
        jeopardy: float | None = None
        while self.left_s() < self.attempt_s:
            if self.lost is not None:
                raise self.lost
            budget = self.log.store.cfg.retry_budget_s
            if jeopardy is not None and time.monotonic() - jeopardy > budget:
                raise StorageUnreachable(
                    f"{self.what} {self.uri}: lease generation {self.generation} went unrenewed past its deadline "
                    f"for storage.retry_budget_s = {budget:g} s (its driver cannot reach the bucket, or is gone): "
                    "this process writes nothing more. Everything committed is kept: resubmit to resume"
                )
            if self.left_s() < 0 and jeopardy is None:
                jeopardy = time.monotonic()
                log.warning(
                    "%s %s: lease generation %d is past its deadline (not renewed for its ttl of %g s, by this "
                    "process's clock): its writes wait until it is renewed or taken over",
                    self.what,
                    self.uri,
                    self.generation,
                    self.ttl_s,
                )
            # (The renewal thread may hold the lock through an outage: look again each second meanwhile.)
            if self._renewing.acquire(timeout=1.0):
                try:
                    if self.left_s() >= self.attempt_s:
                        pass  # renewed by another thread meanwhile
                    elif self.holding:
                        self.renew()
                    else:
                        self.refresh()
                finally:
                    self._renewing.release()
            if self.left_s() < self.attempt_s:
                progress.beat()
                time.sleep(min(1.0, self.ttl_s / 8))
        if self.lost is not None:
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

    def refresh(self) -> None:
        """A worker's view: read the log (LeaseLost on a successor) and the age of the holder's newest renewal;
        the deadline is then no later than a successor could take over, by the server's clock."""
        looked = time.monotonic()
        self.check()
        age = self.log.age_s(self.state)
        self._until = max(self._until, looked + self.ttl_s - age - fence.ROUNDING_S - fence.margin_s(self.ttl_s))

    def renew(self) -> None:
        """The holder: look for a takeover first (LeaseLost), then renew. While a renewal can still land before
        the deadline it rewrites this generation's renewal object; past that (a renewal written then could
        land after a successor took over) it appends a `renew` entry to the log, which the server refuses
        if a successor took the number first."""
        self.check()
        self._renewals += 1
        sent = time.monotonic()
        if self.left_s() >= self.attempt_s:
            # One bounded attempt, no retry past it: this object must never land after the deadline.
            self.log.store.put_bytes(
                self.log.renewal_key(self.generation),
                json.dumps({"generation": self.generation, "renewals": self._renewals, "at": utc_now()}).encode(),
                "application/json",
                once=True,
            )
        else:
            past = self.left_s() < 0
            self._append({"kind": "renew"})
            if past:
                log.warning(
                    "%s %s: lease generation %d renewed again, in the log", self.what, self.uri, self.generation
                )
        self._until = sent + self.ttl_s - fence.margin_s(self.ttl_s)

    def keep_renewed(self, on_lost: Callable[[LeaseLost], None]) -> None:
        """Renew every ttl/4 from a thread of its own until `release`; `on_lost` once if it is lost."""
        every = max(0.5, self.ttl_s / 4)

        def run() -> None:
            while not self._stop_renewing.wait(every):
                try:
                    with self._renewing:
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
