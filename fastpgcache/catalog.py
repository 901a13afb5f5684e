"""What the system catalogs say about a cache table: owners, grants, limits, and what can be trusted.

Setup reads only catalogs before it trusts anything: a table, view or version
table that another role created could run that role's code the moment the
admin selects from it (a view's functions, a policy, a trigger). Every query
here names pg_catalog objects explicitly, so no object on the search path can
stand in for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from .model import routine_name, secrets_table, settings_table, usage_table

VERSION_TABLE = "fastpgcache_alembic_version"
"""Alembic version table of the cache schema; never the application's `alembic_version`."""

WRITE_VERBS = ("enroll", "set", "set_many", "delete", "expire", "incr", "clear", "expire_batch", "trim", "claim")
"""The write functions ordinary roles call (migration 0004)."""

HELPER_VERBS = ("hold", "charge", "announce", "cull", "cleanup_all")
"""The write functions' own helpers and the owner's cleanup."""

LIMIT_VERBS = ("max_value_bytes", "has_quota")
"""Functions returning the limits as constants, which the write functions' plans fold in (migration 0006)."""

READ_VERBS = ("key_array",)
"""Plain functions (not SECURITY DEFINER) the reads call, e.g. `<table>_key_array` for get_many."""

SEARCH_PATH = "SET LOCAL search_path = pg_catalog, pg_temp"
"""What setup and migrations run under: names they do not qualify resolve in pg_catalog only."""

_RELATIONS = text("""
SELECT c.relname, c.relkind, c.relpersistence, c.relrowsecurity, c.relforcerowsecurity,
       pg_catalog.pg_get_userbyid(c.relowner) AS owner,
       pg_catalog.array_to_string(c.relacl, ' ') AS acl
  FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
 WHERE n.nspname OPERATOR(pg_catalog.=) :schema
   AND c.relname OPERATOR(pg_catalog.=) ANY (CAST(:names AS pg_catalog.name[]))""")

_SCHEMA = text("""
SELECT CASE pg_catalog.pg_get_userbyid(n.nspowner) WHEN 'pg_database_owner' THEN (
           SELECT pg_catalog.pg_get_userbyid(d.datdba) FROM pg_catalog.pg_database AS d
            WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
       ELSE pg_catalog.pg_get_userbyid(n.nspowner) END AS owner,
       EXISTS (SELECT FROM pg_catalog.aclexplode(n.nspacl) AS a
                WHERE a.grantee OPERATOR(pg_catalog.=) 0 AND a.privilege_type OPERATOR(pg_catalog.=) 'CREATE')
       AS public_create
  FROM pg_catalog.pg_namespace AS n WHERE n.nspname OPERATOR(pg_catalog.=) :schema""")

_FUNCTIONS = text("""
SELECT p.proname, pg_catalog.pg_get_userbyid(p.proowner) AS owner, p.prosecdef,
       pg_catalog.array_to_string(p.proconfig, ',') AS config,
       pg_catalog.pg_get_function_identity_arguments(p.oid) AS arguments,
       pg_catalog.array_to_string(p.proacl, ' ') AS acl, p.prosrc AS source
  FROM pg_catalog.pg_proc AS p JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
 WHERE n.nspname OPERATOR(pg_catalog.=) :schema
   AND p.proname OPERATOR(pg_catalog.=) ANY (CAST(:names AS pg_catalog.name[]))""")

_TRIGGERS = text("""
SELECT c.relname, g.tgname, g.tgenabled, f.proname AS function,
       pg_catalog.pg_get_userbyid(f.proowner) AS function_owner
  FROM pg_catalog.pg_trigger AS g
  JOIN pg_catalog.pg_class AS c ON c.oid OPERATOR(pg_catalog.=) g.tgrelid
  JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
  JOIN pg_catalog.pg_proc AS f ON f.oid OPERATOR(pg_catalog.=) g.tgfoid
 WHERE n.nspname OPERATOR(pg_catalog.=) :schema AND NOT g.tgisinternal
   AND c.relname OPERATOR(pg_catalog.=) ANY (CAST(:names AS pg_catalog.name[]))""")

