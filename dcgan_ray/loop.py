"""The per-worker training function that Ray Train runs on every DDP rank.

Ray does the distributed set-up (process group, device, DDP wrapping); the math is `dcgan_ray.step`.
Each rank holds the whole split in memory (on the GPU when there is one) and trains on its disjoint
slice of a per-epoch permutation. `train.batch_size` is per worker; the global batch is
batch_size x world_size. Rank 0 writes sample grids, the run manifest and the checkpoints.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from PIL import Image

from dcgan_ray.checkpoint import CHECKPOINT_FILE, FORMAT_VERSION, load_checkpoint, save_checkpoint
from dcgan_ray.config import JobConfig, config_from_dict
from dcgan_ray.data import load_split
from dcgan_ray.errors import CheckpointError
from dcgan_ray.images import gif_bytes, grid_image, png_bytes
from dcgan_ray.logs import setup_logging
from dcgan_ray.models import build_models
from dcgan_ray.quality import (describe_metrics, generated_batches, image_stats, load_extractors, quality_metrics,
                               reference_stats, stats_from_tensor, stats_to_tensor)
from dcgan_ray.runs import RunLayout, new_manifest, read_manifest, write_manifest
from dcgan_ray.step import make_optimizers, noise_generator, rank_batches, run_epoch, to_pixels, unwrap
from dcgan_ray.storage import Store

log = logging.getLogger("dcgan_ray.train")


def _restore(store: Store, layout: RunLayout) -> tuple[dict[str, Any] | None, str | None]:
    """The newest readable checkpoint of the run and its URI, or (None, None) for a fresh run.

    Ray hands over its latest registered checkpoint; if that one is damaged we fall back to older
    ones with a warning. If checkpoints exist but none is readable we stop: starting from scratch
    would silently overwrite a run.
    """
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, None
    try:
        with ckpt.as_directory() as d:
            return load_checkpoint(f"{d}/{CHECKPOINT_FILE}", f"s3://{ckpt.path}/{CHECKPOINT_FILE}"), f"s3://{ckpt.path}"
    except CheckpointError as e:
        log.warning("%s; trying the run's older checkpoints", e)
        failed = f"{ckpt.path.rstrip('/')}/{CHECKPOINT_FILE}"
    for key in layout.checkpoint_keys(store):
        if failed.endswith(key):
            continue
        try:
            state = load_checkpoint(store.get_bytes(key), store.uri(key))
            log.warning("resuming from the older checkpoint %s (epoch %d)", store.uri(key), state["epoch"])
            return state, store.uri(key.rsplit("/", 1)[0])
        except CheckpointError as e:
            log.warning("%s", e)
    raise CheckpointError(
        f"run {layout.uri} has checkpoints but none can be read; refusing to start over and overwrite it. "
        "Delete the damaged checkpoint folders or choose a new `name`"
    )


def _checkpoint_dir_name(store: Store, layout: RunLayout, epoch: int) -> str:
    """checkpoint_epoch_NNNN, or checkpoint_epoch_NNNN_rK when a run resumed from an older checkpoint
    finds that name taken (by the damaged one it skipped): Ray deletes old checkpoints by folder, so
    two registered checkpoints must never share one. Rank 0 decides; every rank reports the same."""
    name = layout.checkpoint_dir_name(epoch)
    if ray.train.get_context().get_world_rank() == 0:
        base, k = name, 0
        while store.list_keys(f"{layout.prefix}/{name}/"):
            k += 1
            name = f"{base}_r{k}"
    if dist.is_available() and dist.is_initialized():
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return name


def _average_bn_buffers(*nets: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks.

    DDP runs with broadcast_buffers=False (two D forwards per step would otherwise trip autograd's
    in-place check), so each rank's running statistics drift apart; before sampling and
    checkpointing they are averaged so every rank, and every checkpoint, holds the same model.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for net in nets:
        for name, buf in unwrap(net).named_buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.AVG)


def _average_metrics(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t.tolist()


def _write_samples(store: Store, layout: RunLayout, cfg: JobConfig, netG: torch.nn.Module,
                   fixed_noise: torch.Tensor, epoch: int) -> str:
    bare = unwrap(netG)
    bare.eval()
    with torch.no_grad():
        pixels = to_pixels(bare(fixed_noise))
    bare.train()
    png = png_bytes(grid_image(pixels, columns=cfg.sample.grid_size, scale=cfg.sample.scale))
    store.put_bytes(layout.sample_key(epoch), png, "image/png")
    store.put_bytes(layout.latest_sample_key, png, "image/png")
    return store.uri(layout.sample_key(epoch))


def _write_gif(store: Store, layout: RunLayout, epochs: list[int]) -> str:
    frames = [Image.open(io.BytesIO(store.get_bytes(layout.sample_key(e)))).convert("RGB") for e in epochs]
    store.put_bytes(layout.gif_key, gif_bytes(frames), "image/gif")
    return store.uri(layout.gif_key)


def train_worker(loop_config: dict[str, Any]) -> None:
    setup_logging()
    cfg = config_from_dict(loop_config["config"], "the job's config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    store = Store(cfg.storage)
    layout = RunLayout.of(cfg)
    lead = rank == 0

    data = load_split(store, cfg, max_images=cfg.data.max_images)
    images = torch.from_numpy(data.images).to(device)
    if lead:
        log.info("rank 0/%d on %s: %d images of %s/%s resident in %s memory (%.0f MiB)", world, device,
                 len(images), cfg.data.dataset, cfg.data.split, device.type, images.numel() / 2**20)

    torch.manual_seed(cfg.train.seed)
    netG, netD = build_models(cfg.model.z_dim, cfg.model.g_features, cfg.model.d_features, cfg.model.alpha)
    fixed_noise = torch.randn(cfg.sample.grid_size**2, cfg.model.z_dim,
                              generator=torch.Generator().manual_seed(cfg.train.seed))
    optG, optD = make_optimizers(netG, netD, cfg.train.lr_generator, cfg.train.lr_discriminator,
                                 cfg.train.beta1, cfg.train.beta2)
    start_epoch, step = 0, 0
    state, state_origin = _restore(store, layout)
    if state is not None:
        netG.load_state_dict(state["netG"])
        netD.load_state_dict(state["netD"])
        optG.load_state_dict(state["optG"])
        optD.load_state_dict(state["optD"])
        fixed_noise = state["fixed_noise"]
        start_epoch, step = state["epoch"], state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        if lead:
            log.info("resuming %s at epoch %d/%d (step %d)", layout.uri, start_epoch + 1, cfg.train.epochs, step)

    # DDP after loading: it broadcasts rank 0's parameters, which every rank already has.
    ddp = {"broadcast_buffers": False}
    netG = ray.train.torch.prepare_model(netG, parallel_strategy_kwargs=ddp)
    netD = ray.train.torch.prepare_model(netD, parallel_strategy_kwargs=ddp)
    _move_optimizer_state(optG, device)
    _move_optimizer_state(optD, device)
    fixed_noise = fixed_noise.to(device)

    evaluate = _evaluator(store, cfg, images, rank, world, device) if cfg.eval.every_epochs else None
    manifest = None
    if lead:
        manifest = read_manifest(store, layout) or new_manifest(cfg, layout)
        manifest.update(status="running", epochs_total=cfg.train.epochs, config=cfg.to_dict(), world_size=world,
                        global_batch=cfg.train.batch_size * world)
        manifest["history"] = [h for h in manifest["history"] if h["epoch"] <= start_epoch]
        if state is not None:
            manifest["resumed_from"] = {"epoch": start_epoch, "checkpoint": state_origin}
        write_manifest(store, layout, manifest)
        store.put_bytes(layout.config_key, cfg.to_yaml().encode(), "text/yaml")
        log.info("run %s: %d workers x batch %d = global batch %d; %d steps per epoch", layout.uri, world,
                 cfg.train.batch_size, cfg.train.batch_size * world,
                 len(images) // (world * cfg.train.batch_size))

    def snapshot(done: int, step: int) -> dict[str, Any]:
        return {
            "netG": unwrap(netG).state_dict(), "netD": unwrap(netD).state_dict(),
            "optG": optG.state_dict(), "optD": optD.state_dict(), "epoch": done, "step": step,
            "rng": {"torch": torch.get_rng_state()}, "fixed_noise": fixed_noise.cpu(), "config": cfg.to_dict(),
        }

    if start_epoch == 0:
        # Epoch 0, the untrained G: the first frame of the animation and the far end of every learning curve.
        quality = evaluate(netG) if evaluate is not None else {}
        if lead:
            manifest["samples"]["epochs"] = [_write_samples(store, layout, cfg, netG, fixed_noise, 0)]
            manifest["history"] = [{"epoch": 0, **quality}] if quality else []
            write_manifest(store, layout, manifest)

    for epoch in range(start_epoch, cfg.train.epochs):
        batches = rank_batches(len(images), cfg.train.batch_size, rank, world, cfg.train.seed, epoch)

        def on_log(i: int, m: dict[str, float], epoch: int = epoch, steps: int = len(batches)) -> None:
            log.info("epoch %d/%d step %d/%d  loss_d %.3f  loss_g %.3f  D(x) %.3f  D(G(z)) %.3f  %.0f img/s",
                     epoch + 1, cfg.train.epochs, i, steps, m["loss_d"], m["loss_g"], m["d_real"], m["d_fake"],
                     m["images_per_s"] * world)

        stats = run_epoch(netG, netD, optG, optD, images, batches, cfg.model.z_dim,
                          noise_generator(cfg.train.seed, epoch, rank, device),
                          real_target=1.0 - cfg.train.label_smoothing,
                          log_every=cfg.train.log_every_steps if lead else 0, on_log=on_log)
        step += stats.steps
        loss_d, loss_g, d_real, d_fake, seconds = _average_metrics(
            [stats.loss_d, stats.loss_g, stats.d_real, stats.d_fake, stats.seconds], device)
        _average_bn_buffers(netG, netD)
        done = epoch + 1
        metrics = {
            "epoch": done, "step": step, "loss_d": loss_d, "loss_g": loss_g, "d_real": d_real, "d_fake": d_fake,
            "images_per_s": stats.images * world / seconds, "epoch_seconds": seconds,
            "finite": float(np.isfinite([loss_d, loss_g]).all()),
        }
        if evaluate is not None and (done % cfg.eval.every_epochs == 0 or done == cfg.train.epochs):
            metrics.update(evaluate(netG))
        save_now = done % cfg.checkpoint.every_epochs == 0 or done == cfg.train.epochs
        dir_name = _checkpoint_dir_name(store, layout, done) if save_now else None
        with tempfile.TemporaryDirectory(prefix="dcgan-ckpt-") as tmp:
            checkpoint = None
            if lead:
                sample_uri = _write_samples(store, layout, cfg, netG, fixed_noise, done)
                log.info("epoch %d/%d done in %.1f s: loss_d %.3f loss_g %.3f D(x) %.3f D(G(z)) %.3f %.0f img/s; "
                         "samples %s", done, cfg.train.epochs, seconds, loss_d, loss_g, d_real, d_fake,
                         metrics["images_per_s"], sample_uri)
                _keep_if_best(store, layout, cfg, manifest, metrics, lambda: snapshot(done, step))
                manifest["history"].append(metrics)
                manifest["epochs_completed"] = done
                manifest["samples"]["latest"] = store.uri(layout.latest_sample_key)
                manifest["samples"]["epochs"] = sorted({*manifest["samples"]["epochs"], sample_uri})
                if save_now:
                    save_checkpoint(tmp, snapshot(done, step))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                    manifest["checkpoints"]["latest"] = f"{layout.uri}/{dir_name}"
                write_manifest(store, layout, manifest)
            # Every rank reports (it is a barrier); only rank 0 hands over a checkpoint.
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name)

    if lead:
        manifest["samples"]["gif"] = _write_gif(store, layout, list(range(cfg.train.epochs + 1)))
        manifest["status"] = "finished"
        write_manifest(store, layout, manifest)
        log.info("training finished: %d epochs; samples %s, animation %s, latest checkpoint %s",
                 cfg.train.epochs, manifest["samples"]["latest"], manifest["samples"]["gif"],
                 manifest["checkpoints"]["latest"])


def _evaluator(store: Store, cfg: JobConfig, images: torch.Tensor, rank: int, world: int, device: torch.device):
    """A function G -> quality metrics (on rank 0; {} elsewhere) that every rank must call together.

    Each rank generates its share of eval.num_samples from its own fixed noise, so successive
    evaluations compare the same latent points; the ranks all-reduce sufficient statistics.
    """
    extractors = load_extractors(store, cfg, device)
    names = [e.name for e in extractors]
    reference = reference_stats(store, cfg, extractors, images, device) if rank == 0 else None
    share = cfg.eval.num_samples // world + (rank < cfg.eval.num_samples % world)

    def evaluate(netG: torch.nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        batches = generated_batches(unwrap(netG), share, cfg.model.z_dim, cfg.eval.batch_size,
                                    seed=cfg.train.seed * 7919 + 104729 + rank, device=device)
        total = stats_to_tensor(image_stats(extractors, batches), names).to(device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        if rank != 0:
            return {}
        metrics = quality_metrics(stats_from_tensor(total, extractors), reference)
        metrics["eval_seconds"] = time.perf_counter() - start
        log.info("quality of %d samples: %s (%.1f s)", cfg.eval.num_samples, describe_metrics(metrics),
                 metrics["eval_seconds"])
        return metrics

    return evaluate


def _keep_if_best(store: Store, layout: RunLayout, cfg: JobConfig, manifest: dict[str, Any],
                  metrics: dict[str, Any], snapshot) -> None:
    """Keep the checkpoint with the best quality metric apart from the last N, at <run>/best/."""
    value = metrics.get(cfg.eval.metric)
    if value is None or not math.isfinite(value):
        return
    best = manifest["checkpoints"].get("best")
    if best is not None and best.get("metric") == cfg.eval.metric and best["value"] <= value:
        return
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **snapshot()}, buf)
    store.put_bytes(layout.best_key, buf.getvalue())
    manifest["checkpoints"]["best"] = {"uri": store.uri(layout.best_key.rsplit("/", 1)[0]), "epoch": metrics["epoch"],
                                       "metric": cfg.eval.metric, "value": value}
    log.info("new best %s %.3f at epoch %d: %s", cfg.eval.metric, value, metrics["epoch"],
             manifest["checkpoints"]["best"]["uri"])


def _move_optimizer_state(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam state restored on the CPU follows its parameters to the device."""
    for param_state in opt.state.values():
        for k, v in param_state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                param_state[k] = v.to(device)
