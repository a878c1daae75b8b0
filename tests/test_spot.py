"""`dcgan-ray spot-watch` against a stand-in of AWS's instance metadata service (IMDSv2) on loopback: it
polls for the spot notice and, when one comes, drains its Ray node with the notice's deadline. (The drain
itself, and what a run does with it, runs on a real cluster in tests/test_preemption.py.)"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dcgan_ray.spot import Metadata, seconds_until, watch
from standin_imds import StandInMetadata


@pytest.fixture
def metadata():
    servers = []

    def make(**kwargs) -> StandInMetadata:
        servers.append(StandInMetadata(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_a_spot_notice_drains_this_node_with_its_deadline(metadata):
    imds = metadata(quiet=2, ip="127.0.0.7", lead_s=90)
    drained, found = [], []

    def find_node(gcs: str, ip: str) -> str:
        found.append((gcs, ip))
        return "ab" * 28

    notice = watch(
        "127.0.0.2:6379",
        Metadata(imds.url),
        poll_s=0.01,
        drain_node=lambda *args: drained.append(args),
        find_node=find_node,
        max_polls=10,
    )
    assert notice is not None and notice["action"] == "terminate"
    assert imds.polls == 3  # two quiet polls, then the notice
    assert found == [("127.0.0.2:6379", "127.0.0.7")]
    ((gcs, node, deadline_s, message),) = drained
    assert (gcs, node) == ("127.0.0.2:6379", "ab" * 28)
    assert 80 <= deadline_s <= 90 and message.startswith("spot instance-action terminate at ")
    # IMDSv2: one token, asked for with a ttl, sent with every read.
    assert imds.tokens == 1 and all(r[2] == "token-1" for r in imds.requests if r[0] == "GET")
    assert [r for r in imds.requests if r[0] == "PUT"] == [("PUT", "/latest/api/token", "21600")]


def test_an_on_demand_instance_has_nothing_to_watch(metadata):
    imds = metadata(life_cycle="on-demand")
    assert watch("127.0.0.2:6379", Metadata(imds.url), poll_s=0.01, drain_node=pytest.fail, max_polls=5) is None
    assert imds.polls == 0


def test_no_notice_within_the_polls_drains_nothing(metadata):
    imds = metadata(quiet=100)
    assert watch("x:1", Metadata(imds.url), poll_s=0.01, drain_node=pytest.fail, max_polls=4) is None
    assert imds.polls == 4


def test_a_deadline_is_whole_seconds_ahead_and_never_past():
    now = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
    assert seconds_until("2026-12-04T12:02:00Z", now) == 120
    assert seconds_until("2026-12-04T11:59:00Z", now) == 1
