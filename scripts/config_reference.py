"""Generate docs/configuration.md: every environment variable Belfry reads, taken from the code.

``python scripts/config_reference.py`` writes the file; ``--check`` writes
nothing and exits 1 with a diff when the file is not what the code gives.

Names and defaults come from an AST walk of ``libs/belfry`` and ``services``:

* every call of a settings reader (``env.str/int/float/bool/path/choice/address``
  on a ``belfry.config.Env``): first argument the name, second the default,
  ``minimum=`` the lower bound;
* every read of an environment mapping (``os.environ.get(X)``, ``environ[X]``,
  ``env.pop(X)``) whose key evaluates to a variable name.

A name or default that is not a literal is evaluated: module constants (also
imported ones), local assignments, loops over literal tuples, f-strings, and
function parameters, which take the value of the argument at *every call
site* (``load_sender_settings(env, common, "email", batch=200, ...)`` gives
``BELFRY_EMAIL_BATCH`` with default 200, and so on for every sender). A
dynamic name that cannot be evaluated so must be listed in ``DOMAINS`` (for
instance ``BELFRY_<NAME>_GRPC_ADDRESS``, one per declared service), else the
generator fails naming the file and line: a setting is never missed silently.

Who reads a variable follows the call graph up to its roots: a service's
modules, the ``belfry`` command (``belfry.cli``) or ``belfry up``
(``belfry.local``).

Descriptions are kept by hand in ``DESCRIPTIONS`` (a dynamic name may be
described once by its template, ``BELFRY_<NAME>_BATCH``). A variable without
a description, or a description of a variable no code reads, makes the
generator fail with a message naming it.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import itertools
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = Path("docs") / "configuration.md"
ENV_METHODS = frozenset({"str", "int", "float", "bool", "path", "choice", "address", "https_url"})
MAPPING_READS = frozenset({"get", "pop"})
VARIABLE = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")
REQUIRED = object()  # the default of a variable that must be set
UNKNOWN = object()  # a default the walk cannot evaluate (DEFAULT_TEXT says it)

LOCAL = "belfry up"
# Roots in belfry.cli that are not a subcommand of the same name.
CLI_ROOTS = {"<module>": "belfry", "_parser": "belfry", "main": "belfry", "_after_up": LOCAL}

# What each variable does, one line. Keys are names, or the template of a dynamic name (``BELFRY_<NAME>_BATCH``),
# where ``{name}`` stands for the expanded part in lower case.
DESCRIPTIONS: dict[str, str] = {
    # Common block (belfry.config.load_common, belfry.trust).
    "BELFRY_DATABASE_URL": "PostgreSQL connection URL (every service shares one database)",
    "DATABASE_URL": "read when `BELFRY_DATABASE_URL` is not set",
    "BELFRY_ACCOUNT_RANGE": "`lower..upper`: the accounts whose deliveries and fan-out this replica claims "
    "(lower inclusive, upper exclusive, either open); unset: every account",
    "BELFRY_GRPC_ADDRESS": "where the gRPC server listens (`host:port`; port 0: any free port)",
    "BELFRY_METRICS_ADDRESS": "where Prometheus `/metrics` is served (`host:port`, or `off`)",
    "BELFRY_HEALTH_ADDRESS": "also serve the gRPC health service alone, in plaintext, here (for Kubernetes probes)",
    "BELFRY_LOG_LEVEL": "log level: debug, info, warning, error or critical",
    "BELFRY_LOG_JSON": "log JSON lines (false: human-readable console lines)",
    "BELFRY_DRAIN_SECONDS": "on SIGTERM, how long in-flight calls may finish before the server stops",
    "BELFRY_PROCESSES": "worker processes of the service in one pod, sharing its ports (see docs/deploy.md)",
    "BELFRY_PROCESS_SLOT": "set by a pod's parent process in each worker: its slot (do not set it yourself)",
    "BELFRY_PROCESS_LIFELINE": "set by a pod's parent process: the pipe whose end tells a worker to stop",
    "PROMETHEUS_MULTIPROC_DIR": "where a pod's workers write their metrics for the parent to sum",
    "BELFRY_DB_POOL_MIN": "database connections kept open",
    "BELFRY_DB_POOL_MAX": "database connections at most",
    "BELFRY_TOKEN_KEYS": "HS256 user-token keys `kid=secret,...` (secrets of at least 32 characters); local runs only",
    "BELFRY_TOKEN_ACTIVE_KID": "which key of `BELFRY_TOKEN_KEYS` signs new development tokens",
    "BELFRY_TOKEN_TTL_SECONDS": "lifetime of the development tokens Belfry issues (dev sign-in, `belfry token`)",
    "BELFRY_TOKEN_LEEWAY_SECONDS": "clock skew allowed on a user token's exp, iat and nbf",
    "BELFRY_TOKEN_MAX_LIFETIME_SECONDS": "a user token whose exp - iat is longer than this is refused",
    "BELFRY_SERVICE_TOKEN": "this service's own service token, presented to peers where mutual TLS is off",
    "BELFRY_SERVICE_TOKEN_KEYS": "Ed25519 public keys `kid=key,...` that verify peers' service tokens",
    "BELFRY_TRUST_DOMAIN": "SPIFFE trust domain of the mesh's certificates",
    "BELFRY_TLS_CERT": "this service's certificate (PEM); mutual TLS needs the three `BELFRY_TLS_*` together",
    "BELFRY_TLS_KEY": "this service's private key (PEM)",
    "BELFRY_TLS_CA": "the CA that signs every peer's certificate (PEM)",
    "BELFRY_PRODUCTION": "production: refuse HS256 user tokens, require mutual TLS and the identity provider",
    "BELFRY_GRPC_REFLECTION": "serve gRPC server reflection (lists every method to whoever reaches the port)",
    "BELFRY_MAX_RETRY_AFTER_SECONDS": "the longest a peer's Retry-After may hold a delivery back",
    "BELFRY_OIDC_ISSUER": "the identity provider's issuer URL (https in production); user tokens come from it",
    "BELFRY_OIDC_AUDIENCE": "the audience user tokens must carry (with `BELFRY_OIDC_ISSUER`)",
    "BELFRY_OIDC_ALGORITHMS": "signature algorithms accepted on user tokens (ES256, EdDSA, RS256)",
    "BELFRY_OIDC_ACCOUNT_CLAIM": "the claim that names the user's account",
    "BELFRY_OIDC_USER_CLAIM": "the claim that names the user",
    "BELFRY_OIDC_JWKS_URI": "the provider's JWKS URL (empty: from its discovery document)",
    "BELFRY_OIDC_REFRESH_SECONDS": "an unknown key id fetches the provider's keys again at most this often",
    "BELFRY_OIDC_CACHE_SECONDS": "the provider's keys are fetched again once older than this",
    "BELFRY_PRODUCERS": "producer identities and the accounts each may publish for (`name=acc1|acc2,...`, `*`: any)",
    "BELFRY_PROVISIONING": "identities allowed the provisioning methods (comma-separated)",
    "BELFRY_APPS": "identities of the host applications (the app role; comma-separated)",
    "BELFRY_OPERATORS": "identities allowed the operator methods (comma-separated)",
    # Senders (belfry.queue.sender).
    "BELFRY_WORKER_ID": "this replica's name in queue leases and error histories",
    "BELFRY_QUEUE_RETENTION_SECONDS": "finished deliveries are purged from the queue after this",
    "BELFRY_PREFERENCES_ADDRESS": "the preferences service (directory) address",
    "BELFRY_<NAME>_BATCH": "deliveries the {name} sender leases at most at once",
    "BELFRY_<NAME>_CONCURRENCY": "deliveries the {name} sender handles at once",
    "BELFRY_<NAME>_LEASE_SECONDS": "how long the {name} sender holds a leased delivery before another may take it",
    "BELFRY_<NAME>_FANOUT": "endpoints of one delivery the {name} sender sends to at once",
    # preferences
    "BELFRY_PREFERENCES_MAX_BATCH": "largest EffectiveBatch / GetUsers request",
    "BELFRY_APP_URL": "the web app's address, linked from the 'your defaults changed' email",
    "BELFRY_DISPATCHER_ADDRESS": "the dispatcher's address (the gateway proxies its FollowService for the web app)",
    # webpush
    "BELFRY_WEBPUSH_ADDRESS": "the web push service's address",
    "BELFRY_WEBPUSH_ALLOWED_HOSTS": "push-service hosts a subscription may name (`.suffix` matches subdomains)",
    "BELFRY_WEBPUSH_ALLOWED_PORTS": "ports a push endpoint may use",
    "BELFRY_WEBPUSH_ALLOW_NETWORKS": "private networks (CIDR) push endpoints may resolve to (tests, private relays)",
    "BELFRY_WEBPUSH_CA_FILE": "an extra CA for the push services' certificates",
    "BELFRY_WEBPUSH_TTL_SECONDS": "default time to live asked of the push service",
    "BELFRY_WEBPUSH_TIMEOUT_SECONDS": "one push request's timeout",
    "BELFRY_WEBPUSH_MAX_CONNECTIONS": "connections at most, across all push services",
    "BELFRY_WEBPUSH_MAX_SUBSCRIPTIONS_PER_USER": "browser subscriptions one user may hold",
    "BELFRY_VAPID_PRIVATE_KEY": "VAPID private key (PEM; `\\n` for newlines)",
    "BELFRY_VAPID_PRIVATE_KEY_FILE": "file holding the VAPID private key, created when missing",
    "BELFRY_VAPID_SUBJECT": "VAPID contact (`mailto:` or `https:`) the push services may use",
    "BELFRY_VAPID_OTHER_KEYS": "during a rotation: other VAPID keys still bound to subscriptions (PEM)",
    "BELFRY_VAPID_OTHER_KEY_FILES": "during a rotation: files of other VAPID keys (comma-separated)",
    # dispatcher
    "BELFRY_DISPATCHER_PREFERENCES_DEADLINE": "deadline of one call to the preferences service (seconds)",
    "BELFRY_DISPATCHER_MAX_EVENT_BYTES": "largest event accepted",
    "BELFRY_DISPATCHER_MAX_FUTURE_SECONDS": "how far in the future an event's time may be",
    "BELFRY_DISPATCHER_MAX_QUEUE_DEPTH": "backpressure: pending deliveries past which producers are refused (0: off)",
    "BELFRY_DISPATCHER_MAX_QUEUE_LAG_SECONDS": "backpressure: queue lag past which producers are refused (0: off)",
    "BELFRY_DISPATCHER_MAX_FANOUT_LAG_SECONDS": "backpressure: fan-out lag past which the heaviest accounts are refused",
    "BELFRY_DISPATCHER_ACCOUNT_RATE": "events per second one account may publish (0: no limit)",
    "BELFRY_DISPATCHER_ACCOUNT_BURST": "burst of one account's rate limit",
    "BELFRY_DISPATCHER_BACKLOG_REFRESH_SECONDS": "how often the backlog figures behind backpressure are read",
    "BELFRY_DISPATCHER_MAX_BATCH": "largest PublishBatch request",
    "BELFRY_DISPATCHER_IDEMPOTENCY_HOURS": "how long an idempotency key replays its first answer",
    "BELFRY_DISPATCHER_RETENTION_DAYS": "how long published notifications and their status are kept",
    "BELFRY_DISPATCHER_PURGE_SECONDS": "how often expired rows are purged",
    "BELFRY_DISPATCHER_FANOUT_WORKERS": "fan-out workers (each holds a database connection); 0: this replica only accepts",
    "BELFRY_DISPATCHER_PUBLISH_WRITERS": "writers that batch published events into the database",
    "BELFRY_DISPATCHER_AUTO_FOLLOW": "who follows an object automatically (`topic-pattern=sources,...`)",
    "BELFRY_DISPATCHER_FANOUT_ASSIST_LAG_SECONDS": "fan-out lag from which each publishing call fans out as many "
    "events as it accepted before answering (0 = never)",
    "BELFRY_DISPATCHER_FANOUT_BATCH": "notifications one fan-out step takes",
    "BELFRY_DISPATCHER_WATCH_POLL_SECONDS": "`WatchStatus` streams: seconds between readings of an account's changes",
    "BELFRY_DISPATCHER_WATCH_MARGIN_SECONDS": "`WatchStatus` streams: how long after its time a change may become "
    "visible (its transaction committing) and still be sent; each reading re-reads this much",
    "BELFRY_DISPATCHER_FANOUT_CHUNK": "recipients one fan-out insert writes",
    # batching
    "BELFRY_BATCHING_WINDOW_SECONDS": "how long assignments wait to be merged into one notification",
    "BELFRY_BATCHING_TICK_SECONDS": "how often due windows are looked for (the window's precision)",
    "BELFRY_BATCHING_DIGEST_TICK_SECONDS": "how often due digests are looked for",
    "BELFRY_BATCHING_TASK_DIGEST_AT": "local day and time of the weekly task digest",
    "BELFRY_BATCHING_WORKFLOW_DIGEST_AT": "local day and time of the weekly workflow digest",
    "BELFRY_BATCHING_TASK_DIGEST_TOPIC": "topic of the task digest",
    "BELFRY_BATCHING_WORKFLOW_DIGEST_TOPIC": "topic of the workflow digest",
    "BELFRY_BATCHING_DIGEST_TTL_SECONDS": "a digest not delivered by then is expired, not sent late",
    "BELFRY_BATCHING_RETENTION_SECONDS": "how long closed windows, applied delivery ids and workflow changes are kept",
    # email
    "BELFRY_SMTP_HOST": "SMTP relay host (`belfry up`: its mail catcher unless set)",
    "BELFRY_SMTP_PORT": "SMTP relay port",
    "BELFRY_SMTP_USER": "SMTP user (with `BELFRY_SMTP_PASSWORD`)",
    "BELFRY_SMTP_PASSWORD": "SMTP password",
    "BELFRY_SMTP_STARTTLS": "upgrade the connection with STARTTLS (submission, port 587)",
    "BELFRY_SMTP_TLS": "TLS from the first byte (port 465); not with `BELFRY_SMTP_STARTTLS`",
    "BELFRY_SMTP_TIMEOUT": "SMTP timeout (seconds)",
    "BELFRY_SMTP_POOL_SIZE": "SMTP connections kept open",
    "BELFRY_SMTP_CA": "a private CA for the relay's certificate (default: the system's)",
    "BELFRY_EMAIL_FROM": "the From address of notification emails",
    "BELFRY_EMAIL_BOUNCE_DOMAIN": "domain of the per-delivery (VERP) envelope senders",
    "BELFRY_EMAIL_VERP_KEYS": "keys signing VERP envelope senders (comma-separated; empty: no VERP)",
    "BELFRY_EMAIL_BOUNCE_ADDRESS": "host:port of the bounce receiver (SMTP, VERP addresses only; unset: off; needs BELFRY_EMAIL_VERP_KEYS)",
    "BELFRY_EMAIL_BOUNCE_MAX_BYTES": "largest bounce or complaint message accepted (552 above it)",
    "BELFRY_EMAIL_BOUNCE_PORT": "internal: the bounce port a pod's parent process bound, handed to its workers",
    "BELFRY_EMAIL_SOFT_BOUNCE_LIMIT": "soft bounces of one address within the window that suppress it",
    "BELFRY_EMAIL_SOFT_BOUNCE_WINDOW_SECONDS": "the window soft bounces are counted in",
    "BELFRY_EMAIL_DKIM_KEYS": "DKIM signing keys, `domain:selector:algorithm:/path/key.pem` separated by `;` (empty: unsigned)",
    "BELFRY_EMAIL_BRANDING_DOMAINS": "more domains accounts may use in their branded From address, comma-separated (each needs a key in `BELFRY_EMAIL_DKIM_KEYS`)",
    "BELFRY_EMAIL_DAILY_CAP": "emails one user receives per day at most",
    "BELFRY_EMAIL_SOFT_SUPPRESSION_SECONDS": "a suppression for soft bounces lapses after this",
    "BELFRY_PUBLIC_URL": "where the web app is served: base of the preferences and unsubscribe links (https)",
    "BELFRY_UNSUBSCRIBE_KEY": "secret signing one-click unsubscribe and 'open it' links (the same in email, gateway "
    "and webpush)",
    "BELFRY_UNSUBSCRIBE_OTHER_KEYS": "during a rotation: keys unsubscribe and open links are also accepted under",
    "BELFRY_UNSUBSCRIBE_TTL_SECONDS": "how long an unsubscribe or open link stays valid",
    # mobile
    "BELFRY_FCM_SERVICE_ACCOUNT_FILE": "Google service-account JSON key for FCM (unset: Android deliveries fail)",
    "BELFRY_FCM_ENDPOINT": "FCM API base URL",
    "BELFRY_APNS_KEY_FILE": "APNs .p8 signing key (unset: iOS deliveries fail)",
    "BELFRY_APNS_KEY_ID": "the APNs key's id (Apple portal)",
    "BELFRY_APNS_TEAM_ID": "the Apple team id",
    "BELFRY_APNS_ENDPOINT": "APNs base URL (the sandbox for development builds)",
    "BELFRY_MOBILE_CA_FILE": "an extra CA for FCM and APNs (tests, private relays)",
    "BELFRY_MOBILE_TIMEOUT_SECONDS": "one push request's timeout",
    "BELFRY_MOBILE_MAX_DEVICES_PER_USER": "devices one user may register",
    # webhooks
    "BELFRY_WEBHOOKS_ALLOWED_HOSTS": "hosts webhooks may call (empty: any public host)",
    "BELFRY_WEBHOOKS_ALLOWED_PORTS": "ports webhooks may call",
    "BELFRY_WEBHOOKS_ALLOW_NETWORKS": "private networks (CIDR) webhooks may reach (tests, on-premises)",
    "BELFRY_WEBHOOKS_CA_FILE": "an extra CA for webhook endpoints",
    "BELFRY_WEBHOOKS_TIMEOUT_SECONDS": "one webhook request's timeout",
    "BELFRY_WEBHOOKS_MAX_PER_USER": "webhooks one user may connect",
    "BELFRY_WEBHOOK_SECRET_KEY": "base64 of 32 bytes: encrypts webhook signing secrets at rest",
    "BELFRY_WEBHOOK_SECRET_KEY_FILE": "file holding that key, created when missing",
    "BELFRY_WEBHOOK_SECRET_OTHER_KEYS": "during a rotation: keys secrets are also opened with",
    # gateway
    "BELFRY_GATEWAY_HTTP_HOST": "where the web app and websocket listen",
    "BELFRY_GATEWAY_HTTP_PORT": "port of the web app and websocket",
    "BELFRY_GATEWAY_ALLOWED_ORIGINS": "origins allowed to call the HTTP API and open websockets (comma-separated)",
    "BELFRY_GATEWAY_LINK_ORIGINS": "origins a notification click may open besides the app's own",
    "BELFRY_GATEWAY_DEV_LOGIN": "offer the development sign-in (signs with `BELFRY_TOKEN_KEYS`); never in production",
    "BELFRY_DEMO_ACCOUNT": "account of the development sign-in",
    "BELFRY_DEMO_USER": "user of the development sign-in",
    "BELFRY_GATEWAY_PRESENCE_TTL_SECONDS": "a replica's presence rows expire after this without renewal",
    "BELFRY_GATEWAY_QUEUE_SIZE": "frames buffered per websocket before it counts as a slow consumer",
    "BELFRY_GATEWAY_RESUME_LIMIT": "a client further behind than this is told to reload its feed",
    "BELFRY_GATEWAY_AUTH_TIMEOUT_SECONDS": "a websocket must say hello within this",
    "BELFRY_GATEWAY_SEND_TIMEOUT_SECONDS": "a frame not sent within this closes the websocket",
    "BELFRY_GATEWAY_WEBSOCKET": "uvicorn's websocket implementation: wsproto (least memory per idle tab) "
    "or websockets-sansio",
    "BELFRY_GATEWAY_MAX_BODY_BYTES": "largest HTTP request body",
    "BELFRY_GATEWAY_USER_RATE": "API requests per second per user (0: no limit)",
    "BELFRY_GATEWAY_USER_BURST": "burst of the per-user rate",
    "BELFRY_GATEWAY_CLIENT_RATE": "API requests and websocket handshakes per second per client address (0: no limit)",
    "BELFRY_GATEWAY_CLIENT_BURST": "burst of the per-client rate",
    "BELFRY_GATEWAY_MAX_SOCKETS": "websockets of one replica",
    "BELFRY_GATEWAY_MAX_SOCKETS_PER_USER": "websockets of one user on one replica",
    "BELFRY_GATEWAY_MAX_SOCKETS_PER_CLIENT": "websockets of one client address on one replica",
    "BELFRY_GATEWAY_TRUSTED_PROXIES": "proxies (addresses or CIDR) whose X-Forwarded-For names the client",
    # Local runs and the belfry command.
    "BELFRY_HOME": "where `belfry up` keeps its database, caught mail and secrets",
    "BELFRY_SERVICE_SIGNING_KEY": "the key that mints service tokens (`belfry service-token`, and `belfry up` for its children)",
    "BELFRY_<NAME>_GRPC_ADDRESS": "`belfry up`: where the {name} service listens",
}

# Defaults the walk cannot evaluate (or shows better in words); same keys as DESCRIPTIONS.
DEFAULT_TEXT: dict[str, str] = {
    "BELFRY_DATABASE_URL": "required, or `DATABASE_URL` (`belfry up`: its private PostgreSQL)",
    "BELFRY_UNSUBSCRIBE_KEY": "required by email; unset in gateway turns one-click unsubscribe and open links off, "
    "in webpush pushes open their URL directly (not marked read)",
    "BELFRY_GRPC_ADDRESS": "`[::]:` and the service's port (50051 to 50058)",
    "BELFRY_PROCESSES": "the whole CPUs the container may use (`belfry up`: 1)",
    "BELFRY_PROCESS_SLOT": "unset",
    "BELFRY_TOKEN_ACTIVE_KID": "the first kid of `BELFRY_TOKEN_KEYS`",
    "BELFRY_WORKER_ID": "`<hostname>-<pid>`",
    "BELFRY_SMTP_PORT": "`465` with `BELFRY_SMTP_TLS`, else `25`",
    "BELFRY_EMAIL_BOUNCE_DOMAIN": "the domain of `BELFRY_EMAIL_FROM`",
    "BELFRY_<NAME>_GRPC_ADDRESS": "`127.0.0.1:` and the service's port",
    "PROMETHEUS_MULTIPROC_DIR": "a fresh temporary folder",
}


def _declared_services() -> list[str]:
    from belfry.service import declared  # noqa: PLC0415 - the tree under scan must be on sys.path first

    return [d.name for d in declared()]


# Dynamic parts of names the walk cannot evaluate: (module, function, expression) -> its values.
DOMAINS: dict[tuple[str, str, str], Callable[[], list[str]]] = {
    ("belfry.local.supervisor", "_spawn", "name.upper()"): lambda: [n.upper() for n in _declared_services()],
    ("belfry.local.supervisor", "_keep_alive", "child.name.upper()"): lambda: [n.upper() for n in _declared_services()],
}


class GeneratorError(Exception):
    """The code and the hand-kept mappings disagree; the message says how to fix it."""


@dataclass
class Function:
    """A top-level function, a method (``Class.name``) or a module's own code (``<module>``)."""

    module: Module
    name: str
    node: ast.AST
    params: list[str] = field(default_factory=list)
    defaults: dict[str, ast.expr] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    assigns: dict[str, list[ast.expr]] = field(default_factory=dict)
    loops: dict[str, list[tuple[ast.expr, ast.expr]]] = field(default_factory=dict)  # name -> (target, iter)

    def nodes(self) -> Iterator[ast.AST]:
        """Every node of the body (nested functions included; for ``<module>``, not the functions')."""
        if isinstance(self.node, ast.Module):
            for stmt in self.node.body:
                if not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    yield from ast.walk(stmt)
            return
        assert isinstance(self.node, ast.FunctionDef | ast.AsyncFunctionDef)
        for stmt in self.node.body:
            yield from ast.walk(stmt)


