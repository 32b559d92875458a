"""The Mobile gRPC servicer: protobuf ↔ dataclasses, nothing else."""

from __future__ import annotations

import re
import uuid

import asyncpg
import grpc
from belfry.api.mobile.v1 import mobile_pb2 as pb
from belfry.api.mobile.v1 import mobile_pb2_grpc as pb_grpc
from belfry.auth import TokenVerifier
from belfry.errors import InvalidArgument, NotFound

from services.mobile import store

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Mobile"].full_name
_PLATFORMS = {pb.PLATFORM_ANDROID: "android", pb.PLATFORM_IOS: "ios"}
_BACK = {v: k for k, v in _PLATFORMS.items()}
_APNS_TOKEN = re.compile(r"^[0-9a-fA-F]{64,200}$")
_FCM_TOKEN = re.compile(r"^[A-Za-z0-9_:\-]{20,4096}$")
_APP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_MAX_LABEL = 200


def _device(device: store.Device) -> pb.Device:
    out = pb.Device(
        device_id=str(device.device_id), platform=_BACK[device.platform], app_id=device.app_id, label=device.label
    )
    out.created_at.FromDatetime(device.created_at)
    return out


class MobileServicer(pb_grpc.MobileServicer):
    """The calling user's devices."""

    def __init__(
        self, pool: asyncpg.Pool, verifier: TokenVerifier, *, max_per_user: int = store.DEFAULT_MAX_PER_USER
    ) -> None:
        self._pool = pool
        self._verifier = verifier
        self._max_per_user = max_per_user

    async def RegisterDevice(  # noqa: N802 - method names come from the proto
        self, request: pb.RegisterDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterDeviceResponse:
        """Validate the token's shape for its platform and store it for the caller (within the cap).

        A token another user of the account registered stays theirs: ALREADY_EXISTS.
        """
        caller = self._verifier.from_metadata(context.invocation_metadata())
        platform = _PLATFORMS.get(request.platform)
        if platform is None:
            raise InvalidArgument("platform must be PLATFORM_ANDROID or PLATFORM_IOS", field="platform")
        pattern = _APNS_TOKEN if platform == "ios" else _FCM_TOKEN
        if not pattern.fullmatch(request.token):
            shape = "hexadecimal (64+ characters)" if platform == "ios" else "an FCM registration token"
            raise InvalidArgument(f"token must be {shape}", field="token")
        if not _APP_ID.fullmatch(request.app_id):
            raise InvalidArgument("app_id must be the app's bundle id or package name", field="app_id")
        if len(request.label) > _MAX_LABEL:
            raise InvalidArgument(f"label must be at most {_MAX_LABEL} characters", field="label")
        device = await store.upsert(
            self._pool,
            caller.account_id,
            caller.user_id,
            platform,
            request.token,
            request.app_id,
            request.label,
            max_per_user=self._max_per_user,
        )
        return pb.RegisterDeviceResponse(device=_device(device))

    async def ListDevices(  # noqa: N802 - method names come from the proto
        self, request: pb.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDevicesResponse:
        """The caller's devices (tokens are not returned)."""
        caller = self._verifier.from_metadata(context.invocation_metadata())
        devices = await store.list_for_user(self._pool, caller.account_id, caller.user_id)
        return pb.ListDevicesResponse(devices=[_device(d) for d in devices])

    async def DeleteDevice(  # noqa: N802 - method names come from the proto
        self, request: pb.DeleteDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDeviceResponse:
        """Forget one of the caller's devices."""
        caller = self._verifier.from_metadata(context.invocation_metadata())
        try:
            device_id = uuid.UUID(request.device_id)
        except ValueError as exc:
            raise InvalidArgument("device_id must be a UUID", field="device_id") from exc
        if not await store.delete(self._pool, caller.account_id, caller.user_id, device_id):
            raise NotFound(f"no device {device_id} for this user")
        return pb.DeleteDeviceResponse()
