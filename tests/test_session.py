"""Cache bound to the caller's Session or Connection: the caller's transaction decides."""
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from fastpgcache import Cache


def test_rolled_back_set_never_happened(engine, schema, cache):
    with Session(engine) as session:
        inside = Cache(session, schema=schema)
        inside.set("k", "v")
        assert inside.get("k") == "v"  # visible inside the transaction
        assert cache.get("k") is None  # invisible to everyone else before commit
        session.rollback()
    assert cache.get("k") is None


def test_committed_set_is_visible_after_commit(engine, schema, cache):
    with Session(engine) as session:
        Cache(session, schema=schema).set("k", {"v": 1}, ttl=60)
        Cache(session, schema=schema).incr("n")
        session.commit()
    assert cache.get("k") == {"v": 1} and cache.get("n") == 1


def test_cache_writes_share_fate_with_application_writes(engine, schema, cache):
    with engine.begin() as connection:
        connection.execute(text(f'CREATE TABLE "{schema}".orders (id int primary key)'))
    with pytest.raises(RuntimeError):
        with Session(engine) as session, session.begin():
            session.execute(text(f'INSERT INTO "{schema}".orders VALUES (1)'))
            Cache(session, schema=schema).set("orders:count", 1)
            raise RuntimeError("the request failed")
    assert cache.get("orders:count") is None
    with engine.connect() as connection:
        assert connection.execute(text(f'SELECT count(*) FROM "{schema}".orders')).scalar() == 0


def test_savepoint_rollback_undoes_only_its_part(engine, schema, cache):
    with Session(engine) as session:
        inside = Cache(session, schema=schema)
        inside.set("outer", 1)
        nested = session.begin_nested()
        inside.set("inner", 2)
        inside.delete("outer")
        nested.rollback()
        assert inside.get("outer") == 1 and inside.get("inner") is None
        session.commit()
    assert cache.get_many(["outer", "inner"]) == {"outer": 1}


def test_delete_rolled_back_keeps_value(engine, schema, cache):
    cache.set("k", "v")
    with Session(engine) as session:
        inside = Cache(session, schema=schema)
        assert inside.delete("k") is True
        assert inside.get("k") is None
        session.rollback()
    assert cache.get("k") == "v"


def test_connection_bind_leaves_commit_to_the_caller(engine, schema, cache):
    with engine.connect() as connection:
        inside = Cache(connection, schema=schema)
        inside.set_many({"a": 1, "b": 2})
        assert inside.get_many(["a", "b"]) == {"a": 1, "b": 2}
        connection.rollback()
        inside.set("c", 3)
        connection.commit()
    assert cache.get_many(["a", "b", "c"]) == {"c": 3}


def test_error_inside_session_is_translated(engine, schema):
    with Session(engine) as session:
        missing = Cache(session, schema=schema + "_missing")
        from fastpgcache import CacheNotSetUpError

        with pytest.raises(CacheNotSetUpError):
            missing.get("k")
