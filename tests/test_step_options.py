"""The `speed` options of the GAN step on CPU: off means the plain step, bit for bit; each option alone
trains the same network up to its documented round-off; bad values are refused naming the key."""

from __future__ import annotations

import copy
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from dcgan_ray.config import JobConfig, SpeedSection, config_from_dict, load_config
from dcgan_ray.errors import ConfigError
from dcgan_ray.gan.models import build_models
from dcgan_ray.gan.step import (
    load_optimizer_state,
    make_optimizers,
    noise_generator,
    prepare_models,
    rank_batches,
    run_epoch,
    to_model_input,
)
from helpers import REPO

Z, BATCH, IMAGES = 16, 8, 32  # 4 steps of a small G and D: enough to compound round-off, quick on 2 cores


def images() -> torch.Tensor:
    return torch.randint(0, 256, (IMAGES, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def train(speed: SpeedSection | None):
    """Losses and final weights of one epoch with `speed` (None: run_epoch's default), from seed 0."""
    torch.manual_seed(0)
    netG, netD = build_models(Z, 16, 8, 0.2)
    speed_or_off = speed or SpeedSection()
    prepare_models(netG, netD, speed_or_off)
    optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999, fused=speed_or_off.fused_adam)
    stats = run_epoch(
        netG,
        netD,
        optG,
        optD,
        images(),
        rank_batches(IMAGES, BATCH, 0, 1, 0, 0),
        Z,
        noise_generator(0, 0, 0, torch.device("cpu")),
        speed=speed,
    )
    return stats, netG, netD


def plain_epoch():
    """The reference network's step as the project wrote it before the options existed: no autocast, default Adam."""
    torch.manual_seed(0)
    netG, netD = build_models(Z, 16, 8, 0.2)
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    noise = noise_generator(0, 0, 0, torch.device("cpu"))
    data = images()
    totals = torch.zeros(4)
    batches = rank_batches(IMAGES, BATCH, 0, 1, 0, 0)
    for idx in batches:
        real = to_model_input(data[idx])
        z = torch.randn(BATCH, Z, generator=noise)
        fake = netG(z)
        optD.zero_grad(set_to_none=True)
        logits_real, logits_fake = netD(real), netD(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(
            logits_real, torch.ones_like(logits_real)
        ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
        loss_d.backward()
        optD.step()
        optG.zero_grad(set_to_none=True)
        netD.requires_grad_(False)
        logits_gen = netD(fake)
        loss_g = F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))
        loss_g.backward()
        netD.requires_grad_(True)
        optG.step()
        totals += torch.stack(
            [loss_d, loss_g, torch.sigmoid(logits_real).mean(), torch.sigmoid(logits_fake).mean()]
        ).detach()
    return (totals / len(batches)).tolist(), netG, netD


def losses(stats) -> list[float]:
    return [stats.loss_d, stats.loss_g, stats.d_real, stats.d_fake]


def assert_weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def assert_same_function(netG, netD, otherG, otherD, **tol) -> None:
    """G and D compute the same (train-mode) outputs. Weights are not compared: the biases of the convs
    in front of BatchNorm get only round-off as gradient, which Adam scales up to whole steps, and
    BatchNorm cancels them again."""
    gen = torch.Generator().manual_seed(5)
    z, real = torch.randn(BATCH, Z, generator=gen), to_model_input(images()[:BATCH])
    with torch.no_grad():
        torch.testing.assert_close(netG(z), otherG(z), **tol)
        torch.testing.assert_close(netD(real), otherD(real), **tol)


@pytest.mark.parametrize("speed", [None, SpeedSection()], ids=["no speed argument", "all options off"])
def test_all_off_is_the_plain_step_bit_for_bit(speed):
    stats, netG, netD = train(speed)
    plain, plainG, plainD = plain_epoch()
    assert losses(stats) == plain
    assert_weights_equal(netG, plainG)
    assert_weights_equal(netD, plainD)


def test_bf16_autocast_stays_near_fp32():
    fp32, _, _ = train(SpeedSection())
    bf16, g16, _ = train(SpeedSection(autocast_bf16=True))
    assert losses(bf16) != losses(fp32)  # autocast did change the arithmetic ...
    # ... by bf16 round-off only (8 bits of mantissa: ~0.4% per op) over 4 steps.
    assert losses(bf16) == pytest.approx(losses(fp32), rel=3e-2)
    assert all(p.dtype == torch.float32 for p in g16.parameters())  # weights and Adam stay fp32


def test_channels_last_changes_layout_not_results():
    seen = []
    stats, netG, netD = train(SpeedSection(channels_last=True))
    netD.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    run_epoch(
        netG,
        netD,
        *make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999),
        images(),
        rank_batches(IMAGES, BATCH, 0, 1, 0, 1),
        Z,
        noise_generator(0, 1, 0, torch.device("cpu")),
        speed=SpeedSection(channels_last=True),
    )
    assert seen and all(seen)  # real batches, and G's output, reach D as NHWC
    conv = netD.net[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain, _, _ = train(SpeedSection())
    assert losses(stats) == pytest.approx(losses(plain), rel=1e-4)


def test_fused_adam_runs_on_cpu_and_matches():
    plain, plainG, plainD = train(SpeedSection())
    fused, netG, netD = train(SpeedSection(fused_adam=True))
    assert losses(fused) == pytest.approx(losses(plain), rel=1e-5)
    assert_same_function(netG, netD, plainG, plainD, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("saved_fused", [False, True])
def test_resumed_optimizer_keeps_this_runs_fused_choice(saved_fused):
    netG, netD = build_models(Z, 16, 8, 0.2)
    saved, _ = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999, fused=saved_fused)
    netG(torch.randn(4, Z)).mean().backward()
    saved.step()
    state = saved.state_dict()
    resumed, _ = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999, fused=not saved_fused)
    load_optimizer_state(resumed, copy.deepcopy(state), fused=not saved_fused)
    assert resumed.param_groups[0]["fused"] == (True if not saved_fused else None)
    assert resumed.state[next(netG.parameters())]["step"].item() == 1.0
    resumed.step()  # the kernel of the new choice accepts the loaded state
    assert resumed.state[next(netG.parameters())]["step"].item() == 2.0


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C++ compiler"
)
@pytest.mark.slow  # over 20 s with no server: outside the fast lane
def test_compile_on_cpu_matches_eager():
    # ~35 s on 2 cores, nearly all of it compiling G, D and D's frozen G-phase variant.
    eager, eagerG, eagerD = train(SpeedSection())
    compiled, netG, netD = train(SpeedSection(compile="default"))
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert_same_function(netG, netD, eagerG, eagerD, rtol=1e-3, atol=1e-4)
    # Compiled in place: checkpoints keep their keys, and the modules are still the bare ones.
    assert not any("_orig_mod" in k for k in netG.state_dict()) and type(netD).__name__ == "Discriminator"
    assert all(p.requires_grad for p in netD.parameters())


