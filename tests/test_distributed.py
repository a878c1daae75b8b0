"""The distributed pieces, pinned without Ray: the GAN step against the textbook step, and what ranks
agree on (summed quality statistics, averaged BatchNorm buffers and metrics) across two real gloo
processes on loopback."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcgan_ray.gan.models import build_models
from dcgan_ray.gan.step import make_optimizers, train_step
from dcgan_ray.gan.sync import average, average_bn_buffers, broadcast_from_rank_zero
from dcgan_ray.quality.fid import frechet_from_stats
from dcgan_ray.quality.metrics import SampleStats, stats_from_tensor, stats_to_tensor
from gloo import on_gloo_ranks


def textbook_step(netG, netD, optG, optD, real, z):
    """pytorch/examples' DCGAN step: the G phase goes through D as it is (D's grads computed, unused)."""
    fake = netG(z)
    optD.zero_grad()
    out_real, out_fake = netD(real), netD(fake.detach())
    loss_d = F.binary_cross_entropy_with_logits(
        out_real, torch.ones_like(out_real)
    ) + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake))
    loss_d.backward()
    optD.step()
    optG.zero_grad()
    out = netD(fake)
    loss_g = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
    loss_g.backward()
    optG.step()
    return loss_d.detach(), loss_g.detach()


def test_project_step_updates_like_the_textbook_step():
    torch.manual_seed(0)
    netG, netD = build_models(100, 16, 8, 0.2)
    twins = copy.deepcopy(netG), copy.deepcopy(netD)
    opts = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999)
    twin_opts = make_optimizers(*twins, 2e-4, 2e-4, 0.5, 0.999)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # more than one step: D must be trainable again after the G phase froze it
        real = torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1
        z = torch.randn(8, 100, generator=gen)
        ours = train_step(netG, netD, *opts, real, z)
        loss_d, loss_g = textbook_step(*twins, *twin_opts, real, z)
        assert torch.allclose(ours.loss_d, loss_d, atol=1e-6) and torch.allclose(ours.loss_g, loss_g, atol=1e-6)
    for mine, theirs in ((netG, twins[0]), (netD, twins[1])):
        for (name, p), q in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.allclose(p.float(), q.float(), atol=1e-5), name
    assert all(p.requires_grad for p in netD.parameters())


def _rank_work(rank: int, world: int) -> tuple:
    """One rank of a real two-process gloo group on 127.0.0.1: each holds half of the data."""
    rng = np.random.default_rng(7)
    features = rng.standard_normal((200, 6))
    probs = rng.dirichlet(np.ones(10), 200)
    mine = SampleStats.empty(6)
    mine.update(torch.from_numpy(features[rank::world]), torch.from_numpy(probs[rank::world]))
    total = stats_to_tensor({"digit": mine}, ["digit"])
    dist.all_reduce(total)

    class Extractor:  # what stats_from_tensor needs to cut the flat tensor
        name, feature_dim = "digit", 6

    summed = stats_from_tensor(total, [Extractor()])["digit"]

    torch.manual_seed(rank)  # ranks' BatchNorm buffers drift apart under broadcast_buffers=False
    netG, _ = build_models(100, 16, 8, 0.2)
    netG.train()
    netG(torch.randn(4, 100))
    # numpy, not tensors, through the queue: a tensor there is shared memory that dies with this process
    before = {k: v.numpy().copy() for k, v in netG.state_dict().items() if "running" in k or "batches" in k}
    average_bn_buffers(netG)
    after = {k: v.numpy().copy() for k, v in netG.state_dict().items() if "running" in k or "batches" in k}
    return (
        summed.to_bytes(),
        before,
        after,
        average([float(rank), 10.0 * rank], torch.device("cpu")),
        broadcast_from_rank_zero(f"name-from-{rank}"),
    )


@pytest.fixture(scope="module")
def two_ranks():
    return on_gloo_ranks(_rank_work, timeout_s=120)


def test_quality_statistics_survive_an_all_reduce(two_ranks):
    rng = np.random.default_rng(7)
    features, probs = rng.standard_normal((200, 6)), rng.dirichlet(np.ones(10), 200)
    whole = SampleStats.empty(6)
    whole.update(torch.from_numpy(features), torch.from_numpy(probs))
    for rank in (0, 1):
        summed = SampleStats.from_bytes(two_ranks[rank][0])
        assert summed.features.n == 200
        assert np.allclose(summed.features.total, whole.features.total)
        assert np.allclose(summed.features.outer, whole.features.outer)
        assert np.allclose(summed.prob_sum, whole.prob_sum)
        assert summed.inception_score() == pytest.approx(whole.inception_score())
        assert frechet_from_stats(summed.features, whole.features) == pytest.approx(0.0, abs=1e-9)


def test_batchnorm_buffers_are_averaged_over_ranks(two_ranks):
    (_, before0, after0, *_), (_, before1, after1, *_) = two_ranks[0], two_ranks[1]
    assert any(not np.array_equal(before0[k], before1[k]) for k in before0)  # the ranks did drift apart
    assert any("num_batches_tracked" in k for k in before0)
    for k in before0:
        assert np.array_equal(after0[k], after1[k]), k  # one model on every rank, as checkpoints need
        if np.issubdtype(before0[k].dtype, np.floating):
            assert np.allclose(after0[k], (before0[k] + before1[k]) / 2), k
        else:
            assert np.array_equal(after0[k], before0[k]), k  # num_batches_tracked: an integer, left alone


def test_metrics_are_averaged_and_decisions_broadcast(two_ranks):
    for rank in (0, 1):
        assert two_ranks[rank][3] == [0.5, 5.0]
        assert two_ranks[rank][4] == "name-from-0"
