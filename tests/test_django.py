"""The Django backend against a real PostgreSQL: the generic behaviours every Django cache backend
shows (Django's BaseCacheTests) that apply to a shared, persistent cache, plus setup and configuration."""
from __future__ import annotations

import asyncio
import io
import pickle
import re
import threading
import time
import uuid
import warnings
import zlib

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from fastpgcache import escape_glob, setup_cache

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402
from django.core import signals  # noqa: E402
from django.core.cache.backends.base import BaseCache, CacheKeyWarning, InvalidCacheKey  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.management import CommandError, call_command  # noqa: E402

from fastpgcache.contrib.django import FastPgCache  # noqa: E402

BACKEND = "fastpgcache.contrib.django.FastPgCache"


def reversed_key(key, key_prefix, version):
    """A KEY_FUNCTION different from Django's default."""
    return f"CUSTOM-{key_prefix}-{version}-{key}"[::-1]


def object_key(key, key_prefix, version):
    """A KEY_FUNCTION returning something no cache can use as a key."""
    return object()


class UnbuildableCache(BaseCache):
    """Stands for a backend whose client library this process lacks: building it fails."""

    def __init__(self, location, params):
        raise RuntimeError("this backend needs a client library that is not installed")


@pytest.fixture(scope="module")
def django_schemas(engine, pg_url):
    """Django configured once: several aliases on one cache table, one alias whose table does not exist yet,
    and two culling aliases with Django's test settings, each on a table of its own (culling counts every
    entry of the role in its table)."""
    shared, fresh = f"dj_{uuid.uuid4().hex[:10]}", f"djnew_{uuid.uuid4().hex[:10]}"
    cull, zero_cull = f"djcull_{uuid.uuid4().hex[:10]}", f"djzero_{uuid.uuid4().hex[:10]}"
    for name in (shared, cull, zero_cull):
        setup_cache(engine=engine, schema=name)

    def alias(schema=shared, options=None, **extra):
        return {"BACKEND": BACKEND, "LOCATION": pg_url, "OPTIONS": {"schema": schema, **(options or {})}, **extra}

    caches = {
        "default": alias(),
        "prefix": alias(KEY_PREFIX="cacheprefix"),
        "v2": alias(VERSION=2),
        "custom_key": alias(KEY_FUNCTION=reversed_key),
        "custom_key2": alias(KEY_FUNCTION=f"{__name__}.reversed_key"),
        "object_key": alias(KEY_FUNCTION=object_key),
        "short": alias(TIMEOUT=1),
        "forever": alias(TIMEOUT=None),
        "fresh": alias(fresh),
        "cull": alias(cull, {"MAX_ENTRIES": 30}),
        "zero_cull": alias(zero_cull, {"MAX_ENTRIES": 30, "CULL_FREQUENCY": 0}),
        "local": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "unbuildable": {"BACKEND": f"{__name__}.UnbuildableCache"},
    }
    if not settings.configured:
        settings.configure(CACHES=caches, INSTALLED_APPS=["fastpgcache.contrib.django_app"], USE_TZ=True,
                           SECRET_KEY="tests-only-" + uuid.uuid4().hex)
        django.setup()
    yield shared, fresh, cull, zero_cull
    with engine.begin() as connection:
        for name in (shared, fresh, cull, zero_cull):
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@pytest.fixture
def caches(django_schemas):
    from django.core.cache import caches

    yield caches
    caches["default"].clear()


@pytest.fixture
def cache(caches):
    return caches["default"]


# -- basic operations ------------------------------------------------------------------

def test_set_get_and_stored_none_is_a_value(cache):
    cache.set("key", "value")
    assert cache.get("key") == "value"
    cache.set("none", None)
    assert cache.get("none", "default") is None
    assert cache.has_key("none")
    assert cache.get("missing") is None
    assert cache.get("missing", "default") == "default"


def test_add_only_when_absent(cache):
    assert cache.add("addkey1", "value") is True
    assert cache.add("addkey1", "newvalue") is False
    assert cache.get("addkey1") == "value"


def test_prefixes_keep_caches_apart(caches):
    caches["default"].set("somekey", "value")
    assert not caches["prefix"].has_key("somekey")
    caches["prefix"].set("somekey", "other")
    assert caches["default"].get("somekey") == "value"
    assert caches["prefix"].get("somekey") == "other"


def test_get_many_returns_only_found_keys_and_accepts_iterators(cache):
    cache.set_many({"a": "a", "b": "b", "c": "c", "d": "d"})
    assert cache.get_many(["a", "c", "d"]) == {"a": "a", "c": "c", "d": "d"}
    assert cache.get_many(["a", "b", "e"]) == {"a": "a", "b": "b"}
    assert cache.get_many(iter(["a", "b", "e"])) == {"a": "a", "b": "b"}
    cache.set_many({"x": None, "y": 1})
    assert cache.get_many(["x", "y"]) == {"x": None, "y": 1}


