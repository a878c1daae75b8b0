"""A sensitivity study on the real local Ray cluster and SeaweedFS: report, restart, failure modes."""

import csv
import io
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dcgan_ray.config import config_from_dict, load_config
from dcgan_ray.errors import ConfigError
from dcgan_ray.storage.layout import study_report_prefix, study_trials_prefix
from dcgan_ray.storage.s3 import Store
from dcgan_ray.study.tuner import run_study
from helpers import make_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def study_job(s3_server, data_prefix, tmp_path_factory):
    """A 4-trial study (2 configurations x 2 seeds, 1 worker each, tiny data) on the session's data and
    digit classifier. lr 10 is the deliberately bad configuration. 6 epochs, so that a stop decided on
    epoch 1's report lands well before the trial could finish on its own (with 4, a loaded machine once let a
    hopeless trial finish before Tune's stop reached it)."""
    cfg = make_config(
        s3_server.endpoint,
        data_prefix,
        name="tiny",
        train={"epochs": 6, "batch_size": 16, "log_every_steps": 100},
        data={"max_images": 128},
        eval={"every_epochs": 1, "num_samples": 128},
        tune={"study": "lr", "seeds": 2, "max_concurrent_trials": 1, "space": {"train.lr": {"grid": [0.0002, 10.0]}}},
    )
    job = tmp_path_factory.mktemp("jobs") / "study.yaml"
    job.write_text(cfg.to_yaml())
    return job


def trial_manifests(store, cfg):
    prefix = f"{study_trials_prefix(cfg)}/"
    return {k.split("/")[-2]: store.head(k)["LastModified"] for k in store.list_keys(prefix) if k.endswith("/run.json")}


def finished_trials(store, cfg):
    import json

    out = {}
    for key in store.list_keys(f"{study_trials_prefix(cfg)}/"):
        if key.endswith("/run.json") and json.loads(store.get_bytes(key)).get("status") == "finished":
            out[key.split("/")[-2]] = store.head(key)["LastModified"]
    return out


class PlantedCode:
    """Unpickling this creates a file: what a hostile pickle in the bucket would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


def test_interrupted_study_resumes_and_reports(ray_head, study_job, tmp_path):
    cfg = load_config(study_job)
    store = Store(cfg.storage)
    # Run the study as a user would, then interrupt it once two trials are finished.
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcgan_ray", "tune", str(study_job), "--address", ray_head.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(finished_trials(store, cfg)) < 2 and proc.poll() is None:
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()[-5000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = finished_trials(store, cfg)
    assert len(first) >= 2, proc.stdout.read()[-3000:]
    # Anyone who can write to the bucket could plant Tune state that runs code when unpickled: a resumed
    # study must never read it.
    marker = tmp_path / "unpickled"
    tune_prefix = f"{cfg.storage.prefix}/studies/lr/tune"
    for name in ("tuner.pkl", "trainable.pkl", "experiment_state-2099-01-01_00-00-00.json"):
        store.put_bytes(f"{tune_prefix}/{name}", pickle.dumps(PlantedCode(str(marker))))

    result = run_study(cfg, address=ray_head.address)
    assert not marker.exists(), "the study unpickled state from the bucket"
    # Finished trials were not run again: their run manifests are untouched.
    after = trial_manifests(store, cfg)
    assert all(after[t] == modified for t, modified in first.items())

    records = result["records"]
    assert len(records) == 4 and len(after) == 4
    # The hopeless configuration is stopped early by the study, counted and reported, not hidden.
    assert sorted(r.stopped_early for r in records) == [False, False, True, True]
    assert all(max(h["epoch"] for h in r.history) < 6 for r in records if r.stopped_early)
    report = study_report_prefix(cfg)
    rows = list(csv.DictReader(io.StringIO(store.get_bytes(f"{report}/trials.csv").decode())))
    assert len(rows) == 4 and all(r["final_digit_fd"] for r in rows)
    bad = [r for r in rows if float(r["train.lr"]) == 10.0]
    good = [r for r in rows if float(r["train.lr"]) == 0.0002]
    assert len(bad) == 2 and all(r["status"] in ("diverged", "d_won") for r in bad), bad
    assert {r["seed"] for r in good} == {"0", "1"}
    for name in ("metric_vs_train_lr.png", "learning_curves.png", "mosaic.png"):
        image = Image.open(io.BytesIO(store.get_bytes(f"{report}/{name}")))
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100
    best = config_from_dict(yaml.safe_load(store.get_bytes(f"{report}/best.yaml")), "best.yaml")
    assert best.train.lr == 0.0002
    html = store.get_bytes(f"{report}/index.html").decode()
    assert "trials.csv" in html and "mosaic.png" in html and "best.yaml" in html


def test_search_space_errors_name_the_key(study_job):
    cfg = load_config(study_job)
    data = cfg.to_dict()
    data["tune"]["space"] = {"train.lrr": {"grid": [1]}}
    with pytest.raises(ConfigError, match="searches `train.lrr`, which is not a job setting"):
        config_from_dict(data)
    data["tune"]["space"] = {"train.beta1": {"grid": [0.5, 1.5]}}
    with pytest.raises(ConfigError, match=r"tune.space.train.beta1 = 1.5.*`train.beta1` = 1.5 is not allowed"):
        config_from_dict(data)
