"""benchmarks/gpu.sh is run on GPU machines this project's own machines lack; here its --quick CPU
variant runs end to end (1-5 min on 2 shared cores, mostly torch.compile), so a GPU session never finds it broken."""

from __future__ import annotations

import pytest
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


@pytest.mark.slow  # over 20 s with no server: outside the fast lane
def test_gpu_sh_runs_on_cpu_quick(tmp_path):
    # gpu.sh calls `python3`, as on the GPU machine: let that be this interpreter.
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.split("== summary")[1]
    assert "step table, cpu" in summary and "eager fp32 (all options off)" in summary

    step = json.loads((tmp_path / "step.json").read_text())
    assert [r["config"] for r in step["rows"]] == ["eager", "bf16", "channels_last", "fused_adam",
                                                  "all_no_cudagraphs", "compile"]
    assert all(r.get("img_per_s", 0) > 0 and math.isfinite(r["loss_d"]) for r in step["rows"]), step

    train = json.loads((tmp_path / "train.json").read_text())
    assert [r["compile"] for r in train["runs"]] == ["none", "default"]
    for run in train["runs"]:
        assert "error" not in run, run
        assert len(run["img_per_s_by_epoch"]) == train["sizes"]["epochs"]
        assert math.isfinite(run["digit_fd_before"]) and math.isfinite(run["digit_fd_after"])
