"""The ``belfry`` command: run services, migrate, run the local mesh, publish, read caught mail."""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import os
import runpy
import sys
from pathlib import Path

import grpc

from belfry import auth, config, identity, migrate, rpc, service
from belfry.errors import BelfryError, ConfigError
from belfry.local import demo, mailcatcher, supervisor


def _serve(args: argparse.Namespace) -> int:
    runpy.run_module(service.declaration(args.name).package, run_name="__main__", alter_sys=True)
    return 0


def _migrate(_: argparse.Namespace) -> int:
    env = config.Env()
    url = config.database_url(env)
    env.check()
    applied = asyncio.run(migrate.migrate_url(url))
    print(f"{len(applied)} migrations applied" + "".join(f"\n  {m.owner}/{m.version}" for m in applied))
    return 0


async def _after_up(env: dict[str, str]) -> None:
    local = supervisor.client_tls(env)
    channel = rpc.connect(env["BELFRY_PREFERENCES_ADDRESS"], local)
    await demo.seed(channel)
    await channel.close()
    dispatcher = rpc.connect(env["BELFRY_DISPATCHER_ADDRESS"], local)
    answer = await demo.publish(
        dispatcher,
        demo.event(
            account_id=demo.DEMO_ACCOUNT,
            topic=demo.SAMPLE_TOPIC,
            recipients=["alice"],
            actor="bruno",
            object_name="Welcome to Belfry",
            url=env["BELFRY_PUBLIC_URL"] + "/",
        ),
    )
    await dispatcher.close()
    print(
        "\nBelfry is up.\n"
        f"  sample notification {answer.notification_id} published to alice@example.test\n"
        "  caught mail:     belfry mail            (belfry mail 1 shows the first one)\n"
        f"  web app (bell):  {env['BELFRY_PUBLIC_URL']}/  (dev sign-in as alice)\n"
        "  publish more:    belfry publish --to alice --topic comments.mentioned --name 'Quote Q-12'\n"
        "Press Ctrl-C to stop.\n",
        flush=True,
    )


def _up(args: argparse.Namespace) -> int:
    return asyncio.run(supervisor.up(args.home, os.environ, on_ready=None if args.no_sample else _after_up))


def _publish(args: argparse.Namespace) -> int:
    # A producer's own service token when given one; else the local mesh's, minted with the key `belfry up` keeps.
    given = os.environ.get("BELFRY_SERVICE_TOKEN", "")
    local = (
        config.TlsSettings(None, None, None, given)
        if given
        else supervisor.client_tls({supervisor.SIGNING_KEY: _local_secret(args.home, supervisor.SIGNING_KEY)})
    )

    async def run() -> int:
        channel = rpc.connect(args.dispatcher, local)
        try:
            answer = await demo.publish(
                channel,
                demo.event(
                    account_id=args.account,
                    topic=args.topic,
                    recipients=args.to,
                    actor=args.actor,
                    object_type=args.object_type,
                    object_name=args.name,
                    url=args.url,
                    idempotency_key=args.idempotency_key,
                ),
            )
        finally:
            await channel.close()
        print(f"{answer.notification_id}{' (replayed)' if answer.replayed else ''}")
        return 0

    return asyncio.run(run())


def _mail(args: argparse.Namespace) -> int:
    mails = mailcatcher.caught(args.home / "mail")
    if args.index is None:
        for m in mails:
            print(f"{m.index:4}  {m.date:31}  {m.to:30}  {m.subject}")
        if not mails:
            print(f"no mail caught yet in {args.home / 'mail'}")
        return 0
    if not 1 <= args.index <= len(mails):
        print(f"no mail #{args.index}; {len(mails)} caught", file=sys.stderr)
        return 1
    msg = email.message_from_bytes(mails[args.index - 1].path.read_bytes(), policy=email.policy.default)
    for header in ("From", "To", "Subject", "Date", "Message-ID", "List-Unsubscribe"):
        if msg[header]:
            print(f"{header}: {msg[header]}")
    body = msg.get_body(preferencelist=("plain", "html"))
    print("\n" + (body.get_content() if body is not None else ""))
    return 0


