"""The cache table: UNLOGGED, keyed by (user_id, key), isolated per role by row-level security.

Revision ID: 0001_cache_table
Revises:
Create Date: 2026-11-25
"""
from sqlalchemy import MetaData

from alembic import context, op
from fastpgcache.model import cache_table

revision = "0001_cache_table"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    options = context.config.attributes["fastpgcache"]
    bind = op.get_bind()
    table = cache_table(options.table).to_metadata(MetaData(), schema=options.schema)
    table.create(bind)
    qualified = options.qualified_table(bind.dialect)
    if options.logged:
        op.execute(f"ALTER TABLE {qualified} SET LOGGED")
    # Every role but the owner sees and writes only its own rows; PostgreSQL
    # enforces it, so table privileges can go to PUBLIC safely.
    op.execute(f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY {options.quote(bind.dialect, options.table + '_own_rows')} ON {qualified}"
        " USING (user_id = current_user) WITH CHECK (user_id = current_user)"
    )
    for statement in grant_statements(options, bind.dialect):
        op.execute(statement)


def grant_statements(options, dialect) -> list[str]:
    """This revision's privileges: reads and writes for PUBLIC or the grantee (0004 narrows them)."""
    grantee = options.grantee(dialect)
    return [f"GRANT USAGE ON SCHEMA {options.quote(dialect, options.schema)} TO {grantee}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {options.qualified_table(dialect)} TO {grantee}"]


def downgrade() -> None:
    options = context.config.attributes["fastpgcache"]
    # IF EXISTS: setup repairs a table dropped by hand by downgrading what is left.
    op.execute(f"DROP TABLE IF EXISTS {options.qualified_table(op.get_bind().dialect)}")
