"""Expiry on write and max_entries: bounded batches on the write path, so no cron is needed."""
from __future__ import annotations

import logging
import time

import pytest
from sqlalchemy import text

from fastpgcache import Cache
from fastpgcache.expiry import ExpiryOnWrite


def _expire_now(engine, schema, user_id="postgres"):
    # Backdate every row of `user_id`, as if their ttl had run out (ttl must be positive).
    with engine.begin() as connection:
        connection.execute(text(f'UPDATE "{schema}".cache SET expires_at = now() - interval \'1 minute\' '
                                "WHERE user_id = :u"), {"u": user_id})


def _rows(engine, schema, user_id="postgres") -> int:
    with engine.connect() as connection:
        return connection.execute(text(f'SELECT count(*) FROM "{schema}".cache WHERE user_id = :u'),
                                  {"u": user_id}).scalar()


def test_every_n_writes_a_write_removes_twice_as_many_expired_rows(engine, schema):
    cache = Cache(engine, schema=schema, expire_every=10)
    cache.set_many({f"old{i}": i for i in range(30)}, ttl=60)
    _expire_now(engine, schema)
    for i in range(9):
        cache.set(f"new{i}", i)
    assert _rows(engine, schema) == 39  # not due yet
    cache.set("new9", 9)  # the 10th write since the last batch: up to 20 expired rows go
    assert _rows(engine, schema) == 40 - 20
    assert cache.stats()["expired_on_write"] == 20
    for i in range(10, 20):
        cache.incr(f"counter{i}")
    stats = cache.stats()
    assert stats["expired"] == 0 and stats["expired_on_write"] == 30
    assert stats["entries"] == 20
    assert cache.get("new0") == 0 and cache.get("counter19") == 1


def test_expiry_on_write_leaves_live_rows_and_other_users_alone(engine, schema, role_engine):
    someone_else, other_engine = role_engine("other")
    other = Cache(other_engine, schema=schema, expire_every=None)
    other.set_many({f"theirs{i}": i for i in range(5)}, ttl=60)
    _expire_now(engine, schema, someone_else)
    mine = Cache(engine, schema=schema, expire_every=5)
    mine.set_many({f"live{i}": i for i in range(5)}, ttl=600)
    mine.set_many({f"more{i}": i for i in range(5)})
    assert _rows(engine, schema) == 10
    assert _rows(engine, schema, someone_else) == 5
    assert mine.stats()["expired_on_write"] == 0


def test_expiry_on_write_can_be_turned_off(engine, schema):
    cache = Cache(engine, schema=schema, expire_every=None)
    cache.set_many({f"old{i}": i for i in range(10)}, ttl=60)
    _expire_now(engine, schema)
    for i in range(200):
        cache.set(f"k{i}", i)
    assert cache.stats()["expired"] == 10
    assert cache.cleanup() == 10  # cleanup() stays for manual or pg_cron use


def test_max_entries_trims_the_oldest_entries_first(engine, schema):
    cache = Cache(engine, schema=schema, max_entries=100, expire_every=50)
    for i in range(300):
        cache.set(f"k{i:03d}", i)
    assert _rows(engine, schema) == 100
    assert cache.keys("k*") == [f"k{i:03d}" for i in range(200, 300)]
    assert cache.stats()["trimmed"] == 200


def test_max_entries_counts_each_role_separately(engine, schema, role_engine):
    someone_else, other_engine = role_engine("other")
    Cache(other_engine, schema=schema).set_many({f"theirs{i}": i for i in range(80)})
    cache = Cache(engine, schema=schema, max_entries=50)
    for i in range(100):
        cache.set(f"k{i:03d}", i)
    assert _rows(engine, schema) == 50
    assert _rows(engine, schema, someone_else) == 80


def test_a_rewritten_key_counts_as_new(engine, schema):
    cache = Cache(engine, schema=schema, max_entries=50)
    for i in range(50):
        cache.set(f"k{i:02d}", i)
    cache.set("k00", "rewritten")  # now the newest entry
    for i in range(50, 99):
        cache.set(f"k{i:02d}", i)
    assert cache.get("k00") == "rewritten"
    assert cache.get("k01") is None


