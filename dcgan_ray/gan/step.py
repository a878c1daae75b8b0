"""The GAN training step and one epoch of it, in plain PyTorch.

Nothing here imports Ray: the step is tested and benchmarked on its own, also on a GPU machine
without Ray. `dcgan_ray.train.worker` wraps it for Ray Train workers.

The step reads like the reference network and pytorch/examples' DCGAN:
  D phase: D on a real batch and on a detached fake batch, BCE on logits, one Adam step.
  G phase: the same fake batch through the updated D, BCE against "real", one Adam step.

`SpeedSection` (config key `speed`) changes how the step runs, never what it computes: bf16 autocast
around the forwards, channels-last tensors, fused Adam, torch.compile. All are off by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dcgan_ray import progress
from dcgan_ray.config import SpeedSection


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N, 3, 32, 32) in [0, 255] -> float in [-1, 1], the range of G's tanh."""
    return images.float().div_(127.5).sub_(1.0)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """G's output in [-1, 1] -> uint8 pixels, on the CPU."""
    return images.detach().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8).cpu()


def prepare_models(netG: nn.Module, netD: nn.Module, speed: SpeedSection) -> None:
    """Apply `speed`'s memory format and compilation to the bare G and D, in place.

    Call it after moving them to their device and before DDP wraps them. Compiling in place
    (`Module.compile`) rather than wrapping keeps state_dict keys and `unwrap()` as they are, so the
    G phase runs through the compiled bare D, and DDP simply calls the compiled module. Compiling
    the bare module forgoes DDPOptimizer's overlap of all-reduce with backward; D's 4 MB and G's
    20 MB of gradients each fit one 25 MB DDP bucket, so there is hardly any overlap to lose.
    """
    for net in (netG, netD):
        if speed.channels_last:
            # torch's stubs leave out the memory_format keyword that Module.to takes (and documents).
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if speed.compile != "none":
            net.compile(mode=speed.compile)


def make_optimizers(
    netG: nn.Module, netD: nn.Module, lr_g: float, lr_d: float, beta1: float, beta2: float, fused: bool = False
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    # fused=None, not False, when off: False would also turn off the foreach kernels torch picks by default.
    fused_or_default = True if fused else None
    optG = torch.optim.Adam(netG.parameters(), lr=lr_g, betas=(beta1, beta2), fused=fused_or_default)
    optD = torch.optim.Adam(netD.parameters(), lr=lr_d, betas=(beta1, beta2), fused=fused_or_default)
    return optG, optD


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict, fused: bool) -> None:
    """Load Adam's state from a checkpoint but keep this run's `fused` choice.

    `load_state_dict` takes the saved hyperparameters, `fused` among them, so a resumed run would
    otherwise keep the checkpointed run's choice. The step counters go where each choice keeps
    them: on the parameter's device for the fused kernel, on the CPU otherwise, where the unfused kernels
    read them without waiting for the device.
    """
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group["fused"] = True if fused else None
        for p in group["params"]:
            param_state = opt.state.get(p, {})
            if "step" in param_state:
                param_state["step"] = param_state["step"].to(p.device if fused else "cpu", torch.float32)


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(net, "module", net)


@dataclass
class StepStats:
    """Per-step numbers, kept as 0-d tensors so the hot loop never waits on the device."""

    loss_d: torch.Tensor
    loss_g: torch.Tensor
    d_real: torch.Tensor  # mean D(x), probability
    d_fake: torch.Tensor  # mean D(G(z)) in the D phase, probability


def train_step(
    netG: nn.Module,
    netD: nn.Module,
    optG: torch.optim.Optimizer,
    optD: torch.optim.Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
    real_target: float = 1.0,
    autocast_bf16: bool = False,
) -> StepStats:
    """One D update and one G update. `real` is float in [-1, 1]; `z` is (batch, z_dim).

    With `autocast_bf16` the forwards run in bfloat16 where autocast allows; the logits are turned
    back to fp32 before the losses, so losses, gradients' accumulation and Adam stay fp32.
    """
    # Convolutions and matmuls in bf16 where autocast allows them. Off, a null context: not even
    # autocast's enter/exit (microseconds, three times a step) is added to the reference network's step.
    forwards = (lambda: torch.autocast(real.device.type, dtype=torch.bfloat16)) if autocast_bf16 else nullcontext

    with forwards():
        fake = netG(z)

    # D phase: real and detached fake through D (two forwards, so BatchNorm sees the reference network's
    # separate real and fake batches), one backward.
    optD.zero_grad(set_to_none=True)
    with forwards():
        logits_real = netD(real).float()
        logits_fake = netD(fake.detach()).float()
    loss_d = F.binary_cross_entropy_with_logits(
        logits_real, torch.full_like(logits_real, real_target)
    ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    loss_d.backward()
    optD.step()

    # G phase: through the bare D with its weights frozen. D's weight gradients are not needed
    # here, and bypassing D's DDP wrapper keeps it from all-reducing gradients nobody uses.
    optG.zero_grad(set_to_none=True)
    bare_d = unwrap(netD)
    bare_d.requires_grad_(False)
    with forwards():
        logits_gen = bare_d(fake).float()
    loss_g = F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))
    loss_g.backward()
    bare_d.requires_grad_(True)
    optG.step()

    return StepStats(
        loss_d=loss_d.detach(),
        loss_g=loss_g.detach(),
        d_real=torch.sigmoid(logits_real.detach()).mean(),
        d_fake=torch.sigmoid(logits_fake.detach()).mean(),
    )


