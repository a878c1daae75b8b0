"""Ray's non-public names that dcgan-ray uses are all in dcgan_ray/ray_internals.py, and still there.

No cluster: these run in seconds, so a Ray upgrade fails here, by name, instead of in the middle of the
20-minute suite (or, for the Tune guard, silently copying credentials again).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import tomllib
from pathlib import Path

import pytest
import ray
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from dcgan_ray import ray_internals
from dcgan_ray.ray_internals import SUPPORTED_RAY, UnsupportedRay, check_ray_version
from helpers import REPO

CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"}


def test_the_installed_ray_is_the_supported_one():
    assert Version(ray.__version__) in SpecifierSet(SUPPORTED_RAY)


def test_another_ray_is_refused_in_one_line_naming_the_range(monkeypatch):
    monkeypatch.delenv(ray_internals.UNSUPPORTED_RAY_OPT_IN, raising=False)
    for version in ("2.61.0", "2.59.1", "3.0.0"):
        with pytest.raises(
            UnsupportedRay,
            match=r"needs Ray >=2\.60,<2\.61 .* "
            rf"but Ray {re.escape(version)} is installed"
            r": install the pinned one with `pip install --require-hashes -r "
            r"requirements/runtime\.lock`",
        ) as e:
            check_ray_version(version)
        assert "\n" not in str(e.value)
    check_ray_version("2.60.3")
    monkeypatch.setenv(ray_internals.UNSUPPORTED_RAY_OPT_IN, "1")
    check_ray_version("2.61.0")  # the opt-in for trying an upgrade


def test_every_pin_of_ray_is_the_supported_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray_requirement,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    assert ray_requirement.split("]", 1)[1] == SUPPORTED_RAY
    for lock in ("runtime.lock", "test.lock"):
        (locked,) = re.findall(r"^ray==(\S+)", (REPO / "requirements" / lock).read_text(), re.M)
        assert Version(locked) in SpecifierSet(SUPPORTED_RAY), f"{lock} pins ray {locked}"


def _private_ray_uses(path: Path) -> list[str]:
    """`ray...._x` imports and attribute chains in a file's code (comments and strings do not count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
            names = [node.module, *(a.name for a in node.names)]
            if any(part.startswith("_") for name in names for part in name.split(".")):
                found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ray" and any(p.startswith("_") for p in alias.name.split(".")):
                    found.append(f"{path.name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id == "ray":
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_no_private_ray_name_outside_the_one_module():
    files = [p for d in ("dcgan_ray", "tests", "benchmarks") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 40
    # This file checks the names themselves, so it is the one other place that spells them.
    offenders = [
        use for p in files if p.name not in ("ray_internals.py", Path(__file__).name) for use in _private_ray_uses(p)
    ]
    assert offenders == []
    # The scan sees what it is meant to see.
    assert _private_ray_uses(REPO / "dcgan_ray" / "ray_internals.py")


def test_the_signatures_relied_on_are_unchanged():
    params = {name: list(sig.parameters) for name, sig in ray_internals.signatures().items()}
    assert params == {
        "TorchTrainer._initialize_and_run_controller": ["self", "controller_init_kwargs"],
        "DefaultFailurePolicy.__init__": ["self", "failure_config"],
        "DefaultFailurePolicy.make_decision": ["self", "training_failed_error"],
        "UserExceptionWithTraceback.__init__": ["self", "exc", "traceback_str"],
        "FakeMultiNodeProvider._create_node_with_resources_and_labels": [
            "self",
            "node_config",
            "tags",
            "count",
            "resources",
            "labels",
        ],
    }
    # The controller still takes the policy that _initialize_and_run_controller hands it.
    from ray.train.v2._internal.execution.controller.controller import TrainController

    assert "failure_policy" in inspect.signature(TrainController.__init__).parameters


def test_the_train_function_exception_is_unwrapped():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    raised = ValueError("the worker's own error")
    assert ray_internals.train_function_exception(UserExceptionWithTraceback(raised, "Traceback ...")) is raised
    assert ray_internals.train_function_exception(raised) is None


def test_the_failure_policy_raises_what_a_restart_cannot_fix():
    policy = ray_internals._StopWhen(
        ray.train.FailureConfig(max_failures=5), lambda e: "refused" if isinstance(e, PermissionError) else None
    )
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    assert policy.make_decision(PermissionError("no")) is FailureDecision.RAISE


def test_the_train_function_logger_is_the_one_ray_logs_through():
    module = importlib.import_module(ray_internals.RAY_TRAIN_FUNCTION_ERRORS_LOGGER)
    assert module.logger.name == ray_internals.RAY_TRAIN_FUNCTION_ERRORS_LOGGER
    assert "Error in training function" in inspect.getsource(module)


def test_tune_still_copies_credentials_unless_told_not_to(monkeypatch):
    from ray.tune.execution import class_cache

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", set(class_cache.ENV_VARS_TO_PROPAGATE))
    # If Ray stops listing them here, the guard has nothing to remove: look where Tune copies them now.
    assert CREDENTIALS <= class_cache.ENV_VARS_TO_PROPAGATE
    ray_internals.stop_tune_copying_env_vars(CREDENTIALS)
    assert not CREDENTIALS & class_cache.ENV_VARS_TO_PROPAGATE
    assert "ENV_VARS_TO_PROPAGATE" in inspect.getsource(class_cache._ActorClassCache.get)


def test_the_autoscaler_and_state_names_exist():
    from ray._raylet import InnerGcsClient  # GcsClient hands its calls to this one
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply
    from ray.experimental.internal_kv import _internal_kv_get

    assert callable(InnerGcsClient.get_cluster_status) and callable(_internal_kv_get)
    state = GetClusterStatusReply().autoscaling_state
    assert hasattr(state, "autoscaler_state_version") and hasattr(state, "infeasible_gang_resource_requests")
    assert format_readonly_node_type("abc") != "abc"
    assert callable(ray._private.state.state.get_max_resources_from_cluster_config)
    assert hasattr(ray._private.worker, "_global_node")


def test_the_elastic_policy_sees_nodes_through_the_coordinators_ticks():
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client, elastic

    assert ray_internals.elastic_view_refresh_s() == 20.0
    assert "self.TICK_INTERVAL_S" in inspect.getsource(coordinator._AutoscalingCoordinatorActor)
    assert "_AutoscalingCoordinatorActor" in inspect.getsource(autoscaling_coordinator_client)
    assert "get_reserved_resources" in inspect.getsource(elastic.ElasticScalingPolicy)


def test_ray_up_runs_the_autoscaler_v2_by_itself():
    """cluster/aws-cluster.yaml relies on it (docs/clusters.md: only the autoscaler v2 reports a request no node
    type can hold): Ray 2.60's `ray up` exports RAY_enable_autoscaler_v2=1 with the head's instance id into its
    start commands unless RAY_UP_enable_autoscaler_v2=0 is set where it runs."""
    from ray.autoscaler._private import commands

    source = inspect.getsource(commands.get_or_create_head_node)
    assert 'os.getenv("RAY_UP_enable_autoscaler_v2", "1") == "1"' in source
    assert '"RAY_enable_autoscaler_v2": "1"' in source and '"RAY_CLOUD_INSTANCE_ID": head_node' in source


def test_drain_node_takes_the_options_the_spot_watcher_gives_it():
    """`ray drain-node` is hidden from `ray --help` and not public API: its options, as this Ray has them."""
    from ray.scripts import scripts

    command = ray_internals.drain_node_command("127.0.0.2:6379", "ab" * 28, 90, "spot instance-action terminate")
    assert command[1] == "drain-node"
    options = {o for p in scripts.drain_node.params for o in p.opts}
    given = {a.split("=", 1)[0] for a in command[2:]}
    assert given <= options, given - options
    reason = next(p for p in scripts.drain_node.params if "--reason" in p.opts)
    assert "DRAIN_NODE_REASON_PREEMPTION" in reason.type.choices
