"""A --address wins over RAY_ADDRESS and RAY_API_SERVER_ADDRESS, which Ray's job and state clients would
otherwise use in its place: `dcgan-ray` against a stand-in for a Ray head's job API on loopback, with the
variables naming a cluster that is gone. No Ray cluster.

Each check runs in a child process, as a user's command does: Ray loads its auth token once per process
and keeps it, so a stand-in token loaded here would be sent to the real heads of later tests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray

from dcgan_ray.dev.processes import free_port
from helpers import REPO

TOKEN = "stand-in-token-0123456789abcdef"
NO_NODES = {"result": [], "total": 0, "num_after_truncation": 0, "num_filtered": 0, "partial_failure_warning": ""}


class JobApi(BaseHTTPRequestHandler):
    """Answers as a Ray head's dashboard does, just enough (its version, no jobs, no nodes); records the path
    of each request that carries the token."""

    paths: list[str]

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_error(401)
            return
        self.paths.append(self.path)
        body: object
        if self.path == "/api/version":
            body = {"version": "4", "ray_version": ray.__version__, "ray_commit": "stand-in"}
        elif self.path == "/api/jobs/":
            body = []
        elif self.path.startswith("/api/v0/nodes"):
            body = {"result": True, "msg": "", "data": {"result": NO_NODES}}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the tests read `paths`


@pytest.fixture
def job_api() -> Iterator[tuple[str, list[str]]]:
    """(URL, the paths it was asked for) of a stand-in job API on 127.0.0.1."""
    paths: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("RecordingJobApi", (JobApi,), {"paths": paths}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", paths
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def dead_cluster(monkeypatch) -> str:
    """The address of a cluster that is gone (nothing listens there), left in both of Ray's variables."""
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", dead)
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)  # read by the child processes only
    return dead


def dcgan_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcgan_ray", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_jobs_asks_the_given_address(job_api, dead_cluster):
    url, paths = job_api
    done = dcgan_ray("jobs", "--address", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no dcgan-ray jobs on this cluster"
    assert paths == ["/api/version", "/api/version", "/api/jobs/"]


def test_the_error_names_the_given_address_not_the_environments(dead_cluster):
    given = f"http://127.0.0.1:{free_port()}"
    done = dcgan_ray("jobs", "--address", given)
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"error: cannot reach Ray's job API at {given} (Failed to connect to Ray at address: {given}.)"
    ), done.stderr
    assert dead_cluster not in done.stderr


def test_without_an_address_the_environment_still_decides(job_api, dead_cluster, monkeypatch):
    url, paths = job_api
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", url)
    done = dcgan_ray("jobs")
    assert done.returncode == 0, done.stderr
    assert paths[-1] == "/api/jobs/"


def test_the_job_slot_and_a_queued_run_are_looked_up_on_the_named_cluster(job_api, dead_cluster, monkeypatch):
    """`submit` asks the given cluster for its job slots; `runs` asks the cluster a run was queued on
    whether it still has the submission, not the cluster the variables name now."""
    url, paths = job_api
    queued_on = f"http://127.0.0.1:{free_port()}"
    script = (
        "import json, sys; from dcgan_ray.jobs import _offers_job_slot; from dcgan_ray.recovery import "
        "queued_job_gone; print(json.dumps([_offers_job_slot(sys.argv[1]), queued_job_gone(sys.argv[2], 'x')]))"
    )
    monkeypatch.setenv("RAY_ADDRESS", url)  # the cluster the user works with now
    done = subprocess.run(
        [sys.executable, "-c", script, url, queued_on], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    slot, why = json.loads(done.stdout.splitlines()[-1])
    assert slot is False and [p.split("?")[0] for p in paths] == ["/api/v0/nodes"]
    refused = f"Failed to connect to Ray at address: {queued_on}."
    assert why == f"the cluster it was queued on ({queued_on}) does not answer ({refused})"