def test_speed_defaults_are_all_off():
    assert JobConfig().speed == SpeedSection(autocast_bf16=False, channels_last=False, fused_adam=False, compile="none")


@pytest.mark.parametrize(
    "speed, error",
    [
        (
            {"compile": "fast"},
            r"`speed\.compile` = 'fast' is not allowed; expected one of none, default, reduce-overhead",
        ),
        ({"fused_adam": "yes"}, r"`speed\.fused_adam` must be bool"),
        ({"autocast": True}, r"unknown key `speed\.autocast`; allowed here: autocast_bf16"),
        (
            {"compile": "reduce-overhead"},
            r"`speed\.compile` = 'reduce-overhead' .*needs `scaling\.use_gpu: true`.*"
            r"`speed\.compile: default`",
        ),
    ],
)
def test_bad_speed_values_name_the_key(speed, error):
    with pytest.raises(ConfigError, match=error):
        config_from_dict({"speed": speed})


def test_cuda_graphs_allowed_with_gpus():
    cfg = config_from_dict({"speed": {"compile": "reduce-overhead"}, "scaling": {"use_gpu": True}})
    assert cfg.speed.compile == "reduce-overhead"


def test_commented_speed_block_in_svhn_job_is_valid(tmp_path):
    """jobs/svhn.yaml shows the options as comments; uncommented they must load as they stand."""
    text = (REPO / "jobs" / "svhn.yaml").read_text()
    block = re.search(r"^# speed:.*\n(?:#   .*\n)+", text, flags=re.M)
    assert block, "jobs/svhn.yaml lost its commented `speed:` block"
    job = tmp_path / "svhn.yaml"
    job.write_text(text.replace(block.group(0), re.sub(r"^# ", "", block.group(0), flags=re.M)))
    speed = load_config(job).speed
    assert speed.autocast_bf16 and speed.channels_last and speed.fused_adam and speed.compile == "reduce-overhead"
