"""The Dockerfile, checked without Docker (images cannot be pulled or built on these machines): its base is Ray's
CPU image of the pinned Ray and a Python the package supports; torch comes first, alone and hash-checked, and
brings the image's one CUDA runtime (VARIANT=gpu) or none (cpu); every folder it writes to is made by the user
who writes there; the install check covers what the locks install and nothing of the base image; the recipes'
tags are the version and the digest of what the image is made of; every file it copies is in the build context,
and nothing secret is in that context or the image's settings."""

from __future__ import annotations

import fnmatch
import hashlib
import posixpath
import re
import subprocess
import sys
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


def expand(text: str, **args: str) -> str:
    values = {**arg_defaults(), **args}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], text)


def base_image(**args: str) -> str:
    (source,) = [a for i, a in instructions() if i == "FROM"]
    return expand(source.split()[0], **args)


def locked(name: str, lock: str = "runtime.lock") -> list[str]:
    """The versions a lock pins `name` at (one per environment marker)."""
    return re.findall(rf"^{name}==([^ ;\\]+)", (REPO / "requirements" / lock).read_text(), re.M)


def lock_names(lock: str) -> set[str]:
    return set(re.findall(r"^([a-z0-9][a-z0-9._-]*)==", (REPO / "requirements" / lock).read_text(), re.M))


CUDA_RUNTIME = re.compile(r"(nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|triton)")
VARIANTS = ("gpu", "cpu")


def test_the_base_is_rays_cpu_image_of_the_pinned_ray_and_a_supported_python():
    (ray,) = locked("ray")
    # Ray's CPU image for both variants: it has no CUDA toolkit, so the GPU variant's only CUDA is torch's.
    assert base_image() == f"rayproject/ray:{ray}-py311-cpu"
    assert Version(arg_defaults()["RAY_VERSION"]) in SpecifierSet(SUPPORTED_RAY)
    python = re.fullmatch(r"py(\d)(\d+)", arg_defaults()["PYTHON_TAG"])
    assert Version(f"{python[1]}.{python[2]}") in SpecifierSet(PROJECT["requires-python"])
    # The KubeRay manifests run this image on a Ray cluster of the same version.
    for name in ("kuberay.yaml", "kueue.yaml"):
        (job,) = [d for d in yaml.safe_load_all((REPO / "cluster" / name).read_text()) if d and d["kind"] == "RayJob"]
        assert job["spec"]["rayClusterSpec"]["rayVersion"] == arg_defaults()["RAY_VERSION"]


def test_torch_comes_first_alone_and_hash_checked():
    runs = [a for i, a in instructions() if i == "RUN"]
    (torch_run,) = [r for r in runs if "-r requirements/torch-${VARIANT}.lock" in r]
    assert "--no-deps --require-hashes -r requirements/torch-${VARIANT}.lock" in torch_run
    (lock_run,) = [r for r in runs if "-r requirements/runtime.lock" in r]
    assert "--require-hashes" in lock_run
    (package_run,) = [r for r in runs if "-e ." in r]
    # torch's layer, then the lock's, then the package's: a new lock leaves the torch layer as it was.
    assert runs.index(torch_run) < runs.index(lock_run) < runs.index(package_run)
    copies = [a for i, a in instructions() if i == "COPY"]
    assert copies[0].split()[-2] == "requirements/torch-${VARIANT}.lock", "torch's layer may depend on its lock only"
    torch = (REPO / "requirements" / "torch-version").read_text().strip()
    (torch_spec,) = [d.removeprefix("torch") for d in PROJECT["dependencies"] if d.startswith("torch")]
    assert Version(torch) in SpecifierSet(torch_spec) and Version(torch) >= Version("2.6")
    assert locked("torch", "torch-gpu.lock") == [torch]
    assert locked("torch", "torch-cpu.lock") == [f"{torch}+cpu"]
    for variant in VARIANTS:
        text = (REPO / "requirements" / f"torch-{variant}.lock").read_text()
        entries = re.split(r"\n(?=[a-z0-9])", text.split("\n", 1)[1])[1:]
        assert entries and all(re.search(r"--hash=sha256:[0-9a-f]{64}", e) for e in entries), variant
    assert "--index-url https://download.pytorch.org/whl/cpu" in (REPO / "requirements" / "torch-cpu.lock").read_text()


