"""Failsafe mode: database errors become cache misses, logged once per burst; bad input still raises."""
from __future__ import annotations

import logging
import uuid

import pytest
from sqlalchemy import text

from fastpgcache import Cache, CacheConnectionError, CacheNotSetUpError, FastPgCache, setup_cache


def test_failsafe_is_off_by_default(engine, empty_schema):
    cache = Cache(engine, schema=empty_schema)
    with pytest.raises(CacheNotSetUpError):
        cache.get("k")
    with pytest.raises(CacheNotSetUpError):
        cache.stats()


def test_reads_answer_as_misses_and_writes_report_nothing_stored(engine, empty_schema):
    cache = Cache(engine, schema=empty_schema, failsafe=True)
    assert cache.get("k") is None
    assert cache.get("k", "fallback") == "fallback"
    assert cache.get("k", default=7) == 7
    assert cache.get_many(["a", "b"]) == {}
    assert cache.exists("k") is False
    assert cache.ttl("k") == -2
    assert cache.keys("*") == []
    assert list(cache.scan_iter("*")) == []
    assert cache.set("k", "v") is False
    assert cache.set("k", "v", nx=True) is False
    assert cache.set_many({"a": 1, "b": 2}) == 0
    assert cache.incr("n") is None  # no made-up counter value
    assert cache.decr("n", 5) is None
    assert cache.delete("k") is False
    assert cache.delete_many(["a"]) is None  # unknown, unlike 0 ("none of them existed")
    assert cache.expire("k", 10) is False
    assert cache.persist("k") is False
    assert cache.clear() is None
    assert cache.cleanup() is None
    stats = cache.stats()
    assert stats["entries"] is None and stats["expired"] is None
    assert stats["errors"] == 20
    assert stats["last_error"].startswith("CacheNotSetUpError: cache table")


def test_fallback_containers_are_not_shared(engine, empty_schema):
    cache = Cache(engine, schema=empty_schema, failsafe=True)
    first = cache.get_many(["a"])
    first["a"] = 1
    assert cache.get_many(["a"]) == {}


def test_get_or_set_computes_when_the_database_fails(engine, empty_schema):
    cache = Cache(engine, schema=empty_schema, failsafe=True)
    assert cache.get_or_set("k", lambda: "computed", ttl=5) == "computed"
    assert cache.get_or_set("k", lambda: "again", lock=False) == "again"


def test_one_warning_per_burst_then_one_on_recovery(engine, empty_schema, caplog):
    cache = Cache(engine, schema=empty_schema, failsafe=True)
    with caplog.at_level(logging.WARNING, logger="fastpgcache"):
        for i in range(25):
            cache.get(f"k{i}")
        failures = [r for r in caplog.records if "failsafe mode answers as a cache miss" in r.getMessage()]
        assert len(failures) == 1
        assert "get failed" in failures[0].getMessage()
        assert len(caplog.records) == 1

        setup_cache(engine=engine, schema=empty_schema)
        assert cache.set("k", "v") is True
        assert cache.get("k") == "v"
        recovered = [r for r in caplog.records if "answering again" in r.getMessage()]
        assert len(recovered) == 1
        assert "after 25 failed calls" in recovered[0].getMessage()

        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{empty_schema}" CASCADE'))
        cache.get("again")
        cache.get("again")
    new_bursts = [r for r in caplog.records if "failsafe mode answers as a cache miss" in r.getMessage()]
    assert len(new_bursts) == 2


def test_on_error_hears_every_error_with_the_operation(engine, empty_schema):
    heard = []
    cache = Cache(engine, schema=empty_schema, failsafe=True,
                  on_error=lambda error, operation: heard.append((type(error), operation)))
    cache.get("a")
    cache.set("a", 1)
    cache.incr("n")
    assert heard == [(CacheNotSetUpError, "get"), (CacheNotSetUpError, "set"), (CacheNotSetUpError, "incr")]


def test_a_raising_on_error_callback_does_not_break_failsafe(engine, empty_schema, caplog):
    def broken(error, operation):
        raise RuntimeError("callback bug")

    cache = Cache(engine, schema=empty_schema, failsafe=True, on_error=broken)
    with caplog.at_level(logging.ERROR, logger="fastpgcache"):
        assert cache.get("k", "d") == "d"
    assert any("on_error callback raised" in r.getMessage() for r in caplog.records)


def test_on_error_must_be_callable(engine, schema):
    with pytest.raises(TypeError, match="on_error must be a callable"):
        Cache(engine, schema=schema, on_error="print")


def test_bad_input_still_raises_in_failsafe_mode(engine, schema):
    cache = Cache(engine, schema=schema, failsafe=True)
    with pytest.raises(TypeError, match="invalid key type"):
        cache.get(None)
    with pytest.raises(TypeError):
        cache.set("k", object())
    with pytest.raises(ValueError, match="ttl must be a positive number"):
        cache.set("k", 1, ttl=-1)
    cache.set("text", "not a number")
    with pytest.raises(ValueError, match="not an integer"):
        cache.incr("text")
    assert cache.stats()["errors"] == 0


def test_failsafe_client_starts_and_answers_while_the_server_is_unreachable(caplog):
    secret = f"pw-{uuid.uuid4().hex}"
    heard = []
    with caplog.at_level(logging.WARNING, logger="fastpgcache"):
        cache = FastPgCache(host="127.0.0.1", port=1, user="nobody", password=secret, failsafe=True,
                            use_cuckoo_filter=False, on_error=lambda error, op: heard.append(error))
        try:
            assert cache.get("k", "d") == "d"
            assert cache.set("k", 1) is False
            assert cache.get_or_set("k", lambda: "fresh") == "fresh"
            assert cache.stats()["errors"] >= 3
        finally:
            cache.close()
    assert heard and all(isinstance(error, CacheConnectionError) for error in heard)
    assert secret not in caplog.text
    assert all(secret not in str(error) for error in heard)


def test_without_failsafe_an_unreachable_server_raises_a_clear_error():
    with pytest.raises(CacheConnectionError, match="is the server running"):
        FastPgCache(host="127.0.0.1", port=1, user="nobody", password="x", use_cuckoo_filter=False)
