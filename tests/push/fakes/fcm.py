"""FCM HTTP v1 and Google's OAuth2 token endpoint on loopback TLS.

The token endpoint implements the JWT-bearer grant as Google does: the
assertion must be RS256-signed by the service account's key, with ``iss`` the
account's email, ``aud`` the token URI, the FCM ``scope``, and at most an hour
between ``iat`` and ``exp``. Sends need a live access token and a
``message.token``; errors use Google's JSON error format with the
``FcmError`` detail carrying the errorCode (UNREGISTERED, INVALID_ARGUMENT, …).
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def google_error(code: int, fcm_code: str, message: str) -> dict[str, Any]:
    """Google's error body with the FCM detail."""
    return {
        "error": {
            "code": code,
            "message": message,
            "status": _STATUS.get(code, "UNKNOWN"),
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm_code}],
        }
    }


@dataclass
class FakeFcm:
    """State of the fake; ``app`` is its ASGI application."""

    public_key: rsa.RSAPublicKey
    client_email: str
    project_id: str
    token_uri: str = ""  # set once the port is known
    access_tokens: dict[str, float] = field(default_factory=dict)  # token → expiry
    exchanges: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    scripted: dict[str, list[tuple[int, str, str, dict[str, str]]]] = field(default_factory=dict)

    async def token(self, request: Request) -> Response:
        """POST /token: the OAuth2 JWT-bearer grant."""
        if request.headers.get("content-type", "").split(";")[0] != "application/x-www-form-urlencoded":
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        try:
            claims = jwt.decode(
                str(form.get("assertion", "")),
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            )
        except jwt.PyJWTError as exc:
            return JSONResponse({"error": "invalid_grant", "error_description": str(exc)}, status_code=400)
        if claims["iss"] != self.client_email or SCOPE not in str(claims["scope"]).split():
            return JSONResponse({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, 400)
        if claims["exp"] - claims["iat"] > 3600:
            return JSONResponse({"error": "invalid_grant", "error_description": "Invalid JWT: exp too far"}, 400)
        self.exchanges += 1
        token = "ya29." + secrets.token_urlsafe(24)
        self.access_tokens[token] = time.time() + 3600
        return JSONResponse({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    async def send(self, request: Request) -> Response:
        """POST /v1/projects/{project}/messages:send."""
        if request.path_params["project"] != self.project_id:
            return JSONResponse(google_error(403, "SENDER_ID_MISMATCH", "Permission denied."), status_code=403)
        auth = request.headers.get("authorization", "")
        expiry = self.access_tokens.get(auth.removeprefix("Bearer "))
        if not auth.startswith("Bearer ") or expiry is None or expiry < time.time():
            return JSONResponse(
                google_error(401, "THIRD_PARTY_AUTH_ERROR", "Request had invalid authentication credentials."), 401
            )
        body = await request.json()
        message = body.get("message") or {}
        token = message.get("token")
        if not token:
            return JSONResponse(google_error(400, "INVALID_ARGUMENT", "Recipient of the message is not set."), 400)
        scripted = self.scripted.get(token)
        if scripted:
            status, fcm_code, text, headers = scripted.pop(0)
            return JSONResponse(google_error(status, fcm_code, text), status_code=status, headers=headers)
        if (invalid := _invalid(message)) is not None:
            return JSONResponse(google_error(400, "INVALID_ARGUMENT", invalid), status_code=400)
        self.received.append(message)
        return JSONResponse({"name": f"projects/{self.project_id}/messages/{uuid.uuid4().int % 10**16}"})

    @property
    def app(self) -> Starlette:
        """The ASGI application."""
        return Starlette(
            routes=[
                Route("/token", self.token, methods=["POST"]),
                Route("/v1/projects/{project}/messages:send", self.send, methods=["POST"]),
            ]
        )


def _invalid(message: dict[str, Any]) -> str | None:
    """FCM's own checks of the fields Belfry sends: data is a map of strings, a count is an integer."""
    for i, value in enumerate((message.get("data") or {}).values()):
        if not isinstance(value, str):
            return f"Invalid value at 'message.data[{i}].value' (TYPE_STRING)"
    count = ((message.get("android") or {}).get("notification") or {}).get("notification_count")
    if count is not None and (not isinstance(count, int) or count < 0):
        return "Invalid value at 'message.android.notification.notification_count' (TYPE_INT32)"
    return None
