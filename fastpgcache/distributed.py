"""The cache table on Citus (distributed PostgreSQL): distributing it, and the owner's node connections.

A distributed cache table is sharded on `key` across the workers, so a
single-key call touches one shard and a batch one shard per key it holds.
Its companion tables (secrets, settings, usage) become reference tables, a
copy on every node, so the write functions verify their caller on the node
they run on. The SQL the library sends is the same on plain PostgreSQL; only
setup differs.

Citus opens its connections to the nodes as the role running the statement,
and inside the write functions (SECURITY DEFINER) that is the owner role. On
Citus the owner therefore logs in, but only with a random password setup
gives it and stores where Citus alone looks: `pg_dist_authinfo` on every node,
readable by superusers only. Nobody is told the password; an admin who
prefers certificates puts their own row there first and setup keeps it.

    setup_cache(url=..., distributed=True, shard_count=32)   # or fastpgcache-admin --distributed
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.engine import URL, Connection, make_url

from .catalog import LIMIT_VERBS, citus_installed, distribution_of, owner_serves_citus
from .errors import CacheError
from .model import routine_name, secrets_table, settings_table, usage_table

__all__ = ["DELEGATED_VERBS", "MAX_SHARD_COUNT", "apply_distribution", "multi_host_url"]

DELEGATED_VERBS = ("set", "expire", "incr")
"""Write functions of one key that Citus runs on the key's worker (create_distributed_function).

A call outside a transaction block then travels to the worker once, instead of the
coordinator running the function and sending BEGIN, the statement and COMMIT to the
worker (three round trips). Calls inside a transaction run on the coordinator as before."""

MAX_SHARD_COUNT = 64000
"""Citus's own limit on shards per table."""

SCRAM_ITERATIONS = 4096
"""PostgreSQL's default for SCRAM-SHA-256 verifiers."""


def check_shard_count(shard_count) -> None:
    """ValueError unless `shard_count` is None or an int in 1..MAX_SHARD_COUNT."""
    if shard_count is None:
        return
    if not isinstance(shard_count, int) or isinstance(shard_count, bool) or not 1 <= shard_count <= MAX_SHARD_COUNT:
        raise ValueError(f"shard_count must be an int from 1 to {MAX_SHARD_COUNT}; got {shard_count!r}")


def apply_distribution(connection: Connection, options) -> None:
    """Make the cache table and its companions what `options.distributed` asks for; None keeps what is.

    Run at the end of every upgrade to head (alembic/env.py), so objects a migration
    creates on a distributed table are distributed too. Idempotent.
    """
    current = distribution_of(connection, options.schema, options.table)
    wanted = options.distributed if options.distributed is not None else current.get(options.table) is not None
    if wanted:
        _distribute(connection, options, current)
    elif options.shard_count is not None:
        raise CacheError("a shard count applies to a distributed table only; add --distributed (distributed=True)")
    elif any(current.values()):
        _undistribute(connection, options, current)
    else:
        release_owner_login(connection, options.owner)  # e.g. its distributed table was dropped by hand


def check_can_distribute(connection: Connection) -> None:
    """CacheError (one line) unless this is a Citus coordinator."""
    if not citus_installed(connection):
        raise CacheError("distributed=True needs Citus, and this database has no citus extension "
                         "(install Citus on the coordinator and every worker, then CREATE EXTENSION citus)")
    if not connection.execute(text("SELECT pg_catalog.citus_is_coordinator()")).scalar():
        raise CacheError("run setup for a distributed table on the Citus coordinator, not on a worker")


def _may_read_authinfo(connection: Connection) -> bool:
    # Citus is here, and this role may read pg_dist_authinfo (superusers only, unless granted).
    return citus_installed(connection) and bool(connection.execute(text(
        "SELECT pg_catalog.has_table_privilege('pg_catalog.pg_dist_authinfo', 'SELECT')")).scalar())


