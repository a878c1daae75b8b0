"""A real process group of `world` ranks over gloo on 127.0.0.1, for tests of what DDP ranks do (no Ray)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from dcgan_ray.dev.processes import free_port


def _rank(work: Callable[[int, int], Any], rank: int, world: int, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, work(rank, world)))
    finally:
        dist.destroy_process_group()


def on_gloo_ranks(work: Callable[[int, int], Any], world: int = 2, timeout_s: float = 300) -> dict[int, Any]:
    """`work(rank, world)` on each rank of a fresh group (spawned processes: `work` must be a module-level
    function); {rank: what it returned}. Pass numpy arrays or bytes back, not tensors: a tensor through the
    queue is shared memory that dies with its process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(work, r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results