@dataclass
class Module:
    """One parsed source file."""

    name: str
    path: Path
    tree: ast.Module
    constants: dict[str, ast.expr] = field(default_factory=dict)
    classes: dict[str, dict[str, ast.expr]] = field(default_factory=dict)
    imports: dict[str, str] = field(default_factory=dict)  # local name -> dotted target
    functions: dict[str, Function] = field(default_factory=dict)


@dataclass(frozen=True)
class Ctx:
    """A function entered through one call site (``call`` None: a root, entered from outside the scan)."""

    function: Function
    call: ast.Call | None = None
    caller: Ctx | None = None

    def root(self) -> Function:
        """The function this chain of calls starts from."""
        ctx = self
        while ctx.caller is not None:
            ctx = ctx.caller
        return ctx.function


@dataclass
class Read:
    """One variable as read at one site along one chain of calls."""

    name: str
    template: str
    default: object
    minimum: object
    reader: str
    where: str
    typed: bool  # read through belfry.config.Env (else a plain mapping read)


@dataclass
class Variable:
    """One row of the reference."""

    name: str
    default: str
    description: str
    readers: list[str]


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "libs":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _function(module: Module, name: str, node: ast.FunctionDef | ast.AsyncFunctionDef, *, method: bool) -> Function:
    fn = Function(module, name, node)
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    if method and positional and positional[0].arg in {"self", "cls"}:
        positional = positional[1:]
    fn.params = [a.arg for a in positional] + [a.arg for a in args.kwonlyargs]
    for arg, default in zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True):
        fn.defaults[arg.arg] = default
    for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        if kw_default is not None:
            fn.defaults[arg.arg] = kw_default
    for arg in [*positional, *args.kwonlyargs]:
        if arg.annotation is not None:
            fn.annotations[arg.arg] = ast.unparse(arg.annotation)
    _scan_bindings(fn)
    return fn


