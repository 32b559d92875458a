"""The channel registry agrees with the API's enum, the settings tabs and the declared services."""

from __future__ import annotations

from belfry import channels, service
from belfry.api.common.v1 import common_pb2


def test_every_channel_of_the_api_is_registered_once_under_its_own_name() -> None:
    # A value added to the enum without a registry entry, or the reverse, fails here.
    api = {v.number for v in common_pb2.Channel.DESCRIPTOR.values} - {common_pb2.CHANNEL_UNSPECIFIED}
    assert sorted(c.value for c in channels.PREFERENCE) == sorted(api)
    for c in channels.PREFERENCE:
        assert common_pb2.Channel.Name(c.value) == f"CHANNEL_{c.name.upper()}"
        assert channels.BY_VALUE[c.value] is channels.BY_NAME[c.name] is c


def test_every_channel_is_on_a_tab_and_carried_by_queue_channels_that_declared_services_drain() -> None:
    declared = {d.name for d in service.declared()}
    assert {q.sender for q in channels.QUEUE} <= declared
    assert all(q.max_attempts >= 1 for q in channels.QUEUE)
    for c in channels.PREFERENCE:
        assert c.tab in channels.TABS and c.label
        assert c.queue and set(c.queue) <= set(channels.QUEUE_NAMES)


def test_queue_channels_follow_the_preference_channels_switched_on() -> None:
    assert channels.queue_channels(frozenset()) == ()
    assert channels.queue_channels(frozenset({"popup"})) == ("bell",)
    assert channels.queue_channels(frozenset({"email", "browser"})) == ("bell", "browser", "email")
    assert channels.queue_channels(frozenset(channels.NAMES)) == ("bell", "browser", "email", "mobile", "other_apps")
