"""The citus fixture: a real coordinator with two workers that distribute, route and secure a table."""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

pytestmark = [pytest.mark.citus, pytest.mark.own_server]


def _rows(url, sql: str, **params) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(sql), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


@pytest.fixture
def table(citus):
    """A fresh UNLOGGED table with row-level security (SELECT: own rows), distributed on `key`."""
    name = f"cache_{uuid.uuid4().hex[:8]}"
    _rows(citus.coordinator_url, f"""
        CREATE UNLOGGED TABLE {name} (user_id text NOT NULL DEFAULT current_user, key text NOT NULL,
                                      value bytea, PRIMARY KEY (user_id, key));
        ALTER TABLE {name} ENABLE ROW LEVEL SECURITY;
        CREATE POLICY own_rows ON {name} FOR SELECT USING (user_id = current_user);
        SELECT create_distributed_table('{name}', 'key');""")
    yield name
    _rows(citus.coordinator_url, f"DROP TABLE {name}")


def test_the_coordinator_sees_both_workers_as_active(citus):
    active = _rows(citus.coordinator_url, "SELECT node_name, node_port FROM citus_get_active_worker_nodes()")
    assert sorted(active) == sorted(("127.0.0.1", make_url(url).port) for url in citus.worker_urls)
    assert _rows(citus.coordinator_url, "SELECT extname FROM pg_extension WHERE extname = 'citus'") == [("citus",)]


def test_a_distributed_table_has_shards_on_both_workers(citus, table):
    placements = _rows(citus.coordinator_url,
                       "SELECT nodeport, count(*) FROM citus_shards WHERE table_name = CAST(:t AS regclass) "
                       "GROUP BY nodeport", t=table)
    assert {port for port, _ in placements} == {make_url(url).port for url in citus.worker_urls}
    assert sum(count for _, count in placements) == int(_rows(citus.coordinator_url, "SHOW citus.shard_count")[0][0])


def test_a_row_written_through_the_coordinator_is_read_through_every_worker(citus, table):
    # Citus 11+ syncs the metadata to the workers, so any node routes a query to the shard.
    assert _rows(citus.coordinator_url, "SELECT bool_and(hasmetadata AND metadatasynced) FROM pg_dist_node "
                                        "WHERE noderole = 'primary'") == [(True,)]
    _rows(citus.coordinator_url, f"INSERT INTO {table} (key, value) VALUES ('k1', 'v1')")
    for url in citus.worker_urls:
        assert _rows(url, f"SELECT key, convert_from(value, 'UTF8') FROM {table}") == [("k1", "v1")]


def test_unlogged_and_row_level_security_carry_to_every_shard(citus, table):
    for url in citus.worker_urls:
        # Shards are hidden from ordinary catalog queries on a worker unless visibility is overridden.
        shards = _rows(url, """
            SET citus.override_table_visibility = off;
            SELECT c.relname, c.relpersistence, c.relrowsecurity,
                   EXISTS (SELECT FROM pg_policy p WHERE p.polrelid = c.oid AND p.polname = 'own_rows')
            FROM pg_class c WHERE c.relname ~ ('^' || :t || '_[0-9]+$') AND c.relkind = 'r'""", t=table)
        assert shards, f"no shard of {table} on {url}"
        assert {row[1:] for row in shards} == {("u", True, True)}


def test_an_ordinary_role_sees_only_its_own_rows(citus, table):
    role = f"app_{uuid.uuid4().hex[:8]}"
    # CREATE ROLE and GRANT on a distributed table propagate from the coordinator to the workers.
    _rows(citus.coordinator_url, f"""
        CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS;
        GRANT SELECT ON {table} TO {role};
        INSERT INTO {table} (user_id, key, value)
        SELECT u, 'k' || i, 'v' FROM unnest(ARRAY['{role}', 'someone_else']) u, generate_series(1, 20) i""")
    try:
        as_role = make_url(citus.coordinator_url).set(username=role)
        assert _rows(as_role, f"SELECT user_id, count(*) FROM {table} GROUP BY user_id") == [(role, 20)]
        for url in citus.worker_urls:
            assert _rows(url, "SELECT count(*) FROM pg_roles WHERE rolname = :r", r=role) == [(1,)]
    finally:
        _rows(citus.coordinator_url, f"DROP OWNED BY {role}; DROP ROLE {role}")