def _scan_bindings(fn: Function) -> None:
    for node in fn.nodes():
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            fn.assigns.setdefault(node.targets[0].id, []).append(node.value)
        elif isinstance(node, ast.AnnAssign | ast.NamedExpr) and isinstance(node.target, ast.Name):
            if node.value is not None:
                fn.assigns.setdefault(node.target.id, []).append(node.value)
        elif isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
            for target in ast.walk(node.target):
                if isinstance(target, ast.Name):
                    fn.loops.setdefault(target.id, []).append((node.target, node.iter))


def _parse(root: Path, path: Path) -> Module:  # noqa: PLR0912 - one branch per kind of top-level statement
    tree = ast.parse(path.read_text(), filename=str(path))
    module = Module(_module_name(root, path), path, tree)
    package = module.name if path.name == "__init__.py" else module.name.rpartition(".")[0]
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            module.constants[stmt.targets[0].id] = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            module.constants[stmt.target.id] = stmt.value
        elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            module.functions[stmt.name] = _function(module, stmt.name, stmt, method=False)
        elif isinstance(stmt, ast.ClassDef):
            attributes: dict[str, ast.expr] = {}
            for item in stmt.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    attributes[item.target.id] = item.value
                elif isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name):
                    attributes[item.targets[0].id] = item.value
                elif isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    name = f"{stmt.name}.{item.name}"
                    module.functions[name] = _function(module, name, item, method=True)
            module.classes[stmt.name] = attributes
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    module.imports[alias.asname] = alias.name
                else:
                    module.imports[alias.name.partition(".")[0]] = alias.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                module.imports[alias.asname or alias.name] = f"{base}.{alias.name}"
    module.functions["<module>"] = Function(module, "<module>", tree)
    _scan_bindings(module.functions["<module>"])
    return module


