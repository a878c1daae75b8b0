import torch

from dcgan_ray.gan.models import Discriminator, Generator, build_models, count_parameters
from dcgan_ray.gan.step import make_optimizers, noise_generator, rank_batches, run_epoch, to_model_input, train_step


def test_shapes_and_parameter_counts():
    netG, netD = build_models(z_dim=100, g_features=128, d_features=64, alpha=0.2)
    assert count_parameters(netG) == 4_935_171
    assert count_parameters(netD) == 1_033_729
    x = netG(torch.randn(5, 100))
    assert x.shape == (5, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1  # tanh
    assert netD(x).shape == (5,)


def test_architecture_follows_seed():
    netG, netD = Generator(), Discriminator()
    convT = [m for m in netG.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    conv = [m for m in netD.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.kernel_size for m in convT + conv] == [(5, 5)] * 6
    assert [m.stride for m in convT + conv] == [(2, 2)] * 6
    assert [m.out_channels for m in convT] == [256, 128, 3]
    assert [m.out_channels for m in conv] == [64, 128, 256]
    assert len([m for m in netD.modules() if isinstance(m, torch.nn.BatchNorm2d)]) == 2  # not on the first conv
    assert all(m.negative_slope == 0.2 for m in netG.modules() if isinstance(m, torch.nn.LeakyReLU))


def test_sizes_come_from_arguments():
    netG, netD = build_models(z_dim=16, g_features=32, d_features=8, alpha=0.1)
    assert netG(torch.randn(2, 16)).shape == (2, 3, 32, 32)
    assert netD.net[0].out_channels == 8


def test_init_is_dcgan_normal():
    torch.manual_seed(0)
    netG, _ = build_models(100, 128, 64, 0.2)
    w = netG.net[2].weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002


def test_train_step_changes_both_networks():
    torch.manual_seed(0)
    netG, netD = build_models(100, 128, 64, 0.2)
    optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999)
    g0 = [p.clone() for p in netG.parameters()]
    d0 = [p.clone() for p in netD.parameters()]
    real = to_model_input(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    stats = train_step(netG, netD, optG, optD, real, torch.randn(8, 100))
    assert all(not torch.equal(a, b) for a, b in zip(g0, netG.parameters(), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(d0, netD.parameters(), strict=True))
    assert torch.isfinite(stats.loss_d) and torch.isfinite(stats.loss_g)
    assert 0 < stats.d_real.item() < 1 and 0 < stats.d_fake.item() < 1
    assert all(p.requires_grad for p in netD.parameters())  # G phase's freeze is undone


def test_to_model_input_range():
    x = to_model_input(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]


def test_rank_batches_disjoint_and_fresh_each_epoch():
    b0 = rank_batches(100, 8, rank=0, world_size=3, seed=1, epoch=0)
    b1 = rank_batches(100, 8, rank=1, world_size=3, seed=1, epoch=0)
    b2 = rank_batches(100, 8, rank=2, world_size=3, seed=1, epoch=0)
    assert b0.shape == b1.shape == b2.shape == (4, 8)  # 100 // (3 * 8) = 4 full steps each
    seen = torch.cat([b0.flatten(), b1.flatten(), b2.flatten()])
    assert len(set(seen.tolist())) == 96
    assert not torch.equal(b0, rank_batches(100, 8, 0, 3, seed=1, epoch=1))
    assert torch.equal(b0, rank_batches(100, 8, 0, 3, seed=1, epoch=0))


def test_run_epoch_reports_means():
    torch.manual_seed(0)
    netG, netD = build_models(16, 16, 8, 0.2)
    optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    logs = []
    stats = run_epoch(
        netG,
        netD,
        optG,
        optD,
        images,
        rank_batches(64, 8, 0, 1, 0, 0),
        16,
        noise_generator(0, 0, 0, torch.device("cpu")),
        log_every=4,
        on_log=lambda i, m: logs.append((i, m)),
    )
    assert stats.steps == 8 and stats.images == 64
    assert [i for i, _ in logs] == [4, 8]
    assert all(m["images_per_s"] > 0 for _, m in logs)
