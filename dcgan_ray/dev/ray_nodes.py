"""Ray clusters on one machine, every connection on loopback: a head, extra worker nodes, an autoscaler.

Why the odd addresses: Ray replaces 127.0.0.1 and `localhost` by the address its route lookup finds
(`ray._private.services.resolve_ip_for_localhost`), which on a machine with another interface is not
loopback, and its workers, raylets and gloo groups then talk through that interface. Any other address
in 127.0.0.0/8 it keeps as given. So the head is 127.0.0.2 and each extra node gets its own 127.0.0.x:
all of them are loopback, and Ray Train sees distinct nodes (node ranks) as on a real cluster.

Each `ray start --block` runs in its own process group: `stop()` (or `kill()`, a node lost for real)
signals that group and nothing else. The processes run in this process's environment, so the S3
credentials reach the workers from their node, never through a job's runtime env.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dcgan_ray.dev.processes import free_port, http_answers, port_free, stop_process_group, tail
from dcgan_ray.errors import ClusterError

HEAD_IP = "127.0.0.2"

log = logging.getLogger(__name__)


def ray_binary() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def ray_cli(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([ray_binary(), *args], check=check, text=True, capture_output=capture)


class _RayProcess:
    """One `ray start ... --block` in its own process group."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def _launch(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A job's entrypoint runs `python` from the node's PATH: make it this environment's interpreter.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [ray_binary(), "start", "--block", "--disable-usage-stats", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PATH": path, **(env or {})},
            )

    def _start(self, launch, ready, timeout_s: float, what: str, attempts: int = 3) -> None:
        """`launch()` and wait until `ready()`. The ports a node is given are picked free just before `ray
        start` binds them; on a busy machine another process can take one in between, and the raylet or
        head then dies at start-up (`ray start` exits 1: "The current node timed out during startup"). A
        start that exits is launched again, on new ports, up to `attempts` times."""
        for attempt in range(1, attempts + 1):
            launch()
            try:
                self._wait(ready, timeout_s, what)
                return
            except ClusterError as e:
                if attempt == attempts or self._launched.poll() is None:
                    raise
                log.warning(
                    "%s failed to start (attempt %d of %d); starting it again on new ports: %s",
                    what,
                    attempt,
                    attempts,
                    str(e).splitlines()[-1],
                )
                self.stop()  # what the failed start left of its group (a dashboard agent, a log monitor)

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._launched.poll() is not None:
                raise ClusterError(f"{what} exited with {self._launched.returncode}:\n{tail(self.log_path)}")
            if ready():
                return
            time.sleep(0.5)
        self.stop()
        raise ClusterError(f"{what} did not come up in {timeout_s:.0f} s:\n{tail(self.log_path)}")

    @property
    def pid(self) -> int:
        return self._launched.pid

    @property
    def _launched(self) -> subprocess.Popen:
        assert self.proc is not None, "the node's process was not launched"
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc.pid)
            self.proc.wait()

    def terminate(self) -> None:
        """SIGTERM to the node's `ray start --block`, as Kubernetes deletes a pod: Ray drains the node (reason
        PREEMPTION, deadline RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S) and stops it; `wait` for that."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """The node dies at once (SIGKILL to its raylet, workers and agents), as a lost machine would."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


