"""Alembic environment for the cache schema.

Run from a checkout (`FASTPGCACHE_URL=postgresql://admin@db/app alembic upgrade head`,
with the password in PGPASSWORD or ~/.pgpass, never on the command line) or through
`fastpgcache.setup_cache()`, which passes a connection and options in
`config.attributes`. The history lives in its own version table inside the
cache schema, so it never meets an application's own `alembic_version`.
"""
import os

from sqlalchemy import create_engine, pool, text
from sqlalchemy import exc as sa_exc

from alembic import context, operations
from fastpgcache.admin import KEEP_SCHEMA, VERSION_TABLE, MigrationOptions
from fastpgcache.catalog import SEARCH_PATH
from fastpgcache.distributed import apply_distribution, sync_owner_login
from fastpgcache.errors import sqlstate

config = context.config
options: MigrationOptions = config.attributes.get("fastpgcache") or MigrationOptions.from_x_arguments(
    context.get_x_argument(as_dictionary=True)
)
config.attributes["fastpgcache"] = options

DEPENDENT_OBJECTS_STILL_EXIST = "2BP01"


def _configure_and_run(connection):
    quoted_schema = connection.dialect.identifier_preparer.quote(options.schema)
    # Names the migrations leave unqualified (types, operators, functions) resolve in pg_catalog
    # only: an object another role planted on the admin's search path is never picked up.
    connection.execute(text(SEARCH_PATH))
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
        heads = context.get_context().get_current_heads()
        if heads and set(heads) == set(context.script.get_heads()):
            # At head, the table is made (or kept) distributed or local as asked (Citus, distributed.py); a
            # revision that creates objects on a distributed table gets them distributed here.
            apply_distribution(connection, options)
            # Citus may have arrived since the set function was made (migration 0007).
            with operations.Operations.context(context.get_context()):
                context.script.get_revision("0007_set_verifies_in_write").module.fit(connection)
        if not heads:
            # Downgraded to base: leave nothing behind, not even the history.
            version_table = connection.dialect.identifier_preparer.quote(VERSION_TABLE)
            connection.execute(text(f"DROP TABLE IF EXISTS {quoted_schema}.{version_table}"))
            if options.schema != "public" and not config.attributes.get(KEEP_SCHEMA):
                _drop_schema_if_empty(connection, quoted_schema)


def _drop_schema_if_empty(connection, quoted_schema):
    """Drop the schema only if PostgreSQL finds nothing in it (no CASCADE); otherwise keep it."""
    try:
        with connection.begin_nested():
            connection.execute(text(f"DROP SCHEMA {quoted_schema}"))
    except sa_exc.DBAPIError as error:
        if sqlstate(error) != DEPENDENT_OBJECTS_STILL_EXIST:
            raise


def run_migrations_online():
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = options.url or os.environ.get("FASTPGCACHE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("fastpgcache: no database URL; set FASTPGCACHE_URL=postgresql://user@host/db "
                         "and give the password in PGPASSWORD or ~/.pgpass, not on the command line")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _configure_and_run(connection)
            connection.commit()
            sync_owner_login(connection, options.owner)  # Citus: the workers follow the committed setup
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("fastpgcache: offline (--sql) mode is not supported; run against a database")
run_migrations_online()
