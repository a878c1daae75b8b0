"""When this process last made progress: a training step, an evaluation batch, an S3 request answered or
retried. One monotonic timestamp, set with no lock (a float assignment) from wherever work moves on, and
read by the stall watch (`dcgan_ray.train.stall`): a rank whose timestamp stops moving is stuck (a hung
collective, a wedged read), not merely slow (a storage outage's retries and a long evaluation beat too)."""

from __future__ import annotations

import time

_last = time.monotonic()


def beat() -> None:
    global _last
    _last = time.monotonic()


def idle_s() -> float:
    """Seconds since the last beat."""
    return time.monotonic() - _last