def citus_manages_login(connection: Connection, owner: str) -> bool:
    """Whether the owner's login is the one setup gave it for Citus: a pg_dist_authinfo row here."""
    if not _may_read_authinfo(connection):
        return False
    return bool(connection.execute(text(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_authinfo AS a WHERE a.rolename OPERATOR(pg_catalog.=) :r)"),
        {"r": owner}).scalar())


def _companions(options) -> list[str]:
    return [secrets_table(options.table).name, settings_table(options.table).name, usage_table(options.table).name]


def _qualified(connection: Connection, schema: str, name: str) -> str:
    quote = connection.dialect.identifier_preparer.quote
    return f"{quote(schema)}.{quote(name)}"


def _distribute(connection: Connection, options, current: dict) -> None:
    check_can_distribute(connection)
    _owner_logs_in(connection, options.owner)
    # Citus creates a table's shards on a new node (rebalancing, reference tables copied to a node just
    # added) over the table owner's own connection, so the owner may create in the schema on Citus.
    _schema_create(connection, options, "GRANT", "TO")
    for name in _companions(options):
        row = current.get(name)
        qualified = _qualified(connection, options.schema, name)
        if row is not None and not row.reference:  # sharded, or a local Citus table: one copy per node instead
            _call(connection, "undistribute_table", qualified)
        if row is None or not row.reference:
            _call(connection, "create_reference_table", qualified)
            _drop_local_copy(connection, qualified)
    table = _qualified(connection, options.schema, options.table)
    row = current.get(options.table)
    if row is not None and (row.reference or row.column != "key"):
        # A reference or local Citus table, or one sharded on another column: local again first, rows kept.
        _call(connection, "undistribute_table", table)
        row = None
    if row is None:
        # colocate_with none: the cache's shards move alone, never with some other table that happens to match.
        shards = "" if options.shard_count is None else f", shard_count => {int(options.shard_count)}"
        connection.execute(text(f"SELECT pg_catalog.create_distributed_table(:t, 'key', colocate_with => 'none'"
                                f"{shards})"), {"t": table})
        _drop_local_copy(connection, table)
    elif options.shard_count is not None and options.shard_count != row.shards:
        connection.execute(text("SELECT pg_catalog.alter_distributed_table(:t, shard_count => :n, "
                                "cascade_to_colocated => false)"), {"t": table, "n": int(options.shard_count)})
    for verb in DELEGATED_VERBS:
        connection.execute(text("SELECT pg_catalog.create_distributed_function(:f, distribution_arg_name => 'p_key', "
                                "colocate_with => :t)"), {"f": _signature(connection, options, verb), "t": table})
    for verb in LIMIT_VERBS:
        # On every node, and replaced on every node when the admin changes a limit (the delegated calls read them).
        connection.execute(text("SELECT pg_catalog.create_distributed_function(:f)"),
                           {"f": _signature(connection, options, verb)})
    _announce_distribution(connection, options)


def _undistribute(connection: Connection, options, current: dict) -> None:
    table = _qualified(connection, options.schema, options.table)
    for verb in DELEGATED_VERBS:
        signature = _signature(connection, options, verb, missing_ok=True)
        if signature is not None:  # no distribution argument: runs where it is called again
            connection.execute(text("SELECT pg_catalog.create_distributed_function(:f)"), {"f": signature})
    for name in (options.table, *_companions(options)):
        if current.get(name) is not None:
            _call(connection, "undistribute_table", table if name == options.table
                  else _qualified(connection, options.schema, name))
    _schema_create(connection, options, "REVOKE", "FROM")
    release_owner_login(connection, options.owner)


def _schema_create(connection: Connection, options, verb: str, preposition: str) -> None:
    from .admin import quote_role, run_ddl

    schema = connection.dialect.identifier_preparer.quote(options.schema)
    run_ddl(connection, f"{verb} CREATE ON SCHEMA {schema} {preposition} {quote_role(options.owner)}")


def _call(connection: Connection, function: str, relation: str) -> None:
    connection.execute(text(f"SELECT pg_catalog.{function}(:t)"), {"t": relation})