class Walk:
    """The scanned tree: modules, call graph, and the evaluation of names and defaults."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: dict[str, Module] = {}
        for folder in (root / "libs" / "belfry", root / "services"):
            for path in sorted(folder.rglob("*.py")):
                if (root / "libs" / "belfry" / "api") in path.parents:
                    continue  # generated protobuf code
                module = _parse(root, path)
                self.modules[module.name] = module
        self.callers: dict[int, list[tuple[Function, ast.Call]]] = {}
        for module in self.modules.values():
            for fn in module.functions.values():
                for node in fn.nodes():
                    if isinstance(node, ast.Call) and (target := self.target(module, node.func)) is not None:
                        self.callers.setdefault(id(target), []).append((fn, node))
        self._ctxs: dict[int, list[Ctx]] = {}
        self.errors: list[str] = []

    def where(self, fn: Function, node: ast.AST) -> str:
        """``path:line`` of a node."""
        return f"{fn.module.path.relative_to(self.root)}:{getattr(node, 'lineno', 0)}"

    # -- references -----------------------------------------------------------------------------------------

    def lookup(self, dotted: str) -> tuple[Module, str] | Module | None:
        """A scanned module, or (module, attribute) for ``pkg.module.attribute``; None outside the scan."""
        if dotted in self.modules:
            return self.modules[dotted]
        base, _, attr = dotted.rpartition(".")
        if base in self.modules:
            return self.modules[base], attr
        return None

    def _reference(self, module: Module, expr: ast.expr) -> tuple[Module, str] | Module | None:
        if isinstance(expr, ast.Name):
            if expr.id in module.functions or expr.id in module.constants or expr.id in module.classes:
                return module, expr.id
            if expr.id in module.imports:
                return self.lookup(module.imports[expr.id])
            return None
        if isinstance(expr, ast.Attribute):
            base = self._reference(module, expr.value)
            if isinstance(base, Module):
                return self.lookup(f"{base.name}.{expr.attr}")
            if isinstance(base, tuple) and base[1] in base[0].classes:
                return base[0], f"{base[1]}.{expr.attr}"
        return None

    def target(self, module: Module, func: ast.expr) -> Function | None:
        """The scanned function a call expression calls, if it can be told without running the code."""
        found = self._reference(module, func)
        if not isinstance(found, tuple):
            return None
        owner, name = found
        if name in owner.classes:  # building an instance runs its __init__
            name = f"{name}.__init__"
        return owner.functions.get(name)

    def ctxs(self, fn: Function, path: frozenset[int] = frozenset()) -> list[Ctx]:
        """Every chain of calls that reaches ``fn`` (one root context when nothing in the scan calls it)."""
        if not path and id(fn) in self._ctxs:
            return self._ctxs[id(fn)]
        found: list[Ctx] = []
        for caller, call in self.callers.get(id(fn), []):
            if id(caller) in path or caller is fn:
                continue
            found.extend(Ctx(fn, call, up) for up in self.ctxs(caller, path | {id(fn)}))
        if not found:
            found = [Ctx(fn)]
        if not path:
            self._ctxs[id(fn)] = found
        return found

    # -- evaluation -----------------------------------------------------------------------------------------

    def evaluate(self, expr: ast.expr, ctx: Ctx) -> list[object] | None:  # noqa: PLR0911 - one case per node type
        """Every value ``expr`` may have in ``ctx``; None when the walk cannot tell."""
        if isinstance(expr, ast.Constant):
            return [expr.value]
        if isinstance(expr, ast.Tuple | ast.List):
            parts = [self.evaluate(e, ctx) for e in expr.elts]
            if any(p is None for p in parts):
                return None
            return [tuple(combo) for combo in itertools.product(*[p for p in parts if p is not None])]
        if isinstance(expr, ast.JoinedStr):
            return self._joined(expr, ctx)
        if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.USub):
            inner = self.evaluate(expr.operand, ctx)
            if inner is None or not all(isinstance(v, int | float) for v in inner):
                return None
            return [-v for v in inner if isinstance(v, int | float)]
        if isinstance(expr, ast.BinOp):
            return self._binop(expr, ctx)
        if isinstance(expr, ast.Call):
            return self._call(expr, ctx)
        if isinstance(expr, ast.Name):
            return self._name(expr.id, ctx)
        if isinstance(expr, ast.Attribute):
            found = self._reference(ctx.function.module, expr)
            if isinstance(found, tuple):
                return self._attribute(*found)
        return None

    def _joined(self, expr: ast.JoinedStr, ctx: Ctx) -> list[object] | None:
        parts: list[list[str]] = []
        for value in expr.values:
            if isinstance(value, ast.Constant):
                parts.append([str(value.value)])
                continue
            assert isinstance(value, ast.FormattedValue)
            if value.conversion != -1 or value.format_spec is not None:
                return None
            found = self.evaluate(value.value, ctx)
            if found is None:
                domain = DOMAINS.get((ctx.function.module.name, ctx.function.name, ast.unparse(value.value)))
                if domain is None:
                    return None
                found = list(domain())
            parts.append([str(v) for v in found])
        return ["".join(combo) for combo in itertools.product(*parts)]

    def _binop(self, expr: ast.BinOp, ctx: Ctx) -> list[object] | None:
        left, right = self.evaluate(expr.left, ctx), self.evaluate(expr.right, ctx)
        if left is None or right is None:
            return None
        out: list[object] = []
        for a, b in itertools.product(left, right):
            if isinstance(a, str) and isinstance(b, str) and isinstance(expr.op, ast.Add):
                out.append(a + b)
            elif isinstance(a, int | float) and isinstance(b, int | float) and not _boolean(a, b):
                if isinstance(expr.op, ast.Add):
                    out.append(a + b)
                elif isinstance(expr.op, ast.Sub):
                    out.append(a - b)
                elif isinstance(expr.op, ast.Mult):
                    out.append(a * b)
                else:
                    return None
            else:
                return None
        return out

    def _call(self, expr: ast.Call, ctx: Ctx) -> list[object] | None:  # noqa: PLR0911 - str methods, one case each
        func = expr.func
        if not isinstance(func, ast.Attribute):
            return None
        if func.attr in {"upper", "lower", "strip"} and not expr.args:
            inner = self.evaluate(func.value, ctx)
            if inner is None or not all(isinstance(v, str) for v in inner):
                return None
            return [getattr(v, func.attr)() for v in inner if isinstance(v, str)]
        if func.attr == "join" and isinstance(func.value, ast.Constant) and len(expr.args) == 1:
            items = self.evaluate(expr.args[0], ctx)
            sep = func.value.value
            if items is None or not isinstance(sep, str):
                return None
            joined: list[object] = []
            for item in items:
                if not isinstance(item, tuple) or not all(isinstance(i, str) for i in item):
                    return None
                joined.append(sep.join(str(i) for i in item))
            return joined
        return None

    def _attribute(self, module: Module, name: str) -> list[object] | None:
        top = module.functions["<module>"]
        if name in module.constants:
            return self.evaluate(module.constants[name], Ctx(top))
        cls, _, attr = name.partition(".")
        if attr and attr in module.classes.get(cls, {}):
            return self.evaluate(module.classes[cls][attr], Ctx(top))
        return None

    def _name(self, name: str, ctx: Ctx) -> list[object] | None:  # noqa: PLR0911 - one case per kind of binding
        fn = ctx.function
        if name in fn.params:
            if name in fn.assigns or ctx.call is None or ctx.caller is None:
                return None  # reassigned in the body, or a root's parameter: its value comes from outside
            arg = _argument(fn, ctx.call, name)
            if arg is not None:
                return self.evaluate(arg, ctx.caller)
            if name in fn.defaults:
                return self.evaluate(fn.defaults[name], Ctx(fn.module.functions["<module>"]))
            return None
        if name in fn.assigns:
            out: list[object] = []
            for value in fn.assigns[name]:
                found = self.evaluate(value, ctx)
                if found is None:
                    return None
                out.extend(found)
            return out
        if name in fn.loops:
            return self._loop(name, ctx)
        if fn.name != "<module>" and name in fn.module.constants:
            return self._attribute(fn.module, name)
        if fn.name == "<module>" and name in fn.module.constants:
            return self.evaluate(fn.module.constants[name], ctx)
        if name in fn.module.imports:
            imported = self.lookup(fn.module.imports[name])
            if isinstance(imported, tuple):
                return self._attribute(*imported)
        return None

    def _loop(self, name: str, ctx: Ctx) -> list[object] | None:
        out: list[object] = []
        for target, iterable in ctx.function.loops[name]:
            items = self.evaluate(iterable, ctx)
            if items is None or len(items) != 1 or not isinstance(items[0], tuple):
                return None
            for item in items[0]:
                value = _unpack(target, item, name)
                if value is None:
                    return None
                out.append(value)
        return out

    # -- reads ----------------------------------------------------------------------------------------------

    def reads(self) -> list[Read]:
        """Every variable read, once per site and chain of calls."""
        found: list[Read] = []
        for module in self.modules.values():
            for fn in module.functions.values():
                if module.name == "belfry.config" and fn.name.startswith("Env."):
                    continue  # the reader itself
                for node in fn.nodes():
                    found.extend(self._site(fn, node))
        return found

    def _site(self, fn: Function, node: ast.AST) -> list[Read]:
        typed = (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ENV_METHODS
            and _is_env(fn, node.func.value)
        )
        if typed:
            assert isinstance(node, ast.Call)
            return self._expand(fn, node, node.args[0], _default_expr(node), _keyword(node, "minimum"), typed=True)
        mapping = (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MAPPING_READS
        )
        if mapping and isinstance(node, ast.Call) and node.args and not node.keywords:
            default = node.args[1] if len(node.args) > 1 else None
            return self._expand(fn, node, node.args[0], default, None, typed=False)
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            return self._expand(fn, node, node.slice, None, None, typed=False)
        return []

    def _expand(
        self,
        fn: Function,
        node: ast.AST,
        key: ast.expr,
        default: ast.expr | None,
        minimum: ast.expr | None,
        *,
        typed: bool,
    ) -> list[Read]:
        dynamic = (
            isinstance(key, ast.JoinedStr)
            and bool(key.values)
            and isinstance(key.values[0], ast.Constant)
            and str(key.values[0].value).startswith("BELFRY_")
        )
        out: list[Read] = []
        for ctx in self.ctxs(fn):
            names = self.evaluate(key, ctx)
            if names is None or not all(isinstance(n, str) for n in names):
                if typed or dynamic:
                    self.errors.append(
                        f"{self.where(fn, node)}: cannot tell which variable `{ast.unparse(key)}` names "
                        f"(reached from {ctx.root().module.name}.{ctx.root().name}); "
                        "make it a literal or add its dynamic part to DOMAINS in scripts/config_reference.py"
                    )
                continue
            if not typed and not all(VARIABLE.match(str(n)) for n in names):
                continue  # a plain dictionary, not the environment
            defaults = [REQUIRED] if default is None else self.evaluate(default, ctx)
            if defaults is None or len(set(map(repr, defaults))) != 1:
                defaults = [UNKNOWN]
            minimums = [None] if minimum is None else self.evaluate(minimum, ctx)
            shown_minimum = minimums[0] if minimums is not None and len(minimums) == 1 else None
            for name in names:
                out.append(
                    Read(
                        name=str(name),
                        template=_template(fn, key),
                        default=defaults[0],
                        minimum=shown_minimum,
                        reader=self.label(ctx.root()),
                        where=self.where(fn, node),
                        typed=typed,
                    )
                )
        return out

    def label(self, root: Function) -> str:
        """Who runs a root function: a service's name, ``belfry <command>`` or ``belfry up``."""
        parts = root.module.name.split(".")
        if parts[0] == "services" and len(parts) > 1:
            return parts[1]
        if root.module.name == "belfry.cli":
            return CLI_ROOTS.get(root.name, "belfry " + root.name.strip("_").replace("_", "-"))
        if root.module.name.startswith("belfry.local"):
            return LOCAL
        return f"{root.module.name}.{root.name}"


