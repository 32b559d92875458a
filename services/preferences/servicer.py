"""PreferencesService: protobuf ↔ dataclasses around the engine, operations and admin."""

# ruff: noqa: N802  # RPC method names come from the proto

from __future__ import annotations

from typing import TypeAlias

import grpc
from belfry import i18n
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.auth import TokenVerifier
from belfry.errors import InvalidArgument

from services.preferences import convert
from services.preferences.admin import Admin
from services.preferences.admin_servicer import AdminRpcs, choices_from_pb, choices_pb
from services.preferences.batch import BatchAnswers
from services.preferences.engine import Engine
from services.preferences.model import Account, User
from services.preferences.operations import Operations

Context: TypeAlias = grpc.aio.ServicerContext
Version = preferences_pb2.SetPreferenceResponse


class PreferencesServicer(AdminRpcs, preferences_pb2_grpc.PreferencesServiceServicer):
    """User-facing RPCs act for the token's user; EffectiveBatch serves the dispatcher."""

    def __init__(self, engine: Engine, batch: BatchAnswers, operations: Operations, verifier: TokenVerifier) -> None:
        self._engine = engine
        self._batch = batch
        self._ops = operations
        self._admin = Admin(operations)
        self._verifier = verifier

    async def _caller(self, context: Context) -> tuple[User, Account]:
        return await self._ops.identify(self._verifier.from_metadata(context.invocation_metadata()))

    async def EffectiveBatch(
        self, request: preferences_pb2.EffectiveBatchRequest, context: Context
    ) -> preferences_pb2.EffectiveBatchResponse:
        """Decisions for up to 1,000 users of one account for one topic, in request order."""
        return await self._batch.answer(request.account_id, request.topic, list(request.user_ids))

    async def Unsubscribe(
        self, request: preferences_pb2.UnsubscribeRequest, context: Context
    ) -> preferences_pb2.UnsubscribeResponse:
        """Internal: the email unsubscribe link's effect (topic off for email, audited as "email-link").

        With ``preview``, only what the link's page shows: the topic's label in the user's language.
        """
        label, language, locked = await self._ops.unsubscribe_topic(request.account_id, request.user_id, request.topic)
        version = 0
        if not request.preview:
            version = await self._ops.unsubscribe(request.account_id, request.user_id, request.topic)
        return preferences_pb2.UnsubscribeResponse(version=version, topic_label=label, language=language, locked=locked)

    async def Effective(
        self, request: preferences_pb2.EffectiveRequest, context: Context
    ) -> preferences_pb2.EffectiveResponse:
        """The caller's own decision for one topic."""
        user, _ = await self._caller(context)
        topic, (decision,) = await self._engine.effective_batch(user.account_id, request.topic, [user.user_id])
        return preferences_pb2.EffectiveResponse(
            decision=convert.decision_pb(user.user_id, decision), topic=convert.topic_info_pb(topic)
        )

    async def GetPreferences(
        self, request: preferences_pb2.GetPreferencesRequest, context: Context
    ) -> preferences_pb2.GetPreferencesResponse:
        """The caller's own choices, settings, sounds and version."""
        user, _ = await self._caller(context)
        prefs = await self._ops.get(user)
        return preferences_pb2.GetPreferencesResponse(
            choices=choices_pb(prefs.choices),
            version=prefs.settings.version,
            settings=convert.settings_pb(prefs.settings, self._engine.catalogue.default_sound),
            topic_sounds=[preferences_pb2.TopicSound(topic=t, sound=s) for t, s in sorted(prefs.sounds.items())],
        )

    async def SetPreference(self, request: preferences_pb2.SetPreferenceRequest, context: Context) -> Version:
        """One (topic, channel) choice of the caller."""
        user, _ = await self._caller(context)
        if not request.HasField("choice"):
            raise InvalidArgument("choice is required", field="choice")
        choices = choices_from_pb([request.choice], "choice")
        return Version(version=await self._ops.set_choices(user, choices, request.expected_version))

    async def DontShowAgain(self, request: preferences_pb2.DontShowAgainRequest, context: Context) -> Version:
        """The topic off for that channel, from a pop-up or the bell."""
        user, _ = await self._caller(context)
        channel = convert.channel_name(request.channel, field="channel")
        version = await self._ops.set_choices(user, {(request.topic, channel): False}, 0, what="dont_show_again")
        return Version(version=version)

    async def ClearChannel(self, request: preferences_pb2.ClearChannelRequest, context: Context) -> Version:
        """Every unlocked topic off on the tab's channels."""
        user, _ = await self._caller(context)
        channels = [convert.channel_name(c, field="channels") for c in request.channels]
        return Version(version=await self._ops.clear_channels(user, channels, request.expected_version))

    async def UpdateSettings(self, request: preferences_pb2.UpdateSettingsRequest, context: Context) -> Version:
        """Replace the caller's channel settings block."""
        user, _ = await self._caller(context)
        if not request.HasField("settings"):
            raise InvalidArgument("settings is required", field="settings")
        settings = convert.settings_from_pb(request.settings)
        return Version(version=await self._ops.update_settings(user, settings, request.expected_version))

    async def SetMuted(self, request: preferences_pb2.SetMutedRequest, context: Context) -> Version:
        """Mute or unmute pop-up sounds."""
        user, _ = await self._caller(context)
        return Version(version=await self._ops.set_muted(user, request.muted, request.expected_version))

    async def SetTopicSound(self, request: preferences_pb2.SetTopicSoundRequest, context: Context) -> Version:
        """One topic's pop-up sound."""
        user, _ = await self._caller(context)
        version = await self._ops.set_topic_sound(user, request.topic, request.sound, request.expected_version)
        return Version(version=version)

    async def ResetToDefaults(self, request: preferences_pb2.ResetToDefaultsRequest, context: Context) -> Version:
        """Forget the caller's own choices, sounds and settings (or only one topic's own choices)."""
        user, _ = await self._caller(context)
        if request.topic:
            channels = [convert.channel_name(c, field="channels") for c in request.channels]
            version = await self._ops.reset_topic(user, request.topic, channels, request.expected_version)
            return Version(version=version)
        return Version(version=await self._ops.reset(user, request.expected_version))

    async def ListTopics(
        self, request: preferences_pb2.ListTopicsRequest, context: Context
    ) -> preferences_pb2.ListTopicsResponse:
        """The visible catalogue with the caller's effective state per channel."""
        user, account = await self._caller(context)
        locale = request.locale or user.locale
        if not request.locale and not _written(user.locale) and _written(request.fallback_locale):
            locale = request.fallback_locale
        rows = await self._engine.for_user(user, account.tier == "enterprise")
        prefs = await self._ops.get(user)
        catalogue = self._engine.catalogue
        views: dict[str, list[preferences_pb2.TopicView]] = {}
        for topic, decision in rows:
            if all(c.reason in {"not_visible", "channel_not_allowed"} for c in decision.channels):
                continue
            states = [
                preferences_pb2.ChannelState(
                    channel=convert.channel_pb(c.channel),
                    enabled=c.enabled,
                    source=c.reason,
                    product_default=c.channel in topic.defaults,
                )
                for c in decision.channels
                if c.channel in topic.channels
            ]
            views.setdefault(topic.category, []).append(
                preferences_pb2.TopicView(
                    key=topic.key,
                    name=topic.name(locale),
                    locked=topic.locked,
                    channels=states,
                    sound=prefs.sounds.get(topic.key, ""),
                    ttl_seconds=topic.ttl_seconds,
                )
            )
        sounds = [catalogue.default_sound, *(s for s in catalogue.sounds if s != catalogue.default_sound)]
        return preferences_pb2.ListTopicsResponse(
            categories=[
                preferences_pb2.CategoryView(key=c.key, name=c.name(locale), topics=views[c.key])
                for c in catalogue.categories
                if c.key in views
            ],
            sounds=sounds,
            settings=convert.settings_pb(prefs.settings, catalogue.default_sound),
            version=prefs.settings.version,
            channels=convert.channel_views(),
            language=i18n.language(locale),
            account_admin=user.super_admin and account.tier == "enterprise",
        )


def _written(locale: str) -> bool:
    """Whether Belfry writes in the locale's language (``i18n.language`` would not fall back)."""
    return locale.strip().replace("_", "-").partition("-")[0].lower() in i18n.LANGUAGES
