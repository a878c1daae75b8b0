"""What the commands share: argparse helpers, and where the run commands find the bucket."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from dcgan_ray.config import JobConfig, StorageSection, load_config, read_job_file
from dcgan_ray.config.rules import is_http_url
from dcgan_ray.errors import ConfigError, DcganError

if TYPE_CHECKING:  # the commands import what they need when they run: `dcgan-ray --help` stays quick
    from dcgan_ray.storage.layout import RunLayout
    from dcgan_ray.storage.s3 import Store

ADDRESS_HELP = (
    "Ray job API URL; it wins over the environment (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, "
    "else http://127.0.0.1:8265)"
)


def add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", help="job YAML, e.g. jobs/svhn.yaml, or the s3:// URI of a run or study folder (its recorded config)"
    )
    add_overrides(p, "override a config value, e.g. --set train.epochs=2 (repeatable)")


def add_wait_for_lease(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait-for-lease",
        action="store_true",
        help="where another driver (on any cluster) holds the run's or study's lease in the bucket, wait for it to "
        "end or expire instead of stopping (a retried RayJob, a readmitted Kueue job)",
    )


def bounded(low: int, high: int):
    """An argparse type: an integer in [low, high] (argparse prints the one-line error and exits 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high}]")
        return value

    return parse


def endpoint_url(text: str) -> str:
    if not is_http_url(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s):// URL, e.g. http://127.0.0.1:8333")
    return text


SEED_RANGE = (0, 2**32 - 1)


def run_name(text: str) -> str:
    """An argparse type: a run name as the config's `name` allows (it becomes a key in the bucket)."""
    from dcgan_ray.config.rules import NAME_RULE, is_name

    if not is_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a run name ({NAME_RULE})")
    return text


def submission(config: str, overrides: list[str]) -> dict[str, Any]:
    """What run.json and study.json record as submitted: the job file's content (`extends` merged, no
    comments; no config key holds a secret) or the bucket folder it came from, and the overrides."""
    from dcgan_ray.train.runlock import current_submission_id

    content = None if config.startswith("s3://") else read_job_file(config)
    return {
        "config": config,
        "content": content,
        "overrides": list(overrides),
        "submission_id": current_submission_id(),
    }


def storage_for_uri(args: argparse.Namespace) -> StorageSection:
    """Storage settings for a bare URI: --config's, else --endpoint / AWS_ENDPOINT_URL, else the dev stack's."""
    storage = load_config(args.config).storage if args.config else StorageSection()
    endpoint = args.endpoint or (None if args.config else os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        storage.endpoint = endpoint
    return storage


def runs_location(args: argparse.Namespace) -> tuple[StorageSection, str]:
    """(storage settings, runs folder key) of the run commands: --runs, else --config's, else the dev stack's."""
    from dcgan_ray.storage.layout import runs_prefix
    from dcgan_ray.storage.s3 import parse_s3_uri

    if args.overrides and not args.config:
        raise ConfigError("--set changes --config's settings: give --config too (e.g. --config jobs/svhn.yaml)")
    cfg = load_config(args.config, args.overrides) if args.config else JobConfig()
    storage = cfg.storage if args.config else storage_for_uri(args)
    if args.endpoint:
        storage.endpoint = args.endpoint
    if args.runs:
        storage.bucket, prefix = parse_s3_uri(args.runs)
        if not prefix:
            raise DcganError(
                f"--runs {args.runs} names no folder: give the runs folder, e.g. "
                f"s3://{storage.bucket}/{cfg.storage.prefix}/runs"
            )
        return storage, prefix
    return storage, runs_prefix(cfg)


def run_layout(args: argparse.Namespace) -> tuple[Store, RunLayout]:
    from dcgan_ray.storage.layout import RunLayout
    from dcgan_ray.storage.s3 import Store

    storage, prefix = runs_location(args)
    return Store(storage), RunLayout(storage.bucket, f"{prefix}/{args.name}")


def add_runs_location(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="job YAML whose storage settings (bucket, prefix, endpoint) to use")
    add_overrides(p, "override --config's values, e.g. --set storage.endpoint=null for AWS (repeatable)")
    p.add_argument("--runs", default=None, metavar="S3_URI", help="the runs folder, e.g. s3://BUCKET/PREFIX/runs")
    p.add_argument(
        "--endpoint",
        type=endpoint_url,
        default=None,
        help="S3 endpoint URL (default: --config's, else AWS_ENDPOINT_URL, else the dev stack's)",
    )
