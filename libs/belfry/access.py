"""Which caller may call which method: the one allow-list, deny by default.

``RULES`` names, for every method of every Belfry API, who may call it:
Belfry services by name (``dispatcher``), and roles that identities hold by
configuration (``Callers``):

| role | held by | configured with |
| --- | --- | --- |
| ``producer`` | the host application's services that publish, each bound to the accounts it may publish for (or all) | ``BELFRY_PRODUCERS=crm=*;billing=acc_1,acc_2`` |
| ``provisioning`` | the host application's directory sync | ``BELFRY_PROVISIONING=crm-sync`` |
| ``app`` | the host application's backend acting for a signed-in user (the user's token rides along) | ``BELFRY_APPS=crm-web`` |
| ``operator`` | people and tools that inspect and requeue | ``BELFRY_OPERATORS=ops`` |

The kit's RPC interceptor (``belfry.rpc``) asks :class:`Gate` about every
call before the handler runs: a method missing here, or a caller it does not
name, gets PERMISSION_DENIED and the handler never runs. A caller that proves
no identity at all gets UNAUTHENTICATED. For a producer bound to accounts,
the accounts a request acts for (``Rule.accounts``) must all be its own;
on a stream, each message is checked as it is read.

A method that acts for a user (``Rule.user``) still checks the user's token
in its servicer: the service identity says *who relays*, the token *for whom*.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from belfry import errors, identity

PRODUCER = "producer"
PROVISIONING = "provisioning"
APP = "app"
OPERATOR = "operator"
ROLES = (PRODUCER, PROVISIONING, APP, OPERATOR)
ALL_ACCOUNTS = "*"

_DISPATCHER = "/belfry.api.dispatcher.v1.DispatcherService/"
_FOLLOW = "/belfry.api.dispatcher.v1.FollowService/"
_PREFERENCES = "/belfry.api.preferences.v1.PreferencesService/"
_DIRECTORY = "/belfry.api.directory.v1.DirectoryService/"
_BATCHING = "/belfry.api.batching.v1.BatchingService/"
_QUEUE = "/belfry.api.queue.v1.QueueAdmin/"
_DELIVERABILITY = "/belfry.api.email.v1.Deliverability/"
_WEBPUSH = "/belfry.api.webpush.v1.WebPush/"
_MOBILE = "/belfry.api.mobile.v1.Mobile/"
_WEBHOOKS = "/belfry.api.webhooks.v1.Webhooks/"

Accounts = Callable[[Any], Iterable[str]]


@dataclass(frozen=True)
class Rule:
    """Who may call one method; ``user``: it acts for a user token's user; ``accounts``: what a request acts for."""

    callers: frozenset[str]
    user: bool = False
    accounts: Accounts | None = None


def _rule(*callers: str, user: bool = False, accounts: Accounts | None = None) -> Rule:
    return Rule(frozenset(callers), user, accounts)


def _event_account(request: Any) -> Iterable[str]:
    return (request.event.account_id,)


def _batch_accounts(request: Any) -> Iterable[str]:
    return {event.account_id for event in request.events}


def _account(request: Any) -> Iterable[str]:
    return (request.account_id,)


_USER_PREFERENCES = (
    "GetPreferences",
    "SetPreference",
    "Effective",
    "ListTopics",
    "UpdateSettings",
    "SetMuted",
    "SetTopicSound",
    "ClearChannel",
    "DontShowAgain",
    "ResetToDefaults",
    "GetAccountDefaults",
    "SetAccountDefaults",
    "ListRoleProfiles",
    "GetRoleProfile",
    "CreateRoleProfile",
    "UpdateRoleProfile",
    "DeleteRoleProfile",
    "ListAuditLog",
)