def _drop_local_copy(connection: Connection, relation: str) -> None:
    # Distributing a table copies its rows into the shards and leaves the originals hidden on the
    # coordinator's disk; they are dead weight from now on.
    connection.execute(text("SELECT pg_catalog.truncate_local_data_after_distributing_table(:t)"), {"t": relation})


def _signature(connection: Connection, options, verb: str, missing_ok: bool = False) -> str | None:
    # The function's regprocedure text (name and argument types), found by name in the cache's schema.
    signature = connection.execute(text(
        "SELECT CAST(CAST(p.oid AS pg_catalog.regprocedure) AS pg_catalog.text) FROM pg_catalog.pg_proc AS p"
        " WHERE p.pronamespace OPERATOR(pg_catalog.=) CAST(:schema AS pg_catalog.regnamespace)"
        "   AND p.proname OPERATOR(pg_catalog.=) :name"),
        {"schema": options.schema, "name": routine_name(options.table, verb)}).scalar()
    if signature is None and not missing_ok:
        raise CacheError(f"{options.schema}.{routine_name(options.table, verb)} is missing; rerun fastpgcache-admin")
    return signature


def _announce_distribution(connection: Connection, options) -> None:
    # Every role's negative-lookup guard that listens on this node turns off at this commit, not at its
    # next heartbeat: from then on, writes entering through a worker notify only that worker.
    secrets_relation = _qualified(connection, options.schema, secrets_table(options.table).name)
    connection.execute(text(f"SELECT pg_catalog.pg_notify(s.channel, 'distributed') FROM {secrets_relation} AS s"))


# -- the owner's logins ------------------------------------------------------------------

def _owner_logs_in(connection: Connection, owner: str) -> None:
    """LOGIN for the owner, with a password only the coordinator's pg_dist_authinfo holds (the workers get
    it from `sync_owner_login` once this transaction has committed).

    An admin's own row for the owner (a certificate, a password of theirs) is kept as it is.
    """
    from .admin import quote_role, run_ddl

    authinfo = connection.execute(text(
        "SELECT a.authinfo FROM pg_catalog.pg_dist_authinfo AS a"
        " WHERE a.rolename OPERATOR(pg_catalog.=) :r AND a.nodeid OPERATOR(pg_catalog.=) 0"), {"r": owner}).scalar()
    if authinfo is None:
        password = secrets.token_urlsafe(32)
        # The verifier, not the password, is what the statement carries (and what Citus copies to the workers),
        # so a server logging DDL never logs the password.
        run_ddl(connection, f"ALTER ROLE {quote_role(owner)} LOGIN PASSWORD '{scram_verifier(password)}'")
        authinfo = f"password={password}"
        connection.execute(text("INSERT INTO pg_catalog.pg_dist_authinfo (nodeid, rolename, authinfo)"
                                " VALUES (0, :r, :a)"), {"r": owner, "a": authinfo})
    else:
        run_ddl(connection, f"ALTER ROLE {quote_role(owner)} LOGIN")


def sync_owner_login(connection: Connection, owner: str) -> None:
    """Give every worker the coordinator's pg_dist_authinfo row for the owner (or none, as there).

    Workers connect to each other and to the coordinator as the owner when a client enters
    through them. Run after setup's transaction has committed: run_command_on_workers commits
    on each worker at once, where the owner role of an uncommitted setup does not exist yet.
    A worker added later gets the row at the next setup.
    """
    if not _may_read_authinfo(connection) or not connection.execute(text(
            "SELECT pg_catalog.citus_is_coordinator()")).scalar():
        return  # no Citus, or an admin who is no superuser and so set up no distributed table either
    authinfo = connection.execute(text(
        "SELECT a.authinfo FROM pg_catalog.pg_dist_authinfo AS a"
        " WHERE a.rolename OPERATOR(pg_catalog.=) :r AND a.nodeid OPERATOR(pg_catalog.=) 0"), {"r": owner}).scalar()
    if authinfo is None:
        _on_workers(connection, "DELETE FROM pg_catalog.pg_dist_authinfo WHERE rolename = {r}", r=owner)
    else:
        _on_workers(connection, "INSERT INTO pg_catalog.pg_dist_authinfo (nodeid, rolename, authinfo)"
                    " VALUES (0, {r}, {a}) ON CONFLICT (rolename, nodeid) DO UPDATE SET authinfo = EXCLUDED.authinfo",
                    r=owner, a=authinfo)


