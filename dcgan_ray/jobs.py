"""The service: submit training jobs and studies to a cluster's queue, and list them with their state.

`dcgan-ray submit CONFIG` is `ray job submit` made for this project, on Ray's JobSubmissionClient: it
uploads the checkout as the working dir, runs `python -m dcgan_ray train|tune CONFIG --set ...`, names the
submission after the run, and tags it with metadata that `dcgan-ray jobs` reads back. Ray Jobs has no
queue of its own; the queue is a custom resource: the cluster's head offers `dcgan_ray_job_slot` once per
job it runs at a time, every submission's entrypoint asks for one, and the rest wait PENDING in Ray's job
list (and `queued` in run.json) until a slot frees. Ray does not promise an order among pending jobs.
How long a job may wait is the head's RAY_JOB_START_TIMEOUT_SECONDS (`cluster/local.sh up
--queue-timeout`); past it Ray fails the job and `dcgan-ray jobs` says it timed out in the queue.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgan_ray.config import JobConfig, StorageConfig
from dcgan_ray.errors import ClusterError, DcganError
from dcgan_ray.storage.layout import RunLayout, study_name, study_report_prefix
from dcgan_ray.storage.runs import new_run_manifest, read_run_manifest, write_run_manifest
from dcgan_ray.storage.s3 import Store, parse_s3_uri

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOB_SLOT = "dcgan_ray_job_slot"
"""The custom resource a cluster's head offers once per job it runs at a time (the queue's slots)."""
KIND, RUN, RUN_URI, ENDPOINT = "dcgan_ray.kind", "dcgan_ray.run", "dcgan_ray.run_uri", "dcgan_ray.endpoint"
WORKING_DIR_EXCLUDES = [".venv", ".git", "demo-output", "**/__pycache__", "*.egg-info"]
STATES = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "finished", "FAILED": "failed", "STOPPED": "stopped"}


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address), address
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(f"cannot reach Ray's job API at {address} ({str(e).splitlines()[0][:200]}): is the "
                           "cluster up (`cluster/local.sh status`)? Pass --address or set RAY_API_SERVER_ADDRESS") from None


def _offers_job_slot(address: str) -> bool:
    from ray.util.state import list_nodes

    return any(JOB_SLOT in (n.resources_total or {}) for n in list_nodes(address=address, detail=True))


def _tracked_name(cfg: JobConfig, kind: str) -> tuple[str, str]:
    """(name, URI) of what a submission writes: a run folder, or a study's report."""
    if kind == "tune":
        return study_name(cfg), f"s3://{cfg.storage.bucket}/{study_report_prefix(cfg)}/index.html"
    return cfg.name, RunLayout.of(cfg).uri


def submit(cfg: JobConfig, config_path: str, overrides: list[str], kind: str = "train",
           address: str | None = None, queue: bool = True) -> str:
    """Submit the job (kind train) or study (kind tune); returns the submission id."""
    client, address = _client(address)
    path = Path(config_path).resolve()
    if not path.is_relative_to(REPO):
        raise DcganError(f"{config_path} is outside the checkout ({REPO}) that is uploaded as the job's working "
                         "dir; copy it under jobs/ and submit that")
    name, uri = _tracked_name(cfg, kind)
    active = [j for j in client.list_jobs() if (j.metadata or {}).get(RUN_URI) == uri
              and j.status.value in ("PENDING", "RUNNING")]
    if active:
        j = active[0]
        raise ClusterError(f"{name} already has an active submission {j.submission_id} "
                           f"({STATES[j.status.value]}); wait for it, stop it with `ray job stop "
                           f"{j.submission_id}`, or choose another name")
    slot = queue and _offers_job_slot(address)
    if queue and not slot:
        log.warning("the cluster offers no %s resource: the job starts at once instead of queueing "
                    "(start the head with `--resources='{\"%s\": 1}'`, as cluster/ does)", JOB_SLOT, JOB_SLOT)
    entrypoint = shlex.join(["python", "-m", "dcgan_ray", kind, str(path.relative_to(REPO)),
                             *[a for o in overrides for a in ("--set", o)]])
    submission_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"dcgan-{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}",
        runtime_env={"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES},
        entrypoint_resources={JOB_SLOT: 1} if slot else None,
        metadata={KIND: kind, RUN: name, RUN_URI: uri, ENDPOINT: cfg.storage.endpoint or ""},
    )
    if kind == "train":
        _mark_queued(cfg, submission_id)
    return submission_id


