"""What DDP ranks agree on besides gradients: averaged metrics and BatchNorm buffers, summed statistics.

Plain `torch.distributed`, no Ray: each function is a no-op in a single process, so the same code runs
in a Ray Train worker, in `dcgan-ray eval`, and in the unit tests' two-process gloo groups.
Every call here is a collective (and a CPU-GPU sync point): all ranks must make it, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks, in place; returns it."""
    if distributed():
        dist.all_reduce(t)
    return t


def average(values: list[float], device: torch.device) -> list[float]:
    """The mean of each value over ranks."""
    if not distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def average_bn_buffers(*nets: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks.

    DDP runs with broadcast_buffers=False (two D forwards per step would otherwise trip autograd's
    in-place check), so each rank's running statistics drift apart; before sampling and
    checkpointing they are averaged so every rank, and every checkpoint, holds the same model.
    """
    if not distributed():
        return
    world = dist.get_world_size()
    for net in nets:
        for buf in getattr(net, "module", net).buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(world)


def broadcast_from_rank_zero(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a small picklable value: a decision, a name)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small picklable values: sums, BatchNorm buffers)."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def buffers(*nets: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Each net's BatchNorm buffers (running statistics, batch counts), on the CPU: what differs between ranks."""
    return [{name: b.detach().cpu().clone() for name, b in getattr(n, "module", n).named_buffers()} for n in nets]


def load_buffers(saved: list[dict[str, torch.Tensor]], *nets: nn.Module) -> None:
    for net, named in zip(nets, saved, strict=True):
        own = dict(getattr(net, "module", net).named_buffers())
        for name, value in named.items():
            own[name].copy_(value)
