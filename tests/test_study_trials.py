"""A study's trials are expanded and named by this project, so a resubmitted study finds them again without
reading Tune's pickled state; its own state.json is checked before use (no Ray cluster; the real SeaweedFS)."""

from __future__ import annotations

import json
import re

import pytest

from dcgan_ray.config import config_from_dict
from dcgan_ray.errors import StorageError
from dcgan_ray.storage.layout import study_state_key
from dcgan_ray.study.state import read_study_state, write_study_state
from dcgan_ray.study.trials import expand_trials, trial_name


def study(cfg, **tune):
    data = cfg.to_dict()
    data["tune"] = {"study": "s", **tune}
    return config_from_dict(data)


def test_grids_multiply_random_forms_draw_and_seeds_repeat(cfg):
    c = study(
        cfg,
        seeds=2,
        num_samples=3,
        space={
            "train.lr": {"grid": [1e-4, 2e-4]},
            "model.alpha": {"uniform": [0.1, 0.3]},
            "train.beta1": {"choice": [0.5, 0.9]},
            "train.lr_d": {"loguniform": [1e-5, 1e-3]},
        },
    )
    trials = expand_trials(c)
    assert len(trials) == 2 * 3 * 2
    assert {t["params"]["train__lr"] for t in trials} == {1e-4, 2e-4}
    assert all(
        0.1 <= t["params"]["model__alpha"] <= 0.3
        and t["params"]["train__beta1"] in (0.5, 0.9)
        and 1e-5 <= t["params"]["train__lr_d"] <= 1e-3
        for t in trials
    )
    assert len({t["params"]["model__alpha"] for t in trials}) == 6  # a fresh draw per sample, shared by seeds
    # The same study draws the same values and names every time; another study draws others.
    assert expand_trials(c) == trials
    names = [trial_name(t) for t in trials]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"t-[0-9a-f]{10}", n) for n in names)
    other = expand_trials(study(cfg, study="other", seeds=2, num_samples=3, space=c.tune.space))
    assert [t["params"]["model__alpha"] for t in other] != [t["params"]["model__alpha"] for t in trials]


def test_a_grid_only_study_is_the_grid_times_the_seeds(cfg):
    trials = expand_trials(study(cfg, seeds=3, space={"train.lr": {"grid": [1e-4, 2e-4]}}))
    assert sorted((t["params"]["train__lr"], t["seed"]) for t in trials) == [
        (1e-4, 0),
        (1e-4, 1),
        (1e-4, 2),
        (2e-4, 0),
        (2e-4, 1),
        (2e-4, 2),
    ]


def test_the_study_state_round_trips(cfg, store):
    c = study(cfg, space={"train.lr": {"grid": [1e-4]}})
    assert read_study_state(store, c) == {}
    state = {"t-0123456789": {"state": "TERMINATED", "error": None}, "t-abcdefabcd": {"state": "ERROR", "error": "x"}}
    write_study_state(store, c, state)
    assert read_study_state(store, c) == state


@pytest.mark.parametrize(
    "body",
    [
        b"\x80\x04K\x01.",  # a pickle
        b"[]",
        b'{"version": 2, "trials": {}}',
        b'{"version": 1, "trials": []}',
        b'{"version": 1, "trials": {"t-1": {"state": "RUNNING", "error": null}}}',
        b'{"version": 1, "trials": {"t-1": {"state": "ERROR", "error": 5}}}',
        b'{"version": 1, "trials": {"t-1": "TERMINATED"}}',
    ],
)
def test_a_study_state_this_project_did_not_write_is_refused_in_one_line(cfg, store, body):
    c = study(cfg, space={"train.lr": {"grid": [1e-4]}})
    store.put_bytes(study_state_key(c), body)
    with pytest.raises(
        StorageError,
        match=r"s3://.*/studies/s/state\.json is not a study state this project "
        r"wrote \(.*\); delete it to run every trial of the study again",
    ) as e:
        read_study_state(store, c)
    assert "\n" not in str(e.value)
    json.dumps(str(e.value))  # printable as is