def test_delete_reports_whether_a_key_was_there(cache):
    cache.set_many({"key1": "spam", "key2": "eggs"})
    assert cache.delete("key1") is True
    assert cache.get("key1") is None
    assert cache.get("key2") == "eggs"
    assert cache.delete("key1") is False


def test_has_key_and_in(cache):
    cache.set("hello1", "goodbye1")
    assert cache.has_key("hello1")
    assert "hello1" in cache
    assert not cache.has_key("goodbye1")
    assert "goodbye1" not in cache


def test_incr_and_decr_are_atomic_and_keep_missing_keys_missing(cache):
    cache.set("answer", 41)
    assert cache.incr("answer") == 42
    assert cache.get("answer") == 42
    assert cache.incr("answer", 10) == 52
    assert cache.incr("answer", -10) == 42
    assert cache.decr("answer") == 41
    assert cache.decr("answer", -10) == 51
    for operation in (cache.incr, cache.decr):
        with pytest.raises(ValueError, match="not found"):
            operation("does_not_exist")
        with pytest.raises(ValueError):
            operation("does_not_exist", -1)
    assert not cache.has_key("does_not_exist")
    cache.set("null", None)
    cache.set("word", "forty")
    cache.set("object", {1, 2})
    for key in ("null", "word", "object"):
        with pytest.raises(TypeError):
            cache.incr(key)
        with pytest.raises(TypeError):
            cache.decr(key)
    assert cache.get("object") == {1, 2}


def test_incr_keeps_the_timeout(cache):
    cache.set("counter", 1, timeout=100)
    cache.incr("counter")
    assert 98 <= cache.store.ttl(cache.make_key("counter")) <= 100


