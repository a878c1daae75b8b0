"""The gate in front of every write into a leased folder, and the arithmetic of the holder's clock.

A lease (`dcgan_ray.storage.lease`) is judged by other drivers by the server's clock: the holder's newest
renewal older than its ttl may be taken over. Its holder cannot read that clock; it keeps a deadline on its
own monotonic clock instead, the way Chubby's and etcd's lease holders do: from the moment a renewal that
landed was *sent*, plus the ttl, minus a margin. A successor cannot take over before that deadline, so a
write that ends before it cannot land after a successor's first write.

The margin (`margin_s`): the server's timestamps are whole seconds, so the age a successor reads can be up to
`ROUNDING_S` too high; and the holder's clock may run at another rate than the server's. Clocks are not
synchronised, only bounded in rate: quartz drifts by tens to a few hundred parts per million and NTP slews
at most 500 ppm, so `DRIFT` (1%, twenty times that) is generous.

Every write of a process into a folder whose lease it holds (a driver) or writes under (rank 0, a scoring
task) goes through `Store`, which asks the folder's gate first (`gate_for`) and gives the request a timeout
that ends before the deadline (`attempt_s`, each retry asked again). The gate is registered for as long as
the process writes there (`fenced`): one gate, whatever object or module writes.

What this cannot do: a request the network holds for longer than its timeout (bytes already sent, delivered
late) can still land after the deadline. Only what the server fences itself (the lease log's
create-if-absent entries, and so every commit) is safe from that; readers believe commits (see
docs/clusters.md, "What the lease guarantees").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol

ROUNDING_S = 1.0
"""How far an age the server reports (its Date minus an object's Last-Modified, both whole seconds) can be off."""
DRIFT = 0.01
"""The largest difference in rate between the holder's clock and the server's that the margin covers."""


def margin_s(ttl_s: float) -> float:
    """What the holder takes off its deadline: the server's rounding and the clocks' drift over a ttl."""
    return ROUNDING_S + DRIFT * ttl_s


def attempt_s(ttl_s: float) -> float:
    """How long one attempt of a fenced write may take at most (its connect and read timeouts are a third
    each): half the ttl less the margin, so that a renewal every quarter ttl always leaves room for one."""
    return max(0.5, ttl_s / 2 - margin_s(ttl_s) - ROUNDING_S)


class Gate(Protocol):
    """What the store needs of a lease: how long an attempt may take, and a wait for room before the deadline."""

    generation: int

    @property
    def attempt_s(self) -> float: ...

    def left_s(self) -> float:
        """Seconds until the deadline, by this process's clock."""

    def admit(self) -> None:
        """Return once an attempt of `attempt_s` ends before the deadline; LeaseLost when the lease is lost."""


_gates: dict[tuple[str, str], Gate] = {}
_lock = threading.Lock()


@contextlib.contextmanager
def fenced(bucket: str, folder: str, gate: Gate) -> Iterator[None]:
    """Every write of this process under `folder` goes through `gate` for the block, and after it too when
    the lease was lost (`gate.lost`): a thread still running then (a publisher, a clean-up on the way out)
    stays refused, until another lease of this process registers for the folder."""
    where = (bucket, folder.rstrip("/"))
    with _lock:
        _gates[where] = gate
    try:
        yield
    finally:
        with _lock:
            if _gates.get(where) is gate and getattr(gate, "lost", None) is None:
                del _gates[where]


def gate_for(bucket: str, key: str) -> Gate | None:
    """The gate of the innermost fenced folder that holds `key` (a study's trial runs lie in its folder)."""
    if not _gates:  # the common case, without the lock
        return None
    with _lock:
        found = [(len(f), g) for (b, f), g in _gates.items() if b == bucket and (key == f or key.startswith(f + "/"))]
    return max(found, key=lambda x: x[0])[1] if found else None


def generation_for(bucket: str, key: str) -> int | None:
    """The lease generation this process writes `key` as (None: not under a lease of this process)."""
    gate = gate_for(bucket, key)
    return gate.generation if gate is not None else None


class PastDeadline(Exception):
    """Internal: the deadline came closer than an attempt while the request was on its way out (the process
    was paused between the gate and the send); the store asks the gate again."""


_sending = threading.local()


@contextlib.contextmanager
def sending(gate: Gate | None) -> Iterator[None]:
    """The gate of the request this thread is about to send, for `check_before_send`."""
    _sending.gate = gate
    try:
        yield
    finally:
        _sending.gate = None


def check_before_send(**_: object) -> None:
    """botocore's `before-send` hook on the bounded clients: the gate's last look, after the request is signed
    and just before it connects and sends, so a pause between `admit` and the send cannot start an attempt
    that ends after the deadline. (s3transfer's threads send without a gate here: an upload is only believed
    once committed.)"""
    gate = getattr(_sending, "gate", None)
    if gate is not None and gate.left_s() < gate.attempt_s:
        raise PastDeadline
