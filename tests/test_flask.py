"""The Flask-Caching backend, and Cache(db.session) joining a Flask-SQLAlchemy request's transaction."""
from __future__ import annotations

import re
import time
import uuid

import pytest
from sqlalchemy import text

flask = pytest.importorskip("flask")
flask_caching = pytest.importorskip("flask_caching")
flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")

from fastpgcache import Cache  # noqa: E402
from fastpgcache.contrib.flask import FastPgCache  # noqa: E402

BACKEND = "fastpgcache.contrib.flask.FastPgCache"


def make_app(pg_url, schema, **config):
    app = flask.Flask(f"app_{uuid.uuid4().hex[:6]}")
    app.config.update(CACHE_TYPE=BACKEND, CACHE_FASTPGCACHE_URL=pg_url, SECRET_KEY="tests-only-" + uuid.uuid4().hex,
                      **config)
    if schema is not None:
        app.config["CACHE_FASTPGCACHE_SCHEMA"] = schema
    return app


@pytest.fixture
def app(pg_url, schema):
    return make_app(pg_url, schema)


@pytest.fixture
def views(app):
    return flask_caching.Cache(app)


@pytest.fixture
def backend(views, app):
    return views.cache


def test_cache_type_setting_builds_this_backend(backend, schema):
    assert isinstance(backend, FastPgCache)
    assert backend.store.schema == schema
    assert backend.key_prefix == "flask_cache_"  # Flask-Caching's default CACHE_KEY_PREFIX


def test_cached_view_runs_once_until_cleared(app, views):
    calls = []

    @app.get("/report")
    @views.cached(timeout=60)
    def report():
        calls.append(1)
        return {"calls": len(calls)}

    client = app.test_client()
    assert client.get("/report").get_json() == {"calls": 1}
    assert client.get("/report").get_json() == {"calls": 1}
    assert len(calls) == 1
    views.clear()
    assert client.get("/report").get_json() == {"calls": 2}


def test_memoize_and_delete_memoized(app, views):
    calls = []

    @views.memoize(timeout=60)
    def square(n):
        calls.append(n)
        return n * n

    with app.app_context():
        assert [square(3), square(3), square(4), square(4)] == [9, 9, 16, 16]
        assert calls == [3, 4]
        views.delete_memoized(square, 3)
        assert [square(3), square(4)] == [9, 16]
        assert calls == [3, 4, 3]
        views.delete_memoized(square)
        assert square(4) == 16
        assert calls == [3, 4, 3, 4]


def test_return_conventions(backend):
    assert backend.set("a", {"x": (1, 2)}) is True
    assert backend.get("a") == {"x": (1, 2)}
    assert backend.get("missing") is None
    assert backend.add("a", "other") is False
    assert backend.add("b", "new") is True
    assert backend.has("a") is True and backend.has("missing") is False
    assert backend.get_many("a", "missing", "b") == [{"x": (1, 2)}, None, "new"]
    assert backend.get_dict("a", "b") == {"a": {"x": (1, 2)}, "b": "new"}
    assert backend.set_many({"c": 1, "d": 2}) == ["c", "d"]
    assert backend.delete("c") is True
    assert backend.delete("c") is False
    assert backend.delete_many("d", "never-there") == ["d", "never-there"]
    assert backend.get_many("c", "d") == [None, None]
    assert backend.clear() is True
    assert backend.get("a") is None


def test_inc_and_dec_start_missing_keys_at_zero(backend):
    assert backend.inc("hits") == 1
    assert backend.inc("hits", 5) == 6
    assert backend.dec("hits", 2) == 4
    assert backend.dec("fresh") == -1
    assert backend.get("hits") == 4


