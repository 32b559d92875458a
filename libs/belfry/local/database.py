"""The private PostgreSQL of the embedded local run.

Never the machine's shared cluster: a data directory of our own, started with
the PostgreSQL binaries shipped in the ``pgserver`` wheel (Unix socket only;
run as root it drops to its own unprivileged system user).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from belfry.errors import ConfigError


def start(data_dir: Path) -> tuple[Any, str]:
    """Start (or reuse) the private server; return its handle and DSN."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR under root
        try:
            import pgserver  # noqa: PLC0415 - only the local run needs the embedded binaries
        except ModuleNotFoundError as exc:
            raise ConfigError(
                "the private PostgreSQL needs the local extra: pip install -e '.[local]' (./scripts/up does), "
                "or set BELFRY_DATABASE_URL to a PostgreSQL server"
            ) from exc
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
    return server, str(server.get_uri())


def stop(server: Any) -> None:
    """Stop the private server (it keeps its data for the next run)."""
    with contextlib.suppress(Exception):
        server.cleanup()