def test_incr_from_many_threads_loses_no_update(cache):
    cache.set("hits", 0)

    def hit():
        for _ in range(25):
            cache.incr("hits")

    threads = [threading.Thread(target=hit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.get("hits") == 100


class Point:
    """A plain object: only a pickling backend can store it."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def test_values_of_any_picklable_type_round_trip(cache):
    values = {
        "string": "this is a string",
        "int": 42,
        "bool": True,
        "float": 1.5,
        "list": [1, 2, 3, 4],
        "tuple": ("a", 1),
        "set": {1, 2},
        "dict": {"A": 1, "B": 2, 3: (4,)},
        "function": reversed_key,
        "class": Point,
        "object": Point(1, 2),
    }
    cache.set("data", values)
    assert cache.get("data") == values
    for key, value in values.items():
        cache.set(key, value)
        assert cache.get(key) == value and type(cache.get(key)) is type(value)


def test_unicode_keys_and_values(cache):
    stuff = {
        "ascii": "ascii_value",
        "unicode_ascii": "Iñtërnâtiônàlizætiøn1",
        "Iñtërnâtiônàlizætiøn": "Iñtërnâtiônàlizætiøn2",
        "ascii2": {"x": 1},
        "クッキー": "日本語 🍪",
    }
    for key, value in stuff.items():
        cache.set(key, value)
        assert cache.get(key) == value
        assert cache.delete(key)
        assert cache.add(key, value)
        assert cache.get(key) == value
    cache.delete_many(stuff)
    cache.set_many(stuff)
    assert cache.get_many(stuff) == stuff


def test_binary_strings(cache):
    compressed = zlib.compress(b"value to be compressed" * 100)
    for store in (cache.set, cache.add):
        cache.delete("binary")
        store("binary", compressed)
        assert zlib.decompress(cache.get("binary")) == b"value to be compressed" * 100
    cache.set_many({"binary1": compressed})
    assert cache.get_many(["binary1"]) == {"binary1": compressed}


def test_large_values_past_the_limit_are_not_stored_and_drop_the_old_value(cache, django_schemas, engine, caplog):
    big = bytes(range(256)) * 20_000  # 5 MB; the table takes at most 1 MiB per value by default
    cache.set("big", "small enough")
    with caplog.at_level("WARNING", logger="fastpgcache"):
        cache.set("big", {"payload": big})  # as memcached: not stored, and no stale value left behind
    assert cache.get("big") is None and "not stored" in caplog.text
    assert cache.add("big", {"payload": big}) is False
    assert cache.set_many({"big": {"payload": big}, "fine": 1}) == ["big", "fine"]
    setup_cache(engine=engine, schema=django_schemas[0], max_value_bytes=10_000_000)
    try:
        cache.set("big", {"payload": big})
        assert cache.get("big")["payload"] == big
    finally:
        setup_cache(engine=engine, schema=django_schemas[0], max_value_bytes=1024 * 1024)


def test_unpicklable_values_raise_pickle_errors(cache):
    class Unpicklable:
        def __getstate__(self):
            raise pickle.PickleError("no")

    with pytest.raises(pickle.PickleError):
        cache.set("unpicklable", Unpicklable())
    with pytest.raises(pickle.PickleError):
        cache.add("unpicklable", Unpicklable())
    assert not cache.has_key("unpicklable")


# -- batches and clear ---------------------------------------------------------------------

def test_set_many_returns_no_failed_keys_and_empty_data_is_fine(cache):
    assert cache.set_many({"key1": "spam", "key2": "eggs"}) == []
    assert cache.get_many(["key1", "key2"]) == {"key1": "spam", "key2": "eggs"}
    assert cache.set_many({}) == []


def test_set_many_timeout(cache):
    cache.set_many({"key1": "spam", "key2": "eggs"}, 100)
    assert 99 <= cache.store.ttl(cache.make_key("key2")) <= 100
    cache.set_many({"key1": "spam"}, None)
    assert cache.store.ttl(cache.make_key("key1")) == -1


def test_delete_many(cache):
    cache.set_many({"key1": "spam", "key2": "eggs", "key3": "ham"})
    cache.delete_many(["key1", "key2"])
    assert cache.get_many(["key1", "key2", "key3"]) == {"key3": "ham"}
    cache.delete_many([])  # nothing to do, and no error
    cache.delete_many(["nonexistent"])
    assert cache.get("key3") == "ham"


def test_clear_removes_every_prefix_and_version(caches):
    caches["default"].set("key1", "spam")
    caches["prefix"].set("key2", "eggs")
    caches["v2"].set("key3", "ham")
    caches["default"].clear()
    assert caches["default"].get("key1") is None
    assert caches["prefix"].get("key2") is None
    assert caches["v2"].get("key3") is None


def test_without_max_entries_or_cull_frequency_nothing_is_culled(cache):
    cache.set_many({f"cull{i}": i for i in range(400)})  # more than Django's default MAX_ENTRIES of 300
    cache.set("one_more", 1)
    assert len(cache.get_many([f"cull{i}" for i in range(400)])) == 400


def entries_left_after_django_s_cull_test(cache) -> int:
    """Django's own culling test: keys 1..49 set one by one, then how many are still there."""
    cache.clear()
    for i in range(1, 50):
        cache.set(f"cull{i}", "value", 1000)
    return sum(cache.has_key(f"cull{i}") for i in range(1, 50))


def test_max_entries_culls_a_third_as_django_s_database_cache_does(caches):
    # 31 entries: the 32nd write culls 10 (oldest first) and adds one: 22; at 31 again the 42nd does; 49 -> 29.
    assert entries_left_after_django_s_cull_test(caches["cull"]) == 29
    assert caches["cull"].has_key("cull49") and not caches["cull"].has_key("cull1")  # the oldest went


def test_cull_frequency_zero_empties_the_cache_as_django_s_database_cache_does(caches):
    # The 32nd write finds 31 entries and empties the cache; keys 32..49 remain (Django's DBCacheTests: 18).
    assert entries_left_after_django_s_cull_test(caches["zero_cull"]) == 18
    assert caches["zero_cull"].get_many([f"cull{i}" for i in (31, 32, 49)]) == {"cull32": "value",
                                                                               "cull49": "value"}


def test_culling_removes_expired_entries_first(caches):
    cull = caches["cull"]
    cull.clear()
    cull.set_many({f"old{i}": i for i in range(25)}, timeout=1000)
    cull.set_many({f"brief{i}": i for i in range(6)}, timeout=0.3)
    time.sleep(0.5)
    cull.set("trigger", 1)  # 31 entries, 6 of them expired: those go, 25 are left, so nothing else does
    assert len(cull.get_many([f"old{i}" for i in range(25)])) == 25
    assert cull.store.stats()["entries"] == 26 and cull.store.stats()["expired"] == 0


def test_add_and_set_many_cull_too_and_cull_frequency_alone_keeps_django_s_max_entries(django_schemas, pg_url,
                                                                                      engine):
    backend = FastPgCache(pg_url, {"OPTIONS": {"schema": django_schemas[3], "CULL_FREQUENCY": "0"}})
    backend.clear()
    backend.set_many({f"k{i}": i for i in range(301)})  # found 0 entries: nothing culled, 301 now
    assert backend.add("added", 1) is True  # found 301 > 300 (Django's default MAX_ENTRIES): emptied first
    assert backend.store.stats()["entries"] == 1 and backend.get("added") == 1
    backend.set_many({f"k{i}": i for i in range(300)})
    backend.set_many({"a": 1, "b": 2})  # found 301: emptied, then the batch written
    assert backend.get_many(["a", "b", "k0"]) == {"a": 1, "b": 2}
    backend.clear()


# -- timeouts ------------------------------------------------------------------------------

def test_expiration(cache):
    cache.set("expire1", "very quickly", 0.3)
    cache.set("expire2", "very quickly", 0.3)
    cache.set("expire3", "very quickly", 0.3)
    time.sleep(0.5)
    assert cache.get("expire1") is None
    assert cache.add("expire2", "newvalue") is True
    assert cache.get("expire2") == "newvalue"
    assert not cache.has_key("expire3")
    with pytest.raises(ValueError):
        cache.incr("expire3")


def test_default_timeout_comes_from_settings(caches):
    caches["default"].set("k", 1)
    assert 299 <= caches["default"].store.ttl(caches["default"].make_key("k")) <= 300
    caches["forever"].set("k2", 1)
    assert caches["forever"].store.ttl(caches["forever"].make_key("k2")) == -1
    caches["short"].set("k3", 1)
    assert caches["short"].store.ttl(caches["short"].make_key("k3")) == 1


def test_forever_timeout(cache):
    cache.set("key1", "eggs", None)
    assert cache.get("key1") == "eggs"
    assert cache.store.ttl(cache.make_key("key1")) == -1
    assert cache.add("key2", "ham", None) is True
    assert cache.add("key1", "new eggs", None) is False
    assert cache.get("key1") == "eggs"
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, None)
    assert cache.get("key4") == "lobster bisque"
    cache.set("key5", "belgian fries", timeout=1)
    assert cache.touch("key5", timeout=None) is True
    assert cache.store.ttl(cache.make_key("key5")) == -1
    assert cache.touch("key5", timeout=None) is True  # already persistent: still touched


def test_zero_and_negative_timeouts_expire_at_once(cache):
    for timeout in (0, -1):
        cache.set("key1", "eggs", timeout)
        assert cache.get("key1") is None
        assert cache.add("key2", "ham", timeout) is True
        assert cache.get("key2") is None
        cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, timeout)
        assert cache.get_many(["key3", "key4"]) == {}
        cache.set("key5", "belgian fries", timeout=1)
        assert cache.touch("key5", timeout=timeout) is True
        assert cache.get("key5") is None
    cache.set("old", "value")
    cache.set("old", "replaced", 0)
    assert not cache.has_key("old")
    cache.set("kept", "value")
    assert cache.add("kept", "other", 0) is False
    assert cache.get("kept") == "value"