def test_timeouts_follow_flask_caching(app, backend):
    backend.set("default", 1)
    assert 299 <= backend.store.ttl("flask_cache_default") <= 300
    backend.set("forever", 1, timeout=0)
    assert backend.store.ttl("flask_cache_forever") == -1
    backend.set("minute", 1, timeout=60)
    assert backend.store.ttl("flask_cache_minute") == 60
    backend.set("gone", 1, timeout=-1)
    assert not backend.has("gone")
    assert backend.add("gone", 1, timeout=-1) is True
    assert not backend.has("gone")
    backend.set_many({"m1": 1, "m2": 2}, timeout=-5)
    assert backend.get_many("m1", "m2") == [None, None]
    backend.set("short", 1, timeout=1)
    time.sleep(1.2)
    assert backend.get("short") is None


def test_default_timeout_setting(pg_url, schema):
    app = make_app(pg_url, schema, CACHE_DEFAULT_TIMEOUT=45)
    backend = flask_caching.Cache(app).cache
    backend.set("k", 1)
    assert backend.store.ttl("flask_cache_k") == 45


def test_clear_removes_only_its_own_prefix(pg_url, schema):
    shop = flask_caching.Cache(make_app(pg_url, schema, CACHE_KEY_PREFIX="shop[1]*")).cache
    blog = flask_caching.Cache(make_app(pg_url, schema, CACHE_KEY_PREFIX="blog_")).cache
    shop.set("k", "shop")
    blog.set("k", "blog")
    assert shop.get("k") == "shop" and blog.get("k") == "blog"
    shop.clear()
    assert shop.get("k") is None
    assert blog.get("k") == "blog"


def test_url_defaults_to_the_apps_sqlalchemy_uri(pg_url, schema):
    app = flask.Flask("uri_app")
    app.config.update(CACHE_TYPE=BACKEND, SQLALCHEMY_DATABASE_URI=pg_url, CACHE_FASTPGCACHE_SCHEMA=schema,
                      SECRET_KEY="tests-only-secret-key")
    backend = flask_caching.Cache(app).cache
    assert backend.set("k", "v") and backend.get("k") == "v"


def test_pickles_are_signed_with_the_secret_key_or_refused_without_one(pg_url, schema):
    without = flask.Flask("no_key")
    without.config.update(CACHE_TYPE=BACKEND, CACHE_FASTPGCACHE_URL=pg_url, CACHE_FASTPGCACHE_SCHEMA=schema)
    with pytest.raises(ValueError, match="SECRET_KEY"):
        flask_caching.Cache(without)
    first = flask_caching.Cache(make_app(pg_url, schema, CACHE_KEY_PREFIX="same_")).cache
    first.set("obj", {1, 2})
    assert first.get("obj") == {1, 2}
    other_key = flask_caching.Cache(make_app(pg_url, schema, CACHE_KEY_PREFIX="same_")).cache
    assert other_key.get("obj") is None  # another SECRET_KEY: never unpickled, a miss
    explicit = flask_caching.Cache(make_app(pg_url, schema, CACHE_KEY_PREFIX="same_",
                                            CACHE_FASTPGCACHE_PICKLE_KEY="an-explicit-key-0123")).cache
    explicit.set("obj", (3, 4))
    assert explicit.get("obj") == (3, 4) and first.get("obj") is None


def test_missing_url_says_what_to_set():
    app = flask.Flask("no_url")
    app.config.update(CACHE_TYPE=BACKEND)
    with pytest.raises(ValueError, match="CACHE_FASTPGCACHE_URL"):
        flask_caching.Cache(app)


def test_apps_on_one_url_share_one_engine(pg_url, schema):
    first = flask_caching.Cache(make_app(pg_url, schema)).cache
    second = flask_caching.Cache(make_app(pg_url, schema)).cache
    assert first is not second and first.store.bind is second.store.bind


def test_engine_options_are_passed_on(pg_url, schema):
    backend = flask_caching.Cache(make_app(pg_url, schema, CACHE_FASTPGCACHE_ENGINE_OPTIONS={"pool_size": 3})).cache
    assert backend.store.bind.pool.size() == 3
    assert backend.set("k", 1)


# -- Cache(db.session): cache writes inside the request's transaction ---------------------------

