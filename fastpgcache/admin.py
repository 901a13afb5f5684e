"""Creating, checking and changing the cache table: Alembic, driven from Python or `fastpgcache-admin`."""
from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from .errors import CacheError, CacheNotSetUpError, connection_hint, first_line, raise_translated, translate
from .model import DEFAULT_SCHEMA, DEFAULT_TABLE

VERSION_TABLE = "fastpgcache_alembic_version"
"""Alembic version table of the cache schema; never the application's `alembic_version`."""

KEEP_SCHEMA = "fastpgcache_keep_schema"
"""`config.attributes` flag: a downgrade run by setup (forced or repair) keeps the schema and its grants."""

_TRUE = {"1", "true", "yes", "on"}

# Plain identifiers only: they never need escaping in DDL, bind-parameter parsing or
# driver %-formatting, and "<table>_expires_at_idx" stays within PostgreSQL's 63 bytes.
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_SCHEMA_LENGTH = 63
MAX_TABLE_LENGTH = 48
NAME_RULE = (f"use [A-Za-z_][A-Za-z0-9_]* (ASCII letters, digits, underscores; not starting with a digit), "
             f"schema at most {MAX_SCHEMA_LENGTH} characters, table at most {MAX_TABLE_LENGTH}")


@dataclass(frozen=True)
class MigrationOptions:
    """What the migrations create: schema, table name, logged or not, and who may use it."""

    schema: str = DEFAULT_SCHEMA
    table: str = DEFAULT_TABLE
    logged: bool = False
    grant_to: str | None = None
    url: str | None = field(default=None, repr=False)

    def __post_init__(self):
        for kind, name, longest in (("schema", self.schema, MAX_SCHEMA_LENGTH),
                                    ("table", self.table, MAX_TABLE_LENGTH)):
            if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or len(name) > longest:
                raise ValueError(f"invalid {kind} name {name!r}: {NAME_RULE}")
        role = self.grant_to
        if role is not None and (not isinstance(role, str) or not role or "\x00" in role
                                 or len(role.encode()) > 63):
            raise ValueError(f"invalid role name {role!r}: use 1-63 bytes without NUL")

    @classmethod
    def from_x_arguments(cls, x: dict) -> "MigrationOptions":
        """From `alembic -x schema=... -x table=... -x logged=true -x grant_to=ROLE`.

        `-x url=...` is still read, but a command line is visible in `ps`: prefer FASTPGCACHE_URL.
        """
        return cls(schema=x.get("schema", DEFAULT_SCHEMA), table=x.get("table", DEFAULT_TABLE),
                   logged=x.get("logged", "false").lower() in _TRUE, grant_to=x.get("grant_to"), url=x.get("url"))

    @staticmethod
    def quote(dialect, name: str) -> str:
        return dialect.identifier_preparer.quote(name)

    def qualified_table(self, dialect) -> str:
        return f"{self.quote(dialect, self.schema)}.{self.quote(dialect, self.table)}"

    def grant_statements(self, dialect) -> list[str]:
        """The grants that let ordinary roles use the cache (row-level security keeps them apart)."""
        grantee = "PUBLIC" if self.grant_to in (None, "PUBLIC", "public") else self.quote(dialect, self.grant_to)
        return [f"GRANT USAGE ON SCHEMA {self.quote(dialect, self.schema)} TO {grantee}",
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON {self.qualified_table(dialect)} TO {grantee}"]


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed wheel, or the checkout's `alembic/`."""
    shipped = Path(__file__).resolve().parent / "_migrations"
    return shipped if (shipped / "env.py").exists() else Path(__file__).resolve().parent.parent / "alembic"


def _alembic(connection: Connection, options: MigrationOptions):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = connection
    config.attributes["fastpgcache"] = options
    config.attributes[KEEP_SCHEMA] = True
    return config


def cache_status(bind: Engine | Connection, schema: str = DEFAULT_SCHEMA, table: str = DEFAULT_TABLE) -> dict:
    """Whether the cache table exists, is UNLOGGED, has row-level security, and its migration revision."""
    if isinstance(bind, Engine):
        try:
            with bind.connect() as connection:
                return cache_status(connection, schema, table)
        except sa_exc.DBAPIError as error:
            raise_translated(error, f"{schema}.{table}")
    row = bind.execute(text(
        "SELECT c.relpersistence, c.relrowsecurity FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = :schema AND c.relname = :table AND c.relkind = 'r'"), {"schema": schema, "table": table}
    ).first()
    revision = None
    if inspect(bind).has_table(VERSION_TABLE, schema=schema):
        quoted = f"{bind.dialect.identifier_preparer.quote(schema)}.{VERSION_TABLE}"
        revision = bind.execute(text(f"SELECT version_num FROM {quoted}")).scalar()
    return {"schema": schema, "table": table, "exists": row is not None,
            "unlogged": bool(row and row.relpersistence == "u"), "row_level_security": bool(row and row.relrowsecurity),
            "revision": revision}


def _upgrade(connection: Connection, options: MigrationOptions, force: bool) -> None:
    from alembic import command

    # Two admins running setup at once take turns instead of racing on CREATE TABLE.
    connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('fastpgcache-admin'))"))
    status = cache_status(connection, options.schema, options.table)
    config = _alembic(connection, options)
    if status["revision"] and (force or not status["exists"]):
        # Forced, or the table was dropped by hand while its revision stayed recorded:
        # undo what the migrations left (history, trigger function), then build it again.
        command.downgrade(config, "base")
    elif status["exists"] and not status["revision"]:
        if not force:
            raise CacheError(
                f"a table {options.schema}.{options.table} exists but was not created by fastpgcache's migrations "
                "(perhaps by the original project); rerun with --force to drop and recreate it, "
                "or choose another --schema/--table")
    if force:
        connection.execute(text(f"DROP TABLE IF EXISTS {options.qualified_table(connection.dialect)}"))
    command.upgrade(config, "head")
    current = cache_status(connection, options.schema, options.table)
    if current["unlogged"] == options.logged:
        set_logged(connection, options.logged, options.schema, options.table)
    if options.grant_to:
        for statement in options.grant_statements(connection.dialect):
            connection.execute(text(statement))