def test_long_and_float_timeouts_are_relative(cache):
    cache.set("key1", "eggs", 60 * 60 * 24 * 30 + 1)  # memcached would read this as a timestamp
    assert cache.get("key1") == "eggs"
    assert cache.add("key2", "ham", 60 * 60 * 24 * 30 + 1) is True
    cache.set("key3", "spam", 100.2)
    assert cache.get("key3") == "spam"
    month = 60 * 60 * 24 * 30 + 1
    assert month - 1 <= cache.store.ttl(cache.make_key("key1")) <= month  # from now, not since 1970
    assert month - 1 <= cache.store.ttl(cache.make_key("key2")) <= month
    assert cache.store.ttl(cache.make_key("key3")) == 101  # rounded up


def test_touch(cache):
    cache.set("expire1", "very quickly", timeout=1)
    assert cache.touch("expire1", timeout=4) is True
    assert cache.store.ttl(cache.make_key("expire1")) == 4
    assert cache.touch("expire1") is True
    assert 299 <= cache.store.ttl(cache.make_key("expire1")) <= 300
    assert cache.touch("nonexistent") is False
    assert cache.touch("nonexistent", timeout=None) is False


# -- keys ----------------------------------------------------------------------------------

def test_keys_longer_than_memcached_allows_warn_but_work(cache):
    key = "a" * 251
    with pytest.warns(CacheKeyWarning, match="longer than 250"):
        cache.set(key, "value")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheKeyWarning)
        assert cache.get(key) == "value"


def test_keys_with_spaces_warn_but_work(cache):
    with pytest.warns(CacheKeyWarning, match="memcached"):
        cache.set("key with spaces", "value")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheKeyWarning)
        assert cache.get("key with spaces") == "value"


