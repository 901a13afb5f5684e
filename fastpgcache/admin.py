"""Creating, checking and changing the cache table: Alembic, driven from Python or `fastpgcache-admin`."""
from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from .catalog import READ_VERBS, SEARCH_PATH, VERSION_TABLE, WRITE_VERBS, acl_holders, inspect_cache, read_limits
from .distributed import check_can_distribute, check_shard_count, sync_owner_login
from .errors import CacheError, CacheNotSetUpError, connection_hint, first_line, raise_translated, sqlstate, translate
from .model import (
    DEFAULT_OWNER,
    DEFAULT_SCHEMA,
    DEFAULT_TABLE,
    routine_name,
    secrets_table,
    settings_table,
    usage_table,
)

if TYPE_CHECKING:
    from .databricks import DatabricksTokenProvider

__all__ = ["VERSION_TABLE", "MigrationOptions", "cache_status", "main", "migrations_dir", "set_logged", "setup_cache"]

KEEP_SCHEMA = "fastpgcache_keep_schema"
"""`config.attributes` flag: a downgrade run by setup (forced or repair) keeps the schema and its grants."""

LOCK_WAIT_SECONDS = 10.0
"""How long setup waits for any lock (another admin's, or a session reading the table) before giving up."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

# Plain identifiers only: they never need escaping in DDL, bind-parameter parsing or
# driver %-formatting, and "<table>_expires_at_idx" stays within PostgreSQL's 63 bytes.
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_SCHEMA_LENGTH = 63
MAX_TABLE_LENGTH = 48
NAME_RULE = (f"use [A-Za-z_][A-Za-z0-9_]* (ASCII letters, digits, underscores; not starting with a digit), "
             f"schema at most {MAX_SCHEMA_LENGTH} characters, table at most {MAX_TABLE_LENGTH}")


def quote_role(name: str) -> str:
    """A role name as a quoted identifier. Not the dialect's quoting, which doubles '%' for the driver
    (so `app%s` became the role `app%%s`): `run_ddl` escapes a statement's '%' once, at the end."""
    return '"' + name.replace('"', '""') + '"'


def run_ddl(connection: Connection, statement: str) -> None:
    """Run a statement that takes no parameters, its '%' (role names, RAISE formats) kept as written."""
    connection.exec_driver_sql(statement.replace("%", "%%"))


def _check_role_name(kind: str, role) -> None:
    # Role names are quoted wherever they appear, so any 1-63 bytes without NUL work ('%' too).
    if not isinstance(role, str) or not role or "\x00" in role or len(role.encode()) > 63:
        raise ValueError(f"invalid {kind} role name {role!r}: use 1-63 bytes without NUL")


@dataclass(frozen=True)
class MigrationOptions:
    """What the migrations create: schema, table name, logged or not, who owns it and who may use it,
    and whether Citus distributes it (None: keep what exists) over how many shards."""

    schema: str = DEFAULT_SCHEMA
    table: str = DEFAULT_TABLE
    logged: bool = False
    grant_to: str | None = None
    owner: str = DEFAULT_OWNER
    url: str | None = field(default=None, repr=False)
    distributed: bool | None = None
    shard_count: int | None = None

    def __post_init__(self):
        for kind, name, longest in (("schema", self.schema, MAX_SCHEMA_LENGTH),
                                    ("table", self.table, MAX_TABLE_LENGTH)):
            if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or len(name) > longest:
                raise ValueError(f"invalid {kind} name {name!r}: {NAME_RULE}")
        if self.grant_to is not None:
            _check_role_name("--grant-to", self.grant_to)
        _check_role_name("owner", self.owner)
        if self.owner.lower() == "public":
            raise ValueError("the owner must be a role of its own, not PUBLIC")
        if self.distributed not in (None, True, False):
            raise ValueError(f"distributed must be True, False or None (keep what exists); got {self.distributed!r}")
        check_shard_count(self.shard_count)
        if self.shard_count is not None and self.distributed is False:
            raise ValueError("a shard count applies to a distributed table only; drop shard_count or distributed=False")

    @classmethod
    def from_x_arguments(cls, x: dict) -> MigrationOptions:
        """From `alembic -x schema=... -x table=... -x logged=true -x grant_to=ROLE -x owner=ROLE
        -x distributed=true -x shard_count=N`.

        `-x url=...` is still read, but a command line is visible in `ps`: prefer FASTPGCACHE_URL.
        """
        distributed = x.get("distributed")
        if distributed is not None:
            if distributed.lower() not in _TRUE | _FALSE:
                raise ValueError(f"-x distributed takes true or false, not {distributed!r}")
            distributed = distributed.lower() in _TRUE
        shard_count = x.get("shard_count")
        if shard_count is not None:
            if not shard_count.isdigit():
                raise ValueError(f"-x shard_count takes a number of shards, not {shard_count!r}")
            shard_count = int(shard_count)
        return cls(schema=x.get("schema", DEFAULT_SCHEMA), table=x.get("table", DEFAULT_TABLE),
                   logged=x.get("logged", "false").lower() in _TRUE, grant_to=x.get("grant_to"),
                   owner=x.get("owner", DEFAULT_OWNER), url=x.get("url"), distributed=distributed,
                   shard_count=shard_count)

    @staticmethod
    def quote(dialect, name: str) -> str:
        return dialect.identifier_preparer.quote(name)

    def qualified_table(self, dialect) -> str:
        return f"{self.quote(dialect, self.schema)}.{self.quote(dialect, self.table)}"

    def grantee(self, dialect) -> str:
        """The role named by grant_to, quoted, or PUBLIC."""
        if self.grant_to is None or self.grant_to.upper() == "PUBLIC":
            return "PUBLIC"
        return quote_role(self.grant_to)


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