def epoch_permutation(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation on every rank (same seed and epoch), fresh each epoch."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_images, generator=gen)


def rank_batches(
    num_images: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, start: int = 0
) -> torch.Tensor:
    """Index batches of this rank for one epoch: a disjoint slice of the epoch's permutation.

    Every rank gets the same number of full batches (DDP needs equal step counts); the
    remainder, fewer than world_size * batch_size images, is left out of this epoch. After k steps of
    every rank, the first k * world_size * batch_size images of the permutation have been trained on;
    `start` leaves out that many (a run resumed mid-epoch on another world size goes on from there).
    """
    perm = epoch_permutation(num_images, seed, epoch)[start:]
    steps = len(perm) // (world_size * batch_size)
    if steps == 0 and start == 0:
        raise ValueError(
            f"{num_images} images cannot fill one batch of {batch_size} on each of {world_size} workers; "
            "lower train.batch_size or scaling.num_workers, or use more data"
        )
    mine = perm[rank::world_size][: steps * batch_size]
    return mine.view(steps, batch_size)


def noise_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Training noise for (epoch, rank): a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) * 65_537 + rank)


@dataclass
class EpochPosition:
    """How far one rank is into an epoch: the steps it took and the sums of their statistics (loss_d, loss_g,
    D(x), D(G(z))). A mid-epoch checkpoint holds every rank's; resumed on the same world size, each rank
    goes on from its own, so the epoch ends exactly as an uninterrupted one would."""

    steps: int = 0
    totals: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


@dataclass
class EpochStats:
    loss_d: float
    loss_g: float
    d_real: float
    d_fake: float
    images: int  # images this rank trained on in this call
    seconds: float
    steps: int  # optimizer steps this call took (an epoch resumed mid-way took only the rest)


def run_epoch(
    netG: nn.Module,
    netD: nn.Module,
    optG: torch.optim.Optimizer,
    optD: torch.optim.Optimizer,
    images: torch.Tensor,
    batches: torch.Tensor,
    z_dim: int,
    noise: torch.Generator,
    real_target: float = 1.0,
    log_every: int = 0,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    speed: SpeedSection | None = None,
    position: EpochPosition | None = None,
    after_step: Callable[[int, torch.Tensor], None] | None = None,
) -> EpochStats:
    """Train over `batches` (index rows into the device-resident uint8 `images`).

    Losses stay on the device and are read back only every `log_every` steps and at the end, so the
    loop never blocks on the GPU between those points. `speed` must be the one G and D were
    prepared with (`prepare_models`, `make_optimizers`); None means all options off.

    `position`: resume the epoch after the steps it counts. Their batches are skipped and `noise` is
    advanced past their draws (the same calls, so its state is exactly what it was), and the epoch's
    averages include their sums. `after_step(steps, sums)` is called after every step with the steps taken
    and the (4,) sums on the device (reading them waits for the device: the caller decides when to).
    """
    speed = speed or SpeedSection()
    device = images.device
    memory_format = torch.channels_last if speed.channels_last else torch.contiguous_format
    cuda_graphs = speed.compile == "reduce-overhead"
    batches = batches.to(device)
    netG.train()
    netD.train()
    done = position.steps if position is not None else 0
    for _ in range(done):  # the noise of the steps already taken
        torch.randn(batches.shape[1], z_dim, device=device, generator=noise)
    totals = torch.tensor(position.totals if position is not None else (0.0,) * 4, device=device)
    window = torch.zeros(4, device=device)
    window_start, window_steps = time.perf_counter(), 0
    start = window_start
    for i, idx in enumerate(batches[done:], start=done):
        if cuda_graphs:
            # A new step: outputs of the previous step's graph replays may now be overwritten.
            # Every batch has the same shape (full batches only), so one recording serves all steps.
            torch.compiler.cudagraph_mark_step_begin()
        real = to_model_input(images[idx]).contiguous(memory_format=memory_format)
        z = torch.randn(idx.numel(), z_dim, device=device, generator=noise)
        s = train_step(netG, netD, optG, optD, real, z, real_target, speed.autocast_bf16)
        step_vals = torch.stack([s.loss_d, s.loss_g, s.d_real, s.d_fake])
        totals += step_vals
        window += step_vals
        window_steps += 1
        if on_log is not None and log_every and (i + 1) % log_every == 0:
            now = time.perf_counter()
            vals = (window / window_steps).tolist()
            on_log(
                i + 1,
                {
                    "loss_d": vals[0],
                    "loss_g": vals[1],
                    "d_real": vals[2],
                    "d_fake": vals[3],
                    "images_per_s": window_steps * batches.shape[1] / (now - window_start),
                },
            )
            window.zero_()
            window_start, window_steps = now, 0
        progress.beat()
        if after_step is not None:
            after_step(i + 1, totals)
    steps = batches.shape[0]
    vals = (totals / max(steps, 1)).tolist()
    return EpochStats(
        loss_d=vals[0],
        loss_g=vals[1],
        d_real=vals[2],
        d_fake=vals[3],
        images=(steps - done) * batches.shape[1],
        seconds=time.perf_counter() - start,
        steps=steps - done,
    )
