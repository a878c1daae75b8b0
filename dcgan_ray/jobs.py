"""The service: submit training jobs and studies to a cluster's queue, and list them with their state.

`dcgan-ray submit CONFIG` is `ray job submit` made for this project, on Ray's JobSubmissionClient: it
uploads the checkout as the working dir, runs `python -m dcgan_ray train|tune CONFIG --set ...`, names the
submission after the run, and tags it with metadata that `dcgan-ray jobs` reads back. Ray Jobs has no
queue of its own; the queue is a custom resource: the cluster's head offers `dcgan_ray_job_slot` once per
job it runs at a time, every submission's entrypoint asks for one, and the rest wait PENDING in Ray's job
list (and `queued` in run.json) until a slot frees. Ray does not promise an order among pending jobs.
How long a job may wait is the head's RAY_JOB_START_TIMEOUT_SECONDS (`cluster/local.sh up
--queue-timeout`); past it Ray fails the job and `dcgan-ray jobs` says it timed out in the queue.

A run is also reached by its name: `dcgan-ray stop NAME` stops its queued or running job and marks
run.json `stopped` (resubmitting resumes it), `dcgan-ray logs NAME [-f]` shows its newest job's log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgan_ray.config import JobConfig, StorageSection
from dcgan_ray.errors import ClusterError, DcganError, LeaseHeld
from dcgan_ray.storage.layout import RunLayout, study_name, study_prefix, study_report_prefix
from dcgan_ray.storage.lease_status import ownership, release_folder
from dcgan_ray.storage.runs import new_run_manifest, read_run_manifest, write_run_manifest
from dcgan_ray.storage.s3 import Store, parse_s3_uri

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOB_SLOT = "dcgan_ray_job_slot"
"""The custom resource a cluster's head offers once per job it runs at a time (the queue's slots)."""
KIND, RUN, RUN_URI, ENDPOINT = "dcgan_ray.kind", "dcgan_ray.run", "dcgan_ray.run_uri", "dcgan_ray.endpoint"
WORKING_DIR_EXCLUDES = [".venv", ".git", "demo-output", "run-pages", "**/__pycache__", "*.egg-info"]
STATES = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "finished", "FAILED": "failed", "STOPPED": "stopped"}


ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
"""The variables Ray's job and state clients use in place of the address they are given (the first one set)."""
_address_variables_lock = threading.Lock()


class ClusterUnreachable(ClusterError):
    """Ray's job API at `address` does not answer, or is not Ray's; `reason` is the first line of Ray's error."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(
            f"cannot reach Ray's job API at {address} ({reason}): is the cluster up "
            "(`cluster/local.sh status`)? Pass --address or set RAY_API_SERVER_ADDRESS"
        )
        self.address, self.reason = address, reason


def default_address() -> str:
    """The cluster a command without --address talks to, in Ray's own order: RAY_API_SERVER_ADDRESS, then
    RAY_ADDRESS (both as `ray job` reads them), then the local head's job API."""
    return next((os.environ[v] for v in ADDRESS_VARIABLES if os.environ.get(v)), DEFAULT_ADDRESS)


@contextmanager
def _address_wins(address: str) -> Iterator[None]:
    """Around building a Ray job or state client for `address`: the address it is given is the one it uses.

    Ray's `get_address_for_submission_client`, which the constructors of JobSubmissionClient and
    StateApiClient (so also `list_nodes(address=...)`) call, replaces the address by RAY_API_SERVER_ADDRESS,
    else RAY_ADDRESS, so a --address would lose to a variable left over from another cluster. Ray has no
    argument to turn that off; the variables are process-wide, so they are hidden under a lock and put
    back at once."""
    with _address_variables_lock:
        hidden = {v: os.environ.pop(v) for v in ADDRESS_VARIABLES if v in os.environ}
        try:
            yield
        finally:
            os.environ.update(hidden)


