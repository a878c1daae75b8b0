"""The user's entry points: clear errors without tracebacks, and the dev stack's failure messages."""

import _thread
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from dcgan_ray.cli import commands
from dcgan_ray.cli import main as cli_main
from dcgan_ray.dev.seaweed import SeaweedPorts, SeaweedServer
from dcgan_ray.errors import ClusterError, DcganError, LeaseLost
from dcgan_ray.train.ownership import arm_lost_lease_interrupt, interrupt_main_for


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dcgan_ray", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_bad_yaml_key_is_one_clear_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("train:\n  epochs: 2\n  learning_rate: 0.1\n")
    result = run_cli("train", str(job))
    assert result.returncode == 2
    assert "error: " in result.stderr and "unknown key `train.learning_rate`" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_override_value(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("{}\n")
    result = run_cli("data", "prepare", str(job), "--set", "scaling.num_workers=zero")
    assert result.returncode == 2 and "`scaling.num_workers` must be int" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_endpoint_from_the_cli(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"storage:\n  endpoint: http://127.0.0.1:{SeaweedPorts.free().s3}\n")
    result = run_cli("data", "prepare", str(job), "--from", str(tmp_path))
    assert result.returncode == 2 and "cannot reach the S3 endpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_sample_from_a_truncated_checkpoint(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = run_cli("sample", str(bad), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "damaged or truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_seaweed_port_taken_is_named(tmp_path):
    ports = SeaweedPorts.free()
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.s3))
        s.listen()
        with pytest.raises(ClusterError, match=rf"port\(s\) {ports.s3} on 127.0.0.1 are taken"):
            SeaweedServer(tmp_path / "d", ports, tmp_path / "log").start()


def test_seaweed_needs_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ClusterError, match="source cluster/dev.env"):
        SeaweedServer(tmp_path / "d", SeaweedPorts.free(), tmp_path / "log").start()


def test_the_clis_log_handler_outlives_the_stream_it_started_with(tmp_path, capfd):
    """`main` sets up logging on the stderr of the moment (in a test: pytest's capture, closed after the test).
    A later log line goes to the stderr of its own moment: no '--- Logging error ---' about a closed file."""
    import contextlib
    import io
    import logging

    from dcgan_ray.cli import main

    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        assert main(["paths", str(tmp_path / "missing.yaml")]) == 2
    assert "error: " in stream.getvalue()
    stream.close()
    logging.getLogger("dcgan_ray.test").warning("a line after the first stream closed")
    err = capfd.readouterr().err
    assert "a line after the first stream closed" in err and "Logging error" not in err


def lose_the_lease_during_cleanup(args):
    """A driver whose workers already failed on the takeover: its main thread is in the cleanup past the code
    that turns the lease's interrupt into LeaseLost when the renewal thread sees the takeover and interrupts it."""
    lost = LeaseLost("run s3://b/runs/x: this driver (lease generation 1) no longer holds it: it was taken over")
    assert arm_lost_lease_interrupt()
    try:
        raise DcganError("the workers' own error, on its way out")
    finally:
        renewer = threading.Thread(target=interrupt_main_for, args=(lost,))
        renewer.start()
        renewer.join()
        time.sleep(1)  # (the interrupt lands here, in cleanup)


def exit_0(signum, frame):
    sys.exit(0)


def test_a_lost_lease_interrupting_cleanup_still_ends_in_its_one_line(monkeypatch, capsys):
    """Wherever the interrupt lands, and whatever SIGINT does in the driver: Ray Train's fit() leaves a handler
    that aborts the run, or calls sys.exit(0) once its controller is gone (the zombie of tests/test_ownership.py
    once ended so, without a word)."""
    monkeypatch.setattr(LeaseLost, "interrupting", None)
    monkeypatch.setattr(commands, "cmd_sample", lose_the_lease_during_cleanup)
    sigint = signal.signal(signal.SIGINT, exit_0)
    try:
        assert cli_main(["sample", "any", "--out", "any.png"]) == 2
    finally:
        signal.signal(signal.SIGINT, sigint)
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "error: run s3://b/runs/x: this driver (lease generation 1) no longer holds it: it was taken over"
    ), err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    # A Ctrl-C with no lost lease behind it stays one, under Python's own SIGINT handler (in the full suite an
    # earlier test's in-process Ray Train or Tune can leave one of theirs in place).
    monkeypatch.setattr(LeaseLost, "interrupting", None)
    monkeypatch.setattr(commands, "cmd_sample", lambda args: _thread.interrupt_main())
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            cli_main(["sample", "any", "--out", "any.png"])
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, sigint)
