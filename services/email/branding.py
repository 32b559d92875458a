"""Per-account branding: the sending identity and the look of every email of an account.

An account's super admins set it through ``Deliverability.SetBranding``
(``check`` validates every field, naming the one that is wrong); an empty
field means Belfry's default. The sender reads it through ``BrandingCache``:
a batch's accounts are loaded in one query in ``prepare`` and kept
``TTL_SECONDS``, so the send path adds no query per message, and a
``SetBranding`` served by the same process drops its account's entry at once
(other processes and replicas see it within the TTL).

Two values end up inside the HTML: the accent colour is used as an inline
style value, so only ``#rrggbb`` is accepted (nothing else can reach the CSS);
the logo URL is an ``<img src>``, https only, and Belfry never fetches it
(the reader's mail client does). Both are checked again when a message is
composed, so a row written by hand cannot slip past. Everything else is text
that the templates autoescape.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, fields
from email.headerregistry import Address
from urllib.parse import urlsplit

import asyncpg
from belfry.errors import InvalidArgument

from services.email import headers

TTL_SECONDS = 30.0
MAX_FROM_NAME = 100
MAX_LOGO_URL = 2048
MAX_FOOTER = 500
DEFAULT_ACCENT = "#222222"
ACCENT = re.compile(r"^#[0-9a-f]{6}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_FOOTER_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # a line feed is kept: the footer may have lines


@dataclass(frozen=True)
class Branding:
    """One account's branding as stored; an empty field means the default."""

    from_name: str = ""
    from_address: str = ""
    reply_to: str = ""
    logo_url: str = ""
    accent_color: str = ""
    footer: str = ""


FIELDS = tuple(f.name for f in fields(Branding))
DEFAULT = Branding()


def safe_logo(url: str) -> bool:
    """An https URL with a host, no whitespace or control characters, at most ``MAX_LOGO_URL`` characters."""
    if not url or len(url) > MAX_LOGO_URL or any(c.isspace() for c in url) or _CONTROL.search(url):
        return False
    try:
        parts = urlsplit(url)
        return parts.scheme == "https" and bool(parts.hostname)
    except ValueError:
        return False


def check(branding: Branding, allowed_domains: Collection[str], *, prefix: str = "branding.") -> Branding:
    """``branding`` as it is stored, or ``InvalidArgument`` naming the first field that is wrong."""

    def refuse(name: str, why: str) -> InvalidArgument:
        return InvalidArgument(f"{name} {why}", field=f"{prefix}{name}")

    from_name = branding.from_name.strip()
    if len(from_name) > MAX_FROM_NAME:
        raise refuse("from_name", f"is at most {MAX_FROM_NAME} characters")
    if _CONTROL.search(from_name):
        raise refuse("from_name", "is one line: no CR, LF or other control characters")
    from_address = ""
    if branding.from_address.strip():
        parsed = headers.recipient(branding.from_address.strip())
        if parsed is None:
            raise refuse("from_address", "must be a plain address such as news@example.com")
        domain = parsed.domain.lower()
        if domain not in allowed_domains:
            raise refuse(
                "from_address",
                f"must be on a domain this service sends and signs for ({', '.join(sorted(allowed_domains))}), "
                f"not {domain!r}",
            )
        from_address = f"{parsed.username}@{domain}"
    reply_to = ""
    if branding.reply_to.strip():
        parsed = headers.recipient(branding.reply_to.strip())
        if parsed is None:
            raise refuse("reply_to", "must be a plain address such as support@example.com, or empty")
        reply_to = f"{parsed.username}@{parsed.domain.lower()}"
    logo_url = branding.logo_url.strip()
    if len(logo_url) > MAX_LOGO_URL:
        raise refuse("logo_url", f"is at most {MAX_LOGO_URL} characters")
    if logo_url and not safe_logo(logo_url):
        raise refuse("logo_url", "must be an https:// URL with a host (no spaces), or empty")
    accent = branding.accent_color.strip().lower()
    if accent and not ACCENT.match(accent):
        raise refuse("accent_color", "must be a colour written #rrggbb (e.g. #1a73e8), or empty")
    footer = branding.footer.replace("\r\n", "\n").strip()
    if len(footer) > MAX_FOOTER:
        raise refuse("footer", f"is at most {MAX_FOOTER} characters")
    if _FOOTER_CONTROL.search(footer):
        raise refuse("footer", "is plain text: no control characters other than line breaks")
    return Branding(from_name, from_address, reply_to, logo_url, accent, footer)


