"""The local development stack: a SeaweedFS S3 server and a Ray head, every address on loopback.

`cluster/local.sh up|down|status|tensorboard` calls this module. Up and down are idempotent. State (pid file,
logs, the S3 server's data) lives outside the checkout, under $DCGAN_RAY_STACK_DIR (default
~/.local/share/dcgan-ray), so `ray job submit --working-dir .` never uploads it.

The S3 server is started with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment: that
creates the credentials and turns authentication on (cluster/dev.env sets documented dev defaults).
The Ray head is started in the same environment, so its workers inherit the credentials; they never
travel in a job's runtime env. The head offers `--job-slots` job slots (default 1): `dcgan-ray submit`
queues jobs on them, and a job waits at most `--queue-timeout` seconds for one. `tensorboard` starts
TensorBoard on 127.0.0.1 over the runs' event files in the dev bucket (`down` stops it too). The tests
start their own servers and heads on free ports with the same classes (`dev.seaweed`, `dev.ray_nodes`,
`dev.tensorboard`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from dcgan_ray.dev.processes import http_answers, stop_process_group
from dcgan_ray.dev.ray_nodes import HEAD_IP, RayHead
from dcgan_ray.dev.seaweed import SeaweedPorts, SeaweedServer
from dcgan_ray.dev.tensorboard import TensorBoardServer, command_line
from dcgan_ray.errors import ClusterError
from dcgan_ray.jobs import JOB_SLOT
from dcgan_ray.logs import setup_logging

log = logging.getLogger(__name__)


def stack_dir() -> Path:
    return Path(os.environ.get("DCGAN_RAY_STACK_DIR", Path.home() / ".local" / "share" / "dcgan-ray"))


# --- the dev stack (cluster/local.sh) --------------------------------------------------------------

DEV_BUCKET = "dcgan-ray"
RAY_PORT = 6379
DASHBOARD_PORT = 8265
TENSORBOARD_PORT = 6006
DEV_RUNS = f"s3://{DEV_BUCKET}/dcgan-ray/runs"
"""The runs folder of the shipped jobs (jobs/*.yaml: bucket dcgan-ray, prefix dcgan-ray)."""


def _dev_ports() -> SeaweedPorts:
    return SeaweedPorts(s3=int(os.environ.get("DCGAN_RAY_S3_PORT", 8333)))


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def up(num_cpus: int | None, job_slots: int = 1, queue_timeout_s: int = 3600) -> None:
    base = stack_dir()
    ports = _dev_ports()
    endpoint = f"http://127.0.0.1:{ports.s3}"
    if _pid_alive(base / "seaweedfs.pid"):
        print(f"S3 (SeaweedFS) already up at {endpoint}")
    else:
        server = SeaweedServer(base / "seaweedfs", ports, base / "seaweedfs.log", buckets=(DEV_BUCKET,))
        server.start(detach=True)
        assert server.proc is not None  # start() launched it or raised
        (base / "seaweedfs.pid").write_text(str(server.proc.pid))
        print(f"S3 (SeaweedFS) up at {endpoint}, bucket {DEV_BUCKET!r}, data in {base / 'seaweedfs'}")
    if _pid_alive(base / "ray.pid"):
        print(f"Ray head already up at {HEAD_IP}:{RAY_PORT}")
    else:
        # RAY_JOB_START_TIMEOUT_SECONDS: how long Ray's job manager lets a job wait for its job slot.
        # Ray's default temp dir, so `ray status` and `ray.init()` on this machine find the dev cluster.
        head = RayHead(
            base / "ray.log",
            num_cpus,
            port=RAY_PORT,
            dashboard_port=DASHBOARD_PORT,
            resources={JOB_SLOT: job_slots},
            env={"RAY_JOB_START_TIMEOUT_SECONDS": str(queue_timeout_s)},
            temp_dir=Path(tempfile.gettempdir()) / "ray",
        )
        head.start()
        (base / "ray.pid").write_text(str(head.pid))
        print(
            f"Ray head up at {HEAD_IP}:{RAY_PORT} with {job_slots} job slot(s), dashboard and job API at "
            f"http://127.0.0.1:{DASHBOARD_PORT}"
        )
    print("clients need: source cluster/dev.env  (AWS_* credentials, AWS_ENDPOINT_URL, RAY_AUTH_MODE=token)")


def tensorboard(logdir: str, port: int) -> None:
    """TensorBoard on 127.0.0.1:port over `logdir`, in the background; its credentials are this environment's."""
    base = stack_dir()
    pid_file = base / "tensorboard.pid"
    endpoint = os.environ.get("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_dev_ports().s3}")
    if pid := _pid_alive(pid_file):
        print(
            f"TensorBoard already up (pid {pid}): http://127.0.0.1:{(base / 'tensorboard.port').read_text()}; "
            "`cluster/local.sh down` stops it with the rest"
        )
        return
    server = TensorBoardServer(logdir, endpoint, base / "tensorboard.log", port=port)
    server.start()
    assert server.proc is not None  # start() launched it or raised
    pid_file.write_text(str(server.proc.pid))
    (base / "tensorboard.port").write_text(str(port))
    print(
        f"TensorBoard up at {server.url} over {logdir} (log {base / 'tensorboard.log'}); by hand it is:\n"
        f"  {command_line(logdir, endpoint, os.environ.get('AWS_DEFAULT_REGION', 'us-east-1'), port)}"
    )


def down() -> None:
    """Stop what `up` and `tensorboard` started, by the process groups they recorded; no other Ray, S3
    server or TensorBoard is touched."""
    for label, pid_file in (
        ("TensorBoard", stack_dir() / "tensorboard.pid"),
        ("Ray head", stack_dir() / "ray.pid"),
        ("S3 (SeaweedFS)", stack_dir() / "seaweedfs.pid"),
    ):
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
    ray_state = f"up at {HEAD_IP}:{RAY_PORT}, dashboard http://127.0.0.1:{DASHBOARD_PORT}" if ray_ok else "down"
    print(f"Ray head:       {ray_state}" + (f" (pid {ray_pid})" if ray_pid else ""))
    tb_pid = _pid_alive(stack_dir() / "tensorboard.pid")
    if tb_pid:
        print(f"TensorBoard:    http://127.0.0.1:{(stack_dir() / 'tensorboard.port').read_text()} (pid {tb_pid})")
    print(f"state:          {stack_dir()}")
    return s3_ok and ray_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster/local.sh", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start SeaweedFS and a Ray head on loopback (idempotent)")
    p_up.add_argument("--num-cpus", type=int, default=None, help="logical CPUs Ray offers (default: all cores)")
    p_up.add_argument("--job-slots", type=int, default=1, help="jobs run at a time; more wait queued (default 1)")
    p_up.add_argument(
        "--queue-timeout",
        type=int,
        default=3600,
        help="seconds a queued job waits for a slot before it fails (default 3600)",
    )
    p_tb = sub.add_parser("tensorboard", help="start TensorBoard on 127.0.0.1 over the runs in the bucket")
    p_tb.add_argument("--logdir", default=DEV_RUNS, help=f"runs folder to show (default {DEV_RUNS})")
    p_tb.add_argument("--port", type=int, default=TENSORBOARD_PORT, help=f"port (default {TENSORBOARD_PORT})")
    sub.add_parser("down", help="stop all of them (idempotent; the S3 data stays)")
    sub.add_parser("status", help="say what is running; exit 1 unless both are up")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.command == "up":
            up(args.num_cpus, args.job_slots, args.queue_timeout)
        elif args.command == "tensorboard":
            tensorboard(args.logdir, args.port)
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