@pytest.fixture
def notes_app(pg_url, schema, engine):
    db = flask_sqlalchemy.SQLAlchemy()
    pgcache = Cache(db.session, schema=schema)
    app = flask.Flask("notes")
    app.config.update(SQLALCHEMY_DATABASE_URI=pg_url)
    db.init_app(app)
    table = f'"{schema}".notes'

    @app.post("/notes/<name>")
    def save(name):
        body = flask.request.get_data(as_text=True)
        db.session.execute(text(f"INSERT INTO {table} VALUES (:name, :body)"), {"name": name, "body": body})
        pgcache.set(f"note:{name}", body)
        assert pgcache.get(f"note:{name}") == body  # visible inside its own transaction
        if "spam" in body:
            flask.abort(400)
        db.session.commit()
        return {"saved": name}

    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {table} (name text PRIMARY KEY, body text)"))
    yield app, Cache(engine, schema=schema)
    with app.app_context():
        db.engine.dispose()


def test_cache_writes_commit_with_the_request(notes_app):
    app, outside = notes_app
    assert app.test_client().post("/notes/hello", data="hi").status_code == 200
    assert outside.get("note:hello") == "hi"


def test_cache_writes_roll_back_with_a_failed_request(notes_app):
    app, outside = notes_app
    assert app.test_client().post("/notes/junk", data="buy spam").status_code == 400
    assert outside.get("note:junk") is None
    assert not outside.exists("note:junk")


DOWN = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens on port 1


def test_failsafe_setting_follows_flask_cachings_error_conventions(schema):
    backend = flask_caching.Cache(make_app(DOWN, schema, CACHE_FASTPGCACHE_FAILSAFE=True)).cache
    assert backend.set("k", 1) is False  # "False for backend errors"
    assert backend.set("k", 1, timeout=-1) is False  # the delete that expires it failed too
    assert backend.get("k") is None
    assert backend.has("k") is False
    assert backend.get_many("k", "j") == [None, None]
    assert backend.set_many({"k": 1, "j": 2}) == []  # "the keys that were set": none
    assert backend.set_many({"k": 1}, timeout=-1) == []
    assert backend.inc("n") is None and backend.dec("n") is None  # "None for backend errors"
    assert backend.clear() is False


def test_failsafe_delete_many_honours_cache_ignore_errors(schema):
    quiet = flask_caching.Cache(make_app(DOWN, schema, CACHE_FASTPGCACHE_FAILSAFE=True,
                                         CACHE_IGNORE_ERRORS=True)).cache
    assert quiet.delete_many("k", "j") == []  # "the keys deleted": none
    strict = flask_caching.Cache(make_app(DOWN, schema, CACHE_FASTPGCACHE_FAILSAFE=True)).cache
    with pytest.raises(RuntimeError, match=r"Failed to delete keys: \['k', 'j'\]"):
        strict.delete_many("k", "j")


def test_clear_with_a_prefix_is_one_statement(pg_url, schema, record_statements):
    backend = flask_caching.Cache(make_app(pg_url, schema, CACHE_KEY_PREFIX="p_")).cache
    other = flask_caching.Cache(make_app(pg_url, schema, CACHE_KEY_PREFIX="q_")).cache
    backend.set_many({f"k{i}": i for i in range(5)})
    other.set("k0", "kept")
    statements = record_statements(backend.store.bind)
    assert backend.clear() is True
    # One call of the clear function, no key listed first.
    assert [sql.split("(")[0] for sql in statements] == [f"SELECT {schema}.cache_clear"]
    assert backend.get_many("k0", "k4") == [None, None]
    assert other.get("k0") == "kept"