_ROLE = text("""
SELECT r.rolname, r.rolcanlogin, r.rolsuper,
       pg_catalog.array_to_string(ARRAY(
           SELECT m.rolname FROM pg_catalog.pg_auth_members AS a
             JOIN pg_catalog.pg_roles AS m ON m.oid OPERATOR(pg_catalog.=) a.member
            WHERE a.roleid OPERATOR(pg_catalog.=) r.oid ORDER BY m.rolname), ', ') AS members
  FROM pg_catalog.pg_roles AS r WHERE r.rolname OPERATOR(pg_catalog.=) :role""")

_TRUSTED_ROLES = text("""
SELECT r.rolname FROM pg_catalog.pg_roles AS r
 WHERE r.rolsuper OR r.rolname OPERATOR(pg_catalog.=) current_user
    OR r.rolname OPERATOR(pg_catalog.=) ANY (CAST(:extra AS pg_catalog.name[]))""")

_LIMITS = "SELECT max_value_bytes, quota_entries, quota_bytes FROM {settings}"

# Citus's metadata (pg_dist_*) exists only where the extension is; every node holds a copy, readable by all.
_CITUS = text("SELECT pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL"
              " AND EXISTS (SELECT FROM pg_catalog.pg_extension AS e WHERE e.extname OPERATOR(pg_catalog.=) 'citus')")

_DISTRIBUTION = text("""
SELECT c.relname,
       p.partmethod OPERATOR(pg_catalog.=) 'n' AND p.repmodel OPERATOR(pg_catalog.=) 't' AS reference,
       CASE WHEN p.partkey IS NOT NULL THEN pg_catalog.column_to_column_name(p.logicalrelid, p.partkey) END AS column,
       (SELECT pg_catalog.count(*) FROM pg_catalog.pg_dist_shard AS s
         WHERE s.logicalrelid OPERATOR(pg_catalog.=) p.logicalrelid) AS shards
  FROM pg_catalog.pg_dist_partition AS p
  JOIN pg_catalog.pg_class AS c ON c.oid OPERATOR(pg_catalog.=) p.logicalrelid
  JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
 WHERE n.nspname OPERATOR(pg_catalog.=) :schema
   AND c.relname OPERATOR(pg_catalog.=) ANY (CAST(:names AS pg_catalog.name[]))""")

_WORKERS = text("SELECT pg_catalog.count(*) FROM pg_catalog.pg_dist_node AS d"
                " WHERE d.noderole OPERATOR(pg_catalog.=) 'primary' AND d.isactive"
                " AND d.groupid OPERATOR(pg_catalog.<>) 0")

_OWNER_SERVES_CITUS = text("""
SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_partition AS p
                 JOIN pg_catalog.pg_class AS c ON c.oid OPERATOR(pg_catalog.=) p.logicalrelid
                 JOIN pg_catalog.pg_roles AS r ON r.oid OPERATOR(pg_catalog.=) c.relowner
                WHERE r.rolname OPERATOR(pg_catalog.=) :role)""")


def citus_installed(connection: Connection) -> bool:
    """Whether this database has the Citus extension (on the coordinator or a worker)."""
    return bool(connection.execute(_CITUS).scalar())


def distribution_of(connection: Connection, schema: str, table: str, citus: bool | None = None) -> dict:
    """{relation name: its Citus metadata (reference, column, shards), or None} for the cache table and
    its companions; every value None where Citus is not installed (`citus`: already known or not)."""
    names = [table, secrets_table(table).name, settings_table(table).name, usage_table(table).name]
    found = dict.fromkeys(names)
    if citus if citus is not None else citus_installed(connection):
        rows = connection.execute(_DISTRIBUTION, {"schema": schema, "names": names})
        found.update({row.relname: row for row in rows})
    return found


def owner_serves_citus(connection: Connection, owner: str) -> bool:
    """Whether `owner` owns a Citus table, so Citus must log in as it (distributed.py)."""
    return citus_installed(connection) and bool(connection.execute(_OWNER_SERVES_CITUS, {"role": owner}).scalar())


