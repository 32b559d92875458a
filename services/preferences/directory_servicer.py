"""DirectoryService: protobuf ↔ dataclasses around ``directory.Directory``."""

# ruff: noqa: N802  # RPC method names come from the proto

from __future__ import annotations

import grpc
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc

from services.preferences import convert
from services.preferences.directory import Directory
from services.preferences.model import Account


class DirectoryServicer(directory_pb2_grpc.DirectoryServiceServicer):
    """The directory's gRPC face (internal callers, mutual TLS in a cluster)."""

    def __init__(self, directory: Directory) -> None:
        self._directory = directory

    async def UpsertAccount(
        self, request: directory_pb2.UpsertAccountRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.UpsertAccountResponse:
        """Create or update an account (tier required)."""
        a = request.account
        account = await self._directory.upsert_account(Account(a.account_id, a.name, convert.tier_name(a.tier)))
        return directory_pb2.UpsertAccountResponse(account=convert.account_pb(account))

    async def GetAccount(
        self, request: directory_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.GetAccountResponse:
        """One account; NOT_FOUND when absent."""
        account = await self._directory.get_account(request.account_id)
        return directory_pb2.GetAccountResponse(account=convert.account_pb(account))

    async def UpsertUser(
        self, request: directory_pb2.UpsertUserRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.UpsertUserResponse:
        """Create or update a user of an existing account."""
        user = await self._directory.upsert_user(convert.user_from_pb(request.user))
        return directory_pb2.UpsertUserResponse(user=convert.user_pb(user))

    async def GetUsers(
        self, request: directory_pb2.GetUsersRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.GetUsersResponse:
        """Many users of one account (at most 1,000), unknown ids listed apart."""
        users = await self._directory.get_users(request.account_id, list(request.user_ids))
        found = {u.user_id for u in users}
        missing = [u for u in dict.fromkeys(request.user_ids) if u not in found]
        return directory_pb2.GetUsersResponse(users=[convert.user_pb(u) for u in users], missing_user_ids=missing)

    async def UpsertTeam(
        self, request: directory_pb2.UpsertTeamRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.UpsertTeamResponse:
        """Create or replace a team; every member must be a user of the account."""
        team = await self._directory.upsert_team(convert.team_from_pb(request.team))
        return directory_pb2.UpsertTeamResponse(team=convert.team_pb(team))

    async def GetTeam(
        self, request: directory_pb2.GetTeamRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.GetTeamResponse:
        """One team with its members; NOT_FOUND when absent."""
        team = await self._directory.get_team(request.account_id, request.team_id)
        return directory_pb2.GetTeamResponse(team=convert.team_pb(team))