def job_client(address: str | None) -> tuple[Any, str]:
    """Ray's JobSubmissionClient for the cluster at `address` (None: `default_address()`), and the job API URL
    it talks to. A given address wins over RAY_API_SERVER_ADDRESS and RAY_ADDRESS. Every command that talks
    to a cluster's job API builds its client here."""
    from ray.job_submission import JobSubmissionClient

    address = address or default_address()
    try:
        with _address_wins(address):
            client = JobSubmissionClient(address)  # asks the job API for its version: raises if none answers
    except (ConnectionError, RuntimeError) as e:
        raise ClusterUnreachable(address, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
    return client, client.get_address()


def _offers_job_slot(address: str) -> bool:
    from ray.util.state import list_nodes

    with _address_wins(address):
        nodes = list_nodes(address=address, detail=True)
    return any(JOB_SLOT in (n.resources_total or {}) for n in nodes)


def _tracked_name(cfg: JobConfig, kind: str) -> tuple[str, str]:
    """(name, URI) of what a submission writes: a run folder, or a study's report."""
    if kind == "tune":
        return study_name(cfg), f"s3://{cfg.storage.bucket}/{study_report_prefix(cfg)}/index.html"
    return cfg.name, RunLayout.of(cfg).uri


def submit(
    cfg: JobConfig,
    config_path: str,
    overrides: list[str],
    kind: str = "train",
    address: str | None = None,
    queue: bool = True,
    wait_for_lease: bool = False,
) -> str:
    """Submit the job (kind train) or study (kind tune); returns the submission id. `config_path` is a job
    YAML in the checkout, or the s3:// URI of a run or study folder (its recorded config). A run or study
    whose lease another live driver holds, on any cluster, is refused unless `wait_for_lease`, which its
    driver then does."""
    client, address = job_client(address)
    if config_path.startswith("s3://"):
        config_arg = config_path
    else:
        path = Path(config_path).resolve()
        if not path.is_relative_to(REPO):
            raise DcganError(
                f"{config_path} is outside the checkout ({REPO}) that is uploaded as the job's working "
                "dir; copy it under jobs/ and submit that"
            )
        config_arg = str(path.relative_to(REPO))
    name, uri = _tracked_name(cfg, kind)
    store = Store(cfg.storage)
    # A queued job that `dcgan-ray stop` stopped stays PENDING in Ray until it would start (see stop_run).
    run = read_run_manifest(store, RunLayout.of(cfg)) if kind == "train" else None
    stopped = run.get("submission_id") if run and run.get("status") == "stopped" else None
    active = [
        j
        for j in client.list_jobs()
        if (j.metadata or {}).get(RUN_URI) == uri
        and j.status.value in ("PENDING", "RUNNING")
        and j.submission_id != stopped
    ]
    if active:
        j = active[0]
        stop = f"dcgan-ray stop {name}" if kind == "train" else f"ray job stop {j.submission_id}"
        raise ClusterError(
            f"{name} already has an active submission {j.submission_id} "
            f"({STATES[j.status.value]}); wait for it, stop it with `{stop}`, or choose another name"
        )
    # Another cluster's driver (or one of this cluster's not submitted from here) holds it: the bucket says so.
    folder = RunLayout.of(cfg).prefix if kind == "train" else study_prefix(cfg)
    held = ownership(store, folder) if cfg.storage.conditional_writes else None
    if held is not None and held.state == "held" and not wait_for_lease:
        raise LeaseHeld(
            f"{name} is being written by {held.describe()} (its lease in the bucket): wait for it to end, stop it, "
            "or submit with --wait-for-lease to queue behind it"
        )
    slot = queue and _offers_job_slot(address)
    if queue and not slot:
        log.warning(
            "the cluster offers no %s resource: the job starts at once instead of queueing "
            "(start the head with `--resources='{\"%s\": 1}'`, as cluster/ does)",
            JOB_SLOT,
            JOB_SLOT,
        )
    entrypoint = shlex.join(
        ["python", "-m", "dcgan_ray", kind, config_arg, *[a for o in overrides for a in ("--set", o)]]
        + (["--wait-for-lease"] if wait_for_lease else [])
    )
    submission_id = client.submit_job(
        entrypoint=entrypoint,
        # (the suffix: two clusters given one run in one second still tell their submissions apart)
        submission_id=f"dcgan-{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}",
        runtime_env={"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES},
        entrypoint_resources={JOB_SLOT: 1} if slot else None,
        metadata={KIND: kind, RUN: name, RUN_URI: uri, ENDPOINT: cfg.storage.endpoint or ""},
    )
    if held is None or held.state != "held":  # (a live holder's run.json stays its own)
        _mark_queued(cfg, kind, submission_id, address)
    return submission_id


def _mark_queued(cfg: JobConfig, kind: str, submission_id: str, address: str) -> None:
    """run.json (study.json) says `queued`, by which submission on which cluster, until the job's driver
    starts: what `dcgan-ray recover` needs to submit it again if that cluster is lost before it starts."""
    store = Store(cfg.storage)
    if kind == "tune":
        from dcgan_ray.study.state import write_study_record

        write_study_record(store, cfg, status="queued", submission_id=submission_id, queued_on=address)
        return
    layout = RunLayout.of(cfg)
    manifest = read_run_manifest(store, layout) or new_run_manifest(cfg, layout)
    manifest.update(status="queued", submission_id=submission_id, queued_on=address)
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
    client, _ = job_client(address)
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
            if (
                run
                and run.get("status") == "queued"
                and run.get("submission_id") == j.submission_id
                and j.status.value in ("FAILED", "STOPPED")
            ):
                # The job ended before its driver started (a queue deadline, `ray job stop` while pending):
                # nothing else will ever update run.json, so say what became of it.
                run = _record_end_in_queue(meta, run, state)
            if run:
                progress = f"{run.get('epochs_completed', 0)}/{run.get('epochs_total', '?')}"
                b = (run.get("checkpoints") or {}).get("best")
                best = f"{b['metric']} {b['value']:.2f}" if b else ""
        rows.append(
            JobRow(
                j.submission_id, meta[KIND], meta.get(RUN, ""), state, progress, best, meta.get(RUN_URI, ""), message
            )
        )
    return rows


def _run_location(meta: dict[str, str]) -> tuple[Store, RunLayout]:
    """The run's store and folder, with the endpoint the job was submitted with and this process's credentials."""
    bucket, prefix = parse_s3_uri(meta[RUN_URI])
    return Store(StorageSection(endpoint=meta.get(ENDPOINT) or None, bucket=bucket)), RunLayout(bucket, prefix)


def _record_end_in_queue(meta: dict[str, str], run: dict[str, Any], state: str) -> dict[str, Any]:
    run["status"] = state
    try:
        write_run_manifest(*_run_location(meta), run)
    except DcganError as e:
        log.warning("cannot mark %s/run.json %s: %s", meta[RUN_URI], state, e)
    return run


def _run_manifest(meta: dict[str, str]) -> dict[str, Any] | None:
    """The run's run.json (see `_run_location`)."""
    try:
        return read_run_manifest(*_run_location(meta))
    except DcganError as e:  # storage unreachable from here: the table still shows Ray's view
        log.warning("cannot read %s/run.json: %s", meta[RUN_URI], e)
        return None


def format_jobs(rows: list[JobRow]) -> str:
    header = ("SUBMISSION", "KIND", "NAME", "STATE", "EPOCH", "BEST", "ARTIFACTS")
    table = [header] + [(r.submission_id, r.kind, r.name, r.state, r.progress, r.best, r.uri) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines += [f"  {r.submission_id}: {r.message}" for r in rows if r.message]
    return "\n".join(lines) if rows else "no dcgan-ray jobs on this cluster"


# --- one run by its name: its submissions, stopping it, its log ------------------------------------------

ACTIVE = ("PENDING", "RUNNING")
STOP_WAIT_S = 120.0
"""How long `stop` waits for Ray to end the job and its training processes (Ray's own stop escalates from
SIGTERM to SIGKILL within seconds)."""


def run_submissions(client: Any, layout: RunLayout, manifest: dict[str, Any] | None) -> list[Any]:
    """The run's Ray jobs, newest first: those `dcgan-ray submit` tagged with the run's URI, and the one
    run.json names (`submission_id`)."""
    named = (manifest or {}).get("submission_id")
    jobs = [
        j
        for j in client.list_jobs()
        if (j.metadata or {}).get(RUN_URI) == layout.uri or (named and j.submission_id == named)
    ]
    # run.json's own submission first: the newest `dcgan-ray submit` of the run, even before Ray has started it.
    return sorted(jobs, key=lambda j: (j.submission_id == named, j.start_time or 0), reverse=True)


def _no_job_message(layout: RunLayout, address: str) -> str:
    return (
        f"no Ray job of the run {layout.uri} on {address}: a run is found by name when `dcgan-ray submit` "
        "submitted it (a job submitted with `ray job submit` goes by its submission id: `ray job logs ID`, "
        "`ray job stop ID`); check --address (or RAY_API_SERVER_ADDRESS) and the run's name"
    )


def stop_run(
    store: Store, layout: RunLayout, address: str | None = None, wait_s: float = STOP_WAIT_S
) -> list[tuple[str, str]]:
    """Stop the run's queued or running job(s), wait until a running one's training processes are gone,
    then mark run.json `stopped` (a resubmission resumes from the last checkpoint). Returns (submission id,
    the state it was stopped in) for each.

    Ray 2.60 cannot end a job that still waits for its job slot: it delivers the stop when the job would
    start, and the job then ends at once, STOPPED, before its entrypoint does anything. Until then Ray
    lists it as PENDING; run.json already says `stopped`, and `submit` lets the run be submitted again."""
    client, address = job_client(address)
    manifest = read_run_manifest(store, layout)
    active = [j for j in run_submissions(client, layout, manifest) if j.status.value in ACTIVE]
    if not active:
        if manifest is None:
            raise DcganError(_no_job_message(layout, address))
        raise DcganError(
            f"the run {layout.uri} has no queued or running job on {address} (run.json says "
            f"{manifest.get('status', '?')}): nothing to stop"
        )
    stopped = []
    for job in active:
        client.stop_job(job.submission_id)
        stopped.append((job.submission_id, STATES[job.status.value]))
    for job in active:
        if client.get_job_status(job.submission_id).value != "PENDING":
            _wait_until_gone(client, address, job, wait_s)
    # Only now: until its workers were gone, rank 0 could still write run.json. The lease goes too, so a
    # resubmission takes the run at once instead of waiting out its ttl; but only the lease of a job this
    # stopped: a driver that took the run over since keeps it, and its run.json.
    ours = {job.submission_id for job in active}
    release_folder(store, layout.prefix, "stopped by dcgan-ray stop", ours)
    holder = ownership(store, layout.prefix).holder
    if holder is not None and holder["holder"].get("submission_id") not in ours:
        log.info("run %s is held by another driver now; its run.json is left to it", layout.uri)
        return stopped
    manifest = read_run_manifest(store, layout)
    if manifest is not None:
        manifest["status"] = "stopped"
        write_run_manifest(store, layout, manifest)
        _refresh_page(store, layout, manifest)
    return stopped


def _wait_until_gone(client: Any, address: str, job: Any, wait_s: float) -> None:
    """Until Ray says the job ended and no actor of it (the Train controller, the workers) is alive; detached
    actors, which live as long as the cluster, do not count."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + wait_s
    while True:
        info = client.get_job_info(job.submission_id)
        ended = info.status.value not in ACTIVE
        # Detached actors outlive the job that created them by design (Ray Train's elastic policy creates
        # Ray Data's cluster-wide AutoscalingCoordinator in the first job that asks for it).
        alive: list[Any] = []
        if ended and info.job_id:
            with _address_wins(address):
                listed = list_actors(
                    address=address, filters=[("job_id", "=", info.job_id), ("state", "=", "ALIVE")], detail=True
                )
            alive = [a for a in listed if not a.is_detached]
        if ended and not alive:
            return
        if time.monotonic() > deadline:
            actors = ", ".join(sorted(f"{a.class_name} (pid {a.pid})" for a in alive))
            raise ClusterError(
                f"asked Ray to stop {job.submission_id}, but after {wait_s:.0f} s it is "
                f"{STATES.get(info.status.value, info.status.value)} with {len(alive)} of its actors "
                f"alive ({actors}); see `ray job status {job.submission_id}` and `ray list actors`"
            )
        time.sleep(0.5)


def _refresh_page(store: Store, layout: RunLayout, manifest: dict[str, Any]) -> None:
    from dcgan_ray.report.run_page import publish_run_page

    try:
        publish_run_page(store, layout, manifest, layout.runs_uri)
    except DcganError as e:
        log.warning("the run page of %s still shows its last epoch's state: %s", layout.uri, e)


def job_logs(store: Store, layout: RunLayout, follow: bool, out: Any, address: str | None = None) -> str:
    """Write the log of the run's newest job to `out` (with `follow`, as it grows, until the job ends);
    returns its submission id."""
    client, address = job_client(address)
    jobs = run_submissions(client, layout, read_run_manifest(store, layout))
    if not jobs:
        raise DcganError(_no_job_message(layout, address))
    submission_id = jobs[0].submission_id
    if not follow:
        out.write(client.get_job_logs(submission_id))
        return submission_id

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return submission_id
