"""The Webhooks gRPC servicer: protobuf ↔ dataclasses, nothing else."""

from __future__ import annotations

import uuid

import asyncpg
import grpc
from belfry import ssrf
from belfry.api.webhooks.v1 import webhooks_pb2 as pb
from belfry.api.webhooks.v1 import webhooks_pb2_grpc as pb_grpc
from belfry.auth import TokenVerifier
from belfry.errors import AlreadyExists, InvalidArgument, NotFound

from services.webhooks import body, store
from services.webhooks.signing import SecretBox, new_secret

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Webhooks"].full_name
_MAX_LABEL = 200
_MAX_URL = 2048


def _webhook(hook: store.Webhook) -> pb.Webhook:
    out = pb.Webhook(
        webhook_id=str(hook.webhook_id),
        url=hook.url,
        label=hook.label,
        slack=hook.slack,
        disabled=hook.disabled_at is not None,
        disabled_reason=hook.disabled_reason,
    )
    out.created_at.FromDatetime(hook.created_at)
    return out


class WebhooksServicer(pb_grpc.WebhooksServicer):
    """The calling user's webhooks."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        verifier: TokenVerifier,
        guard: ssrf.Guard,
        box: SecretBox,
        *,
        max_per_user: int = store.DEFAULT_MAX_PER_USER,
    ) -> None:
        self._pool = pool
        self._verifier = verifier
        self._guard = guard
        self._box = box
        self._max_per_user = max_per_user

    async def ConnectWebhook(  # noqa: N802 - method names come from the proto
        self, request: pb.ConnectWebhookRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConnectWebhookResponse:
        """Check the URL with the guard, seal a new signing secret, store; the secret is returned once."""
        caller = self._verifier.from_metadata(context.invocation_metadata())
        if not request.url or len(request.url) > _MAX_URL:
            raise InvalidArgument(f"url is required (at most {_MAX_URL} characters)", field="url")
        if len(request.label) > _MAX_LABEL:
            raise InvalidArgument(f"label must be at most {_MAX_LABEL} characters", field="label")
        try:
            target = await self._guard.check(request.url)
        except ssrf.Refused as exc:
            raise InvalidArgument(f"url refused: {exc.reason}", field="url") from exc
        webhook_id = uuid.uuid4()
        secret = new_secret()
        sealed = self._box.seal(secret, caller.account_id, str(webhook_id))
        hook = await store.insert(
            self._pool,
            caller.account_id,
            caller.user_id,
            webhook_id,
            request.url,
            request.label,
            body.is_slack(target.host),
            sealed,
            max_per_user=self._max_per_user,
        )
        if hook is None:
            raise AlreadyExists("this URL is already connected; delete it first to get a new secret", field="url")
        return pb.ConnectWebhookResponse(webhook=_webhook(hook), signing_secret=secret)

    async def ListWebhooks(  # noqa: N802 - method names come from the proto
        self, request: pb.ListWebhooksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWebhooksResponse:
        """The caller's webhooks, disabled ones included (with the reason)."""
        caller = self._verifier.from_metadata(context.invocation_metadata())
        hooks = await store.list_for_user(self._pool, caller.account_id, caller.user_id)
        return pb.ListWebhooksResponse(webhooks=[_webhook(h) for h in hooks])

    async def DeleteWebhook(  # noqa: N802 - method names come from the proto
        self, request: pb.DeleteWebhookRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteWebhookResponse:
        """Disconnect one of the caller's webhooks."""
        caller = self._verifier.from_metadata(context.invocation_metadata())
        try:
            webhook_id = uuid.UUID(request.webhook_id)
        except ValueError as exc:
            raise InvalidArgument("webhook_id must be a UUID", field="webhook_id") from exc
        if not await store.delete(self._pool, caller.account_id, caller.user_id, webhook_id):
            raise NotFound(f"no webhook {webhook_id} for this user")
        return pb.DeleteWebhookResponse()
