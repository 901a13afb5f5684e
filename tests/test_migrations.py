"""The cache table exists only through the Alembic migrations, with its options."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from fastpgcache import Cache, setup_cache
from fastpgcache.admin import VERSION_TABLE, cache_status, migrations_dir, set_logged

ROOT = Path(__file__).resolve().parent.parent


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return ScriptDirectory.from_config(config).get_current_head()


def relpersistence(engine, schema, table="cache"):
    with engine.connect() as connection:
        return connection.execute(text(
            "SELECT c.relpersistence FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :s AND c.relname = :t"), {"s": schema, "t": table}).scalar()


def test_table_is_unlogged_with_primary_key_and_partial_index(engine, schema):
    assert relpersistence(engine, schema) == "u"
    inspector = inspect(engine)
    assert inspector.get_pk_constraint("cache", schema=schema)["constrained_columns"] == ["user_id", "key"]
    indexes = {ix["name"]: ix for ix in inspector.get_indexes("cache", schema=schema)}
    assert indexes["cache_expires_at_idx"]["column_names"] == ["expires_at"]
    with engine.connect() as connection:
        definition = connection.execute(text("SELECT pg_get_indexdef(to_regclass(:ix)::oid)"),
                                        {"ix": f"{schema}.cache_expires_at_idx"}).scalar()
    assert "WHERE (expires_at IS NOT NULL)" in definition
    assert indexes["cache_expiry_idx"]["column_names"] == ["user_id", "expires_at"]  # one role's rows by expiry
    columns = {c["name"]: c for c in inspector.get_columns("cache", schema=schema)}
    assert set(columns) == {"user_id", "key", "value", "flags", "expires_at", "created_at"}
    assert "current_user" in columns["user_id"]["default"].lower()


def test_version_table_is_our_own_inside_the_schema(engine, schema):
    inspector = inspect(engine)
    assert inspector.has_table(VERSION_TABLE, schema=schema)
    assert not inspector.has_table("alembic_version", schema=schema)
    assert cache_status(engine, schema)["revision"] == head_revision()


def test_logged_option_creates_a_logged_table(engine, empty_schema):
    status = setup_cache(engine=engine, schema=empty_schema, logged=True)
    assert status["exists"] and not status["unlogged"]
    assert relpersistence(engine, empty_schema) == "p"


def test_running_setup_twice_keeps_rows(engine, schema):
    Cache(engine, schema=schema).set("kept", "yes")
    setup_cache(engine=engine, schema=schema)
    assert Cache(engine, schema=schema).get("kept") == "yes"


def test_setup_rerun_leaves_the_set_function_alone_when_its_body_is_current_or_it_is_gone(engine, schema):
    def set_function_version():
        with engine.connect() as connection:
            return connection.execute(text("SELECT xmin::text FROM pg_proc WHERE oid = to_regproc(:f)"),
                                      {"f": f"{schema}.cache_set"}).scalar()

    before = set_function_version()
    setup_cache(engine=engine, schema=schema)
    assert set_function_version() == before  # migration 0007's fit issued no DDL: the body was already right
    with engine.begin() as connection:
        connection.execute(text(f'DROP FUNCTION "{schema}".cache_set'))
    assert setup_cache(engine=engine, schema=schema)["revision"] == head_revision()
    assert set_function_version() is None


def test_force_drops_and_recreates(engine, schema):
    Cache(engine, schema=schema).set("gone", "soon")
    status = setup_cache(engine=engine, schema=schema, force=True)
    assert status["revision"] == head_revision()
    assert Cache(engine, schema=schema).get("gone") is None


def test_switching_logged_and_back_keeps_rows(engine, schema):
    cache = Cache(engine, schema=schema)
    cache.set_many({f"k{i}": i for i in range(50)})
    set_logged(engine, True, schema)
    assert relpersistence(engine, schema) == "p"
    assert cache.get_many([f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}
    setup_cache(engine=engine, schema=schema, logged=False)
    assert relpersistence(engine, schema) == "u"
    assert cache.get("k49") == 49


def test_setup_keeps_existing_persistence_when_not_asked(engine, schema):
    set_logged(engine, True, schema)
    setup_cache(engine=engine, schema=schema)
    assert relpersistence(engine, schema) == "p"


def test_custom_table_name_and_two_caches_side_by_side(engine, empty_schema):
    setup_cache(engine=engine, schema=empty_schema, table="sessions")
    setup_cache(engine=engine, schema=empty_schema + "_b")
    try:
        a = Cache(engine, schema=empty_schema, table="sessions")
        b = Cache(engine, schema=empty_schema + "_b")
        a.set("k", "from a")
        b.set("k", "from b")
        assert (a.get("k"), b.get("k")) == ("from a", "from b")
        assert inspect(engine).has_table("sessions", schema=empty_schema)
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{empty_schema}_b" CASCADE'))


def test_foreign_table_with_same_name_is_never_dropped_without_force(engine, empty_schema):
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{empty_schema}"'))
        connection.execute(text(f'CREATE TABLE "{empty_schema}".cache (user_id text, key text, value text)'))
        connection.execute(text(f"INSERT INTO \"{empty_schema}\".cache VALUES ('u', 'k', 'v')"))
    with pytest.raises(Exception, match="--force"):
        setup_cache(engine=engine, schema=empty_schema)
    with engine.connect() as connection:
        assert connection.execute(text(f'SELECT count(*) FROM "{empty_schema}".cache')).scalar() == 1
    setup_cache(engine=engine, schema=empty_schema, force=True)
    assert cache_status(engine, empty_schema)["revision"] == head_revision()


def _alembic(pg_url, *args, env_url=True):
    env = {**os.environ, "FASTPGCACHE_URL": pg_url} if env_url else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "alembic", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_alembic_command_line_upgrade_and_downgrade_leave_nothing(engine, pg_url, empty_schema):
    done = _alembic(pg_url, "-x", f"schema={empty_schema}", "-x", "logged=true", "upgrade", "head")
    assert done.returncode == 0, done.stderr
    assert relpersistence(engine, empty_schema) == "p"
    assert cache_status(engine, empty_schema)["revision"] == head_revision()
    done = _alembic(pg_url, "-x", f"schema={empty_schema}", "downgrade", "base")
    assert done.returncode == 0, done.stderr
    with engine.connect() as connection:
        left = connection.execute(text("SELECT count(*) FROM pg_namespace WHERE nspname = :s"), {"s": empty_schema})
        assert left.scalar() == 0


def reloptions(engine, schema, table="cache"):
    with engine.connect() as connection:
        return connection.execute(text(
            "SELECT c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :s AND c.relname = :t"), {"s": schema, "t": table}).scalar()


def test_pages_keep_room_for_overwrites_and_downgrade_removes_it(engine, pg_url, empty_schema):
    # fillfactor 70 (migration 0003): an overwritten key's new version fits on its own page (a HOT update).
    done = _alembic(pg_url, "-x", f"schema={empty_schema}", "upgrade", "head")
    assert done.returncode == 0, done.stderr
    assert reloptions(engine, empty_schema) == ["fillfactor=70"]
    done = _alembic(pg_url, "-x", f"schema={empty_schema}", "downgrade", "0002_insert_notify_trigger")
    assert done.returncode == 0, done.stderr
    assert reloptions(engine, empty_schema) is None
    setup_cache(engine=engine, schema=empty_schema, logged=True)  # upgrading an existing table sets it too
    assert reloptions(engine, empty_schema) == ["fillfactor=70"]


def test_alembic_url_from_x_argument(engine, pg_url, empty_schema):
    done = _alembic(pg_url, "-x", f"url={pg_url}", "-x", f"schema={empty_schema}", "upgrade", "head", env_url=False)
    assert done.returncode == 0, done.stderr
    assert cache_status(engine, empty_schema)["exists"]


def test_alembic_without_url_says_how_to_give_one():
    env = {k: v for k, v in os.environ.items() if k != "FASTPGCACHE_URL"}
    done = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "FASTPGCACHE_URL" in done.stderr and "PGPASSWORD" in done.stderr
    assert "-x url" not in done.stderr


def test_missing_table_error_names_the_fix(engine):
    cache = Cache(engine, schema=f"nothing_{uuid.uuid4().hex[:6]}")
    from fastpgcache import CacheNotSetUpError

    with pytest.raises(CacheNotSetUpError, match="fastpgcache-admin"):
        cache.get("k")
    with pytest.raises(CacheNotSetUpError, match="alembic"):
        cache.set("k", "v")


def _has_schema(engine, schema) -> bool:
    with engine.connect() as connection:
        found = connection.execute(text("SELECT count(*) FROM pg_namespace WHERE nspname = :s"), {"s": schema})
        return found.scalar() == 1


def test_force_keeps_the_schema_and_its_grants(engine, make_role, schema):
    role, _ = make_role("creator", login=False)
    with engine.begin() as connection:
        connection.execute(text(f'GRANT CREATE ON SCHEMA "{schema}" TO "{role}"'))
    setup_cache(engine=engine, schema=schema, force=True)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT has_schema_privilege(:r, :s, 'CREATE')"),
                                  {"r": role, "s": schema}).scalar()


def test_force_with_a_user_function_in_the_schema_keeps_it(engine, schema):
    with engine.begin() as connection:
        connection.execute(text(f'CREATE FUNCTION "{schema}".answer() RETURNS int LANGUAGE sql AS \'SELECT 42\''))
    status = setup_cache(engine=engine, schema=schema, force=True)
    assert status["exists"] and status["revision"] == head_revision()
    with engine.connect() as connection:
        assert connection.execute(text(f'SELECT "{schema}".answer()')).scalar() == 42


def test_alembic_downgrade_keeps_a_schema_that_holds_other_objects(engine, pg_url, schema):
    with engine.begin() as connection:
        connection.execute(text(f'CREATE FUNCTION "{schema}".answer() RETURNS int LANGUAGE sql AS \'SELECT 42\''))
    done = _alembic(pg_url, "-x", f"schema={schema}", "downgrade", "base")
    assert done.returncode == 0, done.stderr
    assert _has_schema(engine, schema)
    assert not cache_status(engine, schema)["exists"]
    assert not inspect(engine).has_table(VERSION_TABLE, schema=schema)
    with engine.connect() as connection:
        assert connection.execute(text(f'SELECT "{schema}".answer()')).scalar() == 42


@pytest.mark.parametrize("schema_name, table_name", [
    ("a :x", "cache"), (None, "c%t"), (None, "t" * 49), ("é" * 40, "cache"), ("s" * 64, "cache"),
    ("1abc", "cache"), (None, 'quo"te'), ("", "cache"), (None, "a :x"),
])
def test_names_outside_the_accepted_form_are_refused_before_any_sql(engine, empty_schema, schema_name, table_name):
    schema_name = schema_name if schema_name is not None else empty_schema
    with pytest.raises(ValueError, match=r"A-Za-z_.*48"):
        setup_cache(engine=engine, schema=schema_name, table=table_name)
    assert not _has_schema(engine, schema_name)


def test_longest_accepted_names_work(engine, empty_schema):
    table = "t" * 48
    status = setup_cache(engine=engine, schema=empty_schema, table=table)
    assert status["exists"]
    assert inspect(engine).has_index(table, f"{table}_expires_at_idx", schema=empty_schema)
    Cache(engine, schema=empty_schema, table=table).set("k", "v")
    assert Cache(engine, schema=empty_schema, table=table).get("k") == "v"


@pytest.mark.parametrize("force", [False, True])
def test_table_dropped_by_hand_is_recreated_by_setup(engine, schema, force):
    with engine.begin() as connection:
        connection.execute(text(f'DROP TABLE "{schema}".cache'))
    assert cache_status(engine, schema)["revision"] == head_revision()
    status = setup_cache(engine=engine, schema=schema, force=force)
    assert status["exists"] and status["unlogged"] and status["row_level_security"]
    assert status["revision"] == head_revision()
    Cache(engine, schema=schema).set("back", 1)
    assert Cache(engine, schema=schema).get("back") == 1