def _boolean(*values: object) -> bool:
    return any(isinstance(v, bool) for v in values)


def _argument(fn: Function, call: ast.Call, name: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    index = fn.params.index(name)
    if index < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[: index + 1]):
        return call.args[index]
    return None


def _unpack(target: ast.expr, item: object, name: str) -> object | None:
    if isinstance(target, ast.Name):
        return item if target.id == name else None
    if isinstance(target, ast.Tuple) and isinstance(item, tuple) and len(item) == len(target.elts):
        for sub, value in zip(target.elts, item, strict=True):
            if isinstance(sub, ast.Name) and sub.id == name:
                found: object = value
                return found
    return None


def _is_env(fn: Function, receiver: ast.expr) -> bool:
    """Whether ``receiver`` is a ``belfry.config.Env`` (annotated so, or built here)."""
    if not isinstance(receiver, ast.Name):
        return False
    annotation = fn.annotations.get(receiver.id, "")
    if annotation.split(".")[-1].strip("'\"") == "Env":
        return True
    return any(
        isinstance(v, ast.Call) and ast.unparse(v.func).split(".")[-1] == "Env" for v in fn.assigns.get(receiver.id, [])
    )


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _default_expr(call: ast.Call) -> ast.expr | None:
    assert isinstance(call.func, ast.Attribute)
    if call.func.attr == "path":
        return ast.Constant("")  # an optional file: unset means none
    return call.args[1] if len(call.args) > 1 else _keyword(call, "default")


