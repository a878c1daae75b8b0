"""Can the cluster hold the job, and has it placed it yet? Checked before any worker starts.

On a cluster without an autoscaler the nodes that exist are all there will be, so a job that needs
more is refused at once. On an autoscaling cluster (a `ray up` / KubeRay cluster whose head runs Ray's
autoscaler) the nodes that exist say little: a head with `CPU: 0` and worker types at `min_workers: 0`
has nothing until a job asks. There the job asks the way Ray Train itself will, with a placement group
of its workers' bundles, and waits until the autoscaler has brought the nodes up, at most
`scaling.placement_timeout_s`. What no node type could ever hold is refused as soon as the autoscaler
says so (Ray's autoscaler v2 reports infeasible requests; v1 does not, so there only the deadline ends
the wait) or, where the cluster publishes its node types (KubeRay), before anything is asked.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from dcgan_ray.config import ScalingSection
from dcgan_ray.errors import ClusterError
from dcgan_ray.ray_internals import autoscaling_state, has_launching_autoscaler, largest_possible_resources

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())) or "nothing"


def _only(resources: dict[str, float], s: ScalingSection) -> dict[str, float]:
    """The resources a worker asks for, out of a cluster's (which also lists memory, node ids, ...)."""
    return {k: resources.get(k, 0) for k in s.worker_resources}


def placement_strategy(s: ScalingSection) -> str:
    """Ray's placement strategy for the workers, the same for this check and for Ray Train."""
    return "STRICT_PACK" if s.one_node else "PACK"


def check_capacity(s: ScalingSection) -> bool:
    """Refuse what the cluster can never hold; True when it might, but only after scaling up."""
    need = {k: v * s.min_workers for k, v in s.worker_resources.items()}
    now = ray.cluster_resources()
    autoscaling = has_launching_autoscaler()
    limit = largest_possible_resources() if autoscaling else now
    if limit is not None:
        short = {k: v for k, v in need.items() if limit.get(k, 0) < v}
        if short:
            gpu_hint = " (or set scaling.use_gpu=false)" if "GPU" in short else ""
            raise ClusterError(
                f"the job needs {s.min_workers} worker(s) x {_describe(s.worker_resources)} = {_describe(need)}, "
                f"but the cluster {'can grow to at most' if autoscaling else 'has'} "
                f"{_describe(_only(limit, s))}; "
                f"lower scaling.num_workers or scaling.cpus_per_worker{gpu_hint}, or add nodes"
            )
    if s.one_node and not autoscaling:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if not any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
            most = {k: max((r.get(k, 0) for r in nodes), default=0) for k in need}
            raise ClusterError(
                f"scaling.one_node: the job needs {_describe(need)} on one node, but no node has that (the "
                f"most any node has: {_describe(most)}); set scaling.one_node: false, lower "
                "scaling.num_workers, or add a node that large"
            )
    return any(now.get(k, 0) < v for k, v in need.items())


def wait_for_placement(s: ScalingSection) -> float:
    """Block until the cluster can place the job's (minimum) workers; returns the seconds waited.

    The placement group is the same request Ray Train makes, so the autoscaler scales for it; it is
    removed again before Ray Train asks for its own.
    """
    bundles = [dict(s.worker_resources) for _ in range(s.min_workers)]
    pg = placement_group(bundles, strategy=placement_strategy(s), name="dcgan-ray-placement-check")
    start = last_note = time.monotonic()
    try:
        while not pg.wait(timeout_seconds=2):
            waited = time.monotonic() - start
            state = autoscaling_state()
            if state is not None and any(pg.id.hex() in g.details for g in state.infeasible_gang_resource_requests):
                raise ClusterError(
                    f"no node type of this cluster can hold {s.min_workers} worker(s) x "
                    f"{_describe(s.worker_resources)} (the autoscaler calls the request infeasible); lower "
                    "scaling.num_workers or scaling.cpus_per_worker, or add a node type that fits"
                )
            if waited > s.placement_timeout_s:
                raise ClusterError(
                    f"waited {waited:.0f} s (scaling.placement_timeout_s) for the cluster to place "
                    f"{s.min_workers} worker(s) x {_describe(s.worker_resources)}; it has "
                    f"{_describe(_only(ray.cluster_resources(), s))}, {_describe(_only(ray.available_resources(), s))} "
                    "of them free. "
                    "Other jobs may hold the rest, or the autoscaler cannot add nodes: raise "
                    "scaling.placement_timeout_s, lower scaling.num_workers, or add nodes"
                )
            if time.monotonic() - last_note >= PROGRESS_EVERY_S:
                last_note = time.monotonic()
                log.info(
                    "waiting %.0f s so far for %d worker(s) x %s to be placed (the autoscaler adds nodes; "
                    "deadline %.0f s)",
                    waited,
                    s.min_workers,
                    _describe(s.worker_resources),
                    s.placement_timeout_s,
                )
    finally:
        remove_placement_group(pg)
    return time.monotonic() - start


def ensure_placeable(s: ScalingSection) -> None:
    """Refuse what can never run; else wait (bounded) until the workers can be placed: on an autoscaling
    cluster for the nodes to come up, on any cluster for other jobs to free what this one needs."""
    if check_capacity(s):
        log.info(
            "the cluster has too few resources for %d worker(s) x %s now: asking the autoscaler for them",
            s.min_workers,
            _describe(s.worker_resources),
        )
    waited = wait_for_placement(s)
    if waited > 5:
        log.info("the cluster placed %d worker(s) after %.1f s", s.min_workers, waited)
