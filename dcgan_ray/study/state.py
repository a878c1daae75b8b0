"""A study's records in the bucket: which trials ended, and how (what makes a resubmitted study skip
finished ones), and the study itself (study.json: its status, config and submission, what `dcgan-ray
recover` submits again).

Which trials ended is committed to the study's lease log (`dcgan_ray.storage.lease`) before state.json,
its readable copy, is written: a driver that lost the study has that commit refused. Plain JSON in a
shared bucket, never code: every field read back is checked (`check_study_state`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from dcgan_ray.config import JobConfig
from dcgan_ray.errors import ObjectMissing, StorageError
from dcgan_ray.storage import checks
from dcgan_ray.storage.layout import study_record_key, study_state_key
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.s3 import Store

ENDED = ("TERMINATED", "ERROR")


def read_study_state(store: Store, cfg: JobConfig, lease: Lease | None = None) -> dict[str, dict[str, Any]]:
    """The ended trials, {name: {"state": TERMINATED|ERROR, "error": str|None}}; {} for a new study: the
    newest commit in the lease log, else (a study from before the lease) state.json. Checked field by field
    (`check_study_state`): it is plain JSON in a shared bucket, never code."""
    key = study_state_key(cfg)
    committed = [c for c in (lease.state.commits if lease is not None else []) if "study_state" in c]
    try:
        if committed:
            return check_study_state(committed[-1]["study_state"])
        return check_study_state(checks.parse_json(store.get_bytes(key)))
    except ObjectMissing:
        return {}
    except checks.NotOurs as e:
        raise StorageError(
            f"{store.uri(key)} is not a study state this project wrote ({e}); delete it to run "
            "every trial of the study again (finished trials are then reported from their run "
            "folders)"
        ) from None


def check_study_state(state: Any) -> dict[str, dict[str, Any]]:
    state = checks.mapping(state, "the state")
    if state.get("version") != 1:
        raise checks.NotOurs(f"its version is {state.get('version')!r}, this code reads 1")
    trials = checks.mapping(state.get("trials"), "trials")
    for name, trial in trials.items():
        what = checks.member("trials", name)
        checks.mapping(trial, what)
        if trial.get("state") not in ENDED:
            raise checks.NotOurs(f"{what}.state is not one of {', '.join(ENDED)}")
        if trial.get("error") is not None:
            checks.text(trial["error"], f"{what}.error")
    return trials


def write_study_state(
    store: Store, cfg: JobConfig, trials: dict[str, dict[str, Any]], lease: Lease | None = None
) -> None:
    state = {"version": 1, "trials": trials}
    if lease is not None:
        lease.commit({"study_state": state})
    store.put_bytes(study_state_key(cfg), json.dumps(state, indent=1, sort_keys=True).encode(), "application/json")


def read_study_record(store: Store, cfg: JobConfig) -> dict[str, Any] | None:
    """study.json, checked; None for a study never submitted or run since it existed."""
    key = study_record_key(cfg)
    try:
        record = checks.mapping(checks.parse_json(store.get_bytes(key)), "the record")
        checks.text(record.get("status"), "status", 64)
        checks.mapping(record.get("config"), "config")
        return record
    except ObjectMissing:
        return None
    except checks.NotOurs as e:
        raise StorageError(f"{store.uri(key)} is not a study record this project wrote ({e}); delete it") from None


def write_study_record(store: Store, cfg: JobConfig, **fields: Any) -> None:
    """Update study.json with `fields` (status, submission_id, queued_on, submitted); the config always."""
    record = {**(read_study_record(store, cfg) or {}), **fields, "config": cfg.to_dict()}
    record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.put_bytes(study_record_key(cfg), json.dumps(record, indent=1).encode(), "application/json")