def _mark_queued(cfg: JobConfig, submission_id: str) -> None:
    """run.json says `queued` (and by which submission) until the job's driver starts training."""
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    manifest = read_run_manifest(store, layout) or new_run_manifest(cfg, layout)
    manifest.update(status="queued", submission_id=submission_id)
    write_run_manifest(store, layout, manifest)


@dataclass
class JobRow:
    submission_id: str
    kind: str
    name: str
    state: str
    progress: str
    best: str
    uri: str
    message: str


def list_jobs(address: str | None = None) -> list[JobRow]:
    """This project's submissions, newest first, with their run's epoch and best metric from run.json."""
    client, _ = _client(address)
    rows = []
    for j in sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True):
        meta = j.metadata or {}
        if KIND not in meta:
            continue
        state = STATES.get(j.status.value, j.status.value.lower())
        message = (j.message or "").splitlines()[0][:160] if j.status.value in ("FAILED", "STOPPED") else ""
        if "failed to start within" in message:
            state, message = "failed", f"timed out in the queue: {message}"
        progress = best = ""
        if meta[KIND] == "train":
            run = _run_manifest(meta)
            if run and run.get("status") == "queued" and run.get("submission_id") == j.submission_id \
                    and j.status.value in ("FAILED", "STOPPED"):
                # The job ended before its driver started (a queue deadline, `ray job stop` while pending):
                # nothing else will ever update run.json, so say what became of it.
                run = _record_end_in_queue(meta, run, state)
                progress = f"{run.get('epochs_completed', 0)}/{run.get('epochs_total', '?')}"
                b = (run.get("checkpoints") or {}).get("best")
                best = f"{b['metric']} {b['value']:.2f}" if b else ""
        rows.append(JobRow(j.submission_id, meta[KIND], meta.get(RUN, ""), state, progress, best,
                           meta.get(RUN_URI, ""), message))
    return rows


def _record_end_in_queue(meta: dict[str, str], run: dict[str, Any], state: str) -> dict[str, Any]:
    bucket, prefix = parse_s3_uri(meta[RUN_URI])
    run["status"] = state
    try:
        write_run_manifest(Store(StorageConfig(endpoint=meta.get(ENDPOINT) or None, bucket=bucket)),
                           RunLayout(bucket, prefix), run)
    except DcganError as e:
        log.warning("cannot mark %s/run.json %s: %s", meta[RUN_URI], state, e)
    return run


def _run_manifest(meta: dict[str, str]) -> dict[str, Any] | None:
    """The run's run.json, read with the endpoint the job was submitted with and this process's credentials."""
    bucket, prefix = parse_s3_uri(meta[RUN_URI])
    try:
        return read_run_manifest(Store(StorageConfig(endpoint=meta.get(ENDPOINT) or None, bucket=bucket)),
                                 RunLayout(bucket, prefix))
    except DcganError as e:  # storage unreachable from here: the table still shows Ray's view
        log.warning("cannot read %s/run.json: %s", meta[RUN_URI], e)
        return None


def format_jobs(rows: list[JobRow]) -> str:
    header = ("SUBMISSION", "KIND", "NAME", "STATE", "EPOCH", "BEST", "ARTIFACTS")
    table = [header] + [(r.submission_id, r.kind, r.name, r.state, r.progress, r.best, r.uri) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines += [f"  {r.submission_id}: {r.message}" for r in rows if r.message]
    return "\n".join(lines) if rows else "no dcgan-ray jobs on this cluster"