def set_logged(bind: Engine | Connection, logged: bool, schema: str = DEFAULT_SCHEMA,
               table: str = DEFAULT_TABLE) -> None:
    """Switch the table between LOGGED and UNLOGGED; rows are kept (PostgreSQL rewrites the table)."""
    if isinstance(bind, Engine):
        with bind.begin() as connection:
            return set_logged(connection, logged, schema, table)
    qualified = MigrationOptions(schema=schema, table=table).qualified_table(bind.dialect)
    bind.execute(text(f"ALTER TABLE {qualified} SET {'LOGGED' if logged else 'UNLOGGED'}"))


def setup_cache(host: str = "localhost", database: str = "postgres", user: str = "postgres",
                password: str | None = None, schema: str = DEFAULT_SCHEMA, *, port: int = 5432,
                url: str | None = None, engine: Engine | None = None, table: str = DEFAULT_TABLE,
                force: bool = False, logged: bool | None = None, grant_to: str | None = None,
                token_provider=None) -> dict:
    """Create or upgrade the cache table through its Alembic migrations; safe to run again.

    Keeps existing rows unless `force=True`, which drops and recreates the table.
    `logged=True/False` creates, or switches an existing table to, LOGGED/UNLOGGED
    (None keeps what exists, UNLOGGED for a new table). Returns `cache_status()`::

        from fastpgcache import setup_cache
        setup_cache(url="postgresql://admin@db/app", schema="cache")
    """
    from .client import build_url

    options = MigrationOptions(schema=schema, table=table, grant_to=grant_to)  # bad names fail before any SQL
    owns = engine is None
    if engine is None:
        engine = create_engine(build_url(url=url, host=host, port=port, database=database, user=user,
                                         password=None if token_provider else password))
        if token_provider is not None:
            from .databricks import attach

            attach(engine, token_provider)
    try:
        with engine.connect() as probe:
            existing = cache_status(probe, schema, table)
        keep = existing["exists"] and not force
        options = replace(options, logged=(not existing["unlogged"]) if keep and logged is None else bool(logged))
        try:
            with engine.begin() as connection:
                _upgrade(connection, options, force)
        except sa_exc.DBAPIError as error:
            raise_translated(error, f"{schema}.{table}")
        return cache_status(engine, schema, table)
    finally:
        if owns:
            engine.dispose()


# -- fastpgcache-admin -------------------------------------------------------------------

