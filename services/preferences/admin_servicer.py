"""The admin and audit RPCs of PreferencesService (a mixin of the servicer)."""

# ruff: noqa: N802  # RPC method names come from the proto

from __future__ import annotations

from typing import TypeAlias

import grpc
from belfry.api.preferences.v1 import preferences_pb2
from belfry.errors import InvalidArgument, PermissionDenied

from services.preferences import convert
from services.preferences.admin import Admin, require_admin
from services.preferences.model import Account, Choices, User
from services.preferences.operations import Operations
from services.preferences.store import as_json

Context: TypeAlias = grpc.aio.ServicerContext
_DEFAULT_PAGE, _MAX_PAGE = 50, 500


def choices_from_pb(choices: list[preferences_pb2.Choice], field: str) -> Choices:
    """(topic, channel) → enabled; naming a pair twice is refused."""
    result: Choices = {}
    for c in choices:
        key = (c.topic, convert.channel_name(c.channel, field=f"{field}.channel"))
        if key in result:
            raise InvalidArgument(f"{field} names {c.topic}/{key[1]} twice", field=field)
        result[key] = c.enabled
    return result


def choices_pb(choices: Choices) -> list[preferences_pb2.Choice]:
    """Choices in a stable order."""
    return [
        preferences_pb2.Choice(topic=t, channel=convert.channel_pb(c), enabled=e)
        for (t, c), e in sorted(choices.items())
    ]


class AdminRpcs:
    """Account defaults, role profiles and the audit log."""

    _admin: Admin
    _ops: Operations

    async def _caller(self, context: Context) -> tuple[User, Account]:
        raise NotImplementedError  # provided by the servicer

    async def _admin_caller(self, context: Context) -> User:
        user, account = await self._caller(context)
        require_admin(user, account)
        return user

    async def GetAccountDefaults(
        self, request: preferences_pb2.GetAccountDefaultsRequest, context: Context
    ) -> preferences_pb2.AccountDefaults:
        """The caller's account defaults (super admins of enterprise accounts)."""
        user, account = await self._caller(context)
        require_admin(user, account)
        choices, version = await self._admin.get_defaults(account)
        return preferences_pb2.AccountDefaults(choices=choices_pb(choices), version=version)

    async def SetAccountDefaults(
        self, request: preferences_pb2.SetAccountDefaultsRequest, context: Context
    ) -> preferences_pb2.AccountDefaults:
        """Replace the account defaults; affected users are emailed."""
        admin = await self._admin_caller(context)
        choices = choices_from_pb(list(request.choices), "choices")
        version = await self._admin.set_defaults(admin, choices, request.expected_version)
        return preferences_pb2.AccountDefaults(choices=choices_pb(choices), version=version)

    async def ListRoleProfiles(
        self, request: preferences_pb2.ListRoleProfilesRequest, context: Context
    ) -> preferences_pb2.ListRoleProfilesResponse:
        """Every notification profile of the account."""
        user, account = await self._caller(context)
        require_admin(user, account)
        return preferences_pb2.ListRoleProfilesResponse(
            profiles=[
                preferences_pb2.RoleProfile(permission_set=name, choices=choices_pb(c), version=v)
                for name, c, v in await self._admin.profiles(account)
            ],
            permission_sets=await self._admin.permission_sets(account),
        )

    async def GetRoleProfile(
        self, request: preferences_pb2.GetRoleProfileRequest, context: Context
    ) -> preferences_pb2.RoleProfile:
        """One notification profile."""
        user, account = await self._caller(context)
        require_admin(user, account)
        choices, version = await self._admin.profile(account, request.permission_set)
        return preferences_pb2.RoleProfile(
            permission_set=request.permission_set, choices=choices_pb(choices), version=version
        )

    async def CreateRoleProfile(
        self, request: preferences_pb2.CreateRoleProfileRequest, context: Context
    ) -> preferences_pb2.RoleProfile:
        """A new profile for a permission set (ALREADY_EXISTS if it has one)."""
        admin = await self._admin_caller(context)
        p = request.profile
        choices = choices_from_pb(list(p.choices), "profile.choices")
        version = await self._admin.save_profile(admin, p.permission_set, choices, 0, create=True)
        return preferences_pb2.RoleProfile(
            permission_set=p.permission_set, choices=choices_pb(choices), version=version
        )

    async def UpdateRoleProfile(
        self, request: preferences_pb2.UpdateRoleProfileRequest, context: Context
    ) -> preferences_pb2.RoleProfile:
        """Replace a profile's choices (version-checked)."""
        admin = await self._admin_caller(context)
        p = request.profile
        choices = choices_from_pb(list(p.choices), "profile.choices")
        version = await self._admin.save_profile(
            admin, p.permission_set, choices, request.expected_version, create=False
        )
        return preferences_pb2.RoleProfile(
            permission_set=p.permission_set, choices=choices_pb(choices), version=version
        )

    async def DeleteRoleProfile(
        self, request: preferences_pb2.DeleteRoleProfileRequest, context: Context
    ) -> preferences_pb2.DeleteRoleProfileResponse:
        """Remove a profile; its users fall back to the account defaults."""
        admin = await self._admin_caller(context)
        await self._admin.delete_profile(admin, request.permission_set, request.expected_version)
        return preferences_pb2.DeleteRoleProfileResponse()

    async def ListAuditLog(
        self, request: preferences_pb2.ListAuditLogRequest, context: Context
    ) -> preferences_pb2.ListAuditLogResponse:
        """Own entries for anyone; another user's or the account's for super admins."""
        user, _ = await self._caller(context)
        subject: str | None = request.user_id or user.user_id
        if request.account or subject != user.user_id:
            if not user.super_admin:
                raise PermissionDenied("only super admins may read other users' or the account's audit log")
            if request.account:
                subject = None
            else:
                await self._ops.require_user(user.account_id, str(subject))
        size = request.page.page_size or _DEFAULT_PAGE
        if not 0 < size <= _MAX_PAGE:
            raise InvalidArgument(f"page_size must be 1 to {_MAX_PAGE}", field="page.page_size")
        before = None
        if request.page.page_token:
            if not request.page.page_token.isdigit():
                raise InvalidArgument("page_token is not one this service issued", field="page.page_token")
            before = int(request.page.page_token)
        entries = await self._ops.audit(user.account_id, subject, before=before, limit=size)
        return preferences_pb2.ListAuditLogResponse(
            entries=[
                preferences_pb2.AuditEntry(
                    id=e.id,
                    at=convert.timestamp(e.at),
                    actor_user_id=e.actor_user_id,
                    user_id=e.user_id,
                    via=e.via,
                    what=e.what,
                    old_value=as_json(e.old_value),
                    new_value=as_json(e.new_value),
                )
                for e in entries
            ],
            next_page_token=str(entries[-1].id) if len(entries) == size else "",
        )
