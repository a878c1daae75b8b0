"""The bucket is the authority: two Ray clusters on loopback (two heads with their own ports and temp dirs, as
two RayJobs would be) share the session's SeaweedFS server, and the run's lease in the bucket decides which
driver writes it; runs outlive their cluster (`dcgan-ray runs` shows them orphaned, `dcgan-ray recover`
brings them back on another); a driver that lost its lease cannot change what the new holder wrote.

Cluster A is the session's head (tests/conftest.py); cluster B is this module's. The scenarios run in file
order: the last one kills cluster B for good and starts its successor on the same ports.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from dcgan_ray.cli import main as cli_main
from dcgan_ray.config import load_config
from dcgan_ray.dev.ray_nodes import RayHead
from dcgan_ray.jobs import JOB_SLOT, submit
from dcgan_ray.storage.layout import RunLayout, study_prefix
from dcgan_ray.storage.lease import process_alive
from dcgan_ray.storage.lease_log import LeaseLog
from dcgan_ray.storage.lease_status import ownership
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store
from helpers import REPO, SMALL_NETWORK_SETS, process_tree, wait_until

pytestmark = pytest.mark.ray

TTL_S = 10
"""The lease's time-to-live in these runs: what a takeover waits out (the product's default is 60 s)."""


def start_head(log_dir: Path, dashboard_port: int | None = None, port: int | None = None) -> RayHead:
    head = RayHead(
        log_dir / "head.log",
        num_cpus=4,
        port=port,
        dashboard_port=dashboard_port,
        resources={JOB_SLOT: 1},
        env={"RAY_JOB_START_TIMEOUT_SECONDS": "600"},
    )
    head.env["RAY_API_SERVER_ADDRESS"] = head.dashboard_url
    head.start()
    return head


@pytest.fixture(scope="module")
def cluster_b(ray_head, tmp_path_factory):
    """A second cluster; the last scenario replaces it, so the fixture stops whichever head is current."""
    heads = [start_head(tmp_path_factory.mktemp("cluster-b"))]
    yield heads
    for head in heads:
        head.stop()


def smoke_job(endpoint: str, prefix: str, name: str, *sets: str):
    """jobs/smoke.yaml on the test bucket, small and 2 workers wide; its config and its --set overrides."""
    overrides = [
        f"storage.endpoint={endpoint}",
        "storage.bucket=dcgan-test",
        f"storage.prefix={prefix}",
        "storage.create_bucket=false",
        f"storage.lease_ttl_s={TTL_S}",
        f"name={name}",
        "data.max_images=64",
        "checkpoint.keep=3",
        *SMALL_NETWORK_SETS,
        *sets,
    ]
    return load_config(REPO / "jobs/smoke.yaml", overrides), overrides


def job_status(address: str, submission_id: str) -> JobStatus:
    return JobSubmissionClient(address).get_job_status(submission_id)


def wait_for_end(address: str, submission_id: str, timeout_s: float = 300) -> JobStatus:
    return wait_until(
        lambda: (s := job_status(address, submission_id)).is_terminal() and s, timeout_s, f"the end of {submission_id}"
    )


def job_log(address: str, submission_id: str) -> str:
    return JobSubmissionClient(address).get_job_logs(submission_id)


def lease_entries(cfg) -> list[dict]:
    layout = RunLayout.of(cfg)
    return LeaseLog(Store(cfg.storage), layout.prefix).entries()


def snapshot(store: Store, prefix: str, leave_out: tuple[str, ...]) -> dict[str, str]:
    """The sha256 of every object under `prefix`, but those whose key contains one of `leave_out`."""
    return {
        key: hashlib.sha256(store.get_bytes(key)).hexdigest()
        for key in store.list_keys(f"{prefix}/")
        if not any(part in key for part in leave_out)
    }


def runs_table(cfg, capsys) -> str:
    capsys.readouterr()
    runs = RunLayout.of(cfg).runs_uri
    assert cli_main(["runs", "--runs", runs, "--endpoint", cfg.storage.endpoint]) == 0
    return capsys.readouterr().out


def resubmitted(output: str) -> list[str]:
    """The submission ids `dcgan-ray recover` printed."""
    return [line.rsplit(" ", 1)[1] for line in output.splitlines() if "submitted again as" in line]


def row(table: str, name: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"{name} "))


def race(addresses: tuple[str, str], cfg, overrides: list[str], kind: str = "train") -> tuple[str, str, str]:
    """Submit one run (or study) to both clusters at the same moment; once one of the two jobs ended, check it
    was refused in one line naming the other, which holds the lease. Returns the winner's address and
    submission id, and the refusal."""
    ids = {x: submit(cfg, "jobs/smoke.yaml", overrides, kind, x, queue=False) for x in addresses}
    ended = wait_until(
        lambda: {x: s for x, i in ids.items() if (s := job_status(x, i)).is_terminal()}, 300, "one of the two ending"
    )
    ((loser, status),) = ended.items()
    winner = next(x for x in ids if x != loser)
    assert status == JobStatus.FAILED, job_log(loser, ids[loser])[-3000:]
    log = job_log(loser, ids[loser])
    refusals = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 1, log[-3000:]
    (refusal,) = refusals
    folder = RunLayout.of(cfg).prefix if kind == "train" else study_prefix(cfg)
    (acquire,) = [e for e in LeaseLog(Store(cfg.storage), folder).entries() if e["kind"] == "acquire"]
    assert acquire["holder"]["submission_id"] == ids[winner]
    assert f"is held by submission {ids[winner]} on cluster {acquire['holder']['cluster']}" in refusal, refusal
    assert "--wait-for-lease" in refusal
    return winner, ids[winner], refusal


def test_the_same_run_on_two_clusters_at_once_is_trained_by_one(ray_head, cluster_b, s3_server, data_prefix):
    """Three rounds: the same run submitted to both clusters at the same moment. The bucket lets exactly one
    driver take it; the other stops in one line naming the holder. The winner is stopped once it holds the
    run (the next round is a new run), except in the last round, where it trains the run to its end. (That
    of two racers exactly one wins is shown twenty times in tests/test_lease.py, in one process against the
    same server; these rounds show it end to end, through two clusters' jobs.)"""
    clusters = (ray_head.dashboard_url, cluster_b[0].dashboard_url)
    rounds = 3
    stopped = []
    for round_ in range(rounds):
        cfg, overrides = smoke_job(s3_server.endpoint, data_prefix, f"race-{round_}")
        winner, submission_id, _ = race(clusters, cfg, overrides)
        if round_ < rounds - 1:
            JobSubmissionClient(winner).stop_job(submission_id)
            stopped.append((winner, submission_id))
            continue
        assert wait_for_end(winner, submission_id, 600) == JobStatus.SUCCEEDED, job_log(winner, submission_id)[-3000:]
        manifest = read_run_manifest(Store(cfg.storage), RunLayout.of(cfg))
        assert manifest["status"] == "finished" and [h["epoch"] for h in manifest["history"]] == [1]
        entries = lease_entries(cfg)
        assert [e["kind"] for e in entries] == ["acquire", "commit", "commit", "release"]
        assert "checkpoint" in entries[1] and (entries[2]["state"], entries[2]["epochs_completed"]) == ("finished", 1)
        assert manifest["generation"] == entries[0]["generation"]  # run.json names the generation that wrote it
    for (address, submission_id), round_ in zip(stopped, range(rounds - 1), strict=True):
        wait_for_end(address, submission_id)
        # `ray job stop` sends SIGTERM: the driver ends through its lease, which it releases on the way out.
        cfg, _ = smoke_job(s3_server.endpoint, data_prefix, f"race-{round_}")
        last = lease_entries(cfg)[-1]
        assert (last["kind"], last.get("reason")) == ("release", "terminated (SIGTERM)"), last


def test_the_same_study_on_two_clusters_at_once_is_run_by_one(ray_head, cluster_b, s3_server, data_prefix):
    clusters = (ray_head.dashboard_url, cluster_b[0].dashboard_url)
    space = '{"model.alpha": {"grid": [0.2]}}'  # one trial
    sets = [
        "eval.every_epochs=1",
        "eval.num_samples=64",
        "eval.batch_size=64",
        "tune.study=race",
        f"tune.space={space}",
    ]
    cfg, overrides = smoke_job(s3_server.endpoint, data_prefix, "race-study", *sets)
    winner, submission_id, refusal = race(clusters, cfg, overrides, kind="tune")
    assert f"study s3://dcgan-test/{data_prefix}/studies/race is held by" in refusal
    JobSubmissionClient(winner).stop_job(submission_id)
    wait_for_end(winner, submission_id)


def test_a_paused_driver_is_taken_over_and_cannot_change_what_its_successor_wrote(
    ray_head, cluster_b, s3_server, data_prefix, fault, capsys
):
    """The zombie. Cluster B trains a run; its rank 0 pauses just before committing epoch 2's checkpoint
    (as a long GC or a partition would stop it), and so does its driver: the lease goes unrenewed. Once the
    lease expires, `runs` shows the run orphaned and `recover` submits it to cluster A, whose driver takes
    the lease over, resumes from epoch 1 and finishes the run. Then the zombie resumes: the server refuses
    its commit, it stops in one line, and no object the successor wrote is changed."""
    a, b = ray_head.dashboard_url, cluster_b[0].dashboard_url
    cfg, overrides = smoke_job(s3_server.endpoint, data_prefix, "zombie", "train.epochs=3")
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    fault.set("before_commit", "pause", at=2)
    zombie = submit(cfg, "jobs/smoke.yaml", overrides, address=b)
    rank0 = fault.paused()
    (acquire,) = [e for e in lease_entries(cfg) if e["kind"] == "acquire"]
    driver = acquire["holder"]["pid"]
    os.kill(driver, signal.SIGSTOP)
    try:
        table = wait_until(
            lambda: "orphaned" in row(t := runs_table(cfg, capsys), "zombie") and t, 60, "zombie shown orphaned"
        )
        assert "zombie: orphaned: its driver has not renewed its lease for" in table
        capsys.readouterr()
        recover = ["recover", "zombie", "--runs", layout.runs_uri, "--endpoint", s3_server.endpoint]
        assert cli_main([*recover, "--address", a]) == 0
        (successor,) = [
            line.rsplit(" ", 1)[1] for line in capsys.readouterr().out.splitlines() if "submitted again" in line
        ]
        assert wait_for_end(a, successor, 600) == JobStatus.SUCCEEDED, job_log(a, successor)[-3000:]
        finished = read_run_manifest(store, layout)
        assert finished["status"] == "finished" and [h["epoch"] for h in finished["history"]] == [1, 2, 3]
        (restart,) = finished["restarts"]
        assert restart["to_epoch"] == 1 and restart["checkpoint"].endswith("checkpoint_epoch_0001"), restart
        # The zombie's epoch-2 checkpoint (uploaded, never committed) was removed, not resumed from.
        assert "written by lease generation 1 and never committed" in job_log(a, successor)
        # Every object the successor wrote, but the run page and TensorBoard files (views it rewrites each
        # epoch; with them included a fresh-clone run failed once, not yet explained: see issue 32's note) and
        # the zombie's own renewals.
        before = snapshot(store, layout.prefix, ("/report/", "events.out.tfevents", "lease/renewed/00000001"))
    finally:
        os.kill(rank0, signal.SIGCONT)
        os.kill(driver, signal.SIGCONT)
    assert wait_for_end(b, zombie) == JobStatus.FAILED
    log = job_log(b, zombie)
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no longer holds it: it was taken over by submission" in errors[0], log[-4000:]
    # The zombie's commit went to the server and was refused: after the takeover, the log is the successor's.
    entries = lease_entries(cfg)
    takeover = next(e for e in entries if e["kind"] == "acquire" and e["generation"] > 1)
    assert takeover["took_over_from"] == 1
    assert {e["generation"] for e in entries if e["seq"] >= takeover["seq"]} == {takeover["generation"]}
    assert snapshot(store, layout.prefix, ("/report/", "events.out.tfevents", "lease/renewed/00000001")) == before


def kill_cluster(head: RayHead, driver: int) -> None:
    """Every process of the cluster at once, as a lost machine or a deleted pod would: everything under the head's
    `ray start` (the GCS, the raylet, its workers, the job supervisors and their drivers) and the job's driver.
    All of them: a worker left stopped when its parents die would be sent SIGCONT by the kernel (its process
    group orphaned) and train on."""
    for pid in process_tree({head.pid, driver}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    head.kill()


def test_a_lost_head_with_one_run_training_and_two_queued_is_recovered(
    ray_head, cluster_b, s3_server, data_prefix, tmp_path_factory, fault, capsys
):
    """Cluster B's head is killed with one run training and two queued behind it. A new head starts on the
    same address; `runs` shows the three orphaned (the first once its lease expires, the queued ones because
    the new head does not know their submissions), and `recover` brings all three back: they finish, the
    first resuming from its last checkpoint."""
    lost = cluster_b[0]
    names = ["lost-a", "lost-b", "lost-c"]
    jobs = [smoke_job(s3_server.endpoint, data_prefix, name, "train.epochs=3") for name in names]
    first, _ = jobs[0]
    fault.set("before_commit", "pause", at=2)  # the first run stands still mid-run when its cluster is lost
    submit(first, "jobs/smoke.yaml", jobs[0][1], address=lost.dashboard_url)
    paused = fault.paused()
    for cfg, overrides in jobs[1:]:  # (they wait behind the first, which holds the one job slot)
        submit(cfg, "jobs/smoke.yaml", overrides, address=lost.dashboard_url)
    assert [read_run_manifest(Store(c.storage), RunLayout.of(c))["status"] for c, _ in jobs[1:]] == ["queued"] * 2
    (acquire,) = [e for e in lease_entries(first) if e["kind"] == "acquire"]
    kill_cluster(lost, acquire["holder"]["pid"])
    wait_until(lambda: not process_alive(paused), 30, "the paused worker gone with its cluster")
    cluster_b[0] = start_head(tmp_path_factory.mktemp("cluster-b2"), lost.dashboard_port, lost.port)
    new = cluster_b[0]
    tables = [""]

    def three_orphans() -> str | None:
        tables.append(runs_table(first, capsys))
        return tables[-1] if all("orphaned" in row(tables[-1], n) for n in names) else None

    try:
        table = wait_until(three_orphans, 60, "three orphans")
    except AssertionError as e:
        raise AssertionError(f"{e}; `dcgan-ray runs` said last:\n{tables[-1]}") from None
    assert f"lost-b: orphaned: the cluster it was queued on ({new.dashboard_url}) no longer has submission" in table
    capsys.readouterr()
    recover = ["recover", *names, "--runs", RunLayout.of(first).runs_uri, "--endpoint", s3_server.endpoint]
    assert cli_main([*recover, "--address", new.dashboard_url]) == 0
    submitted = resubmitted(capsys.readouterr().out)
    assert len(submitted) == 3
    for submission_id in submitted:
        assert wait_for_end(new.dashboard_url, submission_id, 600) == JobStatus.SUCCEEDED
    for cfg, _ in jobs:
        manifest = read_run_manifest(Store(cfg.storage), RunLayout.of(cfg))
        assert manifest["status"] == "finished" and [h["epoch"] for h in manifest["history"]] == [1, 2, 3]
        assert ownership(Store(cfg.storage), RunLayout.of(cfg).prefix).state == "released"
    (restart,) = read_run_manifest(Store(first.storage), RunLayout.of(first))["restarts"]
    assert restart["to_epoch"] == 1 and restart["checkpoint"].endswith("checkpoint_epoch_0001"), restart