@dataclass(frozen=True)
class Look:
    """What every template gets as ``brand``: safe to put where the templates put it."""

    name: str  # the logo's alt text: the account's sending name
    logo_url: str  # "" when none
    accent: str  # always #rrggbb
    footer: str  # plain text ("" when none); autoescaped in HTML


@dataclass(frozen=True)
class Identity:
    """A message's From, Reply-To and look."""

    sender: Address
    reply_to: Address | None
    look: Look


def identity(branding: Branding | None, default: Address) -> Identity:
    """The From, Reply-To and look ``branding`` gives (its empty fields: the defaults)."""
    b = branding or DEFAULT
    name = headers.header_text(b.from_name, limit=MAX_FROM_NAME) or default.display_name
    sender = default
    if b.from_address or name != default.display_name:
        local, _, domain = (b.from_address or default.addr_spec).rpartition("@")
        sender = Address(display_name=name, username=local, domain=domain)
    reply_to = headers.recipient(b.reply_to) if b.reply_to else None
    look = Look(
        name=name,
        logo_url=b.logo_url if safe_logo(b.logo_url) else "",
        accent=b.accent_color if ACCENT.match(b.accent_color) else DEFAULT_ACCENT,
        footer=b.footer,
    )
    return Identity(sender, reply_to, look)


async def load(pool: asyncpg.Pool | asyncpg.Connection, account_ids: Iterable[str]) -> dict[str, Branding]:
    """The branding of those of ``account_ids`` that have one; one query."""
    rows = await pool.fetch(
        f"select account_id, {', '.join(FIELDS)} from email.branding where account_id = any($1::text[])",
        list(account_ids),
    )
    return {r["account_id"]: Branding(*(r[f] for f in FIELDS)) for r in rows}


async def store(pool: asyncpg.Pool, account_id: str, branding: Branding, user_id: str) -> None:
    """Replace the account's branding."""
    await pool.execute(
        f"""
        insert into email.branding (account_id, {", ".join(FIELDS)}, updated_by)
        values ($1, $2, $3, $4, $5, $6, $7, $8)
        on conflict (account_id) do update
            set {", ".join(f"{f} = excluded.{f}" for f in FIELDS)},
                updated_by = excluded.updated_by, updated_at = now()
        """,
        account_id,
        *(getattr(branding, f) for f in FIELDS),
        user_id,
    )


class BrandingCache:
    """Accounts' branding for the sender, each kept ``ttl`` seconds; ``invalidate`` drops one at once."""

    def __init__(self, pool: asyncpg.Pool, *, ttl: float = TTL_SECONDS) -> None:
        self._pool = pool
        self._ttl = ttl
        self._entries: dict[str, tuple[float, Branding | None]] = {}
        # Bumped by every invalidation: a load that began before one does not store what it read.
        self._generation = 0

    def cached(self, account_id: str) -> tuple[bool, Branding | None]:
        """``(True, branding or None)`` when a fresh entry is held, else ``(False, None)``."""
        entry = self._entries.get(account_id)
        if entry is None or entry[0] <= time.monotonic():
            return False, None
        return True, entry[1]

    async def warm(self, account_ids: Iterable[str]) -> None:
        """Load, in one query, the accounts of ``account_ids`` without a fresh entry."""
        missing = {a for a in account_ids if not self.cached(a)[0]}
        if not missing:
            return
        generation = self._generation
        found = await load(self._pool, missing)
        if generation != self._generation:
            return  # a SetBranding happened meanwhile: what was read may be stale
        expires = time.monotonic() + self._ttl
        if len(self._entries) > 10_000:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
        for account_id in missing:
            self._entries[account_id] = (expires, found.get(account_id))

    async def get(self, account_id: str) -> Branding | None:
        """The account's branding (None: the defaults); a query only when its entry is missing or old."""
        held, branding = self.cached(account_id)
        if held:
            return branding
        generation = self._generation
        found = (await load(self._pool, [account_id])).get(account_id)
        if generation == self._generation:
            self._entries[account_id] = (time.monotonic() + self._ttl, found)
        return found

    def invalidate(self, account_id: str) -> None:
        """Forget the account's entry (its branding was just set)."""
        self._generation += 1
        self._entries.pop(account_id, None)
