"""Runs and studies that outlived their cluster: found in the bucket, submitted again to another cluster.

A run or study is *orphaned* when
- run.json (study.json) says it is unfinished (`running`, `scoring`) and its lease in the bucket is no
  longer held (`dcgan_ray.storage.lease`): its holder stopped renewing it (the driver and its cluster are
  gone: a lost head, a deleted RayJob cluster) or let it go without finishing; or
- it is `queued` by a submission that the cluster it was queued on no longer has, or that cluster does not
  answer: a head lost with its queue (Ray's job manager does not bring pending jobs back).

`dcgan-ray runs` shows them; `dcgan-ray recover --address URL [NAME ...]` submits each (or the named ones)
to that cluster's queue from the config the bucket records, and each resumes from its newest durable
checkpoint (a study: its trials do). The new drivers take over the expired leases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dcgan_ray.errors import DcganError, StorageError
from dcgan_ray.jobs import STATES, ClusterUnreachable, job_client, submit
from dcgan_ray.report.runs_table import SCAN_THREADS, folders, scan
from dcgan_ray.storage import checks
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.lease_status import ownership
from dcgan_ray.storage.runs import load_job, read_run_manifest
from dcgan_ray.storage.s3 import Store

log = logging.getLogger(__name__)

UNFINISHED = ("running", "scoring")


@dataclass
class Orphan:
    kind: str  # "train" (a run) or "tune" (a study)
    name: str
    uri: str  # its folder, whose recorded config is submitted again
    why: str


def orphaned(store: Store, folder: str, record: dict[str, Any]) -> str | None:
    """Why the run or study in `folder`, whose run.json / study.json is `record`, is orphaned; None if not."""
    status = record.get("status")
    if status in UNFINISHED:
        held = ownership(store, folder)
        if held.status_of(record) not in UNFINISHED:  # the log says it ended; run.json is a stale driver's
            return None
        if held.state == "expired":
            return f"its driver has not renewed its lease for {held.age_s:.0f} s (its cluster is gone)"
        if held.state == "released":
            return "its driver let its lease go before it finished"
    if status == "queued" and isinstance(record.get("queued_on"), str) and isinstance(record.get("submission_id"), str):
        return queued_job_gone(record["queued_on"], record["submission_id"])
    return None


def queued_job_gone(address: str, submission_id: str) -> str | None:
    """Why a submission queued on the cluster at `address` will never start; None while it may."""
    try:
        client, _ = job_client(address)
        status = client.get_job_status(submission_id).value
    except ClusterUnreachable as e:
        return f"the cluster it was queued on ({address}) does not answer ({e.reason[:120]})"
    except (ConnectionError, RuntimeError, ValueError) as e:
        text = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        if "does not exist" in text or "not found" in text.lower():
            return f"the cluster it was queued on ({address}) no longer has submission {submission_id}"
        return f"the cluster it was queued on ({address}) does not answer ({text})"
    if status not in ("PENDING", "RUNNING"):
        return f"its submission {submission_id} ended {STATES.get(status, status)} on {address} before it started"
    return None


def find_orphans(
    store: Store,
    runs_prefix: str,
    studies_prefix: str | None,
    name_glob: str | None = None,
    threads: int = SCAN_THREADS,
) -> list[Orphan]:
    """Every orphaned run under `runs_prefix` and study under `studies_prefix` (only those named like
    `name_glob`, told from the folder names), by name; `threads` folders read at once (`runs_table.scan`)."""
    runs = folders(store, runs_prefix, name_glob)
    orphans = scan(lambda name: _orphaned_run(store, f"{runs_prefix.strip('/')}/{name}", name), runs, threads)
    if studies_prefix:
        studies = folders(store, studies_prefix, name_glob)
        orphans += scan(lambda name: _orphaned_study(store, f"{studies_prefix}/{name}", name), studies, threads)
    return [o for o in orphans if o is not None]


def _orphaned_run(store: Store, folder: str, name: str) -> Orphan | None:
    layout = RunLayout(store.bucket, folder)
    try:
        manifest = read_run_manifest(store, layout)
    except StorageError as e:  # a damaged or planted run.json: `dcgan-ray runs` names it
        log.warning("%s", e)
        return None
    why = orphaned(store, layout.prefix, manifest) if manifest else None
    return Orphan("train", name, layout.uri, why) if why else None


def _orphaned_study(store: Store, folder: str, name: str) -> Orphan | None:
    record = _study_record(store, folder)
    why = orphaned(store, folder, record) if record else None
    return Orphan("tune", name, store.uri(folder), why) if why else None


def _study_record(store: Store, folder: str) -> dict[str, Any] | None:
    try:
        return checks.mapping(checks.parse_json(store.get_bytes(f"{folder}/study.json")), "study.json")
    except (StorageError, checks.NotOurs):
        return None


def recover(store: Store, orphans: list[Orphan], address: str | None) -> list[tuple[Orphan, str]]:
    """Submit each orphan to the cluster at `address` from its recorded config, read through this store's
    endpoint (which the job is given too); its driver takes the expired lease over. Returns (orphan,
    submission id) for each."""
    sets = [f"storage.endpoint={store.cfg.endpoint or 'null'}"]
    submitted = []
    for orphan in orphans:
        submission_id = submit(load_job(orphan.uri, sets), orphan.uri, sets, orphan.kind, address, wait_for_lease=True)
        log.info("%s %s (%s): submitted again as %s", orphan.kind, orphan.name, orphan.why, submission_id)
        submitted.append((orphan, submission_id))
    return submitted


def pick(orphans: list[Orphan], names: list[str]) -> list[Orphan]:
    """The orphans named (all of them when none is); a name that is not orphaned is an error saying why."""
    if not names:
        return orphans
    by_name = {o.name: o for o in orphans}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DcganError(
            f"{', '.join(missing)}: not orphaned (finished, held by a live driver, queued on a cluster that has it, "
            "or not in this bucket); `dcgan-ray runs` shows each run's status and lease"
        )
    return [by_name[n] for n in names]
