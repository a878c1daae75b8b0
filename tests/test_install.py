"""The lock files are what pyproject.toml asks for, and agree with each other: a fresh clone installs
exactly what CI tested (scripts/setup.sh installs requirements/test.lock with --require-hashes)."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from helpers import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins(lock: str) -> dict[str, str]:
    text = (REPO / "requirements" / lock).read_text()
    found = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", text, re.M))
    # Every pin carries its hashes (pip refuses a lock with one missing under --require-hashes).
    lines = text.splitlines()
    hashed = [i for i, line in enumerate(lines) if re.match(r"[a-z0-9]", line) and "--hash=sha256:" in lines[i + 1]]
    assert len(hashed) == len(found) > 50
    return found


def test_every_dependency_is_locked_at_a_version_it_allows():
    for lock, requirements in (
        ("runtime.lock", PROJECT["dependencies"]),
        ("test.lock", PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]),
    ):
        locked = pins(lock)
        for text in requirements:
            req = Requirement(text)
            if req.name == "torch":  # installed per machine (CPU or CUDA build) at requirements/torch-version
                assert "torch" not in locked
                assert Version((REPO / "requirements" / "torch-version").read_text().strip()) in req.specifier
                continue
            assert req.name.lower() in locked, f"{lock} lacks {req.name}: run `bash scripts/lock.sh`"
            assert Version(locked[req.name.lower()]) in req.specifier, (
                f"{lock} pins {req.name}=={locked[req.name.lower()]}, pyproject asks {req.specifier}: "
                "run `bash scripts/lock.sh`"
            )


def test_the_test_lock_is_the_runtime_lock_plus_the_test_tools():
    runtime, test = pins("runtime.lock"), pins("test.lock")
    assert {name: test.get(name) for name in runtime} == runtime
    assert not [name for name in test if name.startswith(("nvidia-", "cuda-")) or name == "triton"]


def test_setup_installs_the_lock_hash_checked_then_torch():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert 'pip_install --require-hashes -r "$lock"' in setup and "requirements/test.lock" in setup
    assert "torch==$(cat requirements/torch-version)" in setup and "pip check" in setup
