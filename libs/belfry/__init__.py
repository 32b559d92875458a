"""Belfry: the shared kit (config, logging, database, migrations, RPC bootstrap)
and, under ``belfry.api``, the code generated from ``protos/``."""
