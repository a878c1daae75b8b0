"""`dcgan-ray runs`: every run under a runs folder, from its run.json and its lease (no Ray needed).

One row per run: status, epochs done of the total, the best checkpoint's metric, when run.json was last
written, the submission that queued it (`dcgan-ray submit` records it), and its lease in the bucket: who
holds it and how long ago it was renewed, or that it expired or was released. Newest update first. A
caller that can tell orphaned runs (`dcgan_ray.recovery`) passes `orphaned`: their status reads
`orphaned`, and a line under the table says why.

Each run costs a few small requests (run.json, the lease log's listing and entries), so a listing waits on
request latency, not bandwidth: the runs are read `SCAN_THREADS` at a time (`scan`, which `recover`'s search
for orphans uses too), and a name pattern narrows the folders before any run is read.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from dcgan_ray.errors import StorageError
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.lease_status import ownership
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store

STATUSES = ("running", "finished", "failed", "stopped", "queued", "scoring", "orphaned", "unreadable")
"""What a row's status reads: run.json's (or its lease log's end state), `orphaned`, or `unreadable`."""

SCAN_THREADS = 10
"""Runs read at once (~10 ms a run on loopback, tens of ms on a cloud S3, nearly all of it waiting). 10 is
botocore's connection pool of one client (`max_pool_connections`), which every thread shares: more threads
would open a connection per request and throw it away (urllib3 warns "Connection pool is full")."""

T = TypeVar("T")


def folders(store: Store, prefix: str, name_glob: str | None = None) -> list[str]:
    """The names of the folders right under `prefix` (one listing), only those that match `name_glob`
    (`fnmatch`'s *, ?, [...], case-sensitive as keys are) when given."""
    names = store.list_folders(f"{prefix.strip('/')}/")
    return names if name_glob is None else [n for n in names if fnmatch.fnmatchcase(n, name_glob)]


def scan(read: Callable[[str], T], names: list[str], threads: int = SCAN_THREADS) -> list[T]:
    """`read(name)` for every name, `threads` at a time, in the names' order. The reads share one Store:
    boto3's clients are thread-safe once made, and the caller's listing (`folders`) made it. An exception
    from a read is raised here, after the reads in flight end; the ones not started are dropped."""
    if threads <= 1 or len(names) <= 1:
        return [read(name) for name in names]
    pool = ThreadPoolExecutor(min(threads, len(names)), thread_name_prefix="scan")
    try:
        return list(pool.map(read, names))
    finally:
        pool.shutdown(cancel_futures=True)


@dataclass
class RunRow:
    name: str
    status: str
    epochs: str
    best: str
    updated: str
    submission: str
    lease: str = ""
    why: str = ""  # why it is orphaned


def list_runs(
    store: Store,
    runs_prefix: str,
    orphaned: Callable[[Store, str, dict[str, Any]], str | None] | None = None,
    statuses: Collection[str] | None = None,
    name_glob: str | None = None,
    threads: int = SCAN_THREADS,
) -> list[RunRow]:
    """The rows of the runs under `runs_prefix`, newest update first: only those named like `name_glob` (told
    from the folder names, before any run is read) whose status is one of `statuses`, when given."""
    prefix = runs_prefix.strip("/")
    rows = scan(lambda name: run_row(store, prefix, name, orphaned), folders(store, prefix, name_glob), threads)
    kept = [r for r in rows if r is not None and (statuses is None or r.status in statuses)]
    return sorted(kept, key=lambda r: r.updated, reverse=True)


def run_row(
    store: Store, runs_prefix: str, name: str, orphaned: Callable[[Store, str, dict[str, Any]], str | None] | None
) -> RunRow | None:
    """The row of run `name`; None for a folder without run.json (not a run, or one whose driver never
    started)."""
    layout = RunLayout(store.bucket, f"{runs_prefix}/{name}")
    try:
        m = read_run_manifest(store, layout)
        held = ownership(store, layout.prefix)
    except StorageError as e:  # a damaged or planted run.json or lease entry: say so in its row, list the others
        return RunRow(name, "unreadable", "", str(e).split(" (", 1)[0][:80], "", "")
    if m is None:
        return None
    best = m.get("checkpoints", {}).get("best")
    why = (orphaned(store, layout.prefix, m) if orphaned else None) or ""
    return RunRow(
        name,
        "orphaned" if why else held.status_of(m),
        f"{m.get('epochs_completed', 0)}/{m.get('epochs_total', '?')}",
        f"{best['metric']} {best['value']:.2f} @{best['epoch']}" if best else "",
        str(m.get("updated", "")),
        str(m.get("submission_id") or ""),
        held.describe() if held.state != "none" else "",
        why,
    )


def format_runs(rows: list[RunRow], where: str) -> str:
    if not rows:
        return f"no runs under {where}"
    header = ("NAME", "STATUS", "EPOCHS", "BEST", "UPDATED", "SUBMISSION", "LEASE")
    table = [header] + [(r.name, r.status, r.epochs, r.best, r.updated, r.submission, r.lease) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    orphans = [f"  {r.name}: orphaned: {r.why}" for r in rows if r.why]
    if orphans:
        orphans.append("  submit them again, each resuming from its last checkpoint: dcgan-ray recover --address URL")
    return "\n".join([f"runs under {where}:", *lines, *orphans])