def head_revision() -> str:
    """The newest migration's revision id."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    head = ScriptDirectory.from_config(config).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {migrations_dir()}: reinstall fastpgcache")
    return head


def cache_status(bind: Engine | Connection, schema: str = DEFAULT_SCHEMA, table: str = DEFAULT_TABLE,
                 owner: str = DEFAULT_OWNER) -> dict:
    """Where the cache table stands: exists, UNLOGGED, row-level security, revision, owner, grants,
    limits, and `problems` (objects setup would refuse to trust) and `warnings`.

    Only the catalogs are read until every object is known to belong to a trusted role::

        cache_status(engine, "public")["revision"]   # '0007_set_verifies_in_write'
    """
    if isinstance(bind, Engine):
        try:
            with bind.connect() as connection:
                return cache_status(connection, schema, table, owner)
        except sa_exc.DBAPIError as error:
            raise_translated(error, f"{schema}.{table}")
    return _status(bind, schema, table, owner)


def _status(bind: Connection, schema: str, table: str, owner: str) -> dict:
    # cache_status on a connection.
    catalog = inspect_cache(bind, schema, table, owner)
    entries, version = catalog.entries, catalog.relation("version")
    trusted_version = version is not None and version.relkind == "r" and version.owner in catalog.trusted \
        and not any(trigger.relname == VERSION_TABLE for trigger in catalog.triggers)
    revision = None
    if trusted_version:
        quoted = f"{bind.dialect.identifier_preparer.quote(schema)}.{VERSION_TABLE}"
        revision = bind.execute(text(f"SELECT version_num FROM {quoted}")).scalar()
    at_head = revision == head_revision()  # reads every migration file: once per status
    problems = catalog.problems(revision_at_head=at_head)
    warnings: list[str] = []
    status: dict[str, Any] = {
        "schema": schema, "table": table, "exists": entries is not None and entries.relkind == "r",
        "unlogged": bool(entries and entries.relpersistence == "u"),
        "row_level_security": bool(entries and entries.relrowsecurity),
        "forced_row_level_security": bool(entries and entries.relforcerowsecurity),
        "revision": revision, "owner": entries.owner if entries else None,
        "grants": entries.acl if entries else None, "problems": problems, "warnings": warnings, "limits": {},
        "readers": acl_holders(entries.acl, "r", entries.owner) if entries else [],
        "callers": catalog.callers()}
    if catalog.public_may_create:
        warnings.append(f"PUBLIC may CREATE in schema {schema}, so any role can plant functions there; "
                                  f"run: REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC")
    if catalog.write_grants():
        warnings.append("roles may write the table directly, bypassing the write functions and "
                                  f"their limits: {', '.join(catalog.write_grants())}; rerun fastpgcache-admin")
    role = catalog.role
    status["distribution"] = _distribution_status(catalog)
    warnings += _distribution_warnings(catalog)
    if role is not None:
        status["owner_role"] = {"name": role.rolname, "login": role.rolcanlogin, "members": role.members}
        # On Citus the owner logs in (distributed.py), with a password only pg_dist_authinfo holds.
        if role.rolsuper or (role.rolcanlogin and not catalog.owner_serves_citus):
            warnings.append(f"the owner role {role.rolname} can log in or is a superuser; "
                                      f"make it NOLOGIN NOSUPERUSER")
        elif catalog.distributed is not None and not role.rolcanlogin:
            warnings.append(f"the owner role {role.rolname} cannot log in, so Citus cannot open its "
                                      "connections to the workers and every write fails; rerun fastpgcache-admin "
                                      "--distributed")
    settings = catalog.relation("settings")
    if settings is not None and not problems and settings.owner in catalog.trusted:
        quote = bind.dialect.identifier_preparer.quote
        status["limits"] = read_limits(bind, f"{quote(schema)}.{quote(settings.relname)}")
        if at_head:
            warnings += _limit_function_warnings(catalog, status["limits"])
    return status


def _limit_function_warnings(catalog, limits: dict) -> list[str]:
    # The write functions enforce what the limit functions return, which must be what the settings row says.
    sources = {row.proname: row.source for row in catalog.functions}
    found = []
    for verb, (_, body) in limit_function_bodies(limits).items():
        name = routine_name(catalog.table, verb)
        if sources.get(name) != body:
            found.append(f"{catalog.schema}.{name}() does not hold the settings row's limit, so the write functions "
                         "enforce another one (was the row changed by hand?); rerun fastpgcache-admin")
    return found


def _distribution_status(catalog) -> dict | None:
    # {"column", "shards", "workers"} of a table Citus shards; {"reference": True, ...} for one it copies.
    row = catalog.distributed
    if row is None:
        return None
    return {"column": row.column, "shards": row.shards, "workers": catalog.workers, "reference": row.reference,
            "companions_are_reference_tables": all(
                catalog.distribution.get(name) is not None and catalog.distribution[name].reference
                for name in catalog.distribution if name != catalog.table)}


def _distribution_warnings(catalog) -> list[str]:
    # What a distributed cache table needs, and setup with --distributed repairs.
    row, where = catalog.distributed, f"{catalog.schema}.{catalog.table}"
    if row is None:
        return []
    found = []
    if row.reference or row.column != "key":
        how = "a reference table" if row.reference else f"sharded on {row.column}"
        found.append(f"{where} is a Citus table but not sharded on key ({how}), so lookups go to every shard; "
                     "rerun fastpgcache-admin --distributed")
    loose = [name for name, companion in catalog.distribution.items()
             if name != catalog.table and (companion is None or not companion.reference)]
    if loose:
        found.append(f"{', '.join(loose)} should be reference tables (a copy on every node) beside a distributed "
                     "cache table; rerun fastpgcache-admin --distributed")
    return found


def _take_admin_lock(connection: Connection, lock_wait: float) -> None:
    # Two admins running setup at once take turns instead of racing on CREATE TABLE. Any role may
    # take any advisory lock, so the wait is bounded and the error says who holds it.
    deadline = time.monotonic() + lock_wait
    while not connection.execute(text(
            "SELECT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('fastpgcache-admin'))")).scalar():
        if time.monotonic() >= deadline:
            holder = connection.execute(text(
                "SELECT a.pid, a.usename FROM pg_catalog.pg_locks AS l JOIN pg_catalog.pg_stat_activity AS a"
                " ON a.pid OPERATOR(pg_catalog.=) l.pid WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory'"
                " AND l.granted AND l.objid OPERATOR(pg_catalog.=) CAST(pg_catalog.hashtext('fastpgcache-admin')"
                " AS pg_catalog.oid) LIMIT 1")).first()
            who = f"backend {holder.pid} (role {holder.usename})" if holder else "another session"
            raise CacheError(f"another fastpgcache-admin seems to be running: {who} has held its lock for "
                             f"{lock_wait:g} s; retry when it is done, or end that session "
                             "(SELECT pg_terminate_backend(pid))")
        time.sleep(0.05)


def _lock_table(connection: Connection, options: MigrationOptions, lock_wait: float) -> None:
    # The migrations' DDL needs the table to itself. Asked for with NOWAIT and retried, so the admin
    # never waits in the lock queue, where every other session's cache call would queue behind it.
    table = options.qualified_table(connection.dialect)
    deadline = time.monotonic() + lock_wait
    while True:
        try:
            with connection.begin_nested():
                connection.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE NOWAIT"))
            return
        except sa_exc.DBAPIError as error:
            if sqlstate(error) != "55P03" or time.monotonic() >= deadline:
                if sqlstate(error) == "55P03":
                    raise CacheError(f"{options.schema}.{options.table} stayed in use for {lock_wait:g} s "
                                     f"({_lockers(connection, table)}); retry, or end those sessions") from None
                raise
        time.sleep(0.05)


def _lockers(connection: Connection, table: str) -> str:
    # Who holds a lock on the table, for the error: pids and roles (visible to every role).
    rows = connection.execute(text(
        "SELECT a.pid, a.usename FROM pg_catalog.pg_locks AS l JOIN pg_catalog.pg_stat_activity AS a"
        " ON a.pid OPERATOR(pg_catalog.=) l.pid WHERE l.relation OPERATOR(pg_catalog.=)"
        " pg_catalog.to_regclass(:t) AND l.granted AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()"),
        {"t": table}).all()
    return ", ".join(f"backend {row.pid} of {row.usename}" for row in rows) or "by another session"


def _upgrade(connection: Connection, options: MigrationOptions, force: bool, lock_wait: float) -> None:
    from alembic import command

    connection.execute(text(SEARCH_PATH))
    connection.execute(text("SELECT pg_catalog.set_config('lock_timeout', :ms, true)"),
                       {"ms": str(max(1, round(lock_wait * 1000)))})
    _take_admin_lock(connection, lock_wait)
    status = cache_status(connection, options.schema, options.table, options.owner)
    if status["exists"] and not status["problems"]:
        _lock_table(connection, options, lock_wait)
    if status["problems"]:
        extra = len(status["problems"]) - 1
        raise CacheError("refusing to set up: " + status["problems"][0] + (f" (and {extra} more)" if extra else ""))
    config = _alembic(connection, options)
    if force:
        # Dropped first, so the downgrade below has no rows to carry (on Citus it would copy a distributed
        # table back to the coordinator before dropping it).
        connection.execute(text(f"DROP TABLE IF EXISTS {options.qualified_table(connection.dialect)}"))
    if status["revision"] and (force or not status["exists"]):
        # Forced, or the table was dropped by hand while its revision stayed recorded:
        # undo what the migrations left (history, functions), then build it again.
        command.downgrade(config, "base")
    elif status["exists"] and not status["revision"]:
        if not force:
            raise CacheError(
                f"a table {options.schema}.{options.table} exists but was not created by fastpgcache's migrations "
                "(perhaps by the original project); rerun with --force to drop and recreate it, "
                "or choose another --schema/--table")
    command.upgrade(config, "head")
    current = cache_status(connection, options.schema, options.table, options.owner)
    if current["unlogged"] == options.logged:
        set_logged(connection, options.logged, options.schema, options.table)
    if options.grant_to:
        grant(connection, options)


def grant(connection: Connection, options: MigrationOptions) -> None:
    """Let `options.grant_to` (a role, or PUBLIC) use the cache; naming a role takes PUBLIC's use away.

    Roles granted earlier keep their use. Ordinary roles get exactly: SELECT on the
    table (row-level security shows each its own rows), their own secret, the
    limits, and EXECUTE on the write functions; nobody but the owner may write
    the tables directly.
    """
    dialect = connection.dialect
    grantees = set(readers(connection, options))
    new = options.grantee(dialect)
    grantees.add(new)
    if new != "PUBLIC":
        grantees.discard("PUBLIC")
    for statement in privilege_statements(connection, options, sorted(grantees)):
        run_ddl(connection, statement)


_GRANTEES = text(
    "SELECT DISTINCT CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'"
    "                     ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END"
    "  FROM pg_catalog.pg_class AS c, pg_catalog.aclexplode(c.relacl) AS a"
    " WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(:table)"
    "   AND (a.privilege_type OPERATOR(pg_catalog.=) 'SELECT' OR NOT :readers)"
    "   AND a.grantee OPERATOR(pg_catalog.<>) c.relowner")


def readers(connection: Connection, options: MigrationOptions) -> list[str]:
    """Roles (quoted) and PUBLIC that may read the cache table now; the owner is not among them."""
    return sorted(connection.execute(_GRANTEES, {"table": options.qualified_table(connection.dialect),
                                                 "readers": True}).scalars())


def _privileged(connection: Connection, options: MigrationOptions) -> list[str]:
    # Roles holding any privilege on the cache table, writes included.
    return sorted(connection.execute(_GRANTEES, {"table": options.qualified_table(connection.dialect),
                                                 "readers": False}).scalars())


def privilege_statements(connection: Connection, options: MigrationOptions, grantees: list[str]) -> list[str]:
    """REVOKE then GRANT statements leaving `grantees` (quoted, or PUBLIC) exactly the privileges they need."""
    quote = connection.dialect.identifier_preparer.quote
    schema = quote(options.schema)
    relations = [options.qualified_table(connection.dialect)] + [
        f"{schema}.{quote(table(options.table).name)}" for table in (secrets_table, settings_table, usage_table)]
    everyone = set(grantees) | set(_privileged(connection, options)) | {"PUBLIC"}
    functions = connection.execute(text(
        "SELECT p.oid::pg_catalog.regprocedure::pg_catalog.text, p.proname FROM pg_catalog.pg_proc AS p"
        " WHERE p.pronamespace OPERATOR(pg_catalog.=) CAST(:schema AS pg_catalog.regnamespace)"
        "   AND p.proname OPERATOR(pg_catalog.~~) :prefix"), {"schema": options.schema,
                                                               "prefix": options.table.replace("_", "\\_") + "\\_%"})
    public_verbs = {routine_name(options.table, verb) for verb in WRITE_VERBS + READ_VERBS}
    ours = [(signature, name in public_verbs) for signature, name in functions
            if name.startswith(options.table + "_")]
    statements = [f"REVOKE ALL ON {relation} FROM {role}" for relation in relations for role in sorted(everyone)]
    statements += [f"REVOKE ALL ON FUNCTION {signature} FROM {role}" for signature, _ in ours
                   for role in sorted(everyone)]
    for role in grantees:
        if role != "PUBLIC" or options.schema != "public":
            statements.append(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        statements += [f"GRANT SELECT ON {relations[0]} TO {role}",
                       f"GRANT SELECT ON {relations[1]} TO {role}",
                       f"GRANT SELECT ON {relations[2]} TO {role}", f"GRANT SELECT ON {relations[3]} TO {role}"]
        statements += [f"GRANT EXECUTE ON FUNCTION {signature} TO {role}" for signature, public in ours if public]
    if "PUBLIC" not in grantees and options.schema != "public":
        statements.append(f"REVOKE USAGE ON SCHEMA {schema} FROM PUBLIC")
    # The write functions run as the owner, who then needs the schema's use in its own right (not through
    # PUBLIC, which the line above may take away); on Citus, the workers create the functions as the owner.
    statements.append(f"GRANT USAGE ON SCHEMA {schema} TO {quote_role(options.owner)}")
    return statements


def limit_function_bodies(limits: dict) -> dict[str, tuple[str, str]]:
    """verb -> (return type, SQL body) of the functions holding the limits of a settings row (read_limits)."""
    quota = limits["quota_entries"] is not None or limits["quota_bytes"] is not None
    return {"max_value_bytes": ("integer", f" SELECT {int(limits['max_value_bytes'])} "),
            "has_quota": ("boolean", f" SELECT {'true' if quota else 'false'} ")}


def limit_function_statements(connection: Connection, options: MigrationOptions) -> list[str]:
    """CREATE OR REPLACE statements of the functions that give the write functions the settings row's limits.

    They return constants, so each session's plans fold the limits in instead of
    reading the settings table on every write; replacing them drops those plans.
    """
    quote = connection.dialect.identifier_preparer.quote
    limits = read_limits(connection, f"{quote(options.schema)}.{quote(settings_table(options.table).name)}")
    owner = quote_role(options.owner)
    statements = []
    for verb, (returns, body) in limit_function_bodies(limits).items():
        function = f"{quote(options.schema)}.{quote(routine_name(options.table, verb))}()"
        statements += [f"CREATE OR REPLACE FUNCTION {function} RETURNS {returns} LANGUAGE sql IMMUTABLE PARALLEL SAFE"
                       f" SET search_path = pg_catalog, pg_temp AS $body${body}$body$",
                       f"ALTER FUNCTION {function} OWNER TO {owner}",
                       f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC"]
    return statements


def set_limits(connection: Connection, options: MigrationOptions, *, max_value_bytes: int | None = None,
               quota_entries: int | None = None, quota_bytes: int | None = None) -> None:
    """Change the limits the write functions enforce; None keeps a limit, a quota of 0 removes it.

    Turning a quota on counts every role's entries and bytes first, with the table
    locked against writes for that moment, so the counts start exact. The functions
    that give the write functions the limits are stated again from the settings row
    every time, so a setup repairs a row changed by hand.
    """
    for name, value in (("max_value_bytes", max_value_bytes), ("quota_entries", quota_entries),
                        ("quota_bytes", quota_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0
                                  or (name == "max_value_bytes" and value == 0)):
            raise ValueError(f"{name} must be a positive int{' (0 removes the quota)' if 'quota' in name else ''}; "
                             f"got {value!r}")
    if max_value_bytes is None and quota_entries is None and quota_bytes is None:
        _state_limit_functions(connection, options)
        return
    quote = connection.dialect.identifier_preparer.quote
    schema = quote(options.schema)
    settings = f"{schema}.{quote(settings_table(options.table).name)}"
    usage = f"{schema}.{quote(usage_table(options.table).name)}"
    table = options.qualified_table(connection.dialect)
    before = read_limits(connection, settings)
    had_quota = before.get("quota_entries") is not None or before.get("quota_bytes") is not None
    # Typed parameters: psycopg 3 binds on the server, which cannot guess the type of a bare NULL.
    connection.execute(text(
        f"UPDATE {settings} SET max_value_bytes = coalesce(CAST(:max_value AS bigint), max_value_bytes),"
        " quota_entries = CASE WHEN CAST(:entries AS bigint) IS NULL THEN quota_entries"
        " ELSE NULLIF(CAST(:entries AS bigint), 0) END,"
        " quota_bytes = CASE WHEN CAST(:bytes AS bigint) IS NULL THEN quota_bytes"
        " ELSE NULLIF(CAST(:bytes AS bigint), 0) END"),
        {"max_value": max_value_bytes, "entries": quota_entries, "bytes": quota_bytes})
    after = read_limits(connection, settings)
    has_quota = after["quota_entries"] is not None or after["quota_bytes"] is not None
    if has_quota and not had_quota:
        connection.execute(text(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"))
        connection.execute(text(f"DELETE FROM {usage}"))
        connection.execute(text(
            f"INSERT INTO {usage} (user_id, entries, bytes) SELECT user_id, count(*),"
            f" sum(pg_catalog.octet_length(key) OPERATOR(pg_catalog.+) pg_catalog.octet_length(value))"
            f" FROM {table} GROUP BY user_id"))
    elif had_quota and not has_quota:
        connection.execute(text(f"DELETE FROM {usage}"))
    _state_limit_functions(connection, options)


def _state_limit_functions(connection: Connection, options: MigrationOptions) -> None:
    # The limit functions as the settings row now says; every session's plans drop the values they folded.
    for statement in limit_function_statements(connection, options):
        run_ddl(connection, statement)


def set_logged(bind: Engine | Connection, logged: bool, schema: str = DEFAULT_SCHEMA,
               table: str = DEFAULT_TABLE) -> None:
    """Switch the table, and its roles' secrets with it, between LOGGED and UNLOGGED; rows are kept
    (PostgreSQL rewrites the tables)."""
    if isinstance(bind, Engine):
        with bind.begin() as connection:
            return set_logged(connection, logged, schema, table)
    quote = bind.dialect.identifier_preparer.quote
    for qualified in (MigrationOptions(schema=schema, table=table).qualified_table(bind.dialect),
                      f"{quote(schema)}.{quote(secrets_table(table).name)}"):
        bind.execute(text(f"ALTER TABLE {qualified} SET {'LOGGED' if logged else 'UNLOGGED'}"))


def setup_cache(host: str = "localhost", database: str = "postgres", user: str = "postgres",
                password: str | None = None, schema: str = DEFAULT_SCHEMA, *, port: int = 5432,
                url: str | None = None, engine: Engine | None = None, table: str = DEFAULT_TABLE,
                force: bool = False, logged: bool | None = None, grant_to: str | None = None,
                owner: str = DEFAULT_OWNER, max_value_bytes: int | None = None, quota_entries: int | None = None,
                quota_bytes: int | None = None, lock_wait: float = LOCK_WAIT_SECONDS, token_provider=None,
                distributed: bool | None = None, shard_count: int | None = None) -> dict:
    """Create or upgrade the cache table through its Alembic migrations; safe to run again.

    Keeps existing rows unless `force=True`, which drops and recreates the table.
    `logged=True/False` creates, or switches an existing table to, LOGGED/UNLOGGED
    (None keeps what exists, UNLOGGED for a new table). `owner` is the NOLOGIN role
    that owns everything (created if missing). Limits: `max_value_bytes` (1 MiB for
    a new table), `quota_entries` and `quota_bytes` per role (0 removes a quota;
    None keeps what is set). Every lock is waited for at most `lock_wait` seconds.
    `distributed=True` (Citus, on the coordinator) shards the table on `key` over
    `shard_count` shards (Citus's citus.shard_count when None), converting an existing
    table with its rows; False makes a distributed table local again; None keeps what
    exists (see distributed.py). Returns `cache_status()`::

        from fastpgcache import setup_cache
        setup_cache(url="postgresql://admin@db/app", schema="cache", quota_bytes=100_000_000)
    """
    from .client import build_url

    options = MigrationOptions(schema=schema, table=table, grant_to=grant_to, owner=owner, distributed=distributed,
                               shard_count=shard_count)  # bad names or counts: no SQL
    owns = engine is None
    if engine is None:
        engine = create_engine(build_url(url=url, host=host, port=port, database=database, user=user,
                                         password=None if token_provider else password))
        if token_provider is not None:
            from .databricks import attach

            attach(engine, token_provider)
    try:
        with engine.connect() as probe:
            probe.execute(text(SEARCH_PATH))
            existing = cache_status(probe, schema, table, owner)
            if distributed:
                check_can_distribute(probe)  # before anything is created: one line, nothing left behind
        keep = existing["exists"] and not force
        options = replace(options, logged=(not existing["unlogged"]) if keep and logged is None else bool(logged))
        was = existing.get("distribution")
        if distributed is None and was is not None:
            # A table forced anew is distributed again, over as many shards as before unless told otherwise.
            options = replace(options, distributed=True,
                              shard_count=shard_count or (None if keep or was["reference"] else was["shards"]))
        try:
            # One transaction for the whole setup, even on an AUTOCOMMIT engine (the framework backends').
            with engine.connect().execution_options(isolation_level="READ COMMITTED") as connection, \
                    connection.begin():
                _upgrade(connection, options, force, lock_wait)
                set_limits(connection, options, max_value_bytes=max_value_bytes, quota_entries=quota_entries,
                           quota_bytes=quota_bytes)
            with engine.connect() as connection:
                sync_owner_login(connection, owner)  # Citus: the workers' copy of the owner's login, once committed
                connection.commit()
        except sa_exc.DBAPIError as error:
            raise_translated(error, f"{schema}.{table}")
        return cache_status(engine, schema, table, owner)
    finally:
        if owns:
            engine.dispose()


# -- fastpgcache-admin -------------------------------------------------------------------

def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by fastpgcache-admin and Django's setup command."""
    persistence = parser.add_mutually_exclusive_group()
    persistence.add_argument("--logged", dest="logged", action="store_const", const=True,
                             help="make the table LOGGED (survives crashes, slower writes)")
    persistence.add_argument("--unlogged", dest="logged", action="store_const", const=False,
                             help="make the table UNLOGGED (the default for a new table)")
    parser.add_argument("--grant-to", metavar="ROLE",
                        help="let ROLE use the cache, and take PUBLIC's use away (PUBLIC: everyone again)")
    parser.add_argument("--owner", metavar="ROLE", default=DEFAULT_OWNER,
                        help=f"NOLOGIN role owning the table and its functions (default {DEFAULT_OWNER}; "
                        "created if missing)")
    parser.add_argument("--max-value-bytes", type=int, metavar="N",
                        help="largest value a write may store (default for a new table: 1048576)")
    parser.add_argument("--quota-entries", type=int, metavar="N", help="most entries per role; 0 removes the quota")
    parser.add_argument("--quota-bytes", type=int, metavar="N",
                        help="most bytes of keys and values per role; 0 removes the quota")


def _shard_count(value: str) -> int:
    # argparse's type: a clear one-line error for "--shard-count x" or 0.
    try:
        count = int(value)
        check_shard_count(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 64000, not {value!r}") from None
    return count


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
    parser.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                        help="Citus: shard the table on key across the workers (run on the coordinator; an existing "
                        "table keeps its rows); --no-distributed makes it local again; default: keep what exists")
    parser.add_argument("--shard-count", type=_shard_count, metavar="N",
                        help="Citus: shards of the distributed table (default: the server's citus.shard_count)")
    parser.add_argument("--check", action="store_true",
                        help="report the table's state, owner, grants and limits; exit 1 if not set up")
    parser.add_argument("--cleanup", action="store_true", help="delete every role's expired rows")
    parser.add_argument("--databricks", action="store_true", help="authenticate with Databricks OAuth tokens")
    parser.add_argument("--instance-name", help="Databricks database instance (with --databricks)")
    parser.add_argument("--profile", help="Databricks config profile, for local IDEs (with --databricks)")
    return parser


def _engine_for(args) -> tuple[Engine, DatabricksTokenProvider | None]:
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


def describe(status: dict) -> str:
    """`--check`'s report: the state line first, then owner, grants, limits, problems and warnings."""
    name = f"{status['schema']}.{status['table']}"
    if not status["exists"]:
        lines = [f"{name}: not set up"]
    else:
        lines = [f"{name}: exists, {'UNLOGGED' if status['unlogged'] else 'LOGGED'}, "
                 f"row-level security {'on' if status['row_level_security'] else 'OFF'}"
                 f"{' (forced)' if status['forced_row_level_security'] else ''}, "
                 f"revision {status['revision'] or 'none (not created by fastpgcache)'}"]
        role = status.get("owner_role")
        members = f"; members: {role['members']}" if role and role["members"] else "; no members"
        lines.append(f"  owner: {status['owner']}" + (members if role and role["name"] == status["owner"] else ""))
        readers = ", ".join(status["readers"]) or "nobody but the owner"
        callers = ", ".join(status["callers"]) or "nobody"
        lines.append(f"  grants: SELECT to {readers}; the write functions to {callers}")
        spread = status.get("distribution")
        if spread:
            lines.append("  Citus reference table (a copy on every node)" if spread["reference"] else
                         f"  distributed on {spread['column']}, {spread['shards']} shards, {spread['workers']} workers")
    limits = status.get("limits")
    if limits:
        quota = ", ".join(f"{limits[k]} {k.split('_')[1]}" for k in ("quota_entries", "quota_bytes")
                          if limits[k] is not None) or "none"
        lines.append(f"  limits: values up to {limits['max_value_bytes']} bytes; quota per role: {quota}")
    lines += [f"  problem: {problem}" for problem in status.get("problems", [])]
    lines += [f"  warning: {warning}" for warning in status.get("warnings", [])]
    return "\n".join(lines)


def _run(args) -> int:
    from .cache import Cache

    engine, provider = _engine_for(args)
    try:
        if args.check:
            status = cache_status(engine, args.schema, args.table, args.owner)
            print(describe(status))
            return 0 if status["exists"] and status["revision"] and not status["problems"] else 1
        if args.cleanup:
            removed = Cache(engine, schema=args.schema, table=args.table).cleanup(all_users=True)
            print(f"removed {removed} expired entries from {args.schema}.{args.table}")
            return 0
        status = setup_cache(engine=engine, schema=args.schema, table=args.table, force=args.force,
                             logged=args.logged, grant_to=args.grant_to, owner=args.owner,
                             max_value_bytes=args.max_value_bytes, quota_entries=args.quota_entries,
                             quota_bytes=args.quota_bytes, distributed=args.distributed, shard_count=args.shard_count)
        print(describe(status))
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