def test_the_image_has_one_cuda_runtime():
    """The GPU variant's CUDA is torch's wheels, the CPU variant has none, and the lock of the layer after
    torch's brings no other (scripts/lock.sh leaves them out of it)."""
    gpu, cpu = lock_names("torch-gpu.lock"), lock_names("torch-cpu.lock")
    assert gpu - {"torch"} and all(CUDA_RUNTIME.fullmatch(n) for n in gpu - {"torch"}), gpu
    assert {"nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= gpu
    assert cpu == {"torch"}
    assert not [n for n in lock_names("runtime.lock") if CUDA_RUNTIME.fullmatch(n)]
    assert base_image().endswith("-cpu") and "cuda" not in base_image()


def test_the_install_check_covers_the_locks_only():
    runs = " ".join(a for i, a in instructions() if i == "RUN")
    assert "pip check" not in runs, "pip check checks the base image's packages too"
    assert (
        "python scripts/check_installed.py requirements/runtime.lock requirements/torch-${VARIANT}.lock "
        "--package dcgan-ray" in runs
    )


def test_the_install_check_passes_here_and_catches_what_it_is_for(tmp_path):
    """scripts/check_installed.py against this machine's environment: the locks it was set up from pass; a lock
    that pins another version, and a package whose requirement no lock pins, fail in one line each."""
    check = [sys.executable, str(REPO / "scripts" / "check_installed.py")]
    import torch

    torch_lock = tmp_path / "torch.lock"
    torch_lock.write_text(f"torch=={torch.__version__} \\\n    --hash=sha256:{'0' * 64}\n")
    ok = subprocess.run(
        [*check, str(REPO / "requirements" / "test.lock"), str(torch_lock), "--package", "dcgan-ray"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: ")
    (boto3,) = locked("boto3")
    wrong = tmp_path / "wrong.lock"
    wrong.write_text((REPO / "requirements" / "runtime.lock").read_text().replace(f"boto3=={boto3}", "boto3==1.0.0"))
    bad = subprocess.run(
        [*check, str(wrong), str(torch_lock), "--package", "dcgan-ray"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and f"error: boto3 is {boto3}, the lock pins 1.0.0" in bad.stderr.splitlines()
    unpinned = subprocess.run(
        [*check, str(REPO / "requirements" / "runtime.lock"), "--package", "dcgan-ray"], capture_output=True, text=True
    )
    assert unpinned.returncode == 1
    assert f"error: dcgan-ray requires torch, which no lock pins ({torch.__version__} came from elsewhere)" in (
        unpinned.stderr.splitlines()
    )


def test_every_folder_written_to_belongs_to_the_user_who_writes():
    """The classic builder (and kaniko, older buildah) make a WORKDIR that does not exist as root, whatever USER
    says; COPY without --chown writes as root. So: one user from the start, each folder made by a RUN of that
    user before it is a WORKDIR or a COPY target, every COPY chowned to that user."""
    user, made, workdir = None, set(), "/"
    for instruction, args in instructions():
        if instruction == "USER":
            assert user is None, "one user for every step"
            user = args.strip()
            assert user not in ("root", "0")
        elif instruction in ("RUN", "WORKDIR", "COPY"):
            assert user is not None, f"{instruction} {args}: before USER, it runs as root"
        if instruction == "RUN" and "mkdir -p" in args:
            made |= {w.rstrip("/") for w in args.split("mkdir -p", 1)[1].split("&&")[0].split() if w.startswith("/")}
        elif instruction == "WORKDIR":
            workdir = posixpath.join(workdir, args.strip()).rstrip("/")
            assert workdir in made, f"WORKDIR {workdir} is not made by {user} first"
        elif instruction == "COPY":
            assert f"--chown={user}:" in args, f"COPY {args}: without --chown={user} it writes as root"
            target = posixpath.normpath(posixpath.join(workdir, args.split()[-1]))
            assert target in made or target == workdir, f"COPY to {target}: not a folder {user} made"


def test_the_recipes_tags_are_the_version_and_the_digest():
    made_of = b"".join(
        (REPO / f).read_bytes()
        for f in [
            "Dockerfile",
            "requirements/runtime.lock",
            "requirements/torch-cpu.lock",
            "requirements/torch-gpu.lock",
        ]
    )
    tag = f"{PROJECT['version']}-{hashlib.sha256(made_of).hexdigest()[:12]}"
    script = subprocess.run(
        ["bash", str(REPO / "scripts" / "image-tag.sh")], capture_output=True, text=True, check=True
    )
    assert script.stdout.strip() == tag
    for name in ("kuberay.yaml", "kueue.yaml"):
        (job,) = [d for d in yaml.safe_load_all((REPO / "cluster" / name).read_text()) if d and d["kind"] == "RayJob"]
        rc = job["spec"]["rayClusterSpec"]
        head = rc["headGroupSpec"]["template"]["spec"]["containers"]
        workers = [c for g in rc["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
        # The head (and KubeRay's submitter, which takes the head's image) train nothing: the CPU image.
        assert {c["image"] for c in head} == {f"your-registry/dcgan-ray:{tag}-cpu"}, (
            f"{name}: the head's image; after changing the Dockerfile or a lock, put {tag} in the recipes"
        )
        assert {c["image"] for c in workers} == {f"your-registry/dcgan-ray:{tag}-gpu"}, f"{name}: the workers' image"
        assert "submitterPodTemplate" not in job["spec"], "the submitter takes the head's (CPU) image"
        assert {c.get("imagePullPolicy") for c in head + workers} == {"IfNotPresent"}


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
            for source in {expand(s, VARIANT=v) for s in sources for v in VARIANTS}:
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