@dataclass
class CacheCatalog:
    """A cache table and its companions as the catalogs describe them (nothing read from them)."""

    schema: str
    table: str
    owner_role: str
    schema_owner: str | None = None
    public_may_create: bool = False
    relations: dict = field(default_factory=dict)
    functions: list = field(default_factory=list)
    triggers: list = field(default_factory=list)
    role: Any = None  # the owner role's pg_roles row (rolname, rolsuper, rolcanlogin, members), if it exists
    trusted: frozenset = frozenset()
    distribution: dict = field(default_factory=dict)  # relation name: Citus metadata row or None
    workers: int = 0  # active Citus workers, 0 without Citus
    owner_serves_citus: bool = False  # the owner owns a Citus table, so it logs in for Citus (distributed.py)

    @property
    def distributed(self):
        """The cache table's Citus metadata (reference, column, shards), or None for a plain table."""
        return self.distribution.get(self.table)

    @property
    def entries(self):
        return self.relations.get(self.table)

    def relation(self, kind: str):
        """The catalog row of the `secrets`, `settings` or `usage` table, or the version table."""
        names = {"secrets": secrets_table(self.table).name, "settings": settings_table(self.table).name,
                 "usage": usage_table(self.table).name, "version": VERSION_TABLE}
        return self.relations.get(names[kind])

    def problems(self, revision_at_head: bool) -> list[str]:
        """Objects setup must not trust, one line each naming the object and its owner.

        `revision_at_head`: the write functions exist, so everything must belong to the owner role;
        before that, objects of an older revision may belong to the admin or a superuser.
        """
        found = []
        where = f"{self.schema}"
        # pg_database_owner (public since PostgreSQL 15) is read as the database's owner, who acts as it.
        if self.schema_owner is not None and self.schema_owner not in self.trusted:
            found.append(f"schema {where} is owned by {self.schema_owner}, who could replace the cache's objects "
                         f"(ALTER SCHEMA {where} OWNER TO {self.owner_role}, or use another schema)")
        for name, row in sorted(self.relations.items()):
            label = f"{self.schema}.{name}"
            if row.relkind not in ("r", "p"):
                found.append(f"{label} is not a table (relkind {row.relkind!r}, owned by {row.owner}); "
                             "drop it, or choose another --schema/--table")
            elif row.owner not in self.trusted:
                found.append(f"{label} is owned by {row.owner}, not by {self.owner_role} or an admin; "
                             f"drop it if you did not create it")
        for row in self.functions:
            if row.owner not in self.trusted or (revision_at_head and row.owner != self.owner_role):
                found.append(f"function {self.schema}.{row.proname}({row.arguments}) is owned by {row.owner}, "
                             f"not {self.owner_role}; drop it if you did not create it")
        for row in self.triggers:
            expected = (not revision_at_head and row.relname == self.table
                        and row.tgname == row.function == f"{self.table}_notify_insert"
                        and row.function_owner in self.trusted)
            if not expected:
                found.append(f"trigger {row.tgname} on {self.schema}.{row.relname} runs {row.function} "
                             f"(owned by {row.function_owner}); drop it if you did not create it")
        return found

    def announcement_problems(self) -> list[str]:
        """Why an insert into the table might go unannounced to the guard; [] when none can.

        Inserts are announced by the write functions, so they must all exist, run as the
        table's owner (SECURITY DEFINER, search_path pinned), and nobody else, the owner's
        login included, may write the table directly.
        """
        entries, where = self.entries, f"{self.schema}.{self.table}"
        if entries is None:
            return [f"{where} does not exist; run fastpgcache-admin"]
        if self.distributed is not None:
            return [f"{where} is distributed by Citus: a write's notification reaches only listeners on the node "
                    "that ran it, and clients may enter through any node"]
        found = []
        by_name: dict = {}
        for row in self.functions:
            by_name.setdefault(row.proname, []).append(row)
        for verb in WRITE_VERBS + ("announce",):
            rows = by_name.get(routine_name(self.table, verb))
            if not rows:
                return [f"{where} has no write function {routine_name(self.table, verb)}; upgrade it with "
                        "fastpgcache-admin"]
            for row in rows:
                pinned = "search_path=pg_catalog" in (row.config or "")
                if row.owner != entries.owner or not row.prosecdef or not pinned:
                    found.append(f"function {self.schema}.{row.proname}({row.arguments}) is not the table owner's "
                                 "SECURITY DEFINER function with a fixed search_path; rerun fastpgcache-admin")
        if self.write_grants():
            found.append(f"roles may write {where} directly, and their inserts are not announced: "
                         f"{', '.join(self.write_grants())}; rerun fastpgcache-admin")
        # A LOGIN owner that serves Citus has a password only pg_dist_authinfo holds (superusers only).
        if self.role is not None and (self.role.rolsuper or (self.role.rolcanlogin and not self.owner_serves_citus)):
            found.append(f"the table's owner {self.role.rolname} can log in and write directly, unannounced; "
                         f"make it NOLOGIN")
        return found

    def callers(self) -> list[str]:
        """Roles (PUBLIC included) that may call the write functions, as `<table>_set`'s privileges say."""
        row = next((row for row in self.functions if row.proname == routine_name(self.table, "set")), None)
        return [] if row is None else acl_holders(row.acl, "X", row.owner)

    def write_grants(self) -> list[str]:
        """Roles other than the owner that may write the entry table directly (none should)."""
        row = self.entries
        if row is None or not row.acl:
            return []
        loose = []
        for item in row.acl.split():
            grantee, _, rights = item.partition("=")
            rights = rights.split("/")[0]
            if grantee != row.owner and set(rights) & set("awdDxt"):
                loose.append(f"{grantee or 'PUBLIC'}={rights}")
        return loose


