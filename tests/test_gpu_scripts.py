"""benchmarks/gpu.sh is run on GPU machines this project's own machines lack; here its --quick CPU
variant runs end to end (1-5 min on 2 shared cores, mostly torch.compile; its scaling part on gloo),
so a GPU session never finds it broken."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO


@pytest.mark.slow  # over 20 s with no server: outside the fast lane
def test_gpu_sh_runs_on_cpu_quick(tmp_path):
    # gpu.sh calls `python3`, as on the GPU machine: let that be this interpreter.
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--device", "cpu", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.split("== summary")[1]
    assert "step table, cpu" in summary and "eager fp32 (all options off)" in summary
    assert "2 workers, cpu (1 thread(s) each, gloo on 127.0.0.1)" in summary and "[3] scaling failed" not in summary

    step = json.loads((tmp_path / "step.json").read_text())
    assert [r["config"] for r in step["rows"]] == [
        "eager",
        "bf16",
        "channels_last",
        "fused_adam",
        "all_no_cudagraphs",
        "compile",
    ]
    assert all(r.get("img_per_s", 0) > 0 and math.isfinite(r["loss_d"]) for r in step["rows"]), step

    scaling = json.loads((tmp_path / "scaling.json").read_text())
    rows = {r["variant"]: r for r in scaling["rows"]}
    assert list(rows) == [
        "independent (no DDP)",
        "independent, 2x batch",
        "ddp (defaults)",
        "bucket_cap_mb 1",
        "bucket_cap_mb 100",
        "gradient_as_bucket_view",
        "static_graph",
        "bf16 compression hook",
        "fp16 compression hook",
        "ddp, 2x batch per worker",
    ]
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["step_s"] > 0 and 0 < row["efficiency"] and math.isfinite(row["losses"][0]), row
        if not name.startswith("independent"):
            assert 0 < row["model_efficiency"] <= 1, row
            # From the independent step, which noise can make shorter than the 1-worker one: above 1 is
            # possible, but the all-reduce always costs something on top of that step.
            assert 0 < row["model_shared_efficiency"] < row["one_worker_s"] / row["independent_s"], row
    assert rows["ddp, 2x batch per worker"]["batch"] == 2 * rows["ddp (defaults)"]["batch"]
    assert scaling["bus_gb_s"] > 0

    train = json.loads((tmp_path / "train.json").read_text())
    assert [r["compile"] for r in train["runs"]] == ["none", "default"]
    for run in train["runs"]:
        assert "error" not in run, run
        assert len(run["img_per_s_by_epoch"]) == train["sizes"]["epochs"]
        assert math.isfinite(run["digit_fd_before"]) and math.isfinite(run["digit_fd_after"])
