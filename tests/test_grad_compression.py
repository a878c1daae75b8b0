"""`speed.grad_compression` and `speed.ddp_bucket_mb` on a real two-process gloo group on 127.0.0.1, G and
D wrapped as the worker wraps them (`dcgan_ray.gan.ddp`): compressed all-reduces change the losses by
round-off only and keep the ranks' weights identical; the bucket size changes nothing but the buckets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from dcgan_ray.config import SpeedSection, config_from_dict
from dcgan_ray.errors import ConfigError
from dcgan_ray.gan.ddp import compress_gradients, ddp_kwargs
from dcgan_ray.gan.models import build_models
from dcgan_ray.gan.step import make_optimizers, noise_generator, train_step
from gloo import on_gloo_ranks

Z, BATCH, STEPS = 16, 8, 4
VARIANTS = {
    "fp32": SpeedSection(),
    "bf16": SpeedSection(grad_compression="bf16"),
    "fp16": SpeedSection(grad_compression="fp16"),
    # 0.01 MiB: D's 8-feature convs and G's layers each get buckets of their own (the defaults put each
    # small net in one), so the all-reduces are split differently; the sums must not change.
    "small buckets": SpeedSection(ddp_bucket_mb=0.01),
}


def _train(rank: int, speed: SpeedSection) -> dict:
    torch.manual_seed(0)
    netG, netD = build_models(Z, 16, 8, 0.2)
    netG, netD = (DistributedDataParallel(net, **ddp_kwargs(speed)) for net in (netG, netD))
    compress_gradients(netG, speed)
    compress_gradients(netD, speed)
    optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own images, as in training
    noise = noise_generator(0, 0, rank, torch.device("cpu"))
    losses = []
    for _ in range(STEPS):
        real = torch.rand(BATCH, 3, 32, 32, generator=gen) * 2 - 1
        s = train_step(netG, netD, optG, optD, real, torch.randn(BATCH, Z, generator=noise))
        losses.append([s.loss_d.item(), s.loss_g.item()])
    weights = {
        f"{tag}.{k}": v.numpy().copy()
        for tag, net in (("G", netG), ("D", netD))
        for k, v in net.module.state_dict().items()
        if "running" not in k and "batches" not in k
    }
    return {"losses": losses, "weights": weights, "bucket_bytes_cap": netD.bucket_bytes_cap}


def _rank_work(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    return {name: _train(rank, speed) for name, speed in VARIANTS.items()}


@pytest.fixture(scope="module")
def two_ranks():
    return on_gloo_ranks(_rank_work)


@pytest.mark.parametrize("compression", ["bf16", "fp16"])
def test_compressed_all_reduce_stays_near_fp32(two_ranks, compression):
    fp32, compressed = np.array(two_ranks[0]["fp32"]["losses"]), np.array(two_ranks[0][compression]["losses"])
    assert not np.array_equal(fp32, compressed)  # the hook did round the gradients ...
    # ... by bf16/fp16 round-off only (8 and 11 bits of mantissa), compounded over 4 Adam steps:
    # 4.5e-4 (bf16) and 2.5e-4 (fp16) at most when this was written.
    np.testing.assert_allclose(compressed, fp32, rtol=5e-3)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ranks_keep_identical_weights(two_ranks, variant):
    # Every rank decompresses the same summed buckets, so DDP's invariant holds with the hooks too.
    mine, theirs = two_ranks[0][variant]["weights"], two_ranks[1][variant]["weights"]
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert np.array_equal(mine[key], theirs[key]), key


def test_bucket_size_reaches_ddp_and_changes_no_result(two_ranks):
    assert two_ranks[0]["fp32"]["bucket_bytes_cap"] == 25 * 2**20  # DDP's own default, kept by default
    assert two_ranks[0]["small buckets"]["bucket_bytes_cap"] == int(0.01 * 2**20)
    assert two_ranks[0]["small buckets"]["losses"] == two_ranks[0]["fp32"]["losses"]
    for key, value in two_ranks[0]["fp32"]["weights"].items():
        assert np.array_equal(two_ranks[0]["small buckets"]["weights"][key], value), key


def test_one_worker_is_left_bare():
    # Ray's prepare_model does not wrap a world of one in DDP: there is nothing to hook, and no error.
    netG, _ = build_models(Z, 16, 8, 0.2)
    compress_gradients(netG, SpeedSection(grad_compression="bf16"))
    assert type(netG).__name__ == "Generator"


def test_defaults_change_nothing():
    speed = config_from_dict({}).speed
    assert speed.grad_compression == "none" and speed.ddp_bucket_mb == 25.0
    assert ddp_kwargs(speed) == {"broadcast_buffers": False, "bucket_cap_mb": 25.0}


@pytest.mark.parametrize(
    "speed, error",
    [
        (
            {"grad_compression": "int8"},
            r"`speed\.grad_compression` = 'int8' is not allowed; expected one of none, bf16, fp16",
        ),
        ({"ddp_bucket_mb": 0}, r"`speed\.ddp_bucket_mb` = 0\.0 is not allowed; expected a number > 0"),
        ({"grad_compression": True}, r"`speed\.grad_compression` must be str"),
    ],
)
def test_bad_values_name_the_key(speed, error):
    with pytest.raises(ConfigError, match=error):
        config_from_dict({"speed": speed})
