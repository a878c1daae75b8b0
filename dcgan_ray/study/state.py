"""A study's state.json: which trials ended, and how (what makes a resubmitted study skip finished ones).

Plain JSON in a shared bucket, never code: every field read back is checked (`check_study_state`).
"""

from __future__ import annotations

import json
from typing import Any

from dcgan_ray.config import JobConfig
from dcgan_ray.errors import ObjectMissing, StorageError
from dcgan_ray.storage import checks
from dcgan_ray.storage.layout import study_state_key
from dcgan_ray.storage.s3 import Store

ENDED = ("TERMINATED", "ERROR")


def read_study_state(store: Store, cfg: JobConfig) -> dict[str, dict[str, Any]]:
    """state.json's trials, {name: {"state": TERMINATED|ERROR, "error": str|None}}; {} for a new study.
    Checked field by field (`check_study_state`): it is plain JSON in a shared bucket, never code."""
    key = study_state_key(cfg)
    try:
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


def write_study_state(store: Store, cfg: JobConfig, trials: dict[str, dict[str, Any]]) -> None:
    body = json.dumps({"version": 1, "trials": trials}, indent=1, sort_keys=True).encode()
    store.put_bytes(study_state_key(cfg), body, "application/json")