RULES: Mapping[str, Rule] = {
    # The producers' API: each producer for its own accounts; preferences publishes its "defaults changed" notices.
    _DISPATCHER + "Publish": _rule(PRODUCER, "preferences", accounts=_event_account),
    _DISPATCHER + "PublishBatch": _rule(PRODUCER, accounts=_batch_accounts),
    _DISPATCHER + "PublishStream": _rule(PRODUCER, accounts=_event_account),
    _DISPATCHER + "RecordInboxVisit": _rule(PRODUCER, accounts=_account),
    _DISPATCHER + "GetNotification": _rule(PRODUCER, OPERATOR, accounts=_account),
    _DISPATCHER + "ListNotifications": _rule(PRODUCER, OPERATOR, accounts=_account),
    _DISPATCHER + "WatchStatus": _rule(PRODUCER, OPERATOR, accounts=_account),
    # Follows: the user's own, through the web app or the host application.
    **{_FOLLOW + m: _rule("gateway", APP, user=True) for m in ("Follow", "Unfollow", "Mute", "Unmute", "ListFollows")},
    _FOLLOW + "ListFollowers": _rule(PRODUCER, OPERATOR, accounts=_account),
    # Preferences: the user's own settings; the dispatcher's and batching's batch question; the email link's effect.
    **{_PREFERENCES + m: _rule("gateway", APP, user=True) for m in _USER_PREFERENCES},
    _PREFERENCES + "EffectiveBatch": _rule("dispatcher", "batching"),
    _PREFERENCES + "Unsubscribe": _rule("gateway"),
    # The directory: written only by provisioning; teams read by the dispatcher to expand team recipients,
    # users by the senders' admin APIs (is the token's user an active super admin?).
    **{_DIRECTORY + m: _rule(PROVISIONING) for m in ("UpsertAccount", "UpsertUser", "UpsertTeam", "GetAccount")},
    _DIRECTORY + "GetUsers": _rule(PROVISIONING, "email", "webpush", "mobile", "webhooks"),
    _DIRECTORY + "GetTeam": _rule(PROVISIONING, "dispatcher", "batching"),
    # Operators' views; the senders' admin APIs, for an account's super admins (their token rides along).
    **{_BATCHING + m: _rule(OPERATOR) for m in ("GetStatus", "ListOpenWindows")},
    **{_QUEUE + m: _rule(OPERATOR, APP, user=True) for m in ("ListDeadLetters", "Requeue", "GetStats")},
    **{
        _DELIVERABILITY + m: _rule(OPERATOR, APP, user=True)
        for m in (
            "ListSuppressions",
            "RemoveSuppressions",
            "ImportSuppressions",
            "GetDeliveryFeedback",
            "GetBranding",
            "SetBranding",
        )
    },
    # A user's push subscriptions, devices and webhooks.
    **{
        _WEBPUSH + m: _rule("gateway", APP, user=True)
        for m in ("GetVapidPublicKey", "RegisterSubscription", "ListSubscriptions", "DeleteSubscription")
    },
    **{_MOBILE + m: _rule(APP, user=True) for m in ("RegisterDevice", "ListDevices", "DeleteDevice")},
    **{_WEBHOOKS + m: _rule(APP, user=True) for m in ("ConnectWebhook", "ListWebhooks", "DeleteWebhook")},
}


def relayed(caller: str, service: str) -> tuple[str, ...]:
    """The methods of ``service`` (e.g. ``belfry.api.webpush.v1.WebPush``) ``caller`` may call for a user's token.

    What the gateway's HTTP proxy serves: the allow-list is the one place that says so.
    """
    prefix = f"/{service}/"
    return tuple(
        sorted(
            method.removeprefix(prefix)
            for method, rule in RULES.items()
            if method.startswith(prefix) and rule.user and caller in rule.callers
        )
    )


@dataclass(frozen=True)
class Callers:
    """Which configured identity holds which role; producers with the accounts they may act for (None: all)."""

    producers: Mapping[str, frozenset[str] | None] = field(default_factory=dict)
    provisioning: frozenset[str] = frozenset()
    apps: frozenset[str] = frozenset()
    operators: frozenset[str] = frozenset()

    def roles(self, name: str) -> frozenset[str]:
        """The roles ``name`` holds (a service's identity holds none: it is named in ``RULES`` itself)."""
        held = {
            PRODUCER: name in self.producers,
            PROVISIONING: name in self.provisioning,
            APP: name in self.apps,
            OPERATOR: name in self.operators,
        }
        return frozenset(role for role, yes in held.items() if yes)

    def names(self) -> frozenset[str]:
        """Every configured identity."""
        return frozenset(self.producers) | self.provisioning | self.apps | self.operators