def _template(fn: Function, key: ast.expr) -> str:
    """The name with its dynamic parts as ``<NAME>``: ``f"{prefix}_BATCH"`` → ``BELFRY_<NAME>_BATCH``."""
    if isinstance(key, ast.Constant):
        return str(key.value)
    if isinstance(key, ast.Name) and len(fn.assigns.get(key.id, [])) == 1:
        return _template(fn, fn.assigns[key.id][0])
    if isinstance(key, ast.JoinedStr):
        text = ""
        for value in key.values:
            if isinstance(value, ast.Constant):
                text += str(value.value)
            else:
                assert isinstance(value, ast.FormattedValue)
                inner = value.value
                if isinstance(inner, ast.Name) and len(fn.assigns.get(inner.id, [])) == 1:
                    text += _template(fn, fn.assigns[inner.id][0])
                else:
                    words = re.findall(r"[A-Za-z]+", ast.unparse(inner))
                    base = [w for w in words if w not in {"upper", "lower", "strip"}]
                    text += f"<{(base[-1] if base else 'X').upper()}>"
        return text
    return ast.unparse(key)


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _lookup(table: dict[str, str], read: Read) -> tuple[str, str] | None:
    """(key, text) for a variable: by its name, else by its template with ``{name}`` filled in."""
    if read.name in table:
        return read.name, table[read.name]
    if read.template in table:
        pattern = "^" + re.escape(read.template).replace(re.escape("<NAME>"), "(.+)") + "$"
        match = re.match(pattern, read.name)
        part = match.group(1).lower() if match and match.groups() else ""
        return read.template, table[read.template].replace("{name}", part)
    return None


