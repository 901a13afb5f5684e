"""The set function checks its caller's secret in the statement that writes, not in a query of its own.

Every set ran two statements inside its function: a lookup of the caller's
secret, then the upsert. Now a plain set (no quota, no culling, not xx) runs
one: the upsert takes its row from the caller's secret row, so a wrong secret
writes nothing, and only a call that stored nothing looks the secret up, to
answer NULL (not the caller's) rather than False (not stored). A key new to
the table reads its role's channel for the announcement. Where something is
done to the role's rows before the write (a quota's lock, culling) or the write
is an UPDATE (xx), the secret is still checked first, as before.

On a database with Citus the function keeps revision 0006's body: Citus cannot
plan an INSERT ... SELECT that uses the function's parameters ("there is no
parameter $7"). `fit` picks the body; the migration environment runs it again
at head, so a database that gets Citus later gets the body that works there.

Server instructions per set of an existing key (callgrind, a single-user
server, the library's EXECUTE): 306k → 291k on PostgreSQL 15, 270k → 253k on
PostgreSQL 18 (the floor's plain upsert: 292k and 259k).

Revision ID: 0007_set_verifies_in_write
Revises: 0006_limit_constants
Create Date: 2026-11-29
"""
from sqlalchemy import text

from alembic import context, op
from fastpgcache.admin import run_ddl
from fastpgcache.catalog import citus_installed

revision = "0007_set_verifies_in_write"
down_revision = "0006_limit_constants"
branch_labels = None
depends_on = None

# Each (0006's text, this revision's text), filled in with the table's names.
_CHANGES = (
    # The lookup runs first only where the function touches the role's rows before its write.
    ("""
    SELECT s.channel INTO v_channel FROM {secrets} AS s WHERE s.user_id = p_user AND s.secret = p_secret;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_max_value""", """
    v_max_value"""),
    ("""
    IF p_ttl IS NOT NULL THEN""", """
    IF v_quota OR p_cull_max IS NOT NULL OR p_mode = 2 THEN
        PERFORM FROM {secrets} AS s WHERE s.user_id = p_user AND s.secret = p_secret;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    IF p_ttl IS NOT NULL THEN"""),
    ("""
        VALUES (p_user, p_key, p_value, p_flags, v_expires, v_now)
""", """
        SELECT p_user, p_key, p_value, p_flags, v_expires, v_now FROM {secrets} AS s
         WHERE s.user_id = p_user AND s.secret = p_secret
"""),
    ("""
        v_stored := FOUND;
    END IF;
    IF v_stored AND v_quota THEN""", """
        v_stored := FOUND;
    END IF;
    IF NOT v_stored THEN  -- nothing written: was the secret wrong (NULL) or the key taken or absent (False)?
        PERFORM FROM {secrets} AS s WHERE s.user_id = p_user AND s.secret = p_secret;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    IF v_stored AND v_quota THEN"""),
    ("""
    IF v_inserted THEN
    IF pg_notification_queue_usage()""", """
    IF v_inserted THEN
    SELECT s.channel INTO v_channel FROM {secrets} AS s WHERE s.user_id = p_user;
    IF pg_notification_queue_usage()"""),
)


def _set_function(names, changed: bool) -> str:
    """CREATE OR REPLACE of the set function: as revision 0006 left it, or with this revision's changes."""
    limits = context.script.get_revision("0006_limit_constants").module
    statement = next(statement for statement in limits._settings_readers(limits._TAKE_CONSTANTS)
                     if f"FUNCTION {names.set}(" in statement)
    if changed:
        for before, after in _CHANGES:
            before, after = names.sql(before), names.sql(after)
            if statement.count(before) != 1:
                raise RuntimeError(f"the set function of revision 0006 no longer reads as this revision expects:"
                                   f" {before.strip()[:60]!r}")
            statement = statement.replace(before, after)
    return statement


def _names():
    return context.script.get_revision("0004_write_functions").module._names()


def fit(connection) -> None:
    """Give the set function the body this database can run (see above), if it has another.

    A set function that is missing is left alone: `fastpgcache-admin --check` reports it."""
    names = _names()
    statement = _set_function(names, changed=not citus_installed(connection))
    body = statement[statement.index("$body$") + len("$body$"):statement.rindex("$body$")]
    arguments = context.script.get_revision("0004_write_functions").module._FUNCTIONS["set"][0]
    types = ", ".join(argument.split(" ", 1)[1] for argument in arguments.strip("()").split(", "))
    current = connection.execute(text("SELECT p.prosrc FROM pg_catalog.pg_proc AS p"
                                      " WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure(:f)"),
                                 {"f": f"{names.set}({types})"}).first()
    if current is not None and current.prosrc != body:
        run_ddl(connection, statement)


def upgrade() -> None:
    fit(op.get_bind())


def downgrade() -> None:
    run_ddl(op.get_bind(), _set_function(_names(), changed=False))
