"""The Cache facade's behaviour on a real server: values, ttl, nx/xx, batches, keyspace, counters."""
import datetime as dt
import math
import threading
import time

import pytest
from sqlalchemy import text

from fastpgcache import MAX_KEY_BYTES, Cache, setup_cache

VALUES = [
    "plain", "", "123", '{"looks": "like json"}', "null", "true", "ünïcødé ✓ 日本語 🐘",
    b"", b"\x00\x01\xff binary", bytes(range(256)),
    0, -7, 2**70, 3.25, -0.0, True, False, None,
    {"user": {"id": 123, "tags": ["admin", "dev"], "settings": {"theme": "dark", "on": True}}},
    [1, 2, 3, {"nested": "value"}, [4, 5, 6]], [], {},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: repr(v)[:30])
def test_value_round_trips_with_its_type(cache, value):
    cache.set("k", value)
    got = cache.get("k", default="MISSING")
    assert got == value and type(got) is type(value)


def test_large_value_round_trips_once_the_admin_allows_it(engine, schema, cache):
    setup_cache(engine=engine, schema=schema, max_value_bytes=8_000_000)
    big = "x" * 5_000_000
    cache.set("big", big)
    assert cache.get("big") == big
    blob = bytes(range(256)) * 20_000
    cache.set("blob", blob)
    assert cache.get("blob") == blob


def test_float_special_values(cache):
    cache.set("inf", math.inf)
    assert cache.get("inf") == math.inf
    cache.set("nan", math.nan)
    assert math.isnan(cache.get("nan"))


@pytest.mark.parametrize("value", [object(), (1, 2), {1, 2}, dt.date(2024, 1, 1), {"when": dt.datetime.now()},
                                   [1, object()]])
def test_unsupported_value_type_is_type_error_naming_it_before_sql(engine, value):
    cache = Cache(engine, schema="no_such_schema_here")  # any SQL would raise CacheNotSetUpError
    with pytest.raises(TypeError, match="cannot cache a value of type"):
        cache.set("k", value)


def test_pickle_is_opt_in_and_signed(engine, schema):
    plain, pickling = Cache(engine, schema=schema), Cache(engine, schema=schema, pickle="app-secret-key-0123")
    pickling.set("d", dt.date(2024, 5, 1))
    assert pickling.get("d") == dt.date(2024, 5, 1)
    pickling.set("t", (1, 2))
    assert pickling.get("t") == (1, 2)
    with pytest.raises(TypeError, match="signing key"):
        plain.get("d")
    with pytest.raises(ValueError, match="signing key"):
        Cache(engine, schema=schema, pickle=True)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Cache(engine, schema=schema, pickle="short")
    rotated = Cache(engine, schema=schema, pickle=["new-secret-key-0123", "app-secret-key-0123"])
    assert rotated.get("d") == dt.date(2024, 5, 1)  # an older key still verifies
    rotated.set("n", {3})
    assert pickling.get("n") is None  # signed with the new key, which `pickling` does not hold


def test_parse_json_false_returns_stored_text(cache):
    cache.set("j", {"a": [1, 2]})
    assert cache.get("j", parse_json=False) == '{"a":[1,2]}'
    cache.set("s", "text")
    assert cache.get("s", parse_json=False) == "text"


def test_get_default_and_missing(cache):
    assert cache.get("nope") is None
    assert cache.get("nope", 42) == 42
    cache.set("none", None)
    assert cache.get("none", 42) is None


def test_set_replaces_value_and_ttl(cache):
    cache.set("k", "a", ttl=100)
    cache.set("k", "b")
    assert cache.get("k") == "b"
    assert cache.ttl("k") == -1


def test_ttl_values(cache):
    assert cache.ttl("missing") == -2
    cache.set("forever", 1)
    assert cache.ttl("forever") == -1
    cache.set("short", 1, ttl=0.5)
    assert cache.ttl("short") == 1  # rounded up
    cache.set("hour", 1, ttl=dt.timedelta(hours=1))
    assert 3599 <= cache.ttl("hour") <= 3600