@pytest.mark.parametrize("key", ["nul\x00key", "é" * 600, "k" * 5000, "ends~sha256:" + "0" * 64])
def test_keys_the_table_cannot_hold_work_in_digest_form(cache, key):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheKeyWarning)
        assert cache.add(key, 1) is True and cache.get(key) == 1 and cache.has_key(key)
        assert cache.incr(key, 2) == 3 and cache.touch(key, 100) is True
        cache.set_many({key: "batch", "plain": "p"})
        assert cache.get_many([key, "plain"]) == {key: "batch", "plain": "p"}
        cache.delete_many([key])
        assert cache.get(key, "gone") == "gone"
        cache.set(key, {"v": 1})
        stored = cache.make_key(key)
    assert cache.store.get(stored, parse_json=False) is not None  # make_key names what the table holds
    assert stored != f":1:{key}" and len(stored.encode()) <= 1024 and "\x00" not in stored
    assert stored.startswith(f":1:{key}"[:100].replace("\x00", "\ufffd"))  # a readable start...
    assert re.fullmatch(r".*~sha256:[0-9a-f]{64}", stored)  # ...and the digest of the whole key
    cache.delete("plain")
    assert cache.store.keys(escape_glob(":1:") + "*") == [stored]


@pytest.mark.filterwarnings("ignore::django.core.cache.backends.base.CacheKeyWarning")
def test_distinct_keys_never_share_a_digest_form(cache):
    long_one = "p" * 2000
    impostor = cache.make_key(long_one)[len(":1:"):]  # a key spelled as the other's stored form
    cache.set(long_one, "long")
    cache.set(impostor, "impostor")
    assert cache.get(long_one) == "long" and cache.get(impostor) == "impostor"
    assert cache.make_key(impostor) != cache.make_key(long_one)


def test_portability_warnings_are_about_django_s_key_not_its_stored_form(cache):
    with pytest.warns(CacheKeyWarning, match="characters that will cause errors"):
        cache.set("nul\x00key", 1)  # stored without the NUL, still warned about as memcached would be


def test_a_key_function_returning_no_key_is_refused(caches):
    with pytest.raises(InvalidCacheKey, match="invalid key type object"):
        caches["object_key"].set("k", 1)


def test_custom_key_functions(caches):
    caches["custom_key"].set("answer1", 42)
    assert caches["default"].get("answer1") is None
    assert caches["custom_key"].get("answer1") == 42
    assert caches["custom_key2"].get("answer1") == 42  # the same function, named by a dotted path
    assert caches["custom_key"].store.exists(reversed_key("answer1", "", 1))


# -- versions ------------------------------------------------------------------------------

def test_versions_are_separate_keys(caches):
    cache, v2 = caches["default"], caches["v2"]
    cache.set("answer1", 42)
    assert cache.get("answer1") == 42
    assert cache.get("answer1", version=1) == 42
    assert cache.get("answer1", version=2) is None
    assert v2.get("answer1") is None
    assert v2.get("answer1", version=1) == 42
    v2.set("answer2", 42)
    assert cache.get("answer2") is None
    assert cache.get("answer2", version=2) == 42
    assert cache.add("answer2", 37) is True
    assert cache.add("answer2", 37, version=2) is False
    assert cache.has_key("answer2", version=2)
    assert cache.delete("answer2", version=2)
    assert v2.get("answer2") is None
    assert cache.get("answer2") == 37


def test_versions_in_batches_and_counters(caches):
    cache, v2 = caches["default"], caches["v2"]
    cache.set_many({"ford1": 37, "arthur1": 42})
    assert cache.get_many(["ford1", "arthur1"], version=2) == {}
    assert v2.get_many(["ford1", "arthur1"], version=1) == {"ford1": 37, "arthur1": 42}
    cache.set("answer", 1)
    cache.set("answer", 2, version=2)
    assert cache.incr("answer", version=2) == 3
    assert cache.get("answer") == 1
    assert v2.decr("answer") == 2
    cache.delete_many(["ford1", "arthur1"], version=1)
    assert v2.get_many(["ford1", "arthur1"], version=1) == {}


def test_incr_and_decr_version(caches):
    cache = caches["default"]
    cache.set("answer", 42, version=2)
    assert cache.incr_version("answer", version=2) == 3
    assert cache.get("answer", version=2) is None
    assert cache.get("answer", version=3) == 42
    assert cache.decr_version("answer", version=3) == 2
    assert cache.get("answer", version=2) == 42
    with pytest.raises(ValueError):
        cache.incr_version("does_not_exist")


