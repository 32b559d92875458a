"""Small request builders shared by the preferences tests."""

from __future__ import annotations

from belfry.api.common.v1 import common_pb2
from belfry.api.preferences.v1 import preferences_pb2

from tests.preferences.conftest import Prefs

CHANNELS = ("email", "bell", "popup", "browser", "other_apps", "mobile")


def ch(name: str) -> common_pb2.Channel.ValueType:
    """The enum value of a channel name."""
    return common_pb2.Channel.ValueType(CHANNELS.index(name) + 1)


def choice(topic: str, channel: str, enabled: bool) -> preferences_pb2.Choice:
    """One choice message."""
    return preferences_pb2.Choice(topic=topic, channel=ch(channel), enabled=enabled)


async def decisions(svc: Prefs, account_id: str, topic: str, user_id: str) -> dict[str, tuple[bool, str]]:
    """channel → (enabled, reason) from EffectiveBatch."""
    answer = await svc.prefs.EffectiveBatch(
        preferences_pb2.EffectiveBatchRequest(account_id=account_id, topic=topic, user_ids=[user_id])
    )
    (recipient,) = answer.recipients
    return {CHANNELS[c.channel - 1]: (c.enabled, c.reason) for c in recipient.channels}


async def set_masters_off(svc: Prefs, account_id: str, user_id: str, off: set[str]) -> None:
    """Switch these channels' master switches off (the rest on)."""
    meta = svc.auth(account_id, user_id)
    current = await svc.prefs.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=meta)
    settings = preferences_pb2.ChannelSettings()
    settings.CopyFrom(current.settings)
    del settings.switches[:]
    settings.switches.extend(preferences_pb2.ChannelSwitch(channel=ch(c), enabled=c not in off) for c in CHANNELS)
    await svc.prefs.UpdateSettings(preferences_pb2.UpdateSettingsRequest(settings=settings), metadata=meta)
