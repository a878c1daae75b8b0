"""The commands of one job or study: data, train, sample, eval, classifier, tune, paths, submit, jobs."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from dcgan_ray.cli.options import (
    ADDRESS_HELP,
    SEED_RANGE,
    add_config,
    add_wait_for_lease,
    bounded,
    endpoint_url,
    storage_for_uri,
    submission,
)
from dcgan_ray.config import JobConfig, StorageSection, load_config
from dcgan_ray.errors import ConfigError, DcganError
from dcgan_ray.storage.runs import load_job


def cmd_data_synth(args: argparse.Namespace) -> None:
    from dcgan_ray.data.synth import synth_svhn_mat

    synth_svhn_mat(args.out, args.n, seed=args.seed)
    print(f"wrote {args.n} SVHN-format images to {args.out}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from dcgan_ray.data.svhn import prepare_split
    from dcgan_ray.storage.layout import split_prefix
    from dcgan_ray.storage.s3 import Store

    cfg = load_job(args.config, args.overrides)
    splits = args.split or cfg.data.prepare_splits
    if args.from_ and len(splits) > 1 and not Path(args.from_).is_dir():
        raise DcganError(
            f"--from {args.from_} is one file but {len(splits)} splits were asked for; "
            "give one --split, or a directory holding SVHN's file names"
        )
    store = Store(cfg.storage)
    store.check()
    for split in splits:
        manifest = prepare_split(store, cfg, split, from_=args.from_, force=args.force)
        print(f"{split}: {manifest['count']} images in {store.uri(split_prefix(cfg, split))}")


def cmd_train(args: argparse.Namespace) -> None:
    from dcgan_ray.train.driver import describe, train

    cfg = load_job(args.config, args.overrides)
    manifest = train(cfg, args.address, args.wait_for_lease, submission(args.config, args.overrides))
    print(describe(manifest))


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from dcgan_ray.gan.step import to_pixels
    from dcgan_ray.storage.checkpoint import generator_from_checkpoint, read_checkpoint_uri
    from dcgan_ray.storage.images import grid_image

    state = read_checkpoint_uri(args.checkpoint, storage_for_uri(args))
    netG, cfg = generator_from_checkpoint(state)
    if args.seed is None and args.n == len(state["fixed_noise"]):
        z = state["fixed_noise"]  # the very grid the run showed during training
    else:
        z = torch.randn(args.n, cfg.model.z_dim, generator=torch.Generator().manual_seed(args.seed or 0))
    with torch.no_grad():
        pixels = to_pixels(netG(z))
    grid_image(pixels, scale=args.scale).save(args.out)
    print(f"wrote {args.n} samples of {cfg.name} (epoch {state['epoch']}) to {args.out}")


def cmd_classifier_train(args: argparse.Namespace) -> None:
    import io
    import time

    import torch

    from dcgan_ray.data.svhn import load_split
    from dcgan_ray.quality.classifier import evaluate_accuracy, save_state, train_classifier
    from dcgan_ray.quality.metrics import MORE_CLASSIFIER_TRAINING
    from dcgan_ray.storage.layout import classifier_key
    from dcgan_ray.storage.s3 import Store

    cfg = load_job(args.config, args.overrides)
    store = Store(cfg.storage)
    store.check()
    c = cfg.classifier
    train = load_split(store, cfg, cfg.data.split, max_images=c.max_images)
    test = load_split(store, cfg, c.test_split)
    if len(train.images) < c.batch_size:
        raise ConfigError(
            f"{len(train.images)} {cfg.data.split} images cannot fill one batch of "
            f"classifier.batch_size={c.batch_size}; lower it or use more data (classifier.max_images)"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model = train_classifier(
        torch.from_numpy(train.images),
        torch.from_numpy(train.labels).long(),
        epochs=c.epochs,
        batch_size=c.batch_size,
        lr=c.lr,
        seed=c.seed,
        device=device,
        min_steps=c.min_steps,
    )
    accuracy = evaluate_accuracy(model, torch.from_numpy(test.images), torch.from_numpy(test.labels).long())
    steps_per_epoch = len(train.images) // c.batch_size
    meta: dict[str, Any] = {
        "test_accuracy": accuracy,
        "train_images": len(train.images),
        "test_images": len(test.images),
        "train_split": cfg.data.split,
        "test_split": c.test_split,
        "epochs": max(c.epochs, -(-c.min_steps // steps_per_epoch)),
        "batch_size": c.batch_size,
        "seconds": time.perf_counter() - start,
        "data_sha256": {"train": train.manifest["source"]["sha256"], "test": test.manifest["source"]["sha256"]},
    }
    meta["steps"] = meta["epochs"] * steps_per_epoch
    buf = io.BytesIO()
    torch.save({"model": save_state(model.cpu()), "meta": meta}, buf)
    store.put_bytes(classifier_key(cfg), buf.getvalue())
    print(
        f"digit classifier: test accuracy {accuracy:.4f} on {len(test.images)} {c.test_split} images after "
        f"{meta['steps']} steps ({meta['seconds']:.0f} s); stored at {store.uri(classifier_key(cfg))}"
    )
    if accuracy < cfg.eval.min_classifier_accuracy:
        print(
            f"warning: that is below eval.min_classifier_accuracy={cfg.eval.min_classifier_accuracy:g}, so "
            f"training and studies that evaluate with it will refuse to start. {MORE_CLASSIFIER_TRAINING}",
            file=sys.stderr,
        )


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    import torch

    from dcgan_ray.data.svhn import load_split
    from dcgan_ray.quality.metrics import Evaluator
    from dcgan_ray.storage.checkpoint import generator_from_checkpoint, read_checkpoint_uri
    from dcgan_ray.storage.s3 import Store

    storage = storage_for_uri(args)
    state = read_checkpoint_uri(args.checkpoint, storage)
    netG, trained = generator_from_checkpoint(state)
    cfg = _eval_config(args, storage, trained)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store = Store(cfg.storage)
    real = load_split(store, cfg, max_images=cfg.data.max_images)
    quality = Evaluator(store, cfg, real.images, device)(netG.to(device), seed=args.seed)
    print(
        json.dumps(
            {"checkpoint": args.checkpoint, "epoch": state["epoch"], "num_samples": cfg.eval.num_samples, **quality},
            indent=2,
        )
    )


def _eval_config(args: argparse.Namespace, storage: StorageSection, trained: JobConfig) -> JobConfig:
    """What `eval` runs with: the job YAML's (or the defaults') data, eval and storage settings, the
    command line's flags, and of the checkpoint's config only the model's shape. A shared checkpoint
    must not decide where credentials are sent, what is written where, or where weights come from."""
    from dcgan_ray.config import config_from_dict, set_dotted
    from dcgan_ray.storage.s3 import parse_s3_uri

    data = (load_config(args.config) if args.config else JobConfig()).to_dict()
    data["storage"] = dataclasses.asdict(storage)
    if not args.config and args.checkpoint.startswith("s3://"):
        # The bucket and prefix of the URI the user typed: s3://BUCKET/PREFIX/runs/NAME/...
        bucket, key = parse_s3_uri(args.checkpoint)
        data["storage"]["bucket"] = bucket
        if "/runs/" in f"/{key}":
            data["storage"]["prefix"] = f"/{key}".split("/runs/", 1)[0].strip("/") or data["storage"]["prefix"]
    data["model"] = trained.to_dict()["model"]
    data["name"] = trained.name
    if args.num_samples is not None:
        set_dotted(data, "eval.num_samples", args.num_samples)
    if args.extractors:
        set_dotted(data, "eval.extractors", args.extractors)
    return config_from_dict(data, "eval's settings (--config and flags)")


def cmd_tune(args: argparse.Namespace) -> None:
    from dcgan_ray.study.tuner import run_study

    cfg = load_job(args.config, args.overrides)
    result = run_study(cfg, args.address, args.wait_for_lease, submission(args.config, args.overrides))
    print(f"report: {result['report']}")


def cmd_paths(args: argparse.Namespace) -> None:
    from dcgan_ray.storage.layout import job_paths

    paths = job_paths(load_job(args.config, args.overrides))
    if args.name:
        if args.name not in paths:
            raise DcganError(f"no path named {args.name!r}; known: {', '.join(paths)}")
        print(paths[args.name])
        return
    for name, uri in paths.items():
        print(f"{name:16} {uri}")


def cmd_submit(args: argparse.Namespace) -> None:
    from dcgan_ray.jobs import submit

    cfg = load_job(args.config, args.overrides)
    kind = "tune" if args.study else "train"
    submission_id = submit(
        cfg,
        args.config,
        args.overrides,
        kind,
        args.address,
        queue=not args.no_queue,
        wait_for_lease=args.wait_for_lease,
    )
    print(f"submitted {submission_id}\n  follow: ray job logs -f {submission_id}\n  list:   dcgan-ray jobs")


def cmd_spot_watch(args: argparse.Namespace) -> None:
    from dcgan_ray.spot import Metadata, watch

    notice = watch(args.address, Metadata(args.metadata_url), poll_s=args.poll_s)
    print(f"drained this node for its spot notice: {notice}")


def cmd_jobs(args: argparse.Namespace) -> None:
    from dcgan_ray.jobs import format_jobs, list_jobs

    print(format_jobs(list_jobs(args.address)))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="SVHN data: synthesize offline, prepare into the bucket")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("synth", help="write offline house-number digits in SVHN's exact .mat format")
    p.add_argument("out", help="output .mat path")
    p.add_argument("--n", type=bounded(1, 10_000_000), default=10000, help="number of images (default 10000)")
    p.add_argument("--seed", type=bounded(*SEED_RANGE), default=0)
    p.set_defaults(func=cmd_data_synth)
    p = data_sub.add_parser("prepare", help="fetch SVHN, validate it, store it in the bucket")
    add_config(p)
    p.add_argument(
        "--split",
        action="append",
        choices=["train", "test", "extra"],
        help="split to prepare (repeatable; default: the config's data.prepare_splits)",
    )
    p.add_argument(
        "--from",
        dest="from_",
        metavar="PATH_OR_URL",
        help="take the .mat file from here instead of the official URL (any SVHN-format file)",
    )
    p.add_argument("--force", action="store_true", help="replace a split that is already in the bucket")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="train (or resume) the job on Ray Train")
    add_config(p)
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS, a local `ray start` node, or a new local Ray)",
    )
    add_wait_for_lease(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate a grid PNG from a checkpoint (no Ray needed)")
    p.add_argument("checkpoint", help="s3://... or local path: checkpoint.pt, its folder, or a run folder")
    p.add_argument("--n", type=bounded(1, 4096), default=64, help="number of images (default 64)")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.add_argument(
        "--seed", type=bounded(*SEED_RANGE), default=None, help="noise seed (default: the run's fixed noise)"
    )
    p.add_argument("--scale", type=bounded(1, 16), default=2, help="upscaling of the PNG (default 2)")
    p.add_argument("--config", default=None, help="job YAML whose storage settings to use for s3:// URIs")
    p.add_argument(
        "--endpoint",
        type=endpoint_url,
        default=None,
        help="S3 endpoint URL (default: AWS_ENDPOINT_URL or the dev stack)",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="quality metrics of a checkpoint's generator (no Ray needed)")
    p.add_argument("checkpoint", help="s3://... or local path: checkpoint.pt, its folder, or a run folder")
    p.add_argument(
        "--num-samples",
        type=bounded(2, 1_000_000),
        default=None,
        help="generated images (default: --config's eval.num_samples, else 10000)",
    )
    p.add_argument(
        "--extractors",
        nargs="+",
        choices=["digit", "inception"],
        default=None,
        help="feature extractors (default: --config's eval.extractors, else digit)",
    )
    p.add_argument("--seed", type=bounded(*SEED_RANGE), default=12345, help="noise seed of the evaluated samples")
    p.add_argument(
        "--config",
        default=None,
        help="job YAML whose data, eval and storage settings to use (the checkpoint gives only G's shape)",
    )
    p.add_argument("--endpoint", type=endpoint_url, default=None, help="S3 endpoint URL for s3:// URIs")
    p.set_defaults(func=cmd_eval)

    classifier = sub.add_parser("classifier", help="the digit classifier behind the digit_fd metric")
    classifier_sub = classifier.add_subparsers(dest="classifier_command", required=True)
    p = classifier_sub.add_parser("train", help="train it on the bucket's train split, report test accuracy, store it")
    add_config(p)
    p.set_defaults(func=cmd_classifier_train)

    p = sub.add_parser("tune", help="hyperparameter sensitivity study on Ray Tune (the job's tune: section)")
    add_config(p)
    p.add_argument("--address", default=None, help="Ray cluster address (as for train)")
    add_wait_for_lease(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("paths", help="print where the job's data, run and study live in the bucket")
    add_config(p)
    p.add_argument("name", nargs="?", help="print only this one (e.g. latest_samples, animation, run)")
    p.set_defaults(func=cmd_paths)

    p = sub.add_parser("submit", help="submit the job (or its study) to a cluster's job queue")
    add_config(p)
    p.add_argument("--study", action="store_true", help="submit the job's sensitivity study (dcgan-ray tune)")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--no-queue", action="store_true", help="start at once even where the cluster offers job slots")
    add_wait_for_lease(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "spot-watch", help="on a spot node: drain it for Ray when AWS gives notice, so runs checkpoint in time"
    )
    p.add_argument("--address", required=True, help="the Ray head's GCS address, HEAD_IP:6379")
    p.add_argument("--metadata-url", default="http://169.254.169.254", help="the instance metadata service")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between looks for a notice (default 5)")
    p.set_defaults(func=cmd_spot_watch)

    p = sub.add_parser("jobs", help="list this project's jobs and studies on the cluster")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=cmd_jobs)
