"""The Dockerfile, checked without Docker (images cannot be pulled or built on these machines): its base is
Ray's image of the pinned Ray and a Python the package supports, every file it copies is in the build
context, and nothing secret is in that context or the image's settings."""

from __future__ import annotations

import fnmatch
import re
import tomllib

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from dcgan_ray.ray_internals import SUPPORTED_RAY
from helpers import REPO, checkout_files
from test_cluster_recipes import secret_hits

DOCKERFILE = (REPO / "Dockerfile").read_text()
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    kept = "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#"))
    text = re.sub(r"\\\n", " ", kept)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instructions() if i == "ARG" and "=" in a)


def base_image(**args: str) -> str:
    (source,) = [a for i, a in instructions() if i == "FROM"]
    values = {**arg_defaults(), **args}
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], source.split()[0])


def locked(name: str) -> str:
    (version,) = re.findall(rf"^{name}==(\S+)", (REPO / "requirements" / "runtime.lock").read_text(), re.M)
    return version


def test_the_base_is_rays_image_of_the_pinned_ray_and_a_supported_python():
    assert base_image() == f"rayproject/ray:{locked('ray')}-py311-gpu"
    assert base_image(VARIANT="cpu") == f"rayproject/ray:{locked('ray')}-py311-cpu"
    assert Version(arg_defaults()["RAY_VERSION"]) in SpecifierSet(SUPPORTED_RAY)
    python = re.fullmatch(r"py(\d)(\d+)", arg_defaults()["PYTHON_TAG"])
    assert Version(f"{python[1]}.{python[2]}") in SpecifierSet(PROJECT["requires-python"])
    # The KubeRay manifests run this image on a Ray cluster of the same version.
    for name in ("kuberay.yaml", "kueue.yaml"):
        (job,) = [d for d in yaml.safe_load_all((REPO / "cluster" / name).read_text()) if d and d["kind"] == "RayJob"]
        assert job["spec"]["rayClusterSpec"]["rayVersion"] == arg_defaults()["RAY_VERSION"]


def test_it_installs_the_lock_hash_checked_then_torch_then_the_package():
    runs = " ".join(a for i, a in instructions() if i == "RUN")
    assert "--require-hashes -r requirements/runtime.lock" in runs
    assert '"torch==$(cat requirements/torch-version)"' in runs
    assert runs.index("runtime.lock") < runs.index("torch==") < runs.index("--no-deps -e .")
    assert "pip check" in runs
    torch = Version((REPO / "requirements" / "torch-version").read_text().strip())
    (torch_spec,) = [d.removeprefix("torch") for d in PROJECT["dependencies"] if d.startswith("torch")]
    assert torch in SpecifierSet(torch_spec) and torch >= Version("2.6")
    assert "gpu)" in runs and "cpu)" in runs, "the VARIANT build argument picks the torch build"


def test_it_runs_as_a_user_and_holds_no_credentials():
    users = [a.strip() for i, a in instructions() if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    for instruction, args in instructions():
        if instruction in ("ENV", "ARG"):
            assert not re.search(r"(?i)aws|secret|token|password", args), f"{instruction} {args}"


def context_files() -> list[str]:
    """What `docker build .` sends of this checkout."""
    return in_context(checkout_files())


def in_context(files: list[str]) -> list[str]:
    """The files .dockerignore lets through (the last matching pattern wins; a path is excluded with its
    folder unless a later pattern takes it back)."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    kept = []
    for path in files:
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for pattern in patterns:
            negated, glob = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
            if any(fnmatch.fnmatchcase(p, glob) for p in prefixes):
                excluded = not negated
        if not excluded:
            kept.append(path)
    return kept


def test_the_context_holds_what_is_copied_and_nothing_else():
    context = context_files()
    for instruction, args in instructions():
        if instruction == "COPY":
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such file"
                assert any(f == source.rstrip("/") or f.startswith(source) for f in context), (
                    f"COPY {source}: .dockerignore leaves it out"
                )
    assert "dcgan_ray/ray_internals.py" in context and "requirements/runtime.lock" in context
    assert not [f for f in context if f.startswith((".git/", ".venv/", "cluster/", "tests/"))]
    assert not [f for f in context if "__pycache__" in f]


@pytest.mark.parametrize(
    "path",
    [
        "cluster/dev.env",
        ".venv/pyvenv.cfg",
        ".git/config",
        "tests/conftest.py",
        "dcgan_ray/__pycache__/cli.cpython-311.pyc",
        "demo-output/latest.png",
        ".env",
    ],
)
def test_the_context_rules_leave_out(path):
    assert in_context([path, "dcgan_ray/cli.py"]) == ["dcgan_ray/cli.py"]


def test_nothing_secret_is_in_the_context():
    context = context_files()
    assert len(context) > 30
    hits = {
        f: h for f in context if (REPO / f).is_file() and (h := secret_hits((REPO / f).read_text(errors="replace")))
    }
    assert hits == {}
