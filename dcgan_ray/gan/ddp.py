"""How G's and D's DistributedDataParallel wrappers all-reduce gradients: `speed.ddp_bucket_mb` and
`speed.grad_compression`. Plain PyTorch, no Ray: the worker passes `ddp_kwargs` to Ray's
`prepare_model` and calls `compress_gradients` on what it returns; the tests and benchmarks/scaling.py
do the same on their own process groups.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from dcgan_ray.config import SpeedSection


def bf16_hook(state, bucket):
    """PyTorch's `bf16_compress_hook` under a name of its own. DDP refuses that hook by its name unless
    torch was built with CUDA and NCCL >= 2.10 (older NCCL cannot sum bf16), even on a gloo group,
    which sums bf16 itself (benchmarks/scaling.py all-reduces bf16 over gloo). Under this name it runs on
    either backend; an NCCL older than 2.10 would fail in the all-reduce instead."""
    return default_hooks.bf16_compress_hook(state, bucket)


COMPRESSION_HOOKS = {"bf16": bf16_hook, "fp16": default_hooks.fp16_compress_hook}


def ddp_kwargs(speed: SpeedSection) -> dict:
    """DDP's constructor arguments for G and D. broadcast_buffers=False: D runs two forwards (real,
    fake) before one backward, and a buffer broadcast between them trips autograd's in-place check
    (`dcgan_ray.gan.sync.average_bn_buffers` agrees on the buffers instead)."""
    return {"broadcast_buffers": False, "bucket_cap_mb": speed.ddp_bucket_mb}


def compress_gradients(net: nn.Module, speed: SpeedSection) -> None:
    """Register `speed.grad_compression`'s hook on a DDP-wrapped net; a bare net (one worker: nothing
    is all-reduced) is left as it is."""
    if speed.grad_compression != "none" and isinstance(net, DistributedDataParallel):
        # state None: the hooks then use the default process group, the one DDP itself uses.
        net.register_comm_hook(None, COMPRESSION_HOOKS[speed.grad_compression])
