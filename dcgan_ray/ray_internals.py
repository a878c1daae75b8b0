"""Every name of Ray's that is not public API, in one module, for the one Ray minor version it was read from.

Ray offers no public hook for some of what dcgan-ray does: a failure policy that does not restart the
workers when a restart cannot help, the autoscaler's view of the cluster (is there one, what could it
launch, what does it call infeasible), keeping credentials out of Tune's runtime envs, the exception
Ray Train wraps around what the train function raised. Those uses live here and nowhere else, so an
upgrade of Ray breaks in one place, by name:

- importing this module checks the installed Ray against `SUPPORTED_RAY` (the pin of pyproject.toml
  and requirements/*.lock) and stops with one line naming the supported range;
- tests/test_ray_internals.py (no cluster, a few seconds) checks that every name below is still there
  with the signature used here.

Everything else in the package uses Ray's public API only. To try another Ray: set
DCGAN_RAY_UNSUPPORTED_RAY=1 and run `pytest tests/test_ray_internals.py` first.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import ray
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from dcgan_ray.errors import DcganError

SUPPORTED_RAY = ">=2.60,<2.61"
"""The Ray versions whose internals this module was read from (Ray 2.60's wheel and source)."""

UNSUPPORTED_RAY_OPT_IN = "DCGAN_RAY_UNSUPPORTED_RAY"


class UnsupportedRay(DcganError):
    """The installed Ray is outside SUPPORTED_RAY."""


def check_ray_version(version: str | None = None) -> None:
    version = version or ray.__version__
    if Version(version) in SpecifierSet(SUPPORTED_RAY) or os.environ.get(UNSUPPORTED_RAY_OPT_IN) == "1":
        return
    raise UnsupportedRay(
        f"dcgan-ray needs Ray {SUPPORTED_RAY} (it uses Ray internals checked against that range) but Ray {version} "
        f"is installed: install the pinned one with `pip install --require-hashes -r requirements/runtime.lock`, "
        f"or to try this one set {UNSUPPORTED_RAY_OPT_IN}=1 and run `pytest tests/test_ray_internals.py` first"
    )


check_ray_version()

# Imported after the version check: on another Ray these may not exist, and the check's line is the clearer one.
from ray.train.torch import TorchTrainer  # noqa: E402
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback  # noqa: E402
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision  # noqa: E402

# --- Ray Train: what the train function raised, and a failure policy of our own -------------------------

RAY_TRAIN_FUNCTION_ERRORS_LOGGER = "ray.train.v2._internal.util"
"""The logger through which Ray Train logs, with its traceback, what the train function raised."""


def train_function_exception(error: BaseException) -> BaseException | None:
    """The exception the train function raised, where `error` is Ray Train's wrapper of it (which keeps
    it only in a private attribute); None for any other error."""
    if isinstance(error, UserExceptionWithTraceback):
        return error._base_exc
    return None


class _StopWhen(DefaultFailurePolicy):
    """Ray Train's default failure policy, except that a failure `stop_reason` explains is raised at once
    instead of restarting the workers."""

    def __init__(self, failure_config, stop_reason: Callable[[BaseException], str | None]):
        super().__init__(failure_config)
        self.stop_reason = stop_reason

    def make_decision(self, training_failed_error):
        reason = self.stop_reason(training_failed_error)
        if reason is not None:
            logging.getLogger(__name__).warning("not restarting the workers: a restart cannot fix this: %s", reason)
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class TorchTrainerStoppingOn(TorchTrainer):
    """TorchTrainer that does not restart its workers for failures that `stop_reason` returns a reason for
    (a restart would fail the same way); other failures restart up to FailureConfig.max_failures.

    Ray 2.60 builds its failure policy from FailureConfig alone; `_initialize_and_run_controller` is
    where `fit` hands the policy to the controller. `stop_reason` is pickled to the controller actor:
    make it a module-level function.
    """

    def __init__(self, *args, stop_reason: Callable[[BaseException], str | None], **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_reason = stop_reason

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = _StopWhen(self.run_config.failure_config, self.stop_reason)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


# --- The autoscaler's view of the cluster -----------------------------------------------------------------


def autoscaling_state() -> Any | None:
    """Autoscaler v2's state (an `autoscaler_pb2.AutoscalingState`), or None where the cluster has no v2
    autoscaler. Its `infeasible_gang_resource_requests` name placement groups no node type can hold."""
    # Ray's stub of its compiled _raylet and its generated protobuf modules leave these names out.
    from ray._raylet import GcsClient  # type: ignore[attr-defined]
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply  # type: ignore[attr-defined]

    reply = GetClusterStatusReply()
    try:
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
    except Exception:  # an older GCS or no autoscaler state: treated as "no v2 autoscaler"
        return None
    state = reply.autoscaling_state
    return state if state.autoscaler_state_version > 0 else None


def has_launching_autoscaler() -> bool:
    """Whether the head runs Ray's autoscaler over node types it can launch. v2 reports a state; v1
    publishes a status, which a head without an autoscaling config also has, with a read-only provider
    whose node types are just its nodes' names."""
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    if autoscaling_state() is not None:
        return True
    raw = _internal_kv_get(b"__autoscaling_status")
    mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {} if raw else {}
    return any(node_type != format_readonly_node_type(node) for node, node_type in mapping.items())


def largest_possible_resources() -> dict[str, float] | None:
    """The most of each resource the cluster could ever have, where it publishes its node types (KubeRay
    reports them to the GCS); None where it does not."""
    # Ray annotates the amounts as int; they are resource amounts like ray.cluster_resources()'s floats.
    return cast(dict[str, float] | None, ray._private.state.state.get_max_resources_from_cluster_config() or None)


# --- Ray Tune ---------------------------------------------------------------------------------------------


def stop_tune_copying_env_vars(names: Iterable[str]) -> None:
    """Stop Ray Tune from copying these variables of the driver's environment into every trial's runtime env.

    Tune 2.60 (`ray/tune/execution/class_cache.py`, `_ActorClassCache.get`) puts the variables named in
    `ENV_VARS_TO_PROPAGATE` into the trainable actor's `runtime_env.env_vars`, which Ray keeps in plain
    text (the state API, the dashboard, runtime_env_agent.log). The set is read each time an actor class
    is made, so removing the names here is enough. tests/test_ray_internals.py checks that the set still
    holds the credential names, so a Ray that moves it fails there instead of copying them again.
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(names)


def drain_node_command(gcs_address: str, node_id: str, deadline_s: int, message: str) -> list[str]:
    """`ray drain-node`: tell the GCS that a node will go (reason PREEMPTION) in `deadline_s` seconds, so Ray
    Train's preemption watcher passes the notice to the training loop. Ray 2.60 hides the command from `ray
    --help` and keeps it out of its public API (`ray/scripts/scripts.py`); tests/test_ray_internals.py checks
    its options. It does not stop the node: the cloud does that at the deadline."""
    beside = Path(sys.executable).parent / "ray"
    return [
        str(beside) if beside.exists() else "ray",
        "drain-node",
        f"--address={gcs_address}",
        f"--node-id={node_id}",
        "--reason=DRAIN_NODE_REASON_PREEMPTION",
        f"--reason-message={message}",
        f"--deadline-remaining-seconds={deadline_s}",
    ]


# --- The session, the fake autoscaler and the launcher's validation (tests and the dev stack) -------------


def elastic_view_refresh_s() -> float:
    """How often Ray Train's elastic policy sees the cluster's nodes anew, in seconds: it counts the
    resources that Ray Data's autoscaling coordinator reserved for it, from the nodes the coordinator saw
    when it last looked (once per tick). A test that brings a lost node back waits this long before a run
    that should count it."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor

    return float(_AutoscalingCoordinatorActor.TICK_INTERVAL_S)


def session_dir() -> str:
    """This process's Ray session folder (the logs of every Ray process of a local cluster)."""
    node = ray._private.worker._global_node
    assert node is not None, "session_dir() is called after ray.init()"
    return node.get_session_dir_path()


def validate_cluster_launcher_config(config: dict) -> dict:
    """What `ray up` checks before it touches a cloud: Ray's defaults merged in, then its schema. Returns
    the prepared config; raises jsonschema.ValidationError or ValueError."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def fake_multinode_provider_class() -> type:
    """Ray's fake multi-node autoscaler provider (it starts a real raylet per launched node)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

    return FakeMultiNodeProvider


FAKE_PROVIDER_CREATE_NODE = "_create_node_with_resources_and_labels"
"""The provider method that starts a raylet for a launched node; dcgan_ray.dev.loopback_provider wraps it."""


def signatures() -> dict[str, inspect.Signature]:
    """The signatures this module relies on, for tests/test_ray_internals.py."""
    return {
        # mypy sees Train v1's TorchTrainer; ray.train.torch picks v2's (which has this method) at import.
        "TorchTrainer._initialize_and_run_controller": inspect.signature(TorchTrainer._initialize_and_run_controller),  # type: ignore[attr-defined]
        "DefaultFailurePolicy.__init__": inspect.signature(DefaultFailurePolicy.__init__),
        "DefaultFailurePolicy.make_decision": inspect.signature(DefaultFailurePolicy.make_decision),
        "UserExceptionWithTraceback.__init__": inspect.signature(UserExceptionWithTraceback.__init__),
        "FakeMultiNodeProvider." + FAKE_PROVIDER_CREATE_NODE: inspect.signature(
            getattr(fake_multinode_provider_class(), FAKE_PROVIDER_CREATE_NODE)
        ),
    }
