"""A spot instance's notice, passed on to Ray: `dcgan-ray spot-watch` runs on each spot worker node.

AWS reclaims a spot instance with about two minutes' notice, given only in the instance metadata
(`latest/meta-data/spot/instance-action`: 404 until then, then `{"action": "terminate", "time": ...}`).
Ray's open-source autoscaler does not read it, so the node would simply vanish and the run lose the epoch
in flight. This watcher polls the metadata (IMDSv2: a session token, then the documents) and, on a notice,
drains its own Ray node with reason PREEMPTION and the notice's deadline (`ray drain-node`, Ray's hidden
command: `dcgan_ray.ray_internals.drain_node_command`). Ray Train's preemption watcher then tells the
training loop, which saves a checkpoint at its next step (`dcgan_ray.train.worker`), and restarts the run
on the nodes that stay. On Kubernetes the kubelet's SIGTERM to `ray start --block` drains the node the
same way, with no watcher (cluster/kuberay.yaml).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

METADATA_URL = "http://169.254.169.254"
TOKEN_TTL_S = 21600
POLL_S = 5.0
"""AWS checks for a notice every 5 s in its own examples; the notice comes about 120 s ahead."""


class Metadata:
    """The instance metadata service, IMDSv2 (a token first: IMDSv1 may be switched off on the instance)."""

    def __init__(self, url: str = METADATA_URL, timeout_s: float = 2.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self._token: str | None = None

    def _token_header(self) -> dict[str, str]:
        if self._token is None:
            request = urllib.request.Request(
                f"{self.url}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
            )
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                self._token = answer.read().decode()
        return {"X-aws-ec2-metadata-token": self._token}

    def get(self, path: str) -> str | None:
        """The document at `latest/meta-data/<path>`, or None where there is none (404)."""
        request = urllib.request.Request(f"{self.url}/latest/meta-data/{path}", headers=self._token_header())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                return answer.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 401:  # the token expired: take a new one next time
                self._token = None
            if e.code in (401, 404):
                return None
            raise

    def instance_action(self) -> dict[str, Any] | None:
        """The spot notice, {"action": "terminate"|"stop"|"hibernate", "time": ISO 8601}, or None."""
        text = self.get("spot/instance-action")
        if text is None:
            return None
        notice = json.loads(text)
        return notice if isinstance(notice, dict) and "time" in notice else None


def seconds_until(when: str, now: datetime | None = None) -> int:
    """Whole seconds from `now` to the notice's time (at least 1: a drain needs a deadline in the future)."""
    deadline = datetime.fromisoformat(when.replace("Z", "+00:00"))
    return max(1, int((deadline - (now or datetime.now(UTC))).total_seconds()))


def node_id_of(gcs_address: str, node_ip: str) -> str:
    """The Ray node id of the node at `node_ip` (this instance's private address)."""
    import ray

    ray.init(address=gcs_address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        alive = [n for n in ray.nodes() if n.get("Alive") and n.get("NodeManagerAddress") == node_ip]
    finally:
        ray.shutdown()
    if not alive:
        raise RuntimeError(f"no live Ray node at {node_ip} in the cluster at {gcs_address}")
    return alive[0]["NodeID"]


def drain(gcs_address: str, node_id: str, deadline_s: int, message: str) -> None:
    from dcgan_ray.ray_internals import drain_node_command

    subprocess.run(drain_node_command(gcs_address, node_id, deadline_s, message), check=True, capture_output=True)


def watch(
    gcs_address: str,
    metadata: Metadata,
    poll_s: float = POLL_S,
    drain_node: Callable[[str, str, int, str], None] = drain,
    find_node: Callable[[str, str], str] = node_id_of,
    max_polls: int | None = None,
) -> dict[str, Any] | None:
    """Poll for a spot notice; on one, drain this node with its deadline and return the notice (None when
    `max_polls` ran out first). A metadata service that does not answer is logged and polled again."""
    if metadata.get("instance-life-cycle") != "spot":
        log.info("spot-watch: this is not a spot instance: nothing to watch")
        return None
    polls = 0
    while max_polls is None or polls < max_polls:
        polls += 1
        try:
            notice = metadata.instance_action()
        except (OSError, ValueError) as e:
            log.warning("spot-watch: the instance metadata did not answer (%s); polling again", e)
            notice = None
        if notice is not None:
            deadline_s = seconds_until(notice["time"])
            ip = metadata.get("local-ipv4") or ""
            node_id = find_node(gcs_address, ip)
            message = f"spot instance-action {notice.get('action')} at {notice['time']}"
            drain_node(gcs_address, node_id, deadline_s, message)
            log.warning("spot-watch: %s: drained Ray node %s (%s) with %d s left", message, node_id, ip, deadline_s)
            return notice
        time.sleep(poll_s)
    return None
