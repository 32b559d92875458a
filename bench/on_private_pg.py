"""Run a benchmark script against a private durable PostgreSQL cluster, removed afterwards.

The machine's shared server also serves other people's test runs, whose WAL
and CPU would mix with the benchmark's. This starts a cluster of its own
(``bench.pg_cluster.DurableCluster``: Debian's server binaries, ``initdb``
defaults, so ``fsync``, ``full_page_writes`` and ``synchronous_commit`` on),
points ``BELFRY_TEST_ADMIN_DSN`` at it and runs the script; every bench script
that reads that variable (the data-path ones, ``dispatcher_publish``,
``e2e_mesh``) then creates its scratch databases there.

Usage: python -m bench.on_private_pg bench/write_cost.py [the script's arguments]
"""

from __future__ import annotations

import asyncio
import os
import sys

from bench.pg_cluster import DurableCluster


async def main() -> int:
    """Start the cluster, run the script with the cluster's DSN, stop and remove the cluster."""
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    async with DurableCluster() as cluster:
        env = dict(os.environ, BELFRY_TEST_ADMIN_DSN=cluster.admin_dsn)
        print(f"private PostgreSQL cluster on port {cluster.port} ({cluster.data})", flush=True)
        process = await asyncio.create_subprocess_exec(sys.executable, *sys.argv[1:], env=env)
        return await process.wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
