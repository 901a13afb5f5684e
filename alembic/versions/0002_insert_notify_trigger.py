"""NOTIFY every process's negative-lookup guard of inserted keys, as short hashes.

A statement-level AFTER INSERT trigger reads the statement's inserted rows
from its transition table and sends `hex(sha256(user_id || NUL || key)[:8])`
tokens, space separated, in notifications under the 8,000-byte payload
limit. Any role may LISTEN on any channel, so neither keys nor user names are
ever sent in clear. A statement inserting more keys than a few dozen messages
hold sends "reset" instead, and every guard re-reads the table.

The trigger is ENABLE ALWAYS, so it fires in replica-mode sessions too; each
guard re-checks at its heartbeat that it is still there and enabled.

Upserts that update an existing row fire no INSERT trigger: the guard's
warm-up reads expired rows too, so such keys are already in its filter.

Revision ID: 0002_insert_notify_trigger
Revises: 0001_cache_table
Create Date: 2026-11-25
"""
import hashlib

from alembic import context, op

revision = "0002_insert_notify_trigger"
down_revision = "0001_cache_table"
branch_labels = None
depends_on = None

HASHES_PER_MESSAGE = 450
"""17 bytes per token (16 hex digits and a space): 7,650 bytes, under the 8,000-byte limit."""

MAX_MESSAGES = 64
"""Beyond this many messages (28,800 keys) one statement sends "reset" instead."""

HASH_BYTES = 8
"""Bytes of sha256(user NUL key) a notification carries per key (as hex)."""


def notify_channel(schema: str, table: str) -> str:
    """The channel of one cache table: a hash, so the name fits in 63 bytes and needs no quoting."""
    return "fastpgcache_" + hashlib.sha256(f"{schema}\x00{table}".encode()).hexdigest()[:24]


def notify_function_name(table: str) -> str:
    """Name of the trigger and its function, cut to 63 bytes as PostgreSQL would."""
    return f"{table}_notify_insert".encode()[:63].decode("utf-8", "ignore")


def _names():
    """(options, table, function, trigger), quoted; the trigger and its function share one name."""
    options = context.config.attributes["fastpgcache"]
    dialect = op.get_bind().dialect
    name = options.quote(dialect, notify_function_name(options.table))
    return options, options.qualified_table(dialect), f"{options.quote(dialect, options.schema)}.{name}", name


def upgrade() -> None:
    options, table, function, trigger = _names()
    channel = notify_channel(options.schema, options.table)
    most = HASHES_PER_MESSAGE * MAX_MESSAGES
    width = 2 * HASH_BYTES + 1  # a token and its separating space
    # One query reads the statement's rows (at most one past the limit, so a huge statement
    # costs little here); the messages are then cut at token boundaries without another query.
    op.execute(f"""
CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $body$
DECLARE
    tokens text;
    start integer;
BEGIN
    SELECT string_agg(encode(substr(sha256(convert_to(user_id, 'UTF8') || decode('00', 'hex')
                                           || convert_to(key, 'UTF8')), 1, {HASH_BYTES}), 'hex'), ' ')
      INTO tokens
      FROM (SELECT user_id, key FROM inserted LIMIT {most + 1}) AS capped;
    IF tokens IS NULL THEN
        RETURN NULL;  -- every row took the ON CONFLICT DO UPDATE path
    ELSIF length(tokens) > {most * width} THEN
        PERFORM pg_notify('{channel}', 'reset');
    ELSE
        FOR start IN 0 .. length(tokens) - 1 BY {HASHES_PER_MESSAGE * width} LOOP
            PERFORM pg_notify('{channel}', substr(tokens, start + 1, {HASHES_PER_MESSAGE * width - 1}));
        END LOOP;
    END IF;
    RETURN NULL;
END
$body$""")
    op.execute(f"CREATE TRIGGER {trigger} AFTER INSERT ON {table} REFERENCING NEW TABLE AS inserted"
               f" FOR EACH STATEMENT EXECUTE FUNCTION {function}()")
    # ALWAYS: fire in sessions with session_replication_role = replica too (bulk loads,
    # logical replication apply), whose inserts the guards would otherwise never hear of.
    op.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}")


def downgrade() -> None:
    options, table, function, trigger = _names()
    op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
    op.execute(f"DROP FUNCTION IF EXISTS {function}()")
