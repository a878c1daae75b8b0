"""Which runs and studies outlived their cluster (dcgan_ray.recovery), from the bucket alone, against the real
SeaweedFS: an unfinished run or study whose lease nobody holds any more, a run queued on a cluster that does
not answer; not a finished run, nor one whose driver renews its lease. (Submitting them again, on real
clusters: tests/test_ownership.py.)"""

from __future__ import annotations

import json

import pytest

from dcgan_ray.dev.processes import free_port
from dcgan_ray.errors import DcganError
from dcgan_ray.recovery import find_orphans, pick
from dcgan_ray.storage.layout import RunLayout, study_prefix
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.runs import new_run_manifest, recorded_config, write_run_manifest
from dcgan_ray.storage.s3 import Store
from helpers import make_config


def run(cfg, name: str, **fields) -> None:
    job = make_config(cfg.storage.endpoint, cfg.storage.prefix, name=name)
    layout = RunLayout.of(job)
    write_run_manifest(Store(job.storage), layout, {**new_run_manifest(job, layout), **fields})


def hold(cfg, folder: str, live: bool) -> Lease:
    """A lease on `folder`; not `live`: its driver (this process) is done with it without releasing it."""
    store = Store(cfg.storage)
    lease = Lease.acquire(store, folder, store.uri(folder), "run", {"cluster": "gone"}, 60)
    if not live:
        lease.stop_renewing()
    return lease


def test_orphans_are_the_unfinished_that_nobody_holds(cfg, store):
    runs = f"{cfg.storage.prefix}/runs"
    run(cfg, "held", status="running")
    run(cfg, "dropped", status="running")
    run(cfg, "done", status="finished")
    run(
        cfg,
        "queued-on-nothing",
        status="queued",
        submission_id="dcgan-train-x",
        queued_on=f"http://127.0.0.1:{free_port()}",
    )
    run(cfg, "legacy", status="running")  # a run from before the lease: no log, nothing to tell
    hold(cfg, f"{runs}/held", live=True)
    hold(cfg, f"{runs}/dropped", live=False)
    hold(cfg, f"{runs}/done", live=False)
    study = make_config(cfg.storage.endpoint, cfg.storage.prefix, tune={"study": "lost-study"})
    folder = study_prefix(study)
    store.put_bytes(f"{folder}/study.json", json.dumps({"status": "running", "config": study.to_dict()}).encode())
    hold(cfg, folder, live=False)

    orphans = {o.name: o for o in find_orphans(store, runs, f"{cfg.storage.prefix}/studies")}
    assert set(orphans) == {"dropped", "queued-on-nothing", "lost-study"}
    assert orphans["dropped"].kind == "train" and "has not renewed its lease" in orphans["dropped"].why
    assert orphans["queued-on-nothing"].why.startswith("the cluster it was queued on (http://127.0.0.1:")
    assert orphans["lost-study"].kind == "tune" and orphans["lost-study"].uri == store.uri(folder)
    # What `recover` submits again: the config each recorded.
    assert recorded_config(store, orphans["lost-study"].uri)["tune"]["study"] == "lost-study"
    assert recorded_config(store, orphans["dropped"].uri)["name"] == "dropped"
    assert [o.name for o in pick(list(orphans.values()), ["dropped"])] == ["dropped"]
    with pytest.raises(DcganError, match=r"held, done: not orphaned"):
        pick(list(orphans.values()), ["held", "done"])
