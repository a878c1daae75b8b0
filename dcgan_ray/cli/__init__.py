"""`dcgan-ray` (also `python -m dcgan_ray`): the user's entry point.

  dcgan-ray data synth OUT.mat --n N          offline digits in SVHN's exact .mat format
  dcgan-ray data prepare CONFIG [--from SRC]  SVHN into the bucket (idempotent)
  dcgan-ray train CONFIG [--set k=v ...]      train (or resume) on Ray Train
  dcgan-ray sample CHECKPOINT_URI --out F     a grid from a checkpoint, without Ray
  dcgan-ray eval CHECKPOINT_URI               quality metrics of a checkpoint, without Ray
  dcgan-ray classifier train CONFIG           the digit classifier behind the digit_fd metric
  dcgan-ray tune CONFIG                       a hyperparameter sensitivity study on Ray Tune
  dcgan-ray paths CONFIG [NAME]               where the job's data, run and study live in the bucket
  dcgan-ray submit CONFIG [--study]           queue a training job (or study) on a cluster's job API
  dcgan-ray jobs                              this project's jobs on the cluster: state, epoch, best, URI
  dcgan-ray runs [--status S] [--name GLOB]   every run in the bucket: status, epochs, best, update, submission
  dcgan-ray recover --address URL [NAME ...]  submit every orphaned run and study again (--name GLOB narrows)
  dcgan-ray report NAME [--out DIR]           a run's page (curves, grids, config, timings), written locally
  dcgan-ray stop NAME                         stop a run's queued or running job; resubmitting resumes it
  dcgan-ray logs NAME [-f]                    a run's job log (followed with -f)

runs, report, stop and logs find the bucket and runs folder in --config's storage settings, or in
--runs s3://BUCKET/PREFIX/runs with --endpoint (default AWS_ENDPOINT_URL), else the dev stack's.

Every command that takes CONFIG also takes `--set key=value` overrides. Expected failures print
`error: ...` and exit 2; the message says what to do.
"""

from __future__ import annotations

import argparse
import sys

from dcgan_ray.cli import commands, runs
from dcgan_ray.errors import DcganError, LeaseLost
from dcgan_ray.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcgan-ray", description="Distributed DCGAN on SVHN with Ray and S3.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.add_parsers(sub)
    runs.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)
    except DcganError as e:
        print(f"error: {e.for_job(getattr(args, 'config', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or a driver that lost its lease (see LeaseLost.interrupting)
        if LeaseLost.interrupting is None:
            raise
        print(f"error: {LeaseLost.interrupting}", file=sys.stderr)
        return 2
    return 0