class RayHead(_RayProcess):
    """The head: GCS, dashboard and job API, with token auth.

    `resources` are custom resources it offers (e.g. {dcgan_ray.jobs.JOB_SLOT: 1} makes a queue of one
    job at a time). `autoscaling` is a dict of worker node types (`resources`, `min_workers`, `max_workers`) for
    Ray's fake multi-node autoscaler, which then launches real raylets on 127.0.0.x addresses when
    demand appears (see `dcgan_ray.dev.loopback_provider`). `env` adds variables to the head's
    processes (e.g. RAY_JOB_START_TIMEOUT_SECONDS, the queue deadline, read by the job manager).
    """

    def __init__(
        self,
        log_path: Path,
        num_cpus: int | None = None,
        port: int | None = None,
        dashboard_port: int | None = None,
        resources: dict[str, float] | None = None,
        autoscaling: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        temp_dir: Path | None = None,
    ):
        super().__init__(log_path)
        # Ray's temp dir holds `ray_current_cluster`, which "auto" addresses resolve to (a job's driver
        # among them): every cluster of the tests gets its own, or a job could reach another, stopped one.
        self.temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="ray-"))
        self.num_cpus, self.resources, self.autoscaling, self.env = num_cpus, resources or {}, autoscaling, env or {}
        self.port, self.dashboard_port = port or free_port(), dashboard_port or free_port()

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 120.0) -> None:
        taken = [p for p in (self.port, self.dashboard_port) if not port_free(p)]
        if taken:
            raise ClusterError(
                f"cannot start the Ray head: port(s) {', '.join(map(str, taken))} are taken by "
                "another process (see `ss -ltnp`)"
            )
        # A token makes `ray start` turn on token auth: the GCS listens on all interfaces.
        ray_cli("get-auth-token", "--generate", capture=True)
        args = [
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={self.port}",
            f"--temp-dir={self.temp_dir}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
        ]
        if self.num_cpus is not None:
            args.append(f"--num-cpus={self.num_cpus}")
        if self.resources:
            args.append(f"--resources={json.dumps(self.resources)}")
        env = dict(self.env)
        if self.autoscaling is not None:
            config = self.log_path.with_suffix(".autoscaler.json")
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(json.dumps(self._autoscaling_config(self.autoscaling)))
            args.append(f"--autoscaling-config={config}")
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        helper_ports = ("ray-client-server-port", "dashboard-agent-listen-port")

        def launch() -> None:
            self._launch([*args, *(f"--{p}={free_port()}" for p in helper_ports)], env)

        # Any HTTP answer (401 under token auth) means the dashboard, the last part to start, is up.
        self._start(launch, lambda: http_answers(self.dashboard_url), timeout_s, "the Ray head")

    def _autoscaling_config(self, autoscaling: dict[str, Any]) -> dict[str, Any]:
        """A whole cluster config for the fake multi-node provider (its example.yaml is not in the wheel)."""
        head_resources = {"CPU": self.num_cpus or 0, **self.resources}
        return {
            "cluster_name": "dcgan-ray-local",
            "max_workers": sum(t["max_workers"] for t in autoscaling.values()),
            "idle_timeout_minutes": 5,
            "provider": {
                "type": "external",
                "module": "dcgan_ray.dev.loopback_provider.LoopbackFakeProvider",
                "gcs_address": self.address,
                "disable_launch_config_check": True,
                "disable_node_updaters": True,
                "foreground_node_launch": True,
                "launch_multiple": True,
                "head_node_id": "fffffffffffffffffffffffffffffffffffffffffffffffffff00000",
            },
            "auth": {"ssh_user": "nobody"},
            "head_node_type": "ray.head.default",
            "available_node_types": {
                "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
                **{name: {"node_config": {}, "min_workers": 0, **spec} for name, spec in autoscaling.items()},
            },
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }


class RayNode(_RayProcess):
    """A worker node joining `head` on its own loopback address (127.0.0.3, .4, ...)."""

    def __init__(
        self,
        head: RayHead,
        ip: str,
        log_path: Path,
        num_cpus: int = 1,
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
    ):
        super().__init__(log_path)
        self.head, self.ip, self.num_cpus, self.resources, self.env = head, ip, num_cpus, resources or {}, env or {}

    def start(self, timeout_s: float = 60.0) -> None:
        import ray

        ports = (
            "node-manager-port",
            "object-manager-port",
            "dashboard-agent-grpc-port",
            "dashboard-agent-listen-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
        args = [f"--address={self.head.address}", f"--node-ip-address={self.ip}", f"--num-cpus={self.num_cpus}"]
        if self.resources:
            args.append(f"--resources={json.dumps(self.resources)}")

        def launch() -> None:
            self._launch([*args, *(f"--{p}={free_port()}" for p in ports)], self.env)

        def joined() -> bool:
            return any(n["Alive"] and n["NodeManagerAddress"] == self.ip for n in ray.nodes())

        self._start(launch, joined, timeout_s, f"the Ray node at {self.ip}")
