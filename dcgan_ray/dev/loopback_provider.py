"""Ray's fake multi-node autoscaler provider, with every node it launches on its own loopback address.

Ray's `FakeMultiNodeProvider` (used by `ray.cluster_utils.AutoscalingCluster` and Ray's own autoscaler
tests) starts a real raylet per requested node inside the head's autoscaler process, at the address its
route lookup finds: on a machine with another interface that is not loopback. This subclass gives each
node the next free 127.0.0.x instead (see `dcgan_ray.dev.ray_nodes` for why not 127.0.0.1), and is
named in the autoscaling config as an external provider:
`provider: {type: external, module: dcgan_ray.dev.loopback_provider.LoopbackFakeProvider}`.
"""

from __future__ import annotations

import itertools
from unittest import mock

import ray

from dcgan_ray.ray_internals import FAKE_PROVIDER_CREATE_NODE, fake_multinode_provider_class

FIRST_NODE_IP = 10
"""127.0.0.10 and up: apart from the head (127.0.0.2) and hand-started nodes (127.0.0.3...)."""


class LoopbackFakeProvider(fake_multinode_provider_class()):  # type: ignore[misc]
    def __init__(self, provider_config, cluster_name):
        super().__init__(provider_config, cluster_name)
        self._ips = (f"127.0.0.{i}" for i in itertools.count(FIRST_NODE_IP))


def _create_node_on_loopback(self, *args, **kwargs):
    # The parent asks `ray.util.get_node_ip_address()` (through Ray's Node) where the new raylet lives;
    # answer with a loopback address of its own for the duration of that call.
    ip = next(self._ips)
    with mock.patch.object(ray.util, "get_node_ip_address", return_value=ip):
        return getattr(super(LoopbackFakeProvider, self), FAKE_PROVIDER_CREATE_NODE)(*args, **kwargs)


setattr(LoopbackFakeProvider, FAKE_PROVIDER_CREATE_NODE, _create_node_on_loopback)
