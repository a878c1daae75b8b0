"""Watching runs: TensorBoard event files in the bucket, read by a real TensorBoard in headless Chromium;
the run page; `dcgan-ray runs`, `report`, `stop` and `logs`.

One short run (2 epochs, then resumed to 3) and one 2-trial study, on the session's Ray cluster and
SeaweedFS, serve every TensorBoard, page and command test; the publisher's outage test needs no Ray.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import Chromium
from dcgan_ray.cli import main as cli_main
from dcgan_ray.config import ModelSection
from dcgan_ray.dev.tensorboard import TensorBoardServer, command_line
from dcgan_ray.storage.layout import RunLayout, runs_prefix, study_trials_prefix
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store
from dcgan_ray.train.events import STEP_KEYS
from dcgan_ray.train.watch import RunWatch
from helpers import REPO, SMALL_NETWORK_SETS, TEST_KEY, TEST_SECRET, make_config, run_cfg, wait_until

SCREENSHOT = REPO / "docs" / "tensorboard-images.png"
"""The docs' screenshot: the browser test writes it there only when DCGAN_RAY_UPDATE_DOCS=1 (a test run
leaves the checkout as it was)."""


def grid_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def event_steps(store: Store, layout: RunLayout, tmp_path: Path) -> tuple[dict[str, list[int]], list[int]]:
    """Steps per scalar tag and of the grids, as TensorBoard's own reader sees the run's files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local = tmp_path / "events"
    local.mkdir(exist_ok=True)
    for key in store.list_keys(f"{layout.prefix}/{RunLayout.EVENTS_PREFIX}"):
        (local / key.rsplit("/", 1)[-1]).write_bytes(store.get_bytes(key))
    acc = EventAccumulator(str(local), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [s.step for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, [i.step for i in acc.Images("samples/fixed_noise")]


# --- the publisher, without Ray: training never waits for the bucket ------------------------------------


def test_an_outage_delays_the_events_and_never_training(private_s3, prefix, tmp_path, caplog):
    cfg = make_config(private_s3.endpoint, prefix, name="outage-watch", storage={"retry_budget_s": 3})
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    store.check()
    watch = RunWatch(cfg, start_step=0)
    manifest = {
        "name": cfg.name,
        "status": "running",
        "epochs_completed": 0,
        "epochs_total": 3,
        "config": cfg.to_dict(),
        "history": [{"epoch": 0, "digit_fd": 90.0}],
        "samples": {"epochs": [], "gif": None},
        "checkpoints": {},
    }

    def epoch(n: int) -> float:
        """Train epoch n (4 steps, two progress lines) and end it; the seconds the training thread spent."""
        for i in (2, 4):
            watch.step(
                4 * (n - 1) + i, {"loss_d": 1.0, "loss_g": 2.0, "d_real": 0.6, "d_fake": 0.3, "images_per_s": 100.0}
            )
        manifest["epochs_completed"] = n
        manifest["history"].append(
            {
                "epoch": n,
                "step": 4 * n,
                "loss_d": 1.0,
                "loss_g": 2.0,
                "d_real": 0.6,
                "d_fake": 0.3,
                "images_per_s": 100.0,
                "epoch_seconds": 1.0,
                "world_size": 1,
                "digit_fd": 90.0 - n,
            }
        )
        watch.grid(n, grid_png(n))
        start = time.monotonic()
        watch.epoch_done(manifest)
        return time.monotonic() - start

    watch.grid(0, grid_png(0))
    watch.epoch_done(manifest)
    # Epoch 0's event file and then its run page: the outage must not start while the page still uploads.
    wait_until(lambda: watch.published_files == 1 and watch.published_pages == 1, what="epoch 0 in the bucket")
    private_s3.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="dcgan_ray"):
            waited = epoch(1)
            # (a bound, not a timing: under load each try of the 3 s budget can take long to be refused)
            wait_until(lambda: watch.failures == 1, timeout_s=240, what="the publisher giving up on epoch 1")
    finally:
        private_s3.start()
    # Handing the epoch over never waited for the bucket (a put would have waited out the 3 s budget).
    assert waited < 1.0
    assert "not uploaded" in caplog.text and "they go up after the next epoch" in caplog.text
    assert watch.pending and watch.published_files == 1
    epoch(2)
    wait_until(lambda: watch.published_files == 3, what="epochs 1 and 2 uploaded after the outage")
    manifest["status"] = "finished"
    watch.finished(manifest)
    assert not watch.pending and watch.published_files == 4
    scalars, grids = event_steps(store, layout, tmp_path)
    assert scalars["step/loss_d"] == [2, 4, 6, 8] and scalars["quality/digit_fd"] == [0, 4, 8]
    assert grids == [0, 4, 8]
    page = store.get_bytes(layout.report_key).decode()
    assert "finished" in page and "../samples/" not in page  # no sample URI in this manifest: none linked


# --- one short run, resumed, and a small study, watched ------------------------------------------------


@pytest.fixture(scope="module")
def watched(ray_head, s3_server, data_prefix):
    """A 2-epoch run with evaluation, resumed to 3 epochs; a 2-trial study (1 epoch each). Its runs live in a
    runs folder of their own, so TensorBoard shows them alone."""
    from dcgan_ray.study.tuner import run_study
    from dcgan_ray.train.driver import train

    cfg = run_cfg(s3_server.endpoint, data_prefix, "watched", eval_every=1)
    cfg.storage.runs_prefix = "watch-tests/runs"
    if os.environ.get("DCGAN_RAY_UPDATE_DOCS") == "1":
        cfg.model = ModelSection()  # the docs' screenshot shows the reference network's grids, not grey ones
    first = train(cfg)
    cfg.train.epochs = 3
    resumed = train(cfg)
    study = make_config(
        s3_server.endpoint,
        data_prefix,
        name="watch-study",
        train={"epochs": 1, "batch_size": 16, "log_every_steps": 2},
        data={"max_images": 64},
        eval={"every_epochs": 1, "num_samples": 64},
        tune={
            "study": "watch",
            "seeds": 1,
            "max_concurrent_trials": 2,
            "space": {"train.lr": {"grid": [0.0002, 0.001]}},
        },
    )
    run_study(study, address=ray_head.address)
    return cfg, first, resumed, study


def test_the_run_and_its_resumption_are_one_run_in_the_bucket(watched, tmp_path):
    cfg, first, resumed, _ = watched
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    assert first["epochs_completed"] == 2 and resumed["resumed_from"]["epoch"] == 2
    history = resumed["history"]
    scalars, grids = event_steps(store, layout, tmp_path)
    # Every logged step once, in order, across the resumption (8 steps an epoch, a line every 4).
    assert scalars["step/loss_d"] == [4, 8, 12, 16, 20, 24]
    assert all(scalars[f"step/{key}"] == scalars["step/loss_d"] for key in STEP_KEYS)
    steps = [h.get("step", 0) for h in history]
    assert steps == [0, 8, 16, 24] and grids == steps  # one grid per epoch, epoch 0 included
    for tag in ("quality/digit_fd", "quality/classifier_accuracy", "quality/digit_is"):
        assert scalars[tag] == steps, tag
    for tag in ("epoch/epoch_seconds", "epoch/world_size", "epoch/loss_g", "epoch/images_per_s"):
        assert scalars[tag] == steps[1:], tag
    # What a person opens never holds the credentials.
    published = [store.get_bytes(k) for k in store.list_keys(f"{layout.prefix}/{RunLayout.EVENTS_PREFIX}")]
    published.append(store.get_bytes(layout.report_key))
    assert not [b for b in published if TEST_SECRET.encode() in b or TEST_KEY.encode() in b]


def test_tensorboard_shows_the_run_from_the_bucket_in_a_browser(watched, s3_server, tmp_path):
    cfg, _, resumed, _ = watched
    logdir = f"s3://{cfg.storage.bucket}/{runs_prefix(cfg)}"
    tensorboard = TensorBoardServer(logdir, s3_server.endpoint, tmp_path / "tensorboard.log")
    tensorboard.start()
    try:
        api = tensorboard.url + "/data/plugin"
        expected = {
            "step/loss_d",
            "step/loss_g",
            "step/d_real",
            "step/d_fake",
            "step/images_per_s",
            "quality/digit_fd",
            "quality/classifier_accuracy",
            "epoch/epoch_seconds",
            "epoch/world_size",
        }
        # TensorBoard reads the run's event files one after another: wait until it has read them all
        # (CI at 2ffb1f5 asked while it had read only a file with the quality tags).
        wait_until(
            lambda: expected <= set(json.load(urllib.request.urlopen(f"{api}/scalars/tags")).get("watched", {})),
            what=f"TensorBoard listing the run's scalars {sorted(expected)}",
        )
        steps = [h.get("step", 0) for h in resumed["history"]]
        images = wait_until(
            lambda: (
                [
                    i["step"]
                    for i in json.load(
                        urllib.request.urlopen(f"{api}/images/images?run=watched&tag=samples/fixed_noise")
                    )
                ]
                == steps
                or None
            ),
            what=f"TensorBoard serving a grid at each of the steps {steps}",
        )
        assert images
        points = json.load(urllib.request.urlopen(f"{api}/scalars/scalars?run=watched&tag=step/loss_d"))
        assert [step for _, step, _ in points] == [4, 8, 12, 16, 20, 24]  # no step twice after the resumption

        with Chromium() as browser:
            browser.open(f"{tensorboard.url}/#images")
            page = browser.wait_for(
                lambda p: any("individualImage" in i["src"] and i["width"] > 0 for i in p["images"])
            )
            assert "samples/fixed_noise" in page["text"] and "watched" in page["text"]
            grid = next(i for i in page["images"] if "individualImage" in i["src"])
            assert (grid["width"], grid["height"]) == (256, 256)  # the run's 8x8 grid of 32 px tiles
            # The slider starts at the newest grid: the last epoch's.
            assert re.search(rf"step\s+{steps[-1]}\b", page["text"])
            browser.screenshot(tmp_path / SCREENSHOT.name)
            browser.open(f"{tensorboard.url}/#scalars")
            browser.wait_for(lambda p: "quality/digit_fd" in p["text"])
    finally:
        tensorboard.stop()
    shot = Image.open(tmp_path / SCREENSHOT.name)
    assert shot.size == (1400, 900) and np.asarray(shot.convert("L")).std() > 10
    if os.environ.get("DCGAN_RAY_UPDATE_DOCS") == "1":
        shutil.copyfile(tmp_path / SCREENSHOT.name, SCREENSHOT)


def test_tensorboard_compares_a_studys_trials_by_their_hparams(watched, s3_server, tmp_path):
    _, _, _, study = watched
    logdir = f"s3://{study.storage.bucket}/{study_trials_prefix(study)}"
    tensorboard = TensorBoardServer(logdir, s3_server.endpoint, tmp_path / "tensorboard.log")
    tensorboard.start()
    try:

        def experiment():
            request = urllib.request.Request(
                f"{tensorboard.url}/data/plugin/hparams/experiment",
                data=json.dumps({"experimentName": ""}).encode(),
                headers={"Content-Type": "application/json"},
            )
            found = json.load(urllib.request.urlopen(request))
            lr = next((h for h in found.get("hparamInfos", []) if h["name"] == "train.lr"), {})
            both = lr.get("domainInterval") == {"minValue": 0.0002, "maxValue": 0.001}  # both trials loaded
            return found if both and "quality/digit_fd" in {m["name"]["tag"] for m in found["metricInfos"]} else None

        found = wait_until(experiment, what="HParams finding both trials' learning rates and metrics")
        hparams = {h["name"]: h for h in found["hparamInfos"]}
        assert {"train.lr", "train.seed", "train.lr_generator"} <= set(hparams)
        assert hparams["train.lr"]["domainInterval"] == {"minValue": 0.0002, "maxValue": 0.001}
        assert hparams["train.lr"].get("differs") and not hparams["train.seed"].get("differs")
        trials = [t for t in Store(study.storage).list_folders(f"{study_trials_prefix(study)}/")]
        assert len(trials) == 2
        with Chromium() as browser:
            browser.open(f"{tensorboard.url}/#hparams")
            page = browser.wait_for(lambda p: all(t in p["text"] for t in trials) and "train.lr" in p["text"])
            assert "quality/digit_fd" in page["text"]
    finally:
        tensorboard.stop()


def test_the_run_page_in_the_bucket_and_dcgan_ray_report(watched, tmp_path, capsys):
    cfg, _, resumed, _ = watched
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    page = store.get_bytes(layout.report_key).decode()
    assert store.head(layout.report_key)["ContentType"].startswith("text/html")
    # Refreshed after the last epoch, and by the driver once the run had finished.
    assert "<b>finished</b>, 3 of 3 epochs" in page and "resumed at epoch 2" in page
    for epoch in range(4):
        assert f'src="../samples/epoch_{epoch:04d}.png"' in page
    assert 'src="../samples/progress.gif"' in page and 'src="curves.png"' in page
    assert "lr: 0.0002" in page and "digit_fd" in page  # the config, the metric
    assert f"tensorboard --logdir s3://{cfg.storage.bucket}/watch-tests/runs" in page
    assert Image.open(io.BytesIO(store.get_bytes(f"{layout.report_prefix}/curves.png"))).size[0] > 800

    job = tmp_path / "job.yaml"
    job.write_text(cfg.to_yaml())
    out = tmp_path / "pages"
    capsys.readouterr()
    assert cli_main(["report", "watched", "--config", str(job), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    index = out / "report" / "index.html"
    assert f"run page of {layout.uri}: {index}" in printed
    local = index.read_text()
    linked = re.findall(r'src="([^"]+)"', local)
    assert len(linked) == 6  # curves, animation, 4 grids: each there beside the page
    for src in linked:
        assert (index.parent / src).is_file(), src
    assert Image.open(out / "samples" / "progress.gif").n_frames == 4


def test_dcgan_ray_runs_lists_each_run_from_its_run_json(watched, s3_server, tmp_path, capsys):
    cfg, _, resumed, _ = watched
    capsys.readouterr()
    runs = f"s3://{cfg.storage.bucket}/watch-tests/runs"
    assert cli_main(["runs", "--runs", runs, "--endpoint", s3_server.endpoint]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"runs under {runs}:" and lines[1].split() == [
        "NAME",
        "STATUS",
        "EPOCHS",
        "BEST",
        "UPDATED",
        "SUBMISSION",
        "LEASE",
    ]
    best = resumed["checkpoints"]["best"]
    row = next(line for line in lines if line.startswith("watched "))
    assert row.split()[:4] == ["watched", "finished", "3/3", "digit_fd"]
    assert row.endswith(" released")  # its last driver let the run's lease go when it finished
    assert f"{best['value']:.2f} @{best['epoch']}" in row and resumed["updated"] in row
    # A damaged run.json is one row that says so; the others are still listed.
    store = Store(cfg.storage)
    store.put_bytes("watch-tests/runs/broken/run.json", b"[1, 2]")
    try:
        assert cli_main(["runs", "--runs", runs, "--endpoint", s3_server.endpoint]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
        assert set(rows) == {"watched", "broken"} and rows["broken"].split()[1] == "unreadable"
    finally:
        store.delete(["watch-tests/runs/broken/run.json"])


def test_the_tensorboard_command_is_the_one_the_docs_give(watched, s3_server):
    cfg = watched[0]
    command = command_line(f"s3://{cfg.storage.bucket}/{runs_prefix(cfg)}", s3_server.endpoint)
    assert command == (
        f"AWS_REGION=us-east-1 S3_ENDPOINT={s3_server.endpoint} S3_USE_HTTPS=0 tensorboard --logdir "
        f"s3://dcgan-test/watch-tests/runs --host 127.0.0.1 --port 6006 --samples_per_plugin "
        "images=1000"
    )
    docs = (REPO / "docs" / "watching.md").read_text()
    assert (
        "AWS_REGION=us-east-1 S3_ENDPOINT=http://127.0.0.1:8333 S3_USE_HTTPS=0 tensorboard --logdir "
        "s3://dcgan-ray/dcgan-ray/runs --host 127.0.0.1 --port 6006 --samples_per_plugin images=1000"
    ) in docs
    assert "docs/tensorboard-images.png" in (REPO / "README.md").read_text()


def test_local_sh_tensorboard_starts_it_on_loopback_and_down_stops_it(
    watched, s3_server, tmp_path, monkeypatch, capsys
):
    from dcgan_ray.dev import stack
    from dcgan_ray.dev.processes import free_port, http_answers

    monkeypatch.setenv("DCGAN_RAY_STACK_DIR", str(tmp_path))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    port, logdir = free_port(), f"s3://dcgan-test/{runs_prefix(watched[0])}"
    url = f"http://127.0.0.1:{port}"
    assert stack.main(["tensorboard", "--logdir", logdir, "--port", str(port)]) == 0
    try:
        out = capsys.readouterr().out
        assert f"TensorBoard up at {url} over {logdir}" in out and f"S3_ENDPOINT={s3_server.endpoint}" in out
        wait_until(
            lambda: "watched" in json.load(urllib.request.urlopen(f"{url}/data/plugin/scalars/tags")),
            what="TensorBoard listing the run",
        )
        assert stack.main(["tensorboard", "--logdir", logdir, "--port", str(port)]) == 0  # idempotent
        assert "TensorBoard already up" in capsys.readouterr().out
        stack.main(["status"])
        assert f"TensorBoard:    {url}" in capsys.readouterr().out
    finally:
        assert stack.main(["down"]) == 0
    assert "TensorBoard stopped" in capsys.readouterr().out and not http_answers(url)


# --- a run by its name: stop (queued and running), logs, resubmission -----------------------------------


def test_stop_logs_and_a_resubmission_that_resumes(ray_head, s3_server, data_prefix, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    from dcgan_ray.jobs import submit

    def job(name: str, epochs: int):
        overrides = [
            f"storage.endpoint={s3_server.endpoint}",
            "storage.bucket=dcgan-test",
            f"storage.prefix={data_prefix}",
            "storage.runs_prefix=watch-tests/jobs",
            f"name={name}",
            "data.max_images=64",
            "train.batch_size=16",
            f"train.epochs={epochs}",
            "storage.create_bucket=false",
            *SMALL_NETWORK_SETS,
        ]
        cfg = make_config(
            s3_server.endpoint,
            data_prefix,
            name=name,
            train={"epochs": epochs, "batch_size": 16},
            data={"max_images": 64},
            storage={"runs_prefix": "watch-tests/jobs"},
        )
        return cfg, overrides

    where = [
        "--runs",
        "s3://dcgan-test/watch-tests/jobs",
        "--endpoint",
        s3_server.endpoint,
        "--address",
        ray_head.dashboard_url,
    ]
    client = JobSubmissionClient(ray_head.dashboard_url)
    running_cfg, running_overrides = job("stop-running", 200)
    queued_cfg, queued_overrides = job("stop-queued", 1)
    running = submit(running_cfg, "jobs/smoke.yaml", running_overrides, address=ray_head.dashboard_url)
    queued = submit(queued_cfg, "jobs/smoke.yaml", queued_overrides, address=ray_head.dashboard_url)
    store, layout = Store(running_cfg.storage), RunLayout.of(running_cfg)
    wait_until(
        lambda: (read_run_manifest(store, layout) or {}).get("epochs_completed", 0) >= 2,
        300,
        "the running job's second epoch",
    )
    assert client.get_job_status(queued).value == "PENDING"  # the session head's one job slot is taken

    def logged() -> bool:  # worker lines reach the job's log through Ray's log monitor, a moment later
        capsys.readouterr()
        assert cli_main(["logs", "stop-running", *where]) == 0
        return bool(re.search(r"epoch 2/200 done in", capsys.readouterr().out))

    wait_until(logged, 60, "`dcgan-ray logs` showing epoch 2's line")

    assert cli_main(["stop", "stop-queued", *where]) == 0
    assert f"stopped {queued} (queued)" in capsys.readouterr().out
    queued_store, queued_layout = Store(queued_cfg.storage), RunLayout.of(queued_cfg)
    assert read_run_manifest(queued_store, queued_layout)["status"] == "stopped"
    # Ray delivers the stop when the job would start (it waits for the slot): until then it lists it as
    # PENDING, and the run can be submitted again.
    assert client.get_job_status(queued).value == "PENDING"
    queued_again = submit(queued_cfg, "jobs/smoke.yaml", queued_overrides, address=ray_head.dashboard_url)
    assert cli_main(["stop", "stop-queued", *where]) == 0  # (not to be trained here either)
    assert f"stopped {queued_again} (queued)" in capsys.readouterr().out
    assert read_run_manifest(queued_store, queued_layout)["status"] == "stopped"

    assert cli_main(["stop", "stop-running", *where]) == 0
    assert f"stopped {running} (running)" in capsys.readouterr().out
    assert client.get_job_status(running).value == "STOPPED"
    stopped = read_run_manifest(store, layout)
    assert stopped["status"] == "stopped" and "<b>stopped</b>" in store.get_bytes(layout.report_key).decode()
    time.sleep(3)  # nothing of the stopped job writes run.json any more
    assert read_run_manifest(store, layout) == stopped
    assert cli_main(["stop", "stop-running", *where]) == 2
    assert "has no queued or running job" in capsys.readouterr().err
    # The slot is free: the stopped queued job ends at once, without training.
    wait_until(lambda: client.get_job_status(queued).value == "STOPPED", 120, "the queued job's stop")
    wait_until(lambda: client.get_job_status(queued_again).value == "STOPPED", 120, "the second queued job's stop")
    assert read_run_manifest(queued_store, queued_layout)["epochs_completed"] == 0

    # Resubmitted with a reachable goal: it resumes from its last checkpoint, and `logs -f` follows it to the end.
    goal = stopped["epochs_completed"] + 1
    running_overrides[running_overrides.index("train.epochs=200")] = f"train.epochs={goal}"
    again = submit(running_cfg, "jobs/smoke.yaml", running_overrides, address=ray_head.dashboard_url)
    follow = subprocess.run(
        [sys.executable, "-m", "dcgan_ray", "logs", "stop-running", "-f", *where],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert follow.returncode == 0, follow.stderr[-3000:]
    # The restart's one line (the recorder's) says what it resumed from.
    assert "training finished" in follow.stdout
    assert "restarted: resumes from s3://dcgan-test/watch-tests/jobs/stop-running/checkpoint_epoch_" in follow.stdout
    assert client.get_job_status(again).value == "SUCCEEDED"
    finished = read_run_manifest(store, layout)
    assert finished["status"] == "finished" and finished["epochs_completed"] == goal
    assert finished["resumed_from"]["epoch"] >= 1
    epochs = [h["epoch"] for h in finished["history"]]
    assert epochs == sorted(set(epochs)) and epochs[-1] == goal
