"""The commands of runs found by name in the bucket: runs, report, stop, logs, and recover (the runs and
studies that outlived their cluster)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcgan_ray.cli.options import ADDRESS_HELP, add_runs_location, run_layout, run_name, runs_location
from dcgan_ray.report.runs_table import STATUSES, format_runs, list_runs


def cmd_runs(args: argparse.Namespace) -> None:
    from dcgan_ray.recovery import orphaned
    from dcgan_ray.storage.s3 import Store

    storage, prefix = runs_location(args)
    store = Store(storage)
    store.check()
    rows = list_runs(store, prefix, orphaned, set(args.status) if args.status else None, args.name_glob)
    where = f"s3://{storage.bucket}/{prefix}"
    if args.status or args.name_glob:  # (the first line says what the table leaves out)
        where += f" (status {','.join(args.status or STATUSES)}, name {args.name_glob or '*'})"
    print(format_runs(rows, where))


def cmd_recover(args: argparse.Namespace) -> None:
    from dcgan_ray.recovery import find_orphans, pick, recover
    from dcgan_ray.storage.s3 import Store

    storage, prefix = runs_location(args)
    store = Store(storage)
    store.check()
    # The studies sit beside the runs folder (<prefix>/runs, <prefix>/studies).
    studies = f"{prefix.rsplit('/', 1)[0]}/studies" if prefix.endswith("runs") and "/" in prefix else None
    orphans = pick(find_orphans(store, prefix, studies, args.name_glob), args.names)
    if not orphans:
        named = f" named {args.name_glob}" if args.name_glob else ""
        print(
            f"nothing to recover: no run under s3://{storage.bucket}/{prefix} (nor study beside it){named} is orphaned"
        )
        return
    for orphan, submission_id in recover(store, orphans, args.address):
        kind = "study" if orphan.kind == "tune" else "run"
        print(f"{kind} {orphan.name} ({orphan.why}): submitted again as {submission_id}")


def cmd_report(args: argparse.Namespace) -> None:
    from dcgan_ray.report.run_page import download_run_page

    store, layout = run_layout(args)
    store.check()
    out = Path(args.out or Path("run-pages") / args.name)
    index = download_run_page(store, layout, out, layout.runs_uri)
    print(
        f"run page of {layout.uri}: {index}  (open it in a browser; the copy in the bucket: "
        f"s3://{layout.bucket}/{layout.report_key})"
    )


def cmd_stop(args: argparse.Namespace) -> None:
    from dcgan_ray.jobs import stop_run

    store, layout = run_layout(args)
    for submission_id, state in stop_run(store, layout, args.address):
        print(f"stopped {submission_id} ({state})")
    print(f"{layout.uri}/run.json: stopped; submit the same job again to resume it from its last checkpoint")


def cmd_logs(args: argparse.Namespace) -> None:
    from dcgan_ray.jobs import job_logs

    store, layout = run_layout(args)
    job_logs(store, layout, args.follow, sys.stdout, args.address)


def statuses(text: str) -> list[str]:
    """An argparse type: one status of a run, or several comma-separated."""
    given = [s.strip() for s in text.split(",")]
    wrong = [s for s in given if s not in STATUSES]
    if wrong:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, wrong))} is not a status; give one or more of {', '.join(STATUSES)} "
            "(repeat --status or separate them with commas)"
        )
    return given


def add_name_glob(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--name",
        dest="name_glob",
        default=None,
        metavar="GLOB",
        help=f"only {what} whose name matches this pattern (*, ?, [...]), e.g. 'race-*'",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list every run in the bucket from its run.json")
    add_runs_location(p)
    p.add_argument(
        "--status",
        action="extend",
        type=statuses,
        default=None,
        metavar="STATUS",
        help=f"only runs with this status: {', '.join(STATUSES)} (repeatable, or comma-separated)",
    )
    add_name_glob(p, "runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("report", help="write a run's page (curves, grids, config, timings) locally")
    p.add_argument("name", type=run_name, help="the run's name (the job's `name`)")
    add_runs_location(p)
    p.add_argument("--out", default=None, help="folder to write it to (default run-pages/NAME)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("stop", help="stop a run's queued or running job and mark it stopped (resubmit to resume)")
    p.add_argument("name", type=run_name, help="the run's name (the job's `name`)")
    add_runs_location(p)
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser(
        "recover", help="submit every orphaned run and study (or those named) again, each from its last checkpoint"
    )
    p.add_argument("names", nargs="*", type=run_name, metavar="NAME", help="only these runs or studies")
    add_runs_location(p)
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    add_name_glob(p, "runs and studies")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("logs", help="show the log of a run's newest job")
    p.add_argument("name", type=run_name, help="the run's name (the job's `name`)")
    p.add_argument("-f", "--follow", action="store_true", help="follow the log until the job ends")
    add_runs_location(p)
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=cmd_logs)