def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The --logged/--unlogged/--grant-to options, shared by fastpgcache-admin and Django's setup command."""
    persistence = parser.add_mutually_exclusive_group()
    persistence.add_argument("--logged", dest="logged", action="store_const", const=True,
                             help="make the table LOGGED (survives crashes, slower writes)")
    persistence.add_argument("--unlogged", dest="logged", action="store_const", const=False,
                             help="make the table UNLOGGED (the default for a new table)")
    parser.add_argument("--grant-to", metavar="ROLE", help="grant use of the cache to ROLE instead of PUBLIC")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpgcache-admin",
        description="Create, check or change the fastpgcache table (run once, as the database admin).")
    parser.add_argument("--url", help="SQLAlchemy/libpq URL (default: FASTPGCACHE_URL, else the parts below); "
                        "keep the password out of it: use PGPASSWORD or the prompt")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--database", default="postgres")
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--password", nargs="?", const="", default=None,
                        help="give it alone to be prompted; PGPASSWORD or FASTPGCACHE_URL also work. "
                        "--password VALUE is visible in ps to every local user and is kept only for compatibility")
    parser.add_argument("--schema", default=DEFAULT_SCHEMA)
    parser.add_argument("--table", default=DEFAULT_TABLE)
    parser.add_argument("--force", action="store_true", help="drop and recreate the table without asking")
    add_setup_arguments(parser)
    parser.add_argument("--check", action="store_true", help="report the table's state; exit 1 if not set up")
    parser.add_argument("--cleanup", action="store_true", help="delete every role's expired rows")
    parser.add_argument("--databricks", action="store_true", help="authenticate with Databricks OAuth tokens")
    parser.add_argument("--instance-name", help="Databricks database instance (with --databricks)")
    parser.add_argument("--profile", help="Databricks config profile, for local IDEs (with --databricks)")
    return parser


def _engine_for(args) -> tuple[Engine, object]:
    from .client import build_url

    provider = None
    password = args.password
    if password == "":
        password = getpass.getpass(f"password for {args.user}: ")
    url = args.url or os.environ.get("FASTPGCACHE_URL")
    if args.databricks:
        if not args.instance_name:
            raise CacheError("--databricks needs --instance-name NAME")
        from .databricks import attach, provider_for_instance

        provider = provider_for_instance(args.instance_name, args.profile)
        password = None
    target = build_url(url=url, host=args.host, port=args.port, database=args.database, user=args.user,
                       password=password)
    engine = create_engine(target)
    if provider is not None:
        attach(engine, provider)
    return engine, provider


def _describe(status: dict) -> str:
    if not status["exists"]:
        return f"{status['schema']}.{status['table']}: not set up"
    return (f"{status['schema']}.{status['table']}: exists, {'UNLOGGED' if status['unlogged'] else 'LOGGED'}, "
            f"row-level security {'on' if status['row_level_security'] else 'OFF'}, "
            f"revision {status['revision'] or 'none (not created by fastpgcache)'}")


def _run(args) -> int:
    from .cache import Cache

    engine, provider = _engine_for(args)
    try:
        if args.check:
            status = cache_status(engine, args.schema, args.table)
            print(_describe(status))
            return 0 if status["exists"] and status["revision"] else 1
        if args.cleanup:
            removed = Cache(engine, schema=args.schema, table=args.table).cleanup(all_users=True)
            print(f"removed {removed} expired entries from {args.schema}.{args.table}")
            return 0
        status = setup_cache(engine=engine, schema=args.schema, table=args.table, force=args.force,
                             logged=args.logged, grant_to=args.grant_to)
        print(_describe(status))
        return 0
    finally:
        engine.dispose()
        if provider is not None:
            provider.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fastpgcache-admin`: one line and exit code 2 on any failure."""
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
    except sa_exc.DBAPIError as error:
        translated = translate(error, f"{args.schema}.{args.table}")
        message = str(translated) if translated is not error else connection_hint(error)
        print(f"fastpgcache-admin: {message}", file=sys.stderr)
        code = 2
    except sa_exc.SQLAlchemyError as error:
        # Not from the server (e.g. a statement SQLAlchemy could not build): still one line, no traceback.
        print(f"fastpgcache-admin: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        code = 2
    except (CacheError, CacheNotSetUpError, ValueError, RuntimeError) as error:
        print(f"fastpgcache-admin: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    return code
