"""The cluster recipes in cluster/ are checked offline: no cloud, no Kubernetes, no Ray cluster, no network
(except the AWS setup test's pip, which installs from the package registry through this machine's cache).

- aws-cluster.yaml goes through Ray's own `prepare_config` + `validate_config` (what `ray up` runs before it
  touches AWS; the defaults it merges come from the installed wheel's aws/defaults.yaml).
- kuberay.yaml / kueue.yaml are validated against schemas derived from the KubeRay and Kueue CRDs of the oldest
  and the newest release they say they run on (tests/data/crd-schemas.yaml, scripts/derive_crd_schemas.py),
  plus the rules their operators enforce and this project's own rules for S3 credentials and priorities.
- Every file in cluster/ is scanned for anything that looks like an AWS key.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet

from dcgan_ray.config import load_config
from dcgan_ray.ray_internals import validate_cluster_launcher_config
from helpers import REPO, checkout_files

CLUSTER = REPO / "cluster"
SECRET_NAME = "dcgan-ray-s3"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_SECRET_KEYS = ("AWS_SESSION_TOKEN",)  # only with temporary keys (SSO, an assumed role)
SERVICE_ACCOUNT = "dcgan-ray"
CREDENTIAL_NAME = re.compile(r"(?i)aws_?(secret_?access_?key|access_?key_?id|session_?token)")
# KubeRay's default submitter pod (ray-operator/controllers/ray/common/job.go, v1.7.0): Kueue counts it too.
SUBMITTER_REQUESTS = {"cpu": "500m", "memory": "200Mi"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: these checks must stay offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def walk(node, path=""):
    """Yield (path, key, value) for every mapping entry, however deep."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def quantity(value) -> float:
    """A Kubernetes quantity ("500m", "24Gi", 4) as a number of base units."""
    units = {
        "m": 1e-3,
        "": 1,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * units[unit]


# ---------------------------------------------------------------------------------------------- AWS launcher


@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())


def test_aws_config_passes_rays_validation(aws):
    # raises jsonschema.ValidationError / ValueError on a bad config
    prepared = validate_cluster_launcher_config(copy.deepcopy(aws))
    # The file's own node types survive the merge with Ray's defaults (which would add a spot m5.large).
    assert set(prepared["available_node_types"]) == set(aws["available_node_types"])
    assert prepared["setup_commands"] == aws["setup_commands"]


def test_aws_node_types(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU: 0 so no training lands on it"
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    assert workers, "no worker node types"
    for name, t in workers.items():
        assert t.get("min_workers") == 0, f"{name}: min_workers must be 0 (idle clusters cost nothing)"
        assert 0 < t["max_workers"] <= aws["max_workers"], f"{name}: max_workers out of (0, {aws['max_workers']}]"
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no worker type with a GPU"
    for name, t in gpu.items():
        assert re.match(r"(g|p)\d+[a-z]*\.", t["node_config"]["InstanceType"]), f"{name} is not a GPU instance"
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0 for t in workers.values()), (
        "no CPU worker type"
    )
    # jobs/svhn.yaml asks for scaling.num_workers GPU workers on one node (scaling.one_node): a GPU type
    # must hold them all, so their all-reduce stays off the network (docs/scaling.md).
    job = load_config(REPO / "jobs" / "svhn.yaml")
    assert job.scaling.one_node
    assert any(t["resources"]["GPU"] >= job.scaling.num_workers for t in gpu.values()), "no node type for wide jobs"
    # Studies keep single-GPU nodes: one 1-worker trial per node.
    study = load_config(REPO / "jobs" / "svhn-tune.yaml")
    assert study.scaling.num_workers == 1
    assert any(t["resources"]["GPU"] == 1 and t["max_workers"] >= 2 for t in gpu.values()), "no node type for studies"


def test_aws_s3_access_is_an_instance_profile_never_keys(aws):
    for name, t in aws["available_node_types"].items():
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: no IamInstanceProfile (S3 access)"
    for path, key, value in walk(aws):
        assert not (CREDENTIAL_NAME.search(str(key)) and value), f"credential {key} set at {path}"
    for path, key, value in walk(aws):
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                assert not re.search(r"(?i)aws_(secret_access_key|access_key_id|session_token)\s*=", text), (
                    f"credential assigned in {path}.{key}: {text!r}"
                )


# The Python of AWS's Deep Learning Base AMIs (AWS's release notes; NOTES.md): the recipe must name one whose
# Python the package installs on.
AMI_PYTHON = {"base-oss-nvidia-driver-gpu-ubuntu-22.04": "3.10", "base-oss-nvidia-driver-gpu-ubuntu-24.04": "3.12"}