def test_cache_options_hold_unless_config_sets_them(pg_url, schema, engine):
    options = {"schema": schema, "table": "cache", "failsafe": True, "key_prefix": "opt_"}
    backend = flask_caching.Cache(make_app(pg_url, None, CACHE_OPTIONS=options)).cache
    assert (backend.store.schema, backend.key_prefix, backend.store._failsafe.enabled) == (schema, "opt_", True)
    explicit = flask_caching.Cache(make_app(pg_url, schema, CACHE_OPTIONS={**options, "schema": "elsewhere"},
                                            CACHE_KEY_PREFIX="cfg_", CACHE_FASTPGCACHE_FAILSAFE=False)).cache
    assert (explicit.store.schema, explicit.key_prefix, explicit.store._failsafe.enabled) == (schema, "cfg_", False)


# -- any key Flask-Caching makes --------------------------------------------------------------

@pytest.mark.parametrize("path", ["/page/" + "x" * 1100, "/page/a%00b", "/page/" + "%C3%A9" * 600 + "%00"])
def test_a_cached_view_on_any_path_is_computed_once_in_three_requests(app, views, backend, path, caplog):
    calls = []

    @app.get("/page/<path:rest>")
    @views.cached(timeout=60)
    def page(rest):
        calls.append(rest)
        return {"length": len(rest), "calls": len(calls)}

    client = app.test_client()
    with caplog.at_level("ERROR"):
        answers = [client.get(path) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert [answer.get_json()["calls"] for answer in answers] == [1, 1, 1]
    assert len(calls) == 1 and "Exception possibly due to cache backend" not in caplog.text
    (stored,) = backend.store.keys("flask_cache_view/*")
    assert re.fullmatch(r"flask_cache_view//page/.*~sha256:[0-9a-f]{64}", stored) and len(stored.encode()) <= 1024
    views.clear()  # digest forms keep the prefix, so clear() finds them
    assert backend.store.keys("flask_cache_*") == []


def test_keys_past_the_limit_or_with_nul_round_trip_through_every_method(backend):
    long_key, nul_key = "long:" + "é" * 700, "nul\x00key"
    assert backend.set(long_key, 1) and backend.add(nul_key, "v")
    assert backend.get(long_key) == 1 and backend.has(nul_key)
    assert backend.inc(long_key, 4) == 5 and backend.dec(nul_key + "#n") == -1
    assert backend.set_many({long_key: "a", nul_key: "b"}) == [long_key, nul_key]
    assert backend.get_many(long_key, nul_key, "absent") == ["a", "b", None]
    assert backend.delete(long_key) and backend.delete_many(nul_key) == [nul_key]
    assert backend.get_many(long_key, nul_key) == [None, None]
    backend.set("x" * 2000, "first")
    impostor = backend._key("x" * 2000)[len("flask_cache_"):]  # spelled as the long key's stored form
    backend.set(impostor, "second")
    assert backend.get("x" * 2000) == "first" and backend.get(impostor) == "second"


def test_non_string_keys_are_converted_as_cache_converts_them(backend):
    assert backend.set(42, "int") and backend.get("42") == "int" and backend.get(42) == "int"
    assert backend.set(b"bytes", "b") and backend.get("bytes") == "b"
    assert backend.set(1.5, "float") and backend.get_many(1.5, "1.5") == ["float", "float"]
    assert backend.inc(7) == 1 and backend.has("7")
    with pytest.raises(TypeError, match="invalid key type NoneType: use str, bytes, int or float"):
        backend.set(None, 1)
    with pytest.raises(TypeError, match="invalid key type tuple"):
        backend.get(("a", 1))


# -- CACHE_KEY_PREFIX as a function, CACHE_SERIALIZER ----------------------------------------

def test_a_callable_key_prefix_is_asked_for_every_key_and_by_clear(pg_url, schema):
    tenant = {"name": "acme"}
    backend = flask_caching.Cache(make_app(pg_url, schema, CACHE_KEY_PREFIX=lambda: f"{tenant['name']}:")).cache
    backend.set("k", "for acme")
    tenant["name"] = "globex"
    assert backend.get("k") is None
    backend.set_many({"k": "for globex", "j": 2})
    assert backend.store.keys() == ["acme:k", "globex:j", "globex:k"]
    assert backend.clear() is True  # globex's entries only
    assert backend.store.keys() == ["acme:k"]
    tenant["name"] = "acme"
    assert backend.get("k") == "for acme"
    assert "a function" in repr(backend)


def test_a_callable_prefix_must_return_usable_text(pg_url, schema):
    backend = flask_caching.Cache(make_app(pg_url, schema, CACHE_KEY_PREFIX=lambda: None)).cache
    with pytest.raises(TypeError, match="a key prefix must be a str, not NoneType"):
        backend.get("k")


@pytest.mark.parametrize("prefix, error, message", [
    ("nul\x00", ValueError, "cannot contain NUL"),
    ("p" * 953, ValueError, "at most 952 bytes"),
    (["list"], TypeError, "must be a str, not list"),
])
def test_bad_key_prefixes_are_refused_at_init(pg_url, schema, prefix, error, message):
    with pytest.raises(error, match=message):
        flask_caching.Cache(make_app(pg_url, schema, CACHE_KEY_PREFIX=prefix))


def test_cache_serializer_is_refused_because_it_would_bypass_the_signature(pg_url, schema):
    from cachelib.serializers import BaseSerializer

    with pytest.raises(ValueError, match="does not take CACHE_SERIALIZER: .* signs every pickle"):
        flask_caching.Cache(make_app(pg_url, schema, CACHE_SERIALIZER=BaseSerializer))


# -- timeouts and the guard -------------------------------------------------------------------

def timeouts_of(backend) -> tuple[str, str]:
    """statement_timeout and lock_timeout as the server reports them on the backend's connections."""
    with backend.store.bind.connect() as connection:
        return (connection.exec_driver_sql("SHOW statement_timeout").scalar(),
                connection.exec_driver_sql("SHOW lock_timeout").scalar())


def test_connections_get_fastpgcache_s_timeouts_unless_config_says_otherwise(pg_url, schema):
    assert timeouts_of(flask_caching.Cache(make_app(pg_url, schema)).cache) == ("5s", "1s")
    configured = make_app(pg_url, schema, CACHE_FASTPGCACHE_STATEMENT_TIMEOUT=3, CACHE_FASTPGCACHE_LOCK_TIMEOUT=0.5)
    assert timeouts_of(flask_caching.Cache(configured).cache) == ("3s", "500ms")
    server_s = make_app(pg_url, schema, CACHE_FASTPGCACHE_STATEMENT_TIMEOUT=None,
                        CACHE_OPTIONS={"lock_timeout": 0.25, "statement_timeout": 9})
    assert timeouts_of(flask_caching.Cache(server_s).cache) == ("0", "250ms")  # None in config: the server's
    with pytest.raises(ValueError, match="lock_timeout must be a positive number of seconds"):
        flask_caching.Cache(make_app(pg_url, schema, CACHE_FASTPGCACHE_LOCK_TIMEOUT=-1))


def test_guard_setting_answers_absent_keys_without_a_round_trip_and_sees_other_writers(pg_url, schema,
                                                                                       record_statements,
                                                                                       write_from_another_process):
    first = flask_caching.Cache(make_app(pg_url, schema, CACHE_FASTPGCACHE_GUARD=True)).cache
    second = flask_caching.Cache(make_app(pg_url, schema, CACHE_OPTIONS={"guard": True})).cache
    guard = first.store.guard
    try:
        assert second.store.guard is guard and guard.wait_until_trusted(10)
        sent = record_statements(first.store.bind)
        assert [first.get(f"absent{i}") for i in range(20)] == [None] * 20 and not first.has("absent")
        assert sent == []  # answered by the guard alone
        assert first.set("present", 1) and first.get("present") == 1 and len(sent) >= 2  # the rest are recorded
        write_from_another_process(schema, "flask_cache_elsewhere")
        deadline = time.monotonic() + 5
        while first.get("elsewhere") is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert first.get("elsewhere") == "from another process" and guard.state == "trusted"
    finally:
        guard.stop()
    assert flask_caching.Cache(make_app(pg_url, schema)).cache.store.guard is None  # off unless asked for
