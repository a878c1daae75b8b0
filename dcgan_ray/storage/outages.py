"""Outages of S3 endpoints, shared by every Store of a process: each outage is timed from its first failed
request (a retry budget counts from there, not per call), and logged once when it starts and once when the
endpoint answers again, with its length and the retries it took."""

from __future__ import annotations

import logging
import random
import threading
import time

log = logging.getLogger("dcgan_ray.storage.s3")  # (the Store's lines: one logger for its outages too)

MAX_BACKOFF_S = 5.0
"""Longest wait between two tries during an outage: a server that is back is noticed within seconds."""


class _Outage:
    """The current outage of one endpoint, shared by every Store in this process."""

    def __init__(self, first_failure: str):
        self.started = time.monotonic()
        self.first_failure = first_failure
        self.retries = 0


_outages: dict[str, _Outage] = {}
_outages_lock = threading.Lock()


def outage_failed(endpoint: str, budget_s: float, attempt: int, failure: str, doing: str) -> float | None:
    """Record a failed try; the seconds to wait before the next one, or None when the budget is spent."""
    with _outages_lock:
        outage = _outages.get(endpoint)
        if outage is None:
            outage = _outages[endpoint] = _Outage(failure)
            log.warning(
                "S3 endpoint %s is not answering (%s while trying to %s); retrying for up to %.0f s "
                "(storage.retry_budget_s)",
                endpoint,
                failure,
                doing,
                budget_s,
            )
        left = outage.started + budget_s - time.monotonic()
        if left <= 0:
            return None
        outage.retries += 1
    return min(left, MAX_BACKOFF_S, 0.5 * 2 ** min(attempt, 5)) * random.uniform(0.5, 1.0)


def outage_over(endpoint: str) -> None:
    """A request to the endpoint succeeded: end its outage, if there was one, with one line."""
    if endpoint not in _outages:  # the common case, without the lock
        return
    with _outages_lock:
        outage = _outages.pop(endpoint, None)
    if outage is not None:
        log.warning(
            "S3 endpoint %s answers again after %.1f s (%d retries); carrying on, nothing lost",
            endpoint,
            time.monotonic() - outage.started,
            outage.retries,
        )


def outage_seconds(endpoint: str) -> float | None:
    """How long the endpoint's current outage has lasted in this process (None: no outage)."""
    outage = _outages.get(endpoint)
    return None if outage is None else time.monotonic() - outage.started