def test_get_or_set(cache):
    assert cache.get_or_set("projector", 42) == 42
    assert cache.get_or_set("projector", 43) == 42
    assert cache.get_or_set("callable", lambda: "computed") == "computed"
    assert cache.get_or_set("callable", lambda: "again") == "computed"
    assert cache.get_or_set("none", None) is None
    assert cache.has_key("none")
    assert cache.get_or_set("brian", 1979, version=2) == 1979
    assert cache.get("brian", version=1) is None


def test_async_methods(cache):
    async def scenario():
        await cache.aset("async", 1)
        await cache.aincr("async", 2)
        return await cache.aget("async"), await cache.ahas_key("async")

    assert asyncio.run(scenario()) == (3, True)


# -- wiring, close(), configuration ------------------------------------------------------------

def test_backends_of_one_location_share_one_engine(caches, pg_url):
    from_thread = []
    thread = threading.Thread(target=lambda: from_thread.append(caches["default"]))
    thread.start()
    thread.join()
    assert from_thread[0] is not caches["default"]  # Django builds a backend per thread...
    assert from_thread[0].store.bind is caches["default"].store.bind is caches["v2"].store.bind  # ...one pool


def test_close_and_the_request_finished_signal_leave_the_cache_usable(cache):
    cache.set("survives", 1)
    cache.close()
    signals.request_finished.send(sender=None)
    assert cache.get("survives") == 1
    cache.set("after", 2)
    assert cache.get("after") == 2


def test_cache_entries_are_readable_by_plain_cache_with_the_secret_key(cache, django_schemas, engine):
    from fastpgcache import Cache

    cache.set("shared", {"a": (1, 2)})
    plain = Cache(engine, schema=django_schemas[0], pickle=settings.SECRET_KEY)
    assert plain.get(cache.make_key("shared")) == {"a": (1, 2)}
    assert Cache(engine, schema=django_schemas[0], pickle="another-key-0123456789").get(cache.make_key("shared")) \
        is None  # signed under SECRET_KEY: under any other key it is a miss, never unpickled