def test_value_expires_by_the_database_clock(cache):
    cache.set("brief", "x", ttl=0.3)
    assert cache.exists("brief")
    time.sleep(0.4)
    assert cache.get("brief") is None
    assert not cache.exists("brief")
    assert cache.ttl("brief") == -2
    assert cache.get_many(["brief"]) == {}
    assert cache.keys("*") == []
    assert cache.delete("brief") is False


def test_expire_and_persist(cache):
    assert cache.expire("missing", 10) is False
    assert cache.persist("missing") is False
    cache.set("k", 1)
    assert cache.persist("k") is False  # no ttl to remove
    assert cache.expire("k", 50) is True
    assert 49 <= cache.ttl("k") <= 50
    assert cache.persist("k") is True
    assert cache.ttl("k") == -1
    with pytest.raises(ValueError, match="persist"):
        cache.expire("k", None)


@pytest.mark.parametrize("ttl", [0, -1, -0.5, math.nan, 10**12])
def test_bad_ttl_value(cache, ttl):
    with pytest.raises(ValueError, match="ttl"):
        cache.set("k", "v", ttl=ttl)
    assert cache.exists("k") is False


@pytest.mark.parametrize("ttl", [True, "10", [10], object()])
def test_bad_ttl_type(cache, ttl):
    with pytest.raises(TypeError, match="ttl"):
        cache.set("k", "v", ttl=ttl)


def test_nx_sets_only_when_absent_or_expired(cache):
    assert cache.set("k", "first", nx=True) is True
    assert cache.set("k", "second", nx=True) is False
    assert cache.get("k") == "first"
    cache.set("e", "old", ttl=0.2)
    time.sleep(0.3)
    assert cache.set("e", "new", nx=True) is True
    assert cache.get("e") == "new" and cache.ttl("e") == -1


def test_xx_sets_only_when_present(cache):
    assert cache.set("k", "v", xx=True) is False
    assert cache.exists("k") is False
    cache.set("k", "v", ttl=100)
    assert cache.set("k", "w", xx=True) is True
    assert cache.get("k") == "w" and cache.ttl("k") == -1
    cache.set("e", "old", ttl=0.2)
    time.sleep(0.3)
    assert cache.set("e", "new", xx=True) is False
    with pytest.raises(ValueError, match="mutually exclusive"):
        cache.set("k", "v", nx=True, xx=True)


def test_delete_and_exists(cache):
    cache.set("k", "v")
    assert cache.exists("k")
    assert cache.delete("k") is True
    assert cache.delete("k") is False
    assert cache.get("k") is None and not cache.exists("k")


@pytest.mark.parametrize("key, stored", [("s", "s"), (b"bytes", "bytes"), (7, "7"), (1.5, "1.5")])
def test_key_types_convert_like_redis_py(cache, key, stored):
    cache.set(key, "v")
    assert cache.keys("*") == [stored]
    assert cache.get(stored) == "v"


@pytest.mark.parametrize("key", [None, True, ["a"], {"a": 1}, object()])
def test_bad_key_type(cache, key):
    with pytest.raises(TypeError, match="key"):
        cache.set(key, "v")