def collect(root: Path = ROOT) -> list[Variable]:
    """Every variable the code under ``root`` reads, with its default, description and readers."""
    walk = Walk(root)
    reads = walk.reads()
    problems = list(dict.fromkeys(walk.errors))
    unplaced = sorted({f"{r.name} ({r.where}, reached from {r.reader})" for r in reads if "." in r.reader})
    problems += [
        f"{entry}: not reached from a service, the belfry command or belfry up; give its root a label"
        for entry in unplaced
    ]
    by_name: dict[str, list[Read]] = {}
    for read in reads:
        by_name.setdefault(read.name, []).append(read)
    used: set[str] = set()
    variables: list[Variable] = []
    for name, sites in sorted(by_name.items()):
        described = _lookup(DESCRIPTIONS, sites[0])
        if described is None:
            where = ", ".join(sorted({s.where for s in sites}))
            problems.append(
                f"{name} (read at {where}) has no description: add it to DESCRIPTIONS in {Path(__file__).name}"
            )
            continue
        used.add(described[0])
        shown = _lookup(DEFAULT_TEXT, sites[0])
        if shown is not None:
            used.add("default:" + shown[0])
        variables.append(Variable(name, shown[1] if shown else _default_cell(sites), described[1], _readers(sites)))
    problems += [f"DESCRIPTIONS names {key}, which no code reads: remove it" for key in DESCRIPTIONS if key not in used]
    problems += [
        f"DEFAULT_TEXT names {key}, which no code reads: remove it"
        for key in DEFAULT_TEXT
        if "default:" + key not in used
    ]
    if problems:
        raise GeneratorError("configuration reference:\n  - " + "\n  - ".join(problems))
    return variables


