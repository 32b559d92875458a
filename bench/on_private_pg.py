"""Run a benchmark script against a private durable PostgreSQL cluster, removed afterwards.

The machine's shared server also serves other people's test runs, whose WAL
and CPU would mix with the benchmark's. This starts a cluster of its own
(``bench.pg_cluster.DurableCluster``: Debian's server binaries, ``initdb``
defaults, so ``fsync``, ``full_page_writes`` and ``synchronous_commit`` on),
points ``BELFRY_TEST_ADMIN_DSN`` at it and runs the script; every bench script
that reads that variable (the data-path ones, ``dispatcher_publish``,
``e2e_mesh``) then creates its scratch databases there.

With ``--statements`` (before the script), the cluster loads
``pg_stat_statements`` and the statements that took the server's time are
printed once the script ends: where PostgreSQL spends a benchmark's CPU.

Usage: python -m bench.on_private_pg [--statements] bench/write_cost.py [the script's arguments]
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from bench.pg_cluster import DurableCluster

# The statements that took the most of the server's time, with what each costs per call and per row.
_TOP = """
select round(total_exec_time)::bigint as total_ms, calls, rows,
       round((total_exec_time / calls)::numeric, 3) as ms_per_call,
       round((1000 * total_exec_time / greatest(rows, 1))::numeric, 1) as us_per_row,
       regexp_replace(left(query, 160), '\\s+', ' ', 'g') as query
from pg_stat_statements order by total_exec_time desc limit 15
"""


async def _report_statements(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(_TOP)
    finally:
        await conn.close()
    print("\nstatements by server time (pg_stat_statements):")
    for r in rows:
        print(f"{r['total_ms']:>9} ms {r['calls']:>8} calls {r['rows']:>9} rows "
              f"{r['ms_per_call']:>9} ms/call {r['us_per_row']:>8} µs/row  {r['query']}")  # fmt: skip


async def main() -> int:
    """Start the cluster, run the script with the cluster's DSN, stop and remove the cluster."""
    args = sys.argv[1:]
    statements = bool(args) and args[0] == "--statements"
    args = args[1:] if statements else args
    if not args:
        raise SystemExit(__doc__)
    async with DurableCluster(statements=statements) as cluster:
        env = dict(os.environ, BELFRY_TEST_ADMIN_DSN=cluster.admin_dsn)
        print(f"private PostgreSQL cluster on port {cluster.port} ({cluster.data})", flush=True)
        if statements:
            conn = await asyncpg.connect(cluster.admin_dsn)
            await conn.execute("create extension pg_stat_statements")
            await conn.close()
        process = await asyncio.create_subprocess_exec(sys.executable, *args, env=env)
        code = await process.wait()
        if statements:
            await _report_statements(cluster.admin_dsn)
        return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