def test_key_limits(cache):
    with pytest.raises(ValueError, match="NUL"):
        cache.set("a\x00b", "v")
    with pytest.raises(ValueError, match=str(MAX_KEY_BYTES)):
        cache.set("k" * (MAX_KEY_BYTES + 1), "v")
    with pytest.raises(ValueError, match=str(MAX_KEY_BYTES)):
        cache.get("é" * (MAX_KEY_BYTES // 2 + 1))
    with pytest.raises(ValueError, match="empty"):
        cache.set("", "v")
    with pytest.raises(ValueError, match="UTF-8"):
        cache.set(b"\xff\xfe", "v")
    longest = "k" * MAX_KEY_BYTES
    cache.set(longest, "v")
    assert cache.get(longest) == "v"


def test_incr_and_decr(cache):
    assert cache.incr("n") == 1
    assert cache.incr("n", 10) == 11
    assert cache.decr("n", 20) == -9
    assert cache.get("n") == -9
    cache.set("s", "41")
    assert cache.incr("s") == 42 and cache.get("s") == "42"
    cache.set("t", 5, ttl=100)
    cache.incr("t")
    assert cache.ttl("t") > 90  # incr keeps the ttl


def test_incr_of_expired_key_starts_at_zero_without_ttl(cache):
    cache.set("e", 100, ttl=0.2)
    time.sleep(0.3)
    assert cache.incr("e", 5) == 5
    assert cache.ttl("e") == -1


@pytest.mark.parametrize("value", ["abc", 1.5, b"12", [1], {"a": 1}, "1e3"])
def test_incr_of_non_integer_is_value_error(cache, value):
    cache.set("x", value)
    with pytest.raises(ValueError, match="not an integer"):
        cache.incr("x")
    assert cache.get("x") == value


def test_incr_overflow_and_bad_amount(cache):
    cache.set("big", 2**63 - 1)
    with pytest.raises(ValueError, match="overflows"):
        cache.incr("big")
    for amount in (1.5, "1", True, None):
        with pytest.raises(TypeError, match="amount"):
            cache.incr("n", amount)
        with pytest.raises(TypeError, match="amount"):
            cache.decr("n", amount)


def test_concurrent_incr_is_exact(engine, schema):
    cache = Cache(engine, schema=schema)
    errors = []

    def work():
        try:
            for _ in range(10):
                cache.incr("counter")
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.get("counter") == 1000


def test_set_many_get_many_delete_many(cache):
    items = {f"user:{i}": {"id": i} for i in range(1000)}
    assert cache.set_many(items, ttl=3600) == 1000
    got = cache.get_many(list(items) + ["missing"])
    assert got == items
    assert 3599 <= cache.ttl("user:999") <= 3600
    assert cache.delete_many(["user:1", "user:2", "missing"]) == 2
    assert cache.get_many(["user:1", "user:3"]) == {"user:3": {"id": 3}}
    assert cache.set_many({}) == 0 and cache.get_many([]) == {} and cache.delete_many([]) == 0


def test_set_many_types_and_overwrite(cache):
    cache.set("a", "old", ttl=5)
    batch = {"a": "123", "b": b"raw", "c": None, "d": [1], 5: "int key"}
    assert cache.set_many(batch) == 5
    got = cache.get_many(["a", "b", "c", "d", "5"])
    assert got == {"a": "123", "b": b"raw", "c": None, "d": [1], "5": "int key"}
    assert type(got["a"]) is str and cache.ttl("a") == -1


ARRAY_SYNTAX_KEYS = ['a"b', "a\\b", '\\"', "{x}", "a,b", "{", "}", " spaced ", "NULL", "null", '""', "()", "日本🐘",
                     "tab\there", "new\nline", "'quoted'", "\\x41"]


def test_batches_of_keys_that_look_like_array_syntax(cache):
    # A batch travels as one array literal: quotes, backslashes, braces, commas, blanks and the
    # word NULL in keys must arrive as themselves, and bytes of every value as stored.
    values = {key: key.encode() + bytes(range(256)) for key in ARRAY_SYNTAX_KEYS}
    values["empty bytes"] = b""
    assert cache.set_many(values) == len(values)
    assert cache.get_many(list(values) + ["nul", "NUL"]) == values
    assert sorted(cache.keys("*")) == sorted(values)
    assert {key: cache.get(key) for key in values} == values
    assert cache.delete_many(ARRAY_SYNTAX_KEYS[:9] + ["absent"]) == 9
    assert sorted(cache.get_many(list(values))) == sorted(ARRAY_SYNTAX_KEYS[9:] + ["empty bytes"])


def test_set_many_with_colliding_normalized_keys_keeps_last(cache):
    assert cache.set_many({1: "int", "1": "str"}) == 1
    assert cache.get("1") == "str"


def test_set_many_validates_everything_before_writing(cache):
    with pytest.raises(TypeError, match="object"):
        cache.set_many({"good": 1, "bad": object()})
    with pytest.raises(ValueError, match="NUL"):
        cache.set_many({"good": 1, "b\x00d": 2})
    assert cache.exists("good") is False
    with pytest.raises(TypeError, match="mapping"):
        cache.set_many([("a", 1)])
    with pytest.raises(TypeError, match="iterable of keys"):
        cache.get_many("abc")


def test_keys_glob_patterns(cache):
    names = ["user:1", "user:2", "user:10", "userX1", "a%b", "a_b", "axb", "a*b", "a?b", "a[b", "h\\x", "hello",
             "hallo", "hxllo", "héllo"]
    cache.set_many({name: 1 for name in names})
    assert cache.keys("user:*") == ["user:1", "user:10", "user:2"]
    assert cache.keys("user:?") == ["user:1", "user:2"]
    assert cache.keys("a%b") == ["a%b"]  # % is not a wildcard
    assert cache.keys("a_b") == ["a_b"]  # nor is _
    assert cache.keys("a\\*b") == ["a*b"]
    assert cache.keys("a\\?b") == ["a?b"]
    assert cache.keys("a\\[b") == ["a[b"]
    assert cache.keys("h[ae]llo") == ["hallo", "hello"]
    assert cache.keys("h[^e]llo") == ["hallo", "hxllo", "héllo"]
    assert cache.keys("h[a-f]llo") == ["hallo", "hello"]
    assert cache.keys("h\\\\x") == ["h\\x"]
    assert cache.keys("*") == sorted(cache.keys("*")) and len(cache.keys()) == len(names)
    assert cache.keys("nothing*") == []
    with pytest.raises(TypeError, match="pattern"):
        cache.keys(5)


def test_scan_iter_pages_through_everything(cache):
    cache.set_many({f"k{i:04d}": i for i in range(2500)})
    cache.set("other", 1)
    seen = list(cache.scan_iter("k*", batch_size=1000))
    assert seen == [f"k{i:04d}" for i in range(2500)]
    assert list(cache.scan_iter("k000?", batch_size=3)) == [f"k000{i}" for i in range(10)]
    with pytest.raises(ValueError, match="batch_size"):
        list(cache.scan_iter("*", batch_size=0))


def test_clear_removes_only_this_cache(engine, schema, cache):
    cache.set_many({"a": 1, "b": 2})
    with engine.begin() as connection:
        connection.execute(text(f"INSERT INTO \"{schema}\".cache (user_id, key, value) VALUES ('someone', 'x', 'v')"))
    assert cache.clear() == 2
    assert cache.keys() == []
    with engine.connect() as connection:
        assert connection.execute(text(f'SELECT count(*) FROM "{schema}".cache')).scalar() == 1


def test_cleanup_deletes_expired_rows_in_batches(engine, schema, cache):
    cache.set_many({f"dead{i}": i for i in range(250)}, ttl=0.2)
    cache.set_many({f"live{i}": i for i in range(10)}, ttl=3600)
    cache.set("forever", 1)
    time.sleep(0.3)
    assert (cache.stats()["entries"], cache.stats()["expired"]) == (11, 250)
    statements = []
    run_one = cache._execute

    def count(statement, params, consume):
        statements.append(statement)
        return run_one(statement, params, consume)

    cache._execute = count
    try:
        assert cache.cleanup(batch_size=100) == 250
    finally:
        del cache._execute
    assert len(statements) == 3  # 100 + 100 + 50: bounded batches, not one giant DELETE
    assert (cache.stats()["entries"], cache.stats()["expired"]) == (11, 0)
    assert cache.cleanup() == 0
    with pytest.raises(ValueError, match="batch_size"):
        cache.cleanup(batch_size=0)


def test_get_or_set_computes_once(cache):
    calls = []

    def compute():
        calls.append(1)
        return {"computed": True}

    assert cache.get_or_set("g", compute, ttl=60) == {"computed": True}
    assert cache.get_or_set("g", compute, ttl=60) == {"computed": True}
    assert len(calls) == 1
    assert cache.get_or_set("n", lambda: None) is None
    assert cache.get_or_set("n", lambda: 1 / 0) is None  # a cached None is a hit


def test_cached_decorator(cache):
    calls = []

    @cache.cached(ttl=60)
    def square(x, *, offset=0):
        calls.append(x)
        return x * x + offset

    assert square(4) == 16 and square(4) == 16 and square(5) == 25
    assert square(4, offset=1) == 17
    assert calls == [4, 5, 4]

    @cache.cached(key=lambda user: f"profile:{user}")
    def profile(user):
        return {"user": user}

    assert profile("ann") == {"user": "ann"}
    assert cache.get("profile:ann") == {"user": "ann"}


def test_bad_bind_and_user_id(engine):
    with pytest.raises(TypeError, match="Session, .*Connection or Engine"):
        Cache("postgresql://x")
    for user_id in ("", "a\x00b", 5):
        with pytest.raises(ValueError, match="user_id"):
            Cache(engine, user_id=user_id)


def test_repr_names_table(cache, schema):
    assert repr(cache) == f"<Cache {schema}.cache on Engine>"


def test_incr_amount_must_fit_in_64_bits(cache):
    for amount in (2**63, -(2**63) - 1, 2**70):
        with pytest.raises(ValueError, match="64-bit"):
            cache.incr("n", amount)
        with pytest.raises(ValueError, match="64-bit"):
            cache.decr("n", -amount)
    assert cache.exists("n") is False
    assert cache.incr("n", 2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize("value", [{1: "a"}, {True: 1}, {None: 1}, [1, (2, 3)], {"a": {"b": (1,)}},
                                   {"a": [1, {2: "x"}]}, {"s": {1, 2}}])
def test_nested_values_that_would_change_type_are_refused(cache, value):
    with pytest.raises(TypeError, match="cannot cache"):
        cache.set("k", value)
    assert cache.exists("k") is False


def test_nested_json_values_round_trip_exactly(cache):
    value = {"a": [1, 2.5, True, None, "x", {"b": []}], "c": {}}
    cache.set("k", value)
    assert cache.get("k") == value


def test_glob_escapes_inside_a_class_are_literal(cache):
    cache.set_many({"d": 1, "5": 2, "w": 3, "]": 4})
    assert cache.keys("[\\d]") == ["d"]
    assert cache.keys("[\\w5]") == ["5", "w"]
    assert cache.keys("[\\]]") == ["]"]


def test_keys_with_lone_surrogates_are_refused_clearly(cache):
    with pytest.raises(ValueError, match="surrogate"):
        cache.set("bad\ud800key", "v")


def test_errors_do_not_carry_cached_values(engine, schema):
    from sqlalchemy import text as sql_text

    with engine.begin() as connection:  # a constraint the table does not normally have, to force an error
        connection.execute(sql_text(f'ALTER TABLE "{schema}".cache ADD CONSTRAINT small CHECK (length(value) < 5)'))
    with pytest.raises(Exception) as raised:
        Cache(engine, schema=schema).set("k", "secret-token-123")
    chain, error = [], raised.value
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__
    assert all("secret-token-123" not in str(e) for e in chain)
    assert raised.value.__cause__ is not raised.value


def test_reads_use_the_primary_key_without_a_user_id(engine, cache, explain):
    # Regression: current_user (a `name`, collated "C") against the "default"-collated user_id kept the
    # index out, and every get and get_many scanned the whole table (3.5 ms at 50,000 rows).
    for batch in range(10):
        cache.set_many({f"row:{batch}:{i}": i for i in range(1000)})
    with engine.connect() as connection:
        connection.execute(text(f'ANALYZE "{cache.schema}".cache'))
        connection.commit()
    from fastpgcache.statements import text_array as _text_array

    # get_many of 10 keys: for 100 of these 10,000 rows PostgreSQL 15 rightly prefers a sequential scan.
    for statement, params in [(cache._s.get, {"k": "row:3:3"}), (cache._s.exists, {"k": "row:3:3"}),
                              (cache._s.get_many, {"ks": _text_array(f"row:3:{i}" for i in range(10))})]:
        plan = explain(cache, statement, params)
        assert "Seq Scan" not in plan and "user_id =" in plan.split("Index Cond:")[1], plan
    assert cache.get("row:3:3") == 3 and len(cache.get_many([f"row:3:{i}" for i in range(100)])) == 100


@pytest.mark.parametrize("frequency, remaining", [(3, 29), (0, 18)])
def test_cull_as_django_s_database_cache_does(engine, schema, frequency, remaining):
    # Django's own culling tests: 49 writes into a cache of MAX_ENTRIES 30 leave 29 (CULL_FREQUENCY 3)
    # or, for its DatabaseCache, 18 (0: empty the cache when a write finds it over the limit).
    cache = Cache(engine, schema=schema, cull_max_entries=30, cull_frequency=frequency)
    for i in range(1, 50):
        cache.set(f"cull{i}", "value", 1000)
    assert sum(cache.exists(f"cull{i}") for i in range(1, 50)) == remaining
    assert cache.stats()["entries"] == remaining
    if frequency:
        assert cache.exists("cull49") and not cache.exists("cull1")  # the oldest went first


def test_cull_removes_expired_entries_first_and_set_many_culls_too(engine, schema):
    cache = Cache(engine, schema=schema, cull_max_entries=10, cull_frequency=2)
    cache.set_many({f"old{i}": i for i in range(6)}, ttl=0.1)
    cache.set_many({f"live{i}": i for i in range(5)})
    time.sleep(0.2)
    cache.set("one-more", 1)  # 11 entries found: the 6 expired ones go, the live ones stay
    assert cache.stats()["entries"] == 6 and cache.stats()["expired"] == 0
    cache.set_many({f"batch{i}": i for i in range(10)})
    assert cache.stats()["entries"] == 16  # 16 found on the next write, which culls half, oldest first
    cache.set("after", 1)
    assert cache.stats()["entries"] == 9 and cache.exists("batch9") and not cache.exists("live0")
    with pytest.raises(ValueError, match="cull_frequency"):
        Cache(engine, schema=schema, cull_max_entries=10, cull_frequency=-1)


@pytest.mark.parametrize("stored", ["05", " 5", "5 ", "+5", "-0", "\t5\n", "0x10", "1_000", "0o17", "0b101", "5.0",
                                    "99999999999999999999", "", "١٢"])
def test_incr_takes_only_canonical_decimal_integers_as_redis_does(cache, stored):
    cache.set("n", stored)
    with pytest.raises(ValueError, match="not an integer|overflows"):
        cache.incr("n")
    assert cache.get("n") == stored  # unchanged


@pytest.mark.parametrize("stored, result", [("5", 6), ("-5", -4), ("0", 1), (5, 6), ("9223372036854775806", 2**63 - 1)])
def test_incr_of_canonical_integers(cache, stored, result):
    cache.set("n", stored)
    assert cache.incr("n") == result


def test_a_list_that_contains_itself_is_refused_with_a_clear_error(cache):
    looped = [1]
    looped.append(looped)
    with pytest.raises(ValueError, match="contains itself"):
        cache.set("loop", looped)
    assert cache.get("loop") is None


def test_json_with_surrounding_blanks_written_by_another_client_reads_back(cache, engine, schema):
    cache.set("k", "placeholder")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {schema}.cache SET value = convert_to(' [1, 2] ', 'UTF8'), flags = 2 "
                             "WHERE key = 'k'")
    assert cache.get("k") == [1, 2]
