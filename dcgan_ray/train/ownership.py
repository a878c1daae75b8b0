"""Who may write a run or study folder, decided where every cluster can see it: the bucket's lease
(`dcgan_ray.storage.lease`), taken by the driver before it writes anything and renewed while it lives.

Where the endpoint ignores conditional writes (`storage.conditional_writes: false`), the bucket cannot
decide, and the per-cluster lock (`dcgan_ray.train.runlock`) keeps drivers of one Ray cluster apart; every
run says so once.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import ray

from dcgan_ray.config import JobConfig
from dcgan_ray.errors import LeaseLost, StorageError, StorageUnreachable
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.runlock import DriverLock, current_submission_id

log = logging.getLogger(__name__)


def holder_info() -> dict[str, str | None]:
    """What a lease says of its driver beyond the process: the Ray cluster and job it runs as."""
    ctx = ray.get_runtime_context()
    return {"cluster": ctx.gcs_address, "submission_id": current_submission_id(), "ray_job_id": ctx.get_job_id()}


@contextlib.contextmanager
def own(
    cfg: JobConfig, what: str, folder: str, uri: str, wait: bool = False, stop_main_thread: bool = True
) -> Iterator[Lease | None]:
    """Hold `folder` (a run's or a study's, `uri` for messages) for the block: the lease (None without
    conditional writes, where the per-cluster lock stands in), renewed from a thread and released at the
    end. Refused with LeaseHeld while another live driver holds it (with `wait`: waits for it).

    When the lease is lost (another driver took the folder over after this one went unrenewed for its
    ttl), `stop_main_thread` interrupts the main thread (a driver blocked in `fit()`: `interrupt_main_for`),
    and the driver ends in the lease's LeaseLost. (A trial's driver runs in a thread of Tune's, and a block
    outside the main thread cannot be interrupted: its workers stop at their next write instead.) In the
    main thread, SIGTERM (`ray job stop`, a deleted pod: a Kueue preemption) ends the driver through the
    block, which releases the lease: the next driver need not wait out its ttl, and the workers still
    writing for a moment are fenced by the release like any stale writer."""
    if not cfg.storage.conditional_writes:
        log.warning(
            "storage.conditional_writes is false: only drivers on this Ray cluster are kept from writing %s %s at "
            "once; a driver on another cluster sharing the bucket is not (give their runs other names)",
            what,
            uri,
        )
        with DriverLock(what, uri):
            yield None
        return
    lease = Lease.acquire(Store(cfg.storage), folder, uri, what, holder_info(), cfg.storage.lease_ttl_s, wait)

    interrupts = stop_main_thread and arm_lost_lease_interrupt()

    def on_lost(error: LeaseLost) -> None:
        if interrupts:
            interrupt_main_for(error)
        else:
            log.error("%s", error)

    lease.keep_renewed(on_lost)
    outcome: str | None = "failed"
    terminated = _exit_on_sigterm()
    try:
        with lease.fencing():
            yield lease
        outcome = "done"
    except SystemExit:
        outcome = "terminated (SIGTERM)"
        raise
    except StorageUnreachable:
        outcome = None  # a release would wait through the outage too: the lease expires after its ttl instead
        raise
    finally:
        if terminated is not None:
            signal.signal(signal.SIGTERM, terminated)
        lease.stop_renewing()
        if outcome is not None and lease.lost is None:
            try:
                lease.release(outcome)
            except StorageError as e:
                log.warning("could not release the lease of %s %s (it expires by itself): %s", what, uri, e)


LOST_LEASE_SIGNAL = signal.SIGUSR2
"""The signal whose handler the renewal thread calls in the main thread when the lease is lost
(`_thread.interrupt_main(LOST_LEASE_SIGNAL)` calls it; nothing is sent to the process). Not SIGINT: Ray Train's
`fit()` leaves a SIGINT handler of its own in place, which aborts the run gracefully, or calls sys.exit(0)
once its controller is gone, and the driver would end without the lease's error line."""


def arm_lost_lease_interrupt() -> bool:
    """In the main thread: LOST_LEASE_SIGNAL's handler raises KeyboardInterrupt once a lease is lost. It stays
    in place (a late call finds it and does the same; the CLI turns a KeyboardInterrupt with
    LeaseLost.interrupting set into the error's one line). False elsewhere: only the main thread has handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(LOST_LEASE_SIGNAL, _interrupt_if_lost)
    return True


def _interrupt_if_lost(signum: int, frame: Any) -> None:
    if LeaseLost.interrupting is not None:
        raise KeyboardInterrupt


def interrupt_main_for(error: LeaseLost) -> None:
    """From the renewal thread: end the main thread with `error`, wherever it is."""
    LeaseLost.interrupting = error
    _thread.interrupt_main(LOST_LEASE_SIGNAL)


def _exit_on_sigterm() -> Any:
    """In the main thread: SIGTERM raises SystemExit (Python's default ends the process at once, skipping every
    `finally`). Returns the handler to put back, or None elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def exit_(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, exit_)


def lost_lease(lease: Lease | None, error: BaseException | None = None) -> LeaseLost | None:
    """The LeaseLost behind `error` (a KeyboardInterrupt from the renewal thread, or the workers' own), if any."""
    if isinstance(error, LeaseLost):
        return error
    return lease.lost if lease is not None else None