def _local_secret(home: Path, name: str) -> str:
    """``name`` from the environment, else from the secrets ``belfry up`` wrote into ``home``; a ConfigError saying what to do."""
    if os.environ.get(name):
        return os.environ[name]
    path = home / "secrets.env"
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    known = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if name not in known:
        raise ConfigError(
            f"no signing key: {name} is not set and {path} holds none; "
            f"run `belfry --home {home} up` once (it creates it there), or set {name} to the key the mesh uses"
        )
    return known[name]


def _local_token_keys(home: Path) -> str:
    """The user-token signing keys ``belfry up`` wrote into ``home`` (BELFRY_TOKEN_KEYS)."""
    return _local_secret(home, "BELFRY_TOKEN_KEYS")


def _service_token(args: argparse.Namespace) -> int:
    key = identity.SigningKey.parse(_local_secret(args.home, supervisor.SIGNING_KEY))
    print(key.mint(args.identity, ttl_seconds=args.ttl_days * 86_400))
    return 0


def _service_key(args: argparse.Namespace) -> int:
    key = identity.SigningKey.generate(args.kid)
    print(f"{supervisor.SIGNING_KEY}={key.dump()}\nBELFRY_SERVICE_TOKEN_KEYS={key.public()}")
    return 0


def _token(args: argparse.Namespace) -> int:
    env = config.Env()
    common = config.load_common("cli", env, default_port=0)
    keys = common.token_keys or config.parse_token_keys(_local_token_keys(args.home))
    active = common.token_active_kid or next(iter(keys))
    # The lifetime of development tokens: --ttl, else BELFRY_TOKEN_TTL_SECONDS (checked on its own: a
    # token needs no database, so the common block's other problems do not stop it).
    lifetime = config.Env()
    ttl = args.ttl or config.token_ttl_seconds(lifetime)
    lifetime.check()
    print(auth.TokenIssuer(keys, active, ttl).issue(args.account, args.user))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="belfry", description=__doc__)
    parser.add_argument("--home", type=Path, default=supervisor.default_home(), help="local run folder (BELFRY_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run one service (the container entry point)")
    p.add_argument("name", help=" | ".join(d.name for d in service.declared()))
    p.set_defaults(run=_serve)
    sub.add_parser("migrate", help="apply database migrations (BELFRY_DATABASE_URL)").set_defaults(run=_migrate)
    p = sub.add_parser("up", help="run the whole mesh locally, on embedded defaults unless configured")
    p.add_argument("--no-sample", action="store_true", help="do not seed the demo tenant nor publish the sample")
    p.set_defaults(run=_up)
    p = sub.add_parser("publish", help="publish one event to the dispatcher")
    p.add_argument("--dispatcher", default=os.environ.get("BELFRY_DISPATCHER_ADDRESS", "127.0.0.1:50052"))
    p.add_argument("--account", default=demo.DEMO_ACCOUNT)
    p.add_argument("--topic", default=demo.SAMPLE_TOPIC)
    p.add_argument("--to", action="append", required=True, help="recipient user id (repeatable)")
    p.add_argument("--actor", default="", help="acting user id (empty: the system)")
    p.add_argument("--object-type", default="deal")
    p.add_argument("--name", default="", help="the object's display name")
    p.add_argument("--url", default="")
    p.add_argument("--idempotency-key", default="")
    p.set_defaults(run=_publish)
    p = sub.add_parser("mail", help="list mail caught by the local run, or show one")
    p.add_argument("index", nargs="?", type=int)
    p.set_defaults(run=_mail)
    p = sub.add_parser("token", help="issue a user token (dev sign-in)")
    p.add_argument("--account", default=demo.DEMO_ACCOUNT)
    p.add_argument("--user", default="alice")
    p.add_argument("--ttl", type=int, default=0, help="lifetime in seconds (default: BELFRY_TOKEN_TTL_SECONDS, 900)")
    p.set_defaults(run=_token)
    p = sub.add_parser("service-key", help="make a service-token signing key (keep it; give services its public half)")
    p.add_argument("--kid", default="k1", help="key id (a new one for each rotation)")
    p.set_defaults(run=_service_key)
    p = sub.add_parser("service-token", help=f"mint a service token with {supervisor.SIGNING_KEY} (or belfry up's)")
    p.add_argument("identity", help="a service name, or a configured producer, provisioning, app or operator")
    p.add_argument("--ttl-days", type=int, default=90)
    p.set_defaults(run=_service_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``belfry`` script."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except BelfryError as exc:
        print(f"belfry: {exc.message}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"belfry: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