def _default_cell(sites: list[Read]) -> str:
    """The default as the reference shows it; several when readers differ."""
    typed = [s for s in sites if s.typed] or sites
    known = [s for s in typed if s.default is not REQUIRED] or typed
    cells: dict[str, list[str]] = {}
    for site in known:
        if site.default is REQUIRED:
            cell = "required"
        elif site.default is UNKNOWN:
            cell = "computed at start"
        elif site.default == "" or site.default is None:
            cell = "unset"
        else:
            cell = f"`{_shown(site.default)}`"
        if site.minimum is not None:
            cell += f" (at least {_shown(site.minimum)})"
        readers = cells.setdefault(cell, [])
        if site.reader not in readers:
            readers.append(site.reader)
    if len(cells) == 1:
        return next(iter(cells))
    return "; ".join(f"{cell} ({', '.join(readers)})" for cell, readers in cells.items())


def _readers(sites: list[Read]) -> list[str]:
    order = {name: i for i, name in enumerate(_declared_services())}
    found = {s.reader for s in sites}
    return sorted(found, key=lambda r: (order.get(r, len(order)), r))


def render(variables: list[Variable]) -> str:
    """The Markdown reference."""
    services = _declared_services()
    everyone = set(services)
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by scripts/config_reference.py from the code; do not edit by hand. -->",
        "<!-- Run `python scripts/config_reference.py` after changing a setting; a test fails when this file is stale. -->",
        "",
        "Every environment variable Belfry reads, taken from the code: names and defaults from the settings",
        "readers (`belfry.config.Env`) and from direct reads of the environment. Services read their settings",
        "once at start and refuse to start with one message naming every problem. Defaults are what a service",
        "uses when the variable is unset or empty; `(at least N)` is the smallest value accepted.",
        "",
        "Sections: [common to every service](#common-to-every-service), "
        + "[shared by some services](#shared-by-some-services), "
        + ", ".join(f"[{name}](#{name})" for name in services)
        + ", [local runs and the `belfry` command](#local-runs-and-the-belfry-command).",
        "",
    ]

    def table(title: str, intro: str, rows: list[Variable]) -> None:
        lines.extend(
            [
                f"## {title}",
                "",
                intro,
                "",
                "| variable | default | what it does | read by |",
                "| --- | --- | --- | --- |",
            ]
        )
        for v in rows:
            readers = v.readers
            if everyone <= set(readers):
                readers = ["every service", *[r for r in readers if r not in everyone]]
            cell = ", ".join(r if r == "every service" else f"`{r}`" if r.startswith("belfry") else r for r in readers)
            lines.append(f"| `{v.name}` | {v.default} | {v.description} | {cell} |")
        lines.append("")

    def served(v: Variable) -> set[str]:
        return everyone & set(v.readers)

    table(
        "Common to every service",
        "Read by every service (`belfry.config.load_common`, `belfry.trust`, `belfry.processes`).",
        [v for v in variables if served(v) == everyone],
    )
    table(
        "Shared by some services",
        "Read by several services but not all (the queue senders' scaffold, keys two services share).",
        [v for v in variables if 1 < len(served(v)) < len(everyone)],
    )
    for name in services:
        rows = [v for v in variables if served(v) == {name}]
        table(name, f"Read by the {name} service alone.", rows)
    table(
        "Local runs and the `belfry` command",
        "Read only by `belfry up` (the local mesh) and the `belfry` subcommands; they also read some of the above.",
        [v for v in variables if not served(v)],
    )
    return "\n".join(lines).rstrip() + "\n"


def generate(root: Path = ROOT) -> str:
    """The reference the code under ``root`` gives."""
    return render(collect(root))


def check(root: Path = ROOT) -> str:
    """A unified diff from ``docs/configuration.md`` to what it should be; empty when current."""
    path = root / OUTPUT
    current = path.read_text() if path.exists() else ""
    wanted = generate(root)
    return "".join(
        difflib.unified_diff(
            current.splitlines(keepends=True), wanted.splitlines(keepends=True), str(OUTPUT), f"{OUTPUT} (generated)"
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Write docs/configuration.md, or with ``--check`` say whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 with a diff when stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree to read (default: this checkout)")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    for entry in (str(root / "libs"), str(root)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    importlib.invalidate_caches()
    try:
        if args.check:
            diff = check(root)
            if diff:
                print(diff, end="")
                print(f"{OUTPUT} is stale: run python scripts/config_reference.py", file=sys.stderr)
                return 1
            return 0
        text = generate(root)
    except GeneratorError as exc:
        print(exc, file=sys.stderr)
        return 2
    (root / OUTPUT).write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