def test_aws_ami_python_satisfies_the_package(aws):
    requires = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    assert "3.10" not in requires, "the 22.04 AMI's Python must stay refused, or this test proves nothing"
    for name, t in aws["available_node_types"].items():
        ami = re.search(r"/deeplearning/ami/x86_64/([^/]+)/latest/ami-id", t["node_config"]["ImageId"])
        assert ami and ami[1] in AMI_PYTHON, f"{name}: an AMI whose Python this test does not know"
        assert AMI_PYTHON[ami[1]] in requires, f"{name}: {ami[1]} has Python {AMI_PYTHON[ami[1]]}, not {requires}"
    # The lock is resolved for every Python the package allows, so it installs on the AMI's too.
    assert "--python-version 3.11" in (REPO / "scripts" / "lock.sh").read_text()
    assert str(requires) == ">=3.11"


def test_aws_starts_ray_with_token_auth(aws):
    assert aws["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"] if " start " in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c and "~/venv/bin/ray start" in c for c in starts)
    assert any("--head" in c for c in starts)
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in starts)


@pytest.mark.slow  # over 20 s with no server: outside the fast lane
def test_aws_setup_commands_install_the_package_in_a_fresh_home(aws, tmp_path):
    """The recipe's own setup commands, in order, as `ray up` runs them on a node: a home with the checkout
    where file_mounts puts it, package-manager lines stubbed (they print what they would do), then the
    environment they made imports the package and runs the CLI."""
    home = tmp_path / "home"
    node_home = f"/home/{aws['auth']['ssh_user']}"
    for target, source in aws["file_mounts"].items():
        here = home / Path(target).relative_to(node_home)
        if source == ".":
            for f in checkout_files():
                if (REPO / f).is_file():
                    (here / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / f, here / f)
        else:
            here.parent.mkdir(parents=True, exist_ok=True)
            here.write_text("a-token-made-by-ray-get-auth-token\n")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in ("sudo", "apt-get", "apt"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/package-manager.log\n')
        (stubs / tool).chmod(0o755)
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{stubs}:{os.environ['PATH']}",
        # pip's downloads come from this machine's cache, not the throwaway home's empty one
        "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
    }
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    for command in aws["setup_commands"]:
        done = subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    python = home / "venv" / "bin" / "python"
    check = subprocess.run(
        [
            str(python),
            "-c",
            "import dcgan_ray, dcgan_ray.ray_internals, torch, ray; print(ray.__version__, dcgan_ray.__file__)",
        ],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert check[0] == ray.__version__ and check[1].startswith(str(home / "dcgan-ray"))
    cli = subprocess.run(
        [str(home / "venv" / "bin" / "dcgan-ray"), "paths", str(home / "dcgan-ray/jobs/svhn.yaml")],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0 and "s3://dcgan-ray/dcgan-ray/runs/svhn-dcgan" in cli.stdout, cli.stderr
    assert 'export PATH="$HOME/venv/bin:$PATH"' in (home / ".bashrc").read_text()
    for start in aws["head_start_ray_commands"]:
        assert (home / "venv/bin/ray").exists() or "~/venv/bin/ray" not in start


# ------------------------------------------------------------------------------- AWS from an empty account

IAM = CLUSTER / "iam"
AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
# vCPUs of the recipe's instance types (AWS's EC2 instance type pages): EC2's quotas count these.
VCPUS = {"m5.xlarge": 4, "m5.2xlarge": 8, "g5.xlarge": 4, "g5.12xlarge": 48}


def readme() -> str:
    return (CLUSTER / "README.md").read_text()


def iam(name: str, **values: str) -> dict:
    text = (IAM / name).read_text()
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return json.loads(text)


def statements(document: dict) -> list[dict]:
    assert document["Version"] == "2012-10-17"
    return document["Statement"]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_iam_documents_are_complete_once_filled_in():
    files = sorted(p.name for p in IAM.glob("*.json"))
    assert files == [
        "ec2-trust.json",
        "head-policy.json",
        "irsa-trust.json",
        "pod-identity-trust.json",
        "s3-policy.json",
    ]
    text = readme() + (REPO / "docs" / "clusters.md").read_text()
    for name in files:
        assert f"cluster/iam/{name}" in text, f"cluster/README.md does not use cluster/iam/{name}"
        placeholders = set(re.findall(r"YOUR_[A-Z_]+", (IAM / name).read_text()))
        assert placeholders <= {"YOUR_BUCKET", "YOUR_ACCOUNT_ID", "YOUR_REGION", "YOUR_OIDC_PROVIDER", "YOUR_NAMESPACE"}
        for placeholder in placeholders:  # the README fills in each one
            assert re.search(rf"s[/#]{placeholder}[/#]", readme()), f"{name}: nothing fills in {placeholder}"
        for statement in statements(json.loads((IAM / name).read_text())):
            assert statement["Effect"] == "Allow" and statement["Action"]
            assert ("Principal" in statement) == name.endswith("-trust.json")
            assert ("Resource" in statement) != name.endswith("-trust.json")
            for action in as_list(statement["Action"]):
                assert re.fullmatch(r"[a-z0-9]+:[A-Za-z*]+", action), action
    assert iam("ec2-trust.json")["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ]


def test_the_s3_policy_is_the_bucket_and_the_default_prefix():
    (listing, objects) = statements(iam("s3-policy.json", YOUR_BUCKET="b"))
    assert as_list(listing["Action"]) == ["s3:ListBucket"] and listing["Resource"] == "arn:aws:s3:::b"
    assert set(as_list(objects["Action"])) == {
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
    }
    # the prefix of every job file in this repository and of the Kubernetes ConfigMap
    assert objects["Resource"] == f"arn:aws:s3:::b/{load_config(REPO / 'jobs' / 'svhn.yaml').storage.prefix}/*"
    (config_map,) = [d for d in load_docs("k8s-config.yaml") if d["kind"] == "ConfigMap"]
    assert yaml.safe_load(config_map["data"]["job.yaml"])["storage"]["prefix"] == "dcgan-ray"


def test_the_readme_makes_the_instance_profiles_the_recipe_names(aws):
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in aws["available_node_types"].values()}
    head = aws["available_node_types"][aws["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    (loop,) = re.findall(r"for role in ([\w -]+); do\n((?:  .*\n)+)done", readme())
    assert set(loop[0].split()) == profiles
    for command in (
        "aws iam create-role --role-name $role --assume-role-policy-document file://cluster/iam/ec2-trust.json",
        "aws iam create-instance-profile --instance-profile-name $role",
        "aws iam add-role-to-instance-profile --instance-profile-name $role --role-name $role",
        "aws iam attach-role-policy --role-name $role --policy-arn arn:aws:iam::$ACCOUNT_ID:policy/dcgan-ray-s3",
    ):
        assert command in loop[1], command
    assert (
        f"aws iam attach-role-policy --role-name {head} --policy-arn arn:aws:iam::$ACCOUNT_ID:policy/{head}" in readme()
    )
    # The head hands the workers their profile: PassRole on exactly the workers' role.
    workers = profiles - {head}
    policy = statements(iam("head-policy.json", YOUR_ACCOUNT_ID="123456789012", YOUR_REGION="us-east-1"))
    (pass_role,) = [s for s in policy if s["Action"] == "iam:PassRole"]
    assert as_list(pass_role["Resource"]) == [f"arn:aws:iam::123456789012:role/{w}" for w in sorted(workers)]
    (ssm,) = [s for s in policy if s["Action"] == "ssm:GetParameters"]
    assert fnmatch.fnmatchcase(f"arn:aws:ssm:{aws['provider']['region']}::parameter{AMI_PARAMETER}", ssm["Resource"])
    launch = {a for s in policy for a in as_list(s["Action"]) if a.startswith("ec2:")}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags"} <= launch
    assert not aws["provider"].get("cache_stopped_nodes"), "ec2:StopInstances/StartInstances would be needed"


def test_the_quota_table_is_the_recipes_arithmetic(aws):
    types = aws["available_node_types"]
    for name, t in types.items():
        if name != aws["head_node_type"]:
            assert t["resources"]["CPU"] == VCPUS[t["node_config"]["InstanceType"]], name
    spot = [t for t in types.values() if t["node_config"].get("InstanceMarketOptions")]
    gpu = [t for t in types.values() if t["resources"].get("GPU") and t not in spot]
    standard = [t for n, t in types.items() if not t["resources"].get("GPU") and n != aws["head_node_type"]]
    head = VCPUS[types[aws["head_node_type"]]["node_config"]["InstanceType"]]
    job = load_config(REPO / "jobs" / "svhn.yaml")
    (wide,) = [t for t in gpu if t["resources"]["GPU"] >= job.scaling.num_workers]
    vcpus = lambda node_types: sum(VCPUS[t["node_config"]["InstanceType"]] * t["max_workers"] for t in node_types)  # noqa: E731
    expected = {
        "L-DB2E81BA": (f"{VCPUS[wide['node_config']['InstanceType']]} vCPUs", vcpus(gpu)),
        "L-1216C47A": (f"{head} vCPUs", head + vcpus(standard)),
        "L-3819A6DF": ("none", vcpus(spot)),  # spot instances count against a quota of their own
    }
    for code, (for_the_job, at_most) in expected.items():
        assert re.search(rf"\(`{code}`\) \| {for_the_job}[^|]*\| {at_most} vCPUs \|", readme()), code
        assert "--quota-code $code" in readme() and code in re.search(r"for code in ([\w -]+); do", readme())[1]
    assert "aws service-quotas request-service-quota-increase" in readme()


def test_the_readme_gives_the_security_group_its_self_rule():
    assert "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$SG}]" in readme()
    assert re.search(r"--protocol tcp --port 22 --cidr \"[^\"]+/32\"", readme())
    assert "must let in all traffic from itself" in (CLUSTER / "aws-cluster.yaml").read_text()


def test_the_ami_is_pinned(aws):
    images = {t["node_config"]["ImageId"] for t in aws["available_node_types"].values()}
    assert len(images) == 1, "every node type runs one AMI (one Python, one driver)"
    (image,) = images
    assert re.fullmatch(rf"resolve:ssm:{re.escape(AMI_PARAMETER)}:(PIN|\d+)", image), image
    text = readme()
    assert text.index("bash cluster/pin-ami.sh") < text.index("ray up -y cluster/aws-cluster.yaml")


def test_pin_ami_writes_and_moves_the_version(aws, tmp_path):
    """cluster/pin-ami.sh against a stand-in `aws` CLI that answers as AWS documents: version 42 of the
    parameter, then an explicit 43; the file stays valid for Ray."""
    config = tmp_path / "aws-cluster.yaml"
    shutil.copy(CLUSTER / "aws-cluster.yaml", config)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "aws").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/aws.log\n'
        'case "$*" in\n'
        "  *Parameter.Version*) echo 42 ;;\n"
        "  *Parameter.Value*) echo ami-0123456789abcdef0 ;;\n"
        '  *describe-images*) printf "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)\\t2026-11-20\\n" ;;\n'
        "  *) exit 1 ;;\n"
        "esac\n"
    )
    (stubs / "aws").chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "CONFIG": str(config)}
    script = str(CLUSTER / "pin-ami.sh")
    first = subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True).stdout
    pinned = yaml.safe_load(config.read_text())
    assert {t["node_config"]["ImageId"] for t in pinned["available_node_types"].values()} == {
        f"resolve:ssm:{AMI_PARAMETER}:42"
    }
    assert "version 42" in first and "(was: PIN)" in first and "ami-0123456789abcdef0" in first
    assert all(
        f"--region {aws['provider']['region']}" in line for line in (tmp_path / "aws.log").read_text().splitlines()
    )
    validate_cluster_launcher_config(copy.deepcopy(pinned))
    second = subprocess.run(["bash", script, "43"], env=env, capture_output=True, text=True, check=True).stdout
    assert "version 43" in second and "(was: 42)" in second
    assert yaml.safe_load(config.read_text())["available_node_types"]["cpu_worker"]["node_config"]["ImageId"].endswith(
        ":43"
    )
    refused = subprocess.run(["bash", script, "latest"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "is not a parameter version" in refused.stderr


def test_the_recipe_leaves_the_autoscaler_v2_to_ray_up(aws):
    """docs/clusters.md: a job no node type can hold is refused at once only by the autoscaler v2, which Ray
    2.60's `ray up` turns on by itself (tests/test_ray_internals.py watches that); the recipe must not undo it."""
    starts = aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]
    assert not [c for c in starts if "autoscaler_v2" in c], "the start commands leave v2 to `ray up`"
    assert "RAY_UP_enable_autoscaler_v2=0" in readme()


# ------------------------------------------------------------------------------------------ KubeRay / Kueue

RAYJOB_FILES = ["kuberay.yaml", "kueue.yaml"]


def rayjob(name: str) -> dict:
    return one(load_docs(name), "RayJob")


def containers(job: dict) -> list[dict]:
    rc = job["spec"]["rayClusterSpec"]
    groups = [rc["headGroupSpec"], *rc.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


KUBERAY_SETS = ["kuberay-1.5.1", "kuberay-1.7.0"]  # the oldest KubeRay the recipes name, and the newest release
KUEUE_SETS = ["kueue-0.15.0", "kueue-0.19.2"]  # the oldest Kueue with v1beta2, and the newest release
KUEUE_V1BETA1_SET = "kueue-0.10.0-v1beta1"  # the fallback cluster/README.md gives for Kueue 0.10 to 0.14


def schema_cases() -> list[tuple[str, str]]:
    return [(f, k) for f in RAYJOB_FILES for k in KUBERAY_SETS] + [("kueue.yaml", k) for k in KUEUE_SETS]


@pytest.mark.parametrize("name, crds", schema_cases())
def test_documents_match_the_crd_schemas(name, crds):
    schemas = crd_schemas(crds)
    docs = [d for d in load_docs(name) if d["apiVersion"].startswith(("ray.io/", "kueue.x-k8s.io/"))]
    checked = [d for d in docs if d["kind"] in schemas]
    assert checked, f"{name}: nothing that {crds} describes"
    for doc in checked:
        assert doc["apiVersion"] == f"{SOURCES[crds]['group']}/{SOURCES[crds]['version']}", f"{name}: {doc['kind']}"
        jsonschema.Draft202012Validator(schemas[doc["kind"]]).validate(doc)
    assert {d["kind"] for d in docs} <= {*crd_schemas(KUBERAY_SETS[-1]), *crd_schemas(KUEUE_SETS[-1])}


def test_the_kueue_objects_as_v1beta1_match_kueue_0_10():
    """cluster/README.md: on Kueue 0.10 to 0.14, the same objects with apiVersion kueue.x-k8s.io/v1beta1."""
    schemas = crd_schemas(KUEUE_V1BETA1_SET)
    kueue = [d for d in load_docs("kueue.yaml") if d["apiVersion"].startswith("kueue.x-k8s.io/")]
    assert {d["kind"] for d in kueue} == set(schemas)
    for doc in kueue:
        jsonschema.Draft202012Validator(schemas[doc["kind"]]).validate({**doc, "apiVersion": "kueue.x-k8s.io/v1beta1"})


def test_the_stated_versions_are_the_tested_ones():
    text = readme()
    for name in ("kuberay.yaml", "kueue.yaml"):
        assert "KubeRay >= 1.5.1" in (CLUSTER / name).read_text()
    assert "Kueue >= 0.15" in (CLUSTER / "kueue.yaml").read_text()
    assert "KubeRay >= 1.5.1" in text and "Kueue >= 0.15" in text and "Kueue 0.10 to 0.14" in text
    assert [SOURCES[k]["tag"] for k in (*KUBERAY_SETS, *KUEUE_SETS, KUEUE_V1BETA1_SET)] == [
        "v1.5.1",
        "v1.7.0",
        "v0.15.0",
        "v0.19.2",
        "v0.10.0",
    ]


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_lifecycle(name):
    job = rayjob(name)
    spec = job["spec"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", job["metadata"]["name"]), (
        "KubeRay wants a DNS-1035 RayJob name of at most 47 characters"
    )
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] == "K8sJobMode"
    # Retried on a new cluster (a lost head or node, a Kueue readmission): the retry waits out the old driver's
    # lease in the bucket instead of being refused by it, and resumes (tests/test_ownership.py).
    assert spec["backoffLimit"] >= 2 and "--wait-for-lease" in shlex.split(spec["entrypoint"])
    # The code is installed in the image: a working_dir would upload it to the cluster again.
    assert "working_dir" not in yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    images = {c["image"].rsplit("-", 1)[0] for c in containers(job)}
    assert len(images) == 1, "head and workers run one build (CPU and GPU variants of one tag)"


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_gpu_workers(name):
    rc = rayjob(name)["spec"]["rayClusterSpec"]
    gpu_groups = [
        g
        for g in rc["workerGroupSpecs"]
        if any(
            quantity(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    for g in rc["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        for c in g["template"]["spec"]["containers"]:
            requests, limits = c["resources"].get("requests", {}), c["resources"]["limits"]
            if "nvidia.com/gpu" in requests:  # extended resources: requests must equal limits
                assert quantity(requests["nvidia.com/gpu"]) == quantity(limits["nvidia.com/gpu"])
    job = load_config(REPO / "jobs" / "svhn.yaml")
    assert job.scaling.use_gpu and job.scaling.one_node

    def pod_gpus(g: dict) -> float:
        return max(
            quantity(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in g["template"]["spec"]["containers"]
        )

    # scaling.one_node: one running pod (one node) must hold every worker of the job.
    assert any(g["replicas"] >= 1 and pod_gpus(g) >= job.scaling.num_workers for g in gpu_groups), (
        "no running pod holds jobs/svhn.yaml's scaling.num_workers GPUs"
    )
    # Studies keep a group of 1-GPU pods (idle in this job: replicas 0).
    assert any(pod_gpus(g) == 1 and g["maxReplicas"] >= 2 for g in gpu_groups), "no 1-GPU group for studies"


def pod_specs(job: dict) -> list[dict]:
    rc = job["spec"]["rayClusterSpec"]
    return [g["template"]["spec"] for g in [rc["headGroupSpec"], *rc.get("workerGroupSpecs", [])]]


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_s3_credentials_come_from_the_service_account_or_the_secret(name):
    """EKS without static keys: every Ray pod runs as the ServiceAccount of k8s-config.yaml (IRSA or Pod
    Identity). Other clusters: the keys come from the Secret, each optional (no Secret on EKS), the session
    token too. Never a literal, never the runtime env."""
    job = rayjob(name)
    (account,) = [d for d in load_docs("k8s-config.yaml") if d["kind"] == "ServiceAccount"]
    assert account["metadata"]["name"] == SERVICE_ACCOUNT
    for pod in pod_specs(job):
        assert pod.get("serviceAccountName") == SERVICE_ACCOUNT
    for c in containers(job):
        env = {e["name"]: e for e in c.get("env", [])}
        assert set(env) >= {*SECRET_KEYS, *OPTIONAL_SECRET_KEYS}, f"{c['name']}: {sorted(env)}"
        for key in (*SECRET_KEYS, *OPTIONAL_SECRET_KEYS):
            ref = env[key].get("valueFrom", {}).get("secretKeyRef", {})
            assert ref == {"name": SECRET_NAME, "key": key, "optional": True}, f"{c['name']}: {key}: {ref}"
        if "AWS_ENDPOINT_URL" in env:  # not needed (the job's storage.endpoint says it), but not a secret either
            endpoint = env["AWS_ENDPOINT_URL"]
            assert "valueFrom" not in endpoint and str(endpoint.get("value", "")).startswith(("http://", "https://"))
    # Anywhere in the document (containers added later included): no credential as a literal value.
    for path, key, value in walk(job):
        if key == "env":
            for e in value:
                if CREDENTIAL_NAME.fullmatch(e["name"]):
                    assert "value" not in e, f"{path}: {e['name']} has a literal value"
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{path}: {e['name']} not from a Secret"
    spec = job["spec"]
    assert "AWS_" not in spec.get("runtimeEnvYAML", ""), "credentials never go into the job's runtime env"
    assert "AWS_" not in spec["entrypoint"]


def test_the_service_account_is_annotated_for_irsa_and_the_readme_makes_the_role():
    (account,) = [d for d in load_docs("k8s-config.yaml") if d["kind"] == "ServiceAccount"]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::YOUR_ACCOUNT_ID:role/([\w+=,.@-]+)", role)
    role_name = role.rsplit("/", 1)[1]
    text = readme()
    assert f"aws iam create-role --role-name {role_name} --assume-role-policy-document file://" in text
    assert (
        f"aws iam attach-role-policy --role-name {role_name} --policy-arn arn:aws:iam::$ACCOUNT_ID:policy/dcgan-ray-s3"
        in text
    )
    assert "s#YOUR_ACCOUNT_ID#$ACCOUNT_ID#" in text and "cluster/k8s-config.yaml" in text
    (trust,) = statements(iam("irsa-trust.json", YOUR_ACCOUNT_ID="1", YOUR_OIDC_PROVIDER="oidc/x", YOUR_NAMESPACE="ns"))
    assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert trust["Condition"]["StringEquals"]["oidc/x:sub"] == f"system:serviceaccount:ns:{SERVICE_ACCOUNT}"
    assert trust["Condition"]["StringEquals"]["oidc/x:aud"] == "sts.amazonaws.com"
    (pod_identity,) = statements(iam("pod-identity-trust.json"))
    assert pod_identity["Principal"] == {"Service": "pods.eks.amazonaws.com"}
    assert set(pod_identity["Action"]) == {"sts:AssumeRole", "sts:TagSession"}
    assert f"--service-account {SERVICE_ACCOUNT}" in text and "aws eks create-pod-identity-association" in text
    # Pod Identity users take the IRSA annotation out: the webhook would inject a role that is tried first.
    assert "sed -i '/eks.amazonaws.com\\/role-arn/d' cluster/k8s-config.yaml" in text


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_trains_the_job_of_the_config_map(name):
    """The one place a user edits (bucket, endpoint) is k8s-config.yaml's ConfigMap; the head mounts it
    where the entrypoint reads it (tests/test_config.py loads the job it holds)."""
    job = rayjob(name)
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "dcgan_ray", "train"] and "--set" not in argv
    job_file = Path(argv[4])
    assert argv[5:] == ["--wait-for-lease"]
    (config_map,) = [d for d in load_docs("k8s-config.yaml") if d["kind"] == "ConfigMap"]
    assert job_file.name in config_map["data"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    (mount,) = [
        m for c in head["containers"] for m in c.get("volumeMounts", []) if Path(m["mountPath"]) == job_file.parent
    ]
    assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    # The images' tags start with the package's version (the digest after it: tests/test_image.py).
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert {c["image"].rsplit(":", 1)[1].split("-")[0] for c in containers(job)} == {version}


def test_recipes_state_the_models_predictions():
    """The efficiencies in the recipes' comments are what dcgan_ray.gan.scaling predicts for those nodes
    (fp32, batch 128 per worker, the A10G estimate), so they change when the model does."""
    from dcgan_ray.gan.scaling import LINKS, STEP_ESTIMATES, predict

    def said(workers: int, link: str) -> str:
        return f"{predict(workers, STEP_ESTIMATES['A10G'].seconds(128), LINKS[link]).efficiency:.0%}"

    aws = (CLUSTER / "aws-cluster.yaml").read_text()
    assert f"2 nodes train at {said(2, 'ethernet_10g')} efficiency" in aws
    assert f"4 at {said(4, 'ethernet_10g')}" in aws
    assert f"2 workers {said(2, 'pcie')}" in aws and f"4 workers {said(4, 'pcie')}" in aws
    for name in RAYJOB_FILES:
        text = (CLUSTER / name).read_text()
        assert f"over PCIe, {said(2, 'pcie')} scaling efficiency" in text
        assert f"10 Gb/s: {said(2, 'ethernet_10g')}" in text
    svhn = (REPO / "jobs" / "svhn.yaml").read_text()
    assert f"{said(2, 'pcie')} scaling efficiency" in svhn and f"against {said(2, 'ethernet_10g')}" in svhn


def test_kueue_queue_objects_are_linked():
    docs = load_docs("kueue.yaml")
    flavors = {d["metadata"]["name"] for d in docs if d["kind"] == "ResourceFlavor"}
    cq, lq, job = one(docs, "ClusterQueue"), one(docs, "LocalQueue"), one(docs, "RayJob")
    assert flavors, "no ResourceFlavor"
    for group in cq["spec"]["resourceGroups"]:
        for flavor in group["flavors"]:
            assert flavor["name"] in flavors, f"ClusterQueue uses unknown flavor {flavor['name']}"
            assert [r["name"] for r in flavor["resources"]] == group["coveredResources"], (
                "a flavor must list coveredResources, in the same order"
            )
    covered = {r for g in cq["spec"]["resourceGroups"] for r in g["coveredResources"]}
    assert {"cpu", "memory", "nvidia.com/gpu"} <= covered
    assert lq["spec"]["clusterQueue"] == cq["metadata"]["name"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == lq["metadata"]["name"]
    assert job["metadata"].get("namespace") == lq["metadata"].get("namespace"), "LocalQueues are per namespace"
    assert job["spec"]["suspend"] is True, "Kueue admits a RayJob by unsuspending it"
    assert job["spec"]["shutdownAfterJobFinishes"] is True, "Kueue needs the cluster deleted at the end"
    assert "clusterSelector" not in job["spec"], "a Kueue-managed RayJob cannot use an existing cluster"
    assert not job["spec"]["rayClusterSpec"].get("enableInTreeAutoscaling"), "needs Kueue's elastic jobs"


def test_kueue_quota_admits_the_job():
    docs = load_docs("kueue.yaml")
    cq, job = one(docs, "ClusterQueue"), one(docs, "RayJob")
    quota = {
        r["name"]: quantity(r["nominalQuota"])
        for g in cq["spec"]["resourceGroups"]
        for f in g["flavors"]
        for r in f["resources"]
    }
    rc = job["spec"]["rayClusterSpec"]
    pods = [(1, rc["headGroupSpec"]), *[(g["replicas"], g) for g in rc["workerGroupSpecs"]]]
    need = {k: quantity(v) for k, v in SUBMITTER_REQUESTS.items()}
    for count, group in pods:
        for c in group["template"]["spec"]["containers"]:
            for k, v in (c["resources"].get("requests") or c["resources"]["limits"]).items():
                need[k] = need.get(k, 0) + count * quantity(v)
    for k, v in need.items():
        assert k in quota and v <= quota[k], f"one job needs {k}={v:g}, the ClusterQueue has {quota.get(k)}"


def test_kueue_rayjob_is_the_kuberay_job():
    plain, queued = rayjob("kuberay.yaml"), rayjob("kueue.yaml")
    differ = {"suspend", "ttlSecondsAfterFinished"}
    assert {k: v for k, v in queued["spec"].items() if k not in differ} == {
        k: v for k, v in plain["spec"].items() if k not in differ
    }, "kueue.yaml's RayJob must be kuberay.yaml's plus suspend (same images, entrypoint, credentials)"
    # Kueue frees the quota when KubeRay reports the job Complete or Failed (kueue pkg/controller/jobs/rayjob,
    # Finished()), while KubeRay deletes the cluster only ttlSecondsAfterFinished later: under Kueue, at once.
    assert queued["spec"]["ttlSecondsAfterFinished"] == 0


def test_kueue_priorities_preempt_within_the_queue():
    docs = load_docs("kueue.yaml")
    classes = {d["metadata"]["name"]: d["value"] for d in docs if d["kind"] == "WorkloadPriorityClass"}
    assert classes == {"dcgan-ray-interactive": 1000, "dcgan-ray-study": 100}
    cq = one(docs, "ClusterQueue")
    assert cq["spec"]["preemption"] == {"withinClusterQueue": "LowerPriority"}
    label = one(docs, "RayJob")["metadata"]["labels"]["kueue.x-k8s.io/priority-class"]
    assert label in classes and classes[label] == min(classes.values()), "the example job is the preemptible kind"
    assert "kueue.x-k8s.io/priority-class: dcgan-ray-interactive" in readme()


def test_readme_creates_the_secret_the_jobs_use():
    command = re.search(rf"kubectl create secret generic {SECRET_NAME}((?:.*\\\n)*.*)", readme())
    assert command, f"cluster/README.md does not show how to create the Secret {SECRET_NAME}"
    refs = {v["key"] for f in RAYJOB_FILES for _, k, v in walk(rayjob(f)) if k == "secretKeyRef"}
    assert refs == {*SECRET_KEYS, *OPTIONAL_SECRET_KEYS}
    for key in refs:
        assert f"--from-literal={key}=" in command.group(1), key


# --------------------------------------------------------------------------------------------- secret scan

ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b")
# A 40-character key after a secret's name: on the same line (KEY=..., key: ...) or a few lines on
# (a Kubernetes env entry's `value:`).
SECRET_VALUE = re.compile(
    r"(?i)(?:secret[_-]?access[_-]?key|secret[_-]?key|aws[_-]?secret)[\s\S]{0,80}?[:=]\s*[\"']?"
    r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)


def secret_hits(text: str) -> list[str]:
    return ACCESS_KEY_ID.findall(text) + SECRET_VALUE.findall(text)


def test_secret_patterns_catch_keys():
    # AWS's documented example key pair, assembled here so that no file holds it whole.
    key_id, secret = "AKIA" + "IOSFODNN7" + "EXAMPLE", "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert secret_hits(f"export AWS_ACCESS_KEY_ID={key_id}") == [key_id]
    for text in (
        f"AWS_SECRET_ACCESS_KEY={secret}",
        f'aws_secret_access_key: "{secret}"',
        f"--from-literal=AWS_SECRET_ACCESS_KEY={secret}",
        f"- name: AWS_SECRET_ACCESS_KEY\n  value: {secret}\n",
    ):
        assert secret_hits(text) == [secret], text
    assert secret_hits("AWS_SECRET_ACCESS_KEY=... dcgan-dev-secret") == []


def test_no_credentials_in_cluster_files():
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
    assert {"aws-cluster.yaml", "kuberay.yaml", "kueue.yaml", "README.md"} <= {p.name for p in files}
    hits = {str(p.relative_to(REPO)): h for p in files if (h := secret_hits(p.read_text(errors="replace")))}
    assert hits == {}
    for p in files:
        if p.suffix in (".yaml", ".yml"):
            kinds = [d.get("kind") for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]
            assert "Secret" not in kinds, f"{p.name}: create the Secret with kubectl (README), not from a file"


# ------------------------------------------------------------------------------------ derived CRD schemas
# tests/data/crd-schemas.yaml (made by scripts/derive_crd_schemas.py): per release, the CRDs' schemas of the
# fields the recipes set; `other` lists a CRD's fields that the recipes do not set, accepted as anything.

_DERIVED = yaml.safe_load((Path(__file__).parent / "data" / "crd-schemas.yaml").read_text())
SOURCES = {
    name: {**source, "group": "ray.io" if source["repository"].endswith("kuberay") else "kueue.x-k8s.io"}
    for name, source in _DERIVED["sources"].items()
}


def _expand(node):
    if isinstance(node, dict):
        out = {k: _expand(v) for k, v in node.items() if k != "other"}
        if "other" in node:
            out.setdefault("properties", {}).update({name: True for name in node["other"]})
        return out
    if isinstance(node, list):
        return [_expand(v) for v in node]
    return node


def crd_schemas(name: str) -> dict[str, dict]:
    derived = dict(_DERIVED["schemas"][name])
    defs = _expand(derived.pop("$defs"))
    return {kind: {**_expand(schema), "$defs": defs} for kind, schema in derived.items()}


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_worker_pods_outlast_the_drain_deadline(name):
    """SIGTERM to a worker pod's `ray start --block` drains its Ray node with RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
    (30 s) to go: the run checkpoints in that time only if the kubelet's SIGKILL comes later."""
    for group in rayjob(name)["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
        drain_s = float(env.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S") or 30)
        assert pod["terminationGracePeriodSeconds"] >= drain_s + 30, group["groupName"]


def test_aws_spot_workers_pass_the_notice_on(aws):
    """A spot GPU type beside the on-demand one, and every worker starts the spot watcher (which exits at once
    on an on-demand instance: tests/test_spot.py)."""
    spot = [t for t in aws["available_node_types"].values() if t["node_config"].get("InstanceMarketOptions")]
    assert spot and all(t["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"} for t in spot)
    assert all(t["resources"].get("GPU", 0) >= 1 for t in spot)
    on_demand = [t for t in aws["available_node_types"].values() if not t["node_config"].get("InstanceMarketOptions")]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in on_demand)
    (watch,) = [c for c in aws["worker_start_ray_commands"] if "spot-watch" in c]
    argv = shlex.split(watch.split(";")[-1].split(">")[0])
    assert argv[-3:] == ["~/venv/bin/dcgan-ray", "spot-watch", "--address=$RAY_HEAD_IP:6379"], argv
    assert argv[:2] == ["RAY_AUTH_MODE=token", "nohup"] and watch.rstrip().endswith("&")
