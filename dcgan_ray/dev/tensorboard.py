"""TensorBoard on loopback, reading the runs' event files straight from the bucket.

TensorBoard (the pip package, no TensorFlow needed) reads `s3://` logdirs through boto3: the endpoint
comes from S3_ENDPOINT (a full URL; unset for AWS), the region from AWS_REGION, the credentials from
the usual AWS variables of its own environment, never from its command line. `command_line` is the
command the README, the demo and `cluster/local.sh tensorboard` print; `TensorBoardServer` starts it
for `cluster/local.sh` and the tests, in its own process group, bound to 127.0.0.1.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dcgan_ray.dev.processes import free_port, port_free, stop_process_group, tail
from dcgan_ray.errors import ClusterError

IMAGES_KEPT = 1000
"""Grids TensorBoard keeps per run (its default, 10, would show a 25-epoch run's grids sampled)."""


def tensorboard_binary() -> str:
    beside = Path(sys.executable).parent / "tensorboard"
    if beside.exists():
        return str(beside)
    raise ClusterError(
        "TensorBoard is not installed beside this Python: pip install tensorboard "
        "(scripts/setup.sh installs it with the test tools)"
    )


def tensorboard_env(endpoint: str | None, region: str) -> dict[str, str]:
    """What TensorBoard's S3 reader needs besides the credentials."""
    env = {"AWS_REGION": region}
    if endpoint:
        env.update(S3_ENDPOINT=endpoint, S3_USE_HTTPS="1" if endpoint.startswith("https://") else "0")
    return env


def command_line(logdir: str, endpoint: str | None, region: str = "us-east-1", port: int = 6006) -> str:
    """The command a person types, credentials left to their environment."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in tensorboard_env(endpoint, region).items())
    return (
        f"{env} tensorboard --logdir {shlex.quote(logdir)} --host 127.0.0.1 --port {port} "
        f"--samples_per_plugin images={IMAGES_KEPT}"
    )


class TensorBoardServer:
    """One `tensorboard` process on 127.0.0.1:port over `logdir`."""

    def __init__(
        self,
        logdir: str,
        endpoint: str | None,
        log_path: Path,
        port: int | None = None,
        region: str = "us-east-1",
        reload_interval_s: int = 5,
    ):
        self.logdir, self.endpoint, self.log_path, self.region = logdir, endpoint, log_path, region
        self.port = port or free_port()
        self.reload_interval_s = reload_interval_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        if not port_free(self.port):
            raise ClusterError(
                f"cannot start TensorBoard: port {self.port} on 127.0.0.1 is taken (see `ss -ltnp`); "
                "choose another with --port"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            tensorboard_binary(),
            "--logdir",
            self.logdir,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--samples_per_plugin",
            f"images={IMAGES_KEPT}",
            "--reload_interval",
            str(self.reload_interval_s),
        ]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **tensorboard_env(self.endpoint, self.region)},
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClusterError(
                    f"TensorBoard exited with code {self.proc.returncode} at start-up; last lines of "
                    f"{self.log_path}:\n{tail(self.log_path)}"
                )
            try:
                urllib.request.urlopen(f"{self.url}/data/environment", timeout=2)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        self.stop()
        raise ClusterError(
            f"TensorBoard did not answer on {self.url} within {timeout_s:.0f} s; last lines of "
            f"{self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process_group(self.proc.pid)
