"""A study's trials: the search space expanded into trials (grids multiply, random forms are drawn
`num_samples` times, every configuration runs with `tune.seeds` seeds), each named by a digest of its
values, and each trial's training job.

Random forms are drawn from a generator seeded by the study's name, and a trial's name is a digest of
its values: a resubmitted study expands the same trials and finds every trial's run folder again.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import numpy as np

from dcgan_ray.config import JobConfig, config_from_dict, set_dotted
from dcgan_ray.storage.layout import study_name, study_trials_prefix


def encode_key(key: str) -> str:
    # Tune flattens nested config keys with '/', and dots read badly in its tables: train.lr -> train__lr.
    return key.replace(".", "__")


def decode_key(key: str) -> str:
    return key.replace("__", ".")


def expand_trials(cfg: JobConfig) -> list[dict[str, Any]]:
    """Every trial of the study, as {"params": {encoded key: value}, "seed": s}: the grid's product, each
    point drawn `num_samples` times for the random forms, each with `tune.seeds` seeds."""
    grid = {k: v["grid"] for k, v in cfg.tune.space.items() if "grid" in v}
    random_forms = {k: v for k, v in cfg.tune.space.items() if "grid" not in v}
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(study_name(cfg).encode()).digest()[:8], "big"))
    points: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        points = [{**p, key: v} for p in points for v in values]
    trials: list[dict[str, Any]] = []
    for point in points:
        for _ in range(cfg.tune.num_samples if random_forms else 1):
            drawn = {key: _draw(rng, spec) for key, spec in random_forms.items()}
            params = {encode_key(k): v for k, v in {**point, **drawn}.items()}
            trials.extend({"params": params, "seed": seed} for seed in range(cfg.tune.seeds))
    return trials


def _draw(rng: np.random.Generator, spec: dict[str, Any]) -> Any:
    form, values = next(iter(spec.items()))
    if form == "choice":
        return values[int(rng.integers(len(values)))]
    if form == "uniform":
        return float(rng.uniform(*values))
    return float(np.exp(rng.uniform(np.log(values[0]), np.log(values[1]))))  # loguniform


def trial_name(trial: dict[str, Any]) -> str:
    """A trial's run name, from its values: the same trial gets the same folder in every run of the study."""
    canonical = json.dumps(
        {"params": {decode_key(k): v for k, v in trial["params"].items()}, "seed": trial["seed"]}, sort_keys=True
    )
    return "t-" + hashlib.sha256(canonical.encode()).hexdigest()[:10]


def trial_job(base: dict[str, Any], trial: dict[str, Any]) -> JobConfig:
    """The training job of one trial: the study's job with the trial's values, seed and run folder."""
    data = copy.deepcopy(base)
    for key, value in trial["params"].items():
        set_dotted(data, decode_key(key), value.item() if hasattr(value, "item") else value)
    data["train"]["seed"] = int(trial["seed"])
    data["name"] = trial_name(trial)
    data["storage"]["runs_prefix"] = study_trials_prefix(config_from_dict(base))
    return config_from_dict(data, f"trial {data['name']}")