def parse_producers(raw: str) -> dict[str, frozenset[str] | None]:
    """``crm=*;billing=acc_1,acc_2`` → {"crm": None, "billing": {"acc_1", "acc_2"}}; ValueError says what is wrong."""
    found: dict[str, frozenset[str] | None] = {}
    for entry in filter(None, (e.strip() for e in raw.split(";"))):
        name, sep, accounts = entry.partition("=")
        name = name.strip()
        listed = frozenset(a.strip() for a in accounts.split(",") if a.strip())
        if not sep or not identity.valid_name(name) or not listed:
            raise ValueError(f"{entry!r} is not identity=* or identity=account,account")
        found[name] = None if ALL_ACCOUNTS in listed else listed
    return found


def parse_names(raw: str) -> frozenset[str]:
    """``a,b`` → {"a", "b"}; ValueError names a malformed one."""
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    bad = sorted(n for n in names if not identity.valid_name(n))
    if bad:
        raise ValueError(f"not identity names: {', '.join(bad)}")
    return names


@dataclass(frozen=True)
class Grant:
    """An admitted call: who, and (for a bound producer) the accounts it may act for."""

    caller: str
    accounts: frozenset[str] | None  # None: any account
    rule: Rule

    def binds(self) -> bool:
        """True when requests must be checked for their accounts."""
        return self.accounts is not None and self.rule.accounts is not None

    def check(self, request: Any) -> None:
        """PermissionDenied when the request acts for an account outside the caller's binding."""
        if self.accounts is None or self.rule.accounts is None:
            return
        for account in self.rule.accounts(request):
            if account not in self.accounts:
                raise errors.PermissionDenied(f"{self.caller} may not act for account {account!r}")


class Gate:
    """Names the caller of a call (certificate or service token) and admits it by ``rules``."""

    def __init__(
        self,
        callers: Callers,
        *,
        tokens: identity.ServiceTokenVerifier | None = None,
        trust_domain: str = identity.DEFAULT_TRUST_DOMAIN,
        rules: Mapping[str, Rule] = RULES,
    ) -> None:
        self.callers = callers
        self.rules = rules
        self._tokens = tokens
        self._certificates = identity.CertificateNames(trust_domain)

    def identify(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's identity; Unauthenticated when it proves none."""
        certificate = context.auth_context().get("x509_pem_cert")
        if certificate:
            # Mutual TLS: the handshake verified the chain; the certificate names the caller.
            name = self._certificates.identity(certificate[0])
            if name is None:
                raise errors.Unauthenticated("the client certificate names no identity (a spiffe:// URI or a DNS name)")
            return name
        for key, value in context.invocation_metadata() or ():
            if key == identity.METADATA_KEY and self._tokens is not None:
                return self._tokens.identity(value.decode() if isinstance(value, bytes) else value, now=time.time())
        raise errors.Unauthenticated(
            f"this call needs a caller identity: a mesh client certificate, or a service token in {identity.METADATA_KEY!r}"
        )

    def admit(self, method: str, context: grpc.aio.ServicerContext) -> Grant:
        """The grant for this call; Unauthenticated or PermissionDenied otherwise."""
        caller = self.identify(context)
        rule = self.rules.get(method)
        if rule is not None:
            if caller in rule.callers:
                return Grant(caller, None, rule)
            held = self.callers.roles(caller) & rule.callers
            if held - {PRODUCER}:
                return Grant(caller, None, rule)
            if held:
                return Grant(caller, self.callers.producers[caller], rule)
        raise errors.PermissionDenied(f"{caller} may not call {method}")