def acl_holders(acl: str | None, right: str, owner: str) -> list[str]:
    """Roles other than `owner` holding `right` (an aclitem letter: r SELECT, X EXECUTE) in `acl`."""
    holders = []
    for item in (acl or "").split():
        grantee, _, rights = item.partition("=")
        if right in rights.split("/")[0] and grantee != owner:
            holders.append(grantee.strip('"') or "PUBLIC")
    return holders


def inspect_cache(connection: Connection, schema: str, table: str, owner_role: str | None) -> CacheCatalog:
    """Read the catalogs for `schema.table` and its companion tables, functions and triggers.

    `owner_role` None: the entry table's own owner::

        catalog = inspect_cache(connection, "public", "cache", "fastpgcache_owner")
        catalog.problems(revision_at_head=True)   # [] when setup may trust it
    """
    catalog = CacheCatalog(schema, table, owner_role or "")
    schema_row = connection.execute(_SCHEMA, {"schema": schema}).first()
    if schema_row is not None:
        catalog.schema_owner, catalog.public_may_create = schema_row.owner, schema_row.public_create
    relations = [table, secrets_table(table).name, settings_table(table).name, usage_table(table).name,
                 VERSION_TABLE]
    catalog.relations = {row.relname: row for row in connection.execute(
        _RELATIONS, {"schema": schema, "names": relations})}
    if owner_role is None:
        catalog.owner_role = owner_role = catalog.entries.owner if catalog.entries else ""
    routines = [routine_name(table, verb) for verb in WRITE_VERBS + HELPER_VERBS + LIMIT_VERBS + READ_VERBS]
    routines.append(f"{table}_notify_insert")
    catalog.functions = list(connection.execute(_FUNCTIONS, {"schema": schema, "names": routines}))
    catalog.triggers = list(connection.execute(_TRIGGERS, {"schema": schema, "names": [table, VERSION_TABLE]}))
    catalog.role = connection.execute(_ROLE, {"role": owner_role}).first()
    catalog.trusted = frozenset(connection.execute(_TRUSTED_ROLES, {"extra": [owner_role]}).scalars())
    citus = citus_installed(connection)
    catalog.distribution = distribution_of(connection, schema, table, citus)
    if citus:
        catalog.workers = connection.execute(_WORKERS).scalar() or 0
        catalog.owner_serves_citus = bool(connection.execute(_OWNER_SERVES_CITUS, {"role": owner_role}).scalar())
    return catalog


def read_limits(connection: Connection, settings: str) -> dict:
    """The limits row of a trusted settings table (`settings` quoted and schema-qualified)."""
    row = connection.execute(text(_LIMITS.format(settings=settings))).first()
    return dict(row._mapping) if row is not None else {}
