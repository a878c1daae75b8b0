"""What an interrupted run keeps: a preemption notice becomes a checkpoint at the next step, and a run resumed
mid-epoch goes on exactly where it stopped.

Preemption. Ray Train 2.60 passes a node's drain to the training loop (a spot reclaim through `dcgan-ray
spot-watch`, a pod's SIGTERM to `ray start --block` on Kubernetes, `ray drain-node`):
`ray.train.get_preemption_info()`, a collective that every rank calls at the same steps. `PreemptionCheck`
asks every `every` steps, `every` set from the attempt's first steps' measured time so that asks come about
`checkpoint.preemption_check_s` apart, and on the first notice has the worker save a mid-epoch checkpoint
(uploaded at once, committed to the run's lease like every checkpoint) and then end the attempt on every
rank at that step (`Preempted`): the driver starts the next attempt on the nodes that stay, which resumes
at the next step, so no step is lost, and the drained node, idle, goes at once. (Waiting instead for Ray
Train to restart the run at the deadline races with the node's end: Ray 2.60 records a SIGTERMed node's end
as an expected termination, not a preemption, and counts a death it sees first as a failure.)

Exact resume. A mid-epoch checkpoint holds where the epoch is (`within_epoch`): the steps taken, where in the
epoch's permutation this attempt's batches began, the world size, and every rank's running sums and
BatchNorm buffers (DDP does not keep buffers equal between epochs). The training noise is not stored: each
rank's generator is seeded by (seed, epoch, rank) and advanced past the steps taken (`run_epoch`), which
gives its exact state. Resumed on the same world size, each rank takes back its own, and the run ends
bit-identical to one never interrupted (on CPU; on GPUs, non-deterministic kernels make no two runs equal).
On another world size the epoch's remaining images are dealt to the new ranks: none is seen twice, but the
run is not the same, and its restart entry says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray.train
import torch

from dcgan_ray.gan.step import EpochPosition
from dcgan_ray.gan.sync import average

log = logging.getLogger(__name__)

TIMED_STEPS = 5
"""Steps of an attempt (after its first, which warms up) timed before the ask's cadence is set."""
PREEMPTED = "preempted"
"""What the training function returns when it ended its attempt for a preemption (rank 0's is the result's)."""


class Preempted(Exception):
    """Raised between two steps, on every rank at once, once a preemption's checkpoint is durable."""


@dataclass
class MidEpoch:
    """Where a mid-epoch checkpoint stopped in its epoch (its `within_epoch`)."""

    start: int  # images of the epoch's permutation before this attempt's batches (0 unless resized before)
    steps: int  # steps every rank took of those batches
    world_size: int
    totals: list[list[float]]  # each rank's running sums (loss_d, loss_g, D(x), D(G(z)))
    buffers: list[list[dict[str, torch.Tensor]]]  # each rank's BatchNorm buffers of G and D

    @classmethod
    def of(cls, state: dict[str, Any] | None) -> MidEpoch | None:
        within = (state or {}).get("within_epoch")
        return cls(**within) if within else None

    def resume(self, rank: int, world: int, batch_size: int) -> tuple[int, EpochPosition | None, bool]:
        """(where this attempt's batches begin, the position in them, whether the run stays exact)."""
        if world == self.world_size:
            return self.start, EpochPosition(self.steps, tuple(self.totals[rank])), True  # type: ignore[arg-type]
        return self.start + self.steps * self.world_size * batch_size, None, False


class PreemptionCheck:
    """Asks Ray for a preemption notice between steps (see the module's docstring); `save(steps, sums, info)`
    is the worker's mid-epoch checkpoint, made on every rank at once."""

    def __init__(self, every_s: float, device: torch.device, save: Callable[[int, torch.Tensor, Any], None], rank: int):
        self.every_s, self.device, self.save, self.rank = every_s, device, save, rank
        self.every: int | None = None  # steps between asks, agreed by all ranks once timed
        self.steps = 0  # steps of this attempt
        self.timed_from = 0.0
        self.noticed = False

    def after_step(self, steps_done: int, sums: torch.Tensor) -> None:
        if self.every_s <= 0 or self.noticed:
            return
        self.steps += 1
        if self.every is None:
            self._time_steps()
            return
        if steps_done % self.every:
            return
        info = ray.train.get_preemption_info()  # a collective: every rank asks at the same steps
        if info is None:
            return
        self.noticed = True
        self.save(steps_done, sums, info)
        raise Preempted

    def _time_steps(self) -> None:
        if self.steps == 1:  # (the first step of an attempt warms up: compiles, allocates)
            self.timed_from = time.perf_counter()
        elif self.steps == 1 + TIMED_STEPS:
            # A collective at the same step of every rank: all agree on one cadence.
            (step_s,) = average([(time.perf_counter() - self.timed_from) / TIMED_STEPS], self.device)
            self.every = max(1, round(self.every_s / max(step_s, 1e-6)))
            if self.rank == 0:
                log.info(
                    "asking Ray for preemption notices every %d step(s) (~%.1f s at %.3f s a step)",
                    self.every,
                    self.every * step_s,
                    step_s,
                )
