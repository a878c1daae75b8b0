"""The board where a run's ranks say how they are doing (`dcgan_ray.train.stall`), a Ray actor of the driver's.

A module of its own that imports nothing of the package: every run starts one, and the actor's process
imports only this to be it.
"""

from __future__ import annotations

import time
from typing import Any

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressBoard:
    """Where the ranks of a run's attempts say how they are doing, and the driver asks them for their stacks."""

    def __init__(self) -> None:
        self.ranks: dict[int, dict[str, Any]] = {}
        self.dump_into: str | None = None  # a stall's stacks folder (a key prefix), while one is asked for

    def beat(self, rank: int, beat: dict[str, Any]) -> str | None:
        self.ranks[rank] = {**beat, "received": time.time()}
        return self.dump_into

    def read(self) -> dict[int, dict[str, Any]]:
        return self.ranks

    def ask_for_stacks(self, prefix: str | None) -> None:
        self.dump_into = prefix

    def forget(self, rank: int) -> None:
        self.ranks.pop(rank, None)
