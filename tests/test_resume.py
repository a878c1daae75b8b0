"""Exact resume, without Ray: an epoch stopped after any step and resumed from what a mid-epoch checkpoint
holds (G, D, both Adam states, the step and the running sums; the noise generator reseeded and advanced)
ends bit-identical to the epoch trained straight; on another world size no image is trained twice."""

from __future__ import annotations

import copy

import pytest
import torch

from dcgan_ray.gan.models import build_models
from dcgan_ray.gan.step import EpochPosition, make_optimizers, noise_generator, rank_batches, run_epoch

Z = 8


class Stop(Exception):
    pass


def fresh(seed: int = 0):
    torch.manual_seed(seed)
    netG, netD = build_models(Z, 4, 4, 0.2)
    optG, optD = make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999)
    return netG, netD, optG, optD


def snapshot(netG, netD, optG, optD) -> dict:
    return copy.deepcopy(
        {"G": netG.state_dict(), "D": netD.state_dict(), "optG": optG.state_dict(), "optD": optD.state_dict()}
    )


def assert_identical(a: dict, b: dict) -> None:
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    different = [k for k in flat_a if not torch.equal(torch.as_tensor(flat_a[k]), torch.as_tensor(flat_b[k]))]
    assert different == []


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor | int | float):
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("stop_after", [1, 3, 7])
def test_an_epoch_resumed_after_any_step_ends_bit_identical(stop_after):
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    batches = rank_batches(len(images), 8, 0, 1, seed=5, epoch=2)  # 8 steps

    straight = fresh()
    stats = run_epoch(*straight, images, batches, Z, noise_generator(5, 2, 0, torch.device("cpu")))
    expected = snapshot(*straight)

    interrupted = fresh()
    saved = {}

    def stop(steps: int, sums: torch.Tensor) -> None:
        if steps == stop_after:  # what a mid-epoch checkpoint takes: the state and the position
            saved.update(state=snapshot(*interrupted), position=EpochPosition(steps, tuple(sums.tolist())))
            raise Stop

    with pytest.raises(Stop):
        run_epoch(*interrupted, images, batches, Z, noise_generator(5, 2, 0, torch.device("cpu")), after_step=stop)
    resumed = fresh(seed=123)  # another process: nothing carried over but the checkpoint
    netG, netD, optG, optD = resumed
    netG.load_state_dict(saved["state"]["G"])
    netD.load_state_dict(saved["state"]["D"])
    optG.load_state_dict(saved["state"]["optG"])
    optD.load_state_dict(saved["state"]["optD"])
    rest = run_epoch(
        *resumed, images, batches, Z, noise_generator(5, 2, 0, torch.device("cpu")), position=saved["position"]
    )
    assert_identical(snapshot(*resumed), expected)
    # The epoch's numbers are the whole epoch's, and the steps counted are those this call took.
    assert (rest.loss_d, rest.loss_g, rest.d_real, rest.d_fake) == (
        stats.loss_d,
        stats.loss_g,
        stats.d_real,
        stats.d_fake,
    )
    assert rest.steps == 8 - stop_after and stats.steps == 8


def test_a_resumed_epoch_on_another_world_size_trains_each_image_once():
    """2 ranks took 3 steps of batch 4 (24 images); the rest of the epoch goes to 3 ranks from image 24 on."""
    num, batch = 100, 4
    before = [rank_batches(num, batch, r, 2, seed=1, epoch=0)[:3] for r in range(2)]
    after = [rank_batches(num, batch, r, 3, seed=1, epoch=0, start=3 * 2 * batch) for r in range(3)]
    seen_before = torch.cat([b.reshape(-1) for b in before])
    seen_after = torch.cat([b.reshape(-1) for b in after])
    assert len(set(seen_before.tolist()) | set(seen_after.tolist())) == len(seen_before) + len(seen_after)
    # 76 images left for 3 ranks of batch 4: 6 full steps each (72 images); 4 are left out, as in any epoch.
    assert all(b.shape == (6, batch) for b in after)
    # Together they are a prefix of the epoch's permutation, as an uninterrupted epoch's batches are.
    whole = rank_batches(num, batch, 0, 1, seed=1, epoch=0).reshape(-1)
    assert sorted(seen_before.tolist() + seen_after.tolist()) == sorted(whole[: 24 + 72].tolist())