def test_a_failing_expiry_batch_never_fails_the_write(engine, schema, role_engine, caplog):
    _, noexpiry = role_engine("noexpiry")
    with engine.begin() as connection:
        connection.execute(text(f'REVOKE EXECUTE ON FUNCTION "{schema}".cache_expire_batch FROM PUBLIC'))
    cache = Cache(noexpiry, schema=schema, expire_every=1)
    with caplog.at_level(logging.WARNING, logger="fastpgcache"):
        assert cache.set("a", 1) is True
        assert cache.set("b", 2) is True
    assert cache.get("a") == 1 and cache.get("b") == 2
    warnings = [r for r in caplog.records if "expiry on write failed" in r.getMessage()]
    assert len(warnings) == 1
    assert "the writes themselves succeeded" in warnings[0].getMessage()


@pytest.mark.parametrize("options, message", [
    ({"expire_every": 0}, "expire_every must be a positive int"),
    ({"expire_every": 2.5}, "expire_every must be a positive int"),
    ({"max_entries": -1}, "max_entries must be a positive int"),
    ({"max_entries": True}, "max_entries must be a positive int"),
])
def test_bad_expiry_settings_are_refused(engine, schema, options, message):
    with pytest.raises(ValueError, match=message):
        Cache(engine, schema=schema, **options)


def test_the_check_for_max_entries_runs_rarely_for_large_caps():
    policy = ExpiryOnWrite(every=50, max_entries=1_000_000)
    assert policy.trim_every == 5000
    due = [policy.due(1) for _ in range(5000)]
    assert sum(1 for d in due if d.trim) == 1
    assert sum(1 for d in due if d.expire) == 100
    assert due[-1].trim == 10_000 and due[-1].expire == 100


def test_expiry_batch_uses_the_expires_at_index(engine, schema, nested_plans):
    # A role's many live rows and a few expired ones: the batch must find the expired ones
    # through the partial expires_at index, not by walking the role's rows or the table.
    cache = Cache(engine, schema=schema, expire_every=None)
    for batch in range(3):
        cache.set_many({f"live:{batch}:{i}": i for i in range(1000)})
    cache.set_many({f"dead:{i}": i for i in range(100)}, ttl=0.05)
    time.sleep(0.1)
    with engine.connect() as connection:
        connection.execute(text(f'ANALYZE "{schema}".cache'))
        connection.commit()
    plan = nested_plans(cache, cache._s.expire_batch, {"batch": 100, "skip_locked": False})
    assert "Delete on cache" in plan and "cache_expires_at_idx" in plan and "Seq Scan on cache " not in plan, plan
    assert cache.cleanup() == 100


def test_expiry_batch_finds_a_role_s_expired_rows_by_index_before_any_analyze_and_in_cached_plans(
        engine, schema, nested_plans):
    # The write functions' plans are cached: after five calls PostgreSQL may keep a generic plan, made
    # without the role's name or the time. Before the table's first ANALYZE, or with a generic plan,
    # the batch walked the role's whole primary-key range (0.35 ms at 2,400 rows, growing with them).
    cache = Cache(engine, schema=schema, expire_every=None)
    for batch in range(3):
        cache.set_many({f"live:{batch}:{i}": i for i in range(1000)})
    cache.set_many({f"dead:{i}": i for i in range(100)}, ttl=0.05)
    time.sleep(0.1)
    plan = nested_plans(cache, cache._s.expire_batch, {"batch": 100, "skip_locked": False},
                        settings=("SET plan_cache_mode = force_generic_plan",))
    batch = next(part for part in plan.split("Query Text:") if "LIMIT p_batch" in part)
    assert "cache_expiry_idx" in batch and "cache_pkey" not in batch, batch
    assert cache.cleanup() == 100
