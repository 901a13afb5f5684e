"""The write functions take the limits from two constant functions instead of reading the settings table.

Every write function read `<table>_settings` (the largest value, whether a quota
is set) on every call: a second relation per call beside the caller's secret,
about 6 µs of a set's 150 µs on PostgreSQL 15, more than all the function's
other checks together (benchmarks/). The limits are now also the bodies of
`<table>_max_value_bytes()` and `<table>_has_quota()`: IMMUTABLE functions
returning a constant, which each session folds into its cached plans once.
`fastpgcache-admin` replaces them in the same transaction as it changes the
settings row (still the record `--check` reads), and PostgreSQL drops the
plans that folded the old values, in every session, at its next transaction.
The quota's own numbers are still read from the settings row, where a quota is set.

Revision ID: 0006_limit_constants
Revises: 0005_expiry_index
Create Date: 2026-11-29
"""
from alembic import context, op
from fastpgcache.admin import limit_function_statements, run_ddl
from fastpgcache.catalog import LIMIT_VERBS
from fastpgcache.model import routine_name

revision = "0006_limit_constants"
down_revision = "0005_expiry_index"
branch_labels = None
depends_on = None

_READ_SETTINGS = """
    SELECT t.max_value_bytes, t.quota_entries IS NOT NULL OR t.quota_bytes IS NOT NULL
      INTO v_max_value, v_quota FROM {settings} AS t;"""

_TAKE_CONSTANTS = """
    v_max_value := {max_value_bytes}();
    v_quota := {has_quota}();"""


def _settings_readers(replacement: str) -> list[str]:
    """CREATE OR REPLACE statements of revision 0004's functions that read the settings row, with
    `replacement` in its place (_READ_SETTINGS gives them back as 0004 made them)."""
    base = context.script.get_revision("0004_write_functions").module
    names = base._names()
    quote = op.get_bind().dialect.identifier_preparer.quote
    for verb in LIMIT_VERBS:
        setattr(names, verb, f"{names.schema}.{quote(routine_name(names.options.table, verb))}")
    statements = [statement.replace(names.sql(_READ_SETTINGS), names.sql(replacement))
                  .replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
                  for statement in base.function_statements(names) if names.sql(_READ_SETTINGS) in statement]
    if not statements:
        raise RuntimeError("revision 0004's write functions no longer read the settings row as this revision expects")
    return statements


def upgrade() -> None:
    bind = op.get_bind()
    for statement in limit_function_statements(bind, context.config.attributes["fastpgcache"]):
        run_ddl(bind, statement)
    for statement in _settings_readers(_TAKE_CONSTANTS):
        run_ddl(bind, statement)


def downgrade() -> None:
    bind = op.get_bind()
    options = context.config.attributes["fastpgcache"]
    for statement in _settings_readers(_READ_SETTINGS):
        run_ddl(bind, statement)
    quote = bind.dialect.identifier_preparer.quote
    for verb in LIMIT_VERBS:
        run_ddl(bind, f"DROP FUNCTION IF EXISTS {quote(options.schema)}.{quote(routine_name(options.table, verb))}()")
