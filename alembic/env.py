"""Alembic environment for the cache schema.

Run from a checkout (`alembic -x url=... upgrade head`) or through
`fastpgcache.setup_cache()`, which passes a connection and options in
`config.attributes`. The history lives in its own version table inside the
cache schema, so it never meets an application's own `alembic_version`.
"""
import os

from alembic import context
from sqlalchemy import create_engine, pool, text

from fastpgcache.admin import VERSION_TABLE, MigrationOptions

config = context.config
options: MigrationOptions = config.attributes.get("fastpgcache") or MigrationOptions.from_x_arguments(
    context.get_x_argument(as_dictionary=True)
)
config.attributes["fastpgcache"] = options


def _configure_and_run(connection):
    quoted_schema = connection.dialect.identifier_preparer.quote(options.schema)
    # The version table lives in the schema, so the schema must exist first.
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted_schema}"))
    context.configure(
        connection=connection,
        version_table=VERSION_TABLE,
        version_table_schema=options.schema,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()
        if not context.get_context().get_current_heads():
            # Downgraded to base: leave nothing behind, not even the history.
            version_table = connection.dialect.identifier_preparer.quote(VERSION_TABLE)
            connection.execute(text(f"DROP TABLE IF EXISTS {quoted_schema}.{version_table}"))
            if options.schema != "public":
                empty = connection.execute(
                    text("SELECT NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                         " WHERE n.nspname = :s)"),
                    {"s": options.schema},
                ).scalar()
                if empty:
                    connection.execute(text(f"DROP SCHEMA {quoted_schema}"))


def run_migrations_online():
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = options.url or os.environ.get("FASTPGCACHE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("fastpgcache: no database URL; pass -x url=postgresql://... or set FASTPGCACHE_URL")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _configure_and_run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("fastpgcache: offline (--sql) mode is not supported; run against a database")
run_migrations_online()