def release_owner_login(connection: Connection, owner: str) -> None:
    """NOLOGIN again, and no password on the coordinator, once the owner owns no Citus table (the workers
    follow at `sync_owner_login`)."""
    from .admin import quote_role, run_ddl

    if not citus_installed(connection) or owner_serves_citus(connection, owner):
        return
    if citus_manages_login(connection, owner):
        connection.execute(text("DELETE FROM pg_catalog.pg_dist_authinfo WHERE rolename OPERATOR(pg_catalog.=) :r"),
                           {"r": owner})
        run_ddl(connection, f"ALTER ROLE {quote_role(owner)} NOLOGIN PASSWORD NULL")


def _on_workers(connection: Connection, template: str, **values: str) -> None:
    # run_command_on_workers takes one command text: the values go in as quoted literals (quote_literal).
    literals = {name: connection.execute(text("SELECT pg_catalog.quote_literal(CAST(:v AS pg_catalog.text))"),
                                         {"v": value}).scalar() for name, value in values.items()}
    command = template.format(**literals)
    failed = connection.execute(text("SELECT nodename, nodeport, result FROM pg_catalog.run_command_on_workers(:c)"
                                     " WHERE NOT success"), {"c": command}).first()
    if failed is not None:
        raise CacheError(f"worker {failed.nodename}:{failed.nodeport} did not take the owner's login for Citus "
                         f"({failed.result.strip()}); the table is set up: rerun fastpgcache-admin once it is up")


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802, as pg_authid holds it)."""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    encode = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return (f"SCRAM-SHA-256${iterations}:{encode(salt)}"
            f"${encode(hashlib.sha256(client_key).digest())}:{encode(server_key)}")


# -- clients ----------------------------------------------------------------------------

def multi_host_url(urls: Sequence[str | URL], *, load_balance: bool = True) -> URL:
    """One URL naming several nodes (libpq multi-host), for a client that may enter through any of them::

        FastPgCache(url=multi_host_url(["postgresql://app@coord/app", "postgresql://app@worker1/app"]))

    Every URL must name the same user, database and driver. libpq tries the hosts in
    turn until one answers; `load_balance` (libpq 16+: load_balance_hosts=random)
    picks a random order per connection, spreading a pool over every node.
    """
    if isinstance(urls, (str, URL)) or not urls:
        raise ValueError("multi_host_url takes a list of one or more URLs")
    parsed = [make_url(url) for url in urls]
    first = parsed[0]
    for url in parsed[1:]:
        if (url.drivername, url.username, url.database) != (first.drivername, first.username, first.database):
            raise ValueError("every URL must name the same driver, user and database; "
                             f"{url.render_as_string(hide_password=True)} differs from the first")
        if url.password != first.password:
            raise ValueError("every URL must carry the same password (or none: PGPASSWORD or ~/.pgpass)")
    hosts = []
    for url in parsed:
        if not url.host:
            raise ValueError(f"{url.render_as_string(hide_password=True)} names no host")
        hosts.append(f"{url.host}:{url.port}" if url.port else url.host)
    query = {name: value for name, value in first.query.items() if name not in ("host", "port")}
    query["host"] = tuple(hosts)
    if load_balance and len(hosts) > 1:
        query["load_balance_hosts"] = "random"
    # URL.set() ignores None, so the first URL's own host and port are dropped with _replace.
    return first._replace(host=None, port=None).set(query=query)