@pytest.mark.parametrize("options, message", [
    ({"shcema": "x"}, r"unknown fastpgcache OPTIONS \['shcema'\]"),
    ({"max_entires": 10}, "Accepted: schema: "),
    ({"MAX_ENTRIES": 0}, "MAX_ENTRIES must be a whole number >= 1, got 0"),
    ({"MAX_ENTRIES": "lots"}, "MAX_ENTRIES must be a whole number >= 1, got 'lots'"),
    ({"MAX_ENTRIES": True}, "MAX_ENTRIES must be"),
    ({"CULL_FREQUENCY": -1}, "CULL_FREQUENCY must be a whole number >= 0, got -1"),
    ({"CULL_FREQUENCY": 2.5}, "CULL_FREQUENCY must be"),
    ({"guard": "yes"}, "guard must be True or False"),
])
def test_unknown_options_and_bad_values_are_refused(django_schemas, pg_url, options, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        FastPgCache(pg_url, {"OPTIONS": options})


@pytest.mark.parametrize("options, message", [
    ({"statement_timeout": 0}, "statement_timeout must be a positive number of seconds"),
    ({"lock_timeout": "1s"}, "lock_timeout must be a positive number of seconds"),
])
def test_bad_timeouts_are_refused(django_schemas, pg_url, options, message):
    with pytest.raises(ValueError, match=message):
        FastPgCache(pg_url, {"OPTIONS": options})


def test_location_must_be_a_postgresql_url(django_schemas):
    with pytest.raises(ImproperlyConfigured, match="LOCATION"):
        FastPgCache("", {})
    with pytest.raises(ValueError, match=r"postgresql\+psycopg2:// or postgresql\+psycopg:// URL"):
        FastPgCache("sqlite:///cache.db", {})


def test_password_stays_out_of_reprs_and_errors(django_schemas):
    from fastpgcache import CacheConnectionError

    backend = FastPgCache("postgresql://app:s3cret-pw@127.0.0.1:1/app", {"OPTIONS": {"schema": "s"}})
    assert repr(backend) == "<FastPgCache <Cache s.cache on Engine>>"
    assert repr(backend.store) == "<Cache s.cache on Engine>"
    with pytest.raises(CacheConnectionError) as raised:
        backend.get("k")
    assert "s3cret-pw" not in str(raised.value) and "s3cret-pw" not in repr(raised.value)


def test_missing_table_says_how_to_create_it(django_schemas, pg_url):
    from fastpgcache import CacheNotSetUpError

    backend = FastPgCache(pg_url, {"OPTIONS": {"schema": f"absent_{uuid.uuid4().hex[:8]}"}})
    with pytest.raises(CacheNotSetUpError, match="fastpgcache-admin"):
        backend.get("anything")


# -- manage.py setup_fastpgcache -----------------------------------------------------------------

def test_setup_command_creates_the_missing_table(caches, django_schemas):
    with pytest.raises(CommandError, match="not set up"):
        call_command("setup_fastpgcache", "fresh", "--check", stdout=io.StringIO())
    out = io.StringIO()
    call_command("setup_fastpgcache", stdout=out)
    assert f"cache 'fresh': {django_schemas[1]}.cache ready (UNLOGGED" in out.getvalue()
    assert f"cache 'default': {django_schemas[0]}.cache ready" in out.getvalue()
    assert f"cache 'cull': {django_schemas[2]}.cache ready" in out.getvalue()  # MAX_ENTRIES is no obstacle
    assert f"cache 'zero_cull': {django_schemas[3]}.cache ready" in out.getvalue()
    assert "local" not in out.getvalue() and "unbuildable" not in out.getvalue()  # skipped, not even built
    caches["fresh"].set("now", "works")
    assert caches["fresh"].get("now") == "works"
    check = io.StringIO()
    call_command("setup_fastpgcache", "fresh", "--check", stdout=check)
    assert "ready" in check.getvalue()


def test_setup_command_refuses_other_backends_and_unknown_aliases(django_schemas):
    with pytest.raises(CommandError, match="does not use fastpgcache"):
        call_command("setup_fastpgcache", "local")
    with pytest.raises(CommandError, match="'unbuildable' does not use fastpgcache"):
        call_command("setup_fastpgcache", "unbuildable")
    with pytest.raises(CommandError, match="no cache 'nope'"):
        call_command("setup_fastpgcache", "nope")


def test_failsafe_option_turns_an_outage_into_misses(django_schemas):
    from fastpgcache import CacheConnectionError

    down = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens on port 1
    backend = FastPgCache(down, {"OPTIONS": {"failsafe": True}})
    assert backend.get("k", "default") == "default"
    assert backend.add("k", 1) is False
    assert backend.has_key("k") is False
    assert backend.get_many(["k"]) == {}
    with pytest.raises(ValueError, match="not found"):  # a failed incr counts nothing: a miss
        backend.incr("k")
    with pytest.raises(ValueError, match="not found"):
        backend.decr("k")
    assert backend.set_many({"k": 1, "j": 2}) == ["k", "j"]  # Django: the keys that failed
    assert backend.set_many({"k": 1, "j": 2}, timeout=0) == ["k", "j"]  # the delete failed too
    assert backend.set_many({}) == []
    with pytest.raises(CacheConnectionError):
        FastPgCache(down, {}).get("k")


def test_max_entries_is_an_opt_in_cap(django_schemas, pg_url, engine):
    schema = f"djcap_{uuid.uuid4().hex[:8]}"
    setup_cache(engine=engine, schema=schema)
    try:
        backend = FastPgCache(pg_url, {"OPTIONS": {"schema": schema, "max_entries": 10, "expire_every": 1}})
        for i in range(30):
            backend.set(f"k{i}", i)
        assert backend.store.stats()["entries"] <= 11
        assert backend.get("k29") == 29  # the newest stay; the oldest went first
        assert backend.get("k0") is None
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def test_setup_command_names_the_alias_whose_options_are_wrong(django_schemas, pg_url):
    from django.test import override_settings

    bad = {"BACKEND": BACKEND, "LOCATION": pg_url, "OPTIONS": {"schema": django_schemas[0], "MAX_ENTRIES": "many"}}
    local = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    with override_settings(CACHES={"default": bad, "local": local}):
        with pytest.raises(CommandError, match="cache 'default': OPTIONS MAX_ENTRIES must be a whole number"):
            call_command("setup_fastpgcache", stdout=io.StringIO())


def test_setup_command_runs_the_migrations_without_the_backend_s_statement_timeout(caches, monkeypatch):
    from fastpgcache.contrib.django_app.management.commands import setup_fastpgcache

    seen, real_setup = [], setup_fastpgcache.setup_cache

    def recording_setup(engine, **options):
        with engine.connect() as connection:
            seen.append(connection.exec_driver_sql("SHOW statement_timeout").scalar())
        return real_setup(engine=engine, **options)

    monkeypatch.setattr(setup_fastpgcache, "setup_cache", recording_setup)
    call_command("setup_fastpgcache", "default", stdout=io.StringIO())
    assert seen == ["0"]  # a long ALTER TABLE ... SET LOGGED is not cut off at 5 s
    assert timeouts_of(caches["default"]) == ("5s", "1s")  # the backend itself keeps its limits


# -- timeouts on the shared Engine ----------------------------------------------------------------

def timeouts_of(backend) -> tuple[str, str]:
    """statement_timeout and lock_timeout as the server reports them on the backend's connections."""
    with backend.store.bind.connect() as connection:
        return (connection.exec_driver_sql("SHOW statement_timeout").scalar(),
                connection.exec_driver_sql("SHOW lock_timeout").scalar())


def test_connections_get_fastpgcache_s_timeouts_unless_options_say_otherwise(django_schemas, pg_url):
    schema = {"schema": django_schemas[0]}
    assert timeouts_of(FastPgCache(pg_url, {"OPTIONS": schema})) == ("5s", "1s")
    chosen = FastPgCache(pg_url, {"OPTIONS": {**schema, "statement_timeout": 2.5, "lock_timeout": 0.2}})
    assert timeouts_of(chosen) == ("2500ms", "200ms")
    server_s = FastPgCache(pg_url, {"OPTIONS": {**schema, "statement_timeout": None, "lock_timeout": None}})
    assert timeouts_of(server_s) == ("0", "0")
    assert chosen.store.bind is not server_s.store.bind  # an Engine per set of timeouts
    in_url = make_url(pg_url).update_query_dict({"options": "-c statement_timeout=7000"})
    from_url = FastPgCache(in_url.render_as_string(hide_password=False), {"OPTIONS": schema})
    assert timeouts_of(from_url) == ("7s", "1s")  # a timeout the URL sets is the URL's to decide
    connect_args = {"connect_args": {"options": "-c lock_timeout=3000 -c deadlock_timeout=2000"}}
    from_engine_options = FastPgCache(pg_url, {"OPTIONS": {**schema, "engine_options": connect_args}})
    assert timeouts_of(from_engine_options) == ("5s", "3s")


def test_a_write_stuck_behind_a_row_lock_gives_up_after_lock_timeout(django_schemas, pg_url, engine):
    from fastpgcache import CacheTimeoutError

    backend = FastPgCache(pg_url, {"OPTIONS": {"schema": django_schemas[0], "lock_timeout": 0.2}})
    backend.set("locked", 1)
    with engine.connect() as holder, holder.begin():
        holder.execute(text(f'SELECT 1 FROM "{django_schemas[0]}".cache WHERE key = :k FOR UPDATE'),
                       {"k": backend.make_key("locked")})
        started = time.monotonic()
        with pytest.raises(CacheTimeoutError, match="lock_timeout"):
            backend.set("locked", 2)
        assert time.monotonic() - started < 1.0  # 0.2 s, not the 1 s default nor for ever
    assert backend.get("locked") == 1


# -- the negative-lookup guard --------------------------------------------------------------------

@pytest.fixture
def guarded_options(django_schemas, schema):
    """OPTIONS turning the guard on, for a table of the test's own; the shared guard is stopped afterwards."""
    options = {"OPTIONS": {"schema": schema, "guard": True}}
    yield options
    from fastpgcache.contrib import _guards

    for guard in list(_guards.values()):
        if guard.where == f"{schema}.cache":
            guard.stop()


def test_guard_option_answers_absent_keys_without_a_round_trip(pg_url, guarded_options, record_statements):
    backend = FastPgCache(pg_url, guarded_options)
    others = [FastPgCache(pg_url, guarded_options)]
    thread = threading.Thread(target=lambda: others.append(FastPgCache(pg_url, guarded_options)))
    thread.start()
    thread.join()
    guard = backend.store.guard
    assert all(other.store.guard is guard for other in others)  # one guard per process for the table and role
    assert guard.wait_until_trusted(10)
    backend.set("present", 1)
    sent = record_statements(backend.store.bind)
    assert [backend.get(f"absent{i}") for i in range(20)] == [None] * 20
    assert not backend.has_key("absent") and backend.get_many(["absent1", "absent2"]) == {}
    assert sent == []  # not one statement
    assert backend.get("present") == 1 and len(sent) == 1  # a present key is read: one statement, recorded
    assert others[0].get("present") == 1  # another instance's write is known at once
    assert backend.store.stats()["guard_skips"] >= 22


def test_guard_option_still_sees_another_process_s_write(pg_url, schema, guarded_options, write_from_another_process):
    backend = FastPgCache(pg_url, guarded_options)
    assert backend.store.guard.wait_until_trusted(10)
    assert backend.get("elsewhere") is None
    write_from_another_process(schema, backend.make_key("elsewhere"))
    deadline = time.monotonic() + 5
    while backend.get("elsewhere") is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert backend.get("elsewhere") == "from another process"
    assert backend.store.guard.state == "trusted"


def test_without_the_guard_option_there_is_no_guard(cache):
    assert cache.store.guard is None and cache.store.stats()["guard"] == "off"
