"""Per-role isolation enforced by PostgreSQL row-level security, with real roles."""
import logging
import time

import pytest
from conftest import drop_roles
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from fastpgcache import Cache, CachePermissionError, FastPgCache, setup_cache


@pytest.fixture
def users(make_role, schema):
    """alice and bob: LOGIN roles without superuser or BYPASSRLS, each with an engine."""
    engines = {}
    for name in ("alice", "bob"):
        role, url = make_role(name)
        engines[name] = (role, create_engine(url))
    yield engines
    for _, engine in engines.values():
        engine.dispose()


def test_same_key_different_users(users, schema, engine):
    (alice, a_engine), (bob, b_engine) = users["alice"], users["bob"]
    a, b = Cache(a_engine, schema=schema), Cache(b_engine, schema=schema)
    a.set("profile", {"who": "alice"})
    b.set("profile", {"who": "bob"})
    assert a.get("profile") == {"who": "alice"} and b.get("profile") == {"who": "bob"}
    a.set("only-alice", 1, ttl=60)
    assert b.get("only-alice") is None and not b.exists("only-alice") and b.ttl("only-alice") == -2
    assert b.keys("*") == ["profile"] and b.get_many(["only-alice", "profile"]) == {"profile": {"who": "bob"}}
    assert b.delete("only-alice") is False and b.clear() == 1
    assert b.incr("only-alice") == 1  # bob's own new counter, not alice's value
    assert a.get("only-alice") == 1 and a.get("profile") == {"who": "alice"}
    with engine.connect() as connection:  # the admin (table owner) sees everyone
        owners = connection.execute(text(f'SELECT DISTINCT user_id FROM "{schema}".cache ORDER BY 1')).scalars()
        assert sorted(owners) == sorted([alice, bob])


def test_raw_sql_cannot_cross_users(users, schema):
    (alice, a_engine), (_, b_engine) = users["alice"], users["bob"]
    Cache(a_engine, schema=schema).set("secret", "alice's")
    table = f'"{schema}".cache'
    with b_engine.connect() as connection:
        assert connection.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0
        assert connection.execute(text(f"SELECT * FROM {table} WHERE user_id = :u"), {"u": alice}).all() == []
        for statement in (f"UPDATE {table} SET value = 'x' WHERE user_id = :u",
                          f"DELETE FROM {table} WHERE user_id = :u",
                          f"INSERT INTO {table} (user_id, key, value) VALUES (:u, 'k', 'v')"):
            with pytest.raises(sa_exc.ProgrammingError, match="permission denied"):  # writes go through functions
                connection.execute(text(statement), {"u": alice})
            connection.rollback()
        Cache(connection, schema=schema).set("mine", "bob's")
        connection.commit()
    assert Cache(a_engine, schema=schema).get("secret") == "alice's"


def test_explicit_foreign_user_id_gets_clear_permission_error(users, schema):
    (alice, a_engine), (bob, b_engine) = users["alice"], users["bob"]
    Cache(a_engine, schema=schema).set("k", "alice's")
    posing = Cache(b_engine, schema=schema, user_id=alice)
    with pytest.raises(CachePermissionError, match="current_user") as raised:
        posing.set("k", "bob's")
    assert isinstance(raised.value, PermissionError)
    with pytest.raises(CachePermissionError, match=f"cannot write as '{alice}'"):
        posing.set_many({"a": 1})
    assert posing.get("k") is None  # reads are filtered, never crossed
    assert Cache(b_engine, schema=schema, user_id=bob).set("k", "bob's") is True
    assert Cache(a_engine, schema=schema).get("k") == "alice's"


def test_owner_cleanup_all_users_but_role_cleanup_only_its_own(users, schema, engine):
    (_, a_engine), (_, b_engine) = users["alice"], users["bob"]
    for role_engine in (a_engine, b_engine):
        Cache(role_engine, schema=schema).set_many({"x": 1, "y": 2}, ttl=0.1)
    time.sleep(0.2)
    with pytest.raises(CachePermissionError, match="cache_cleanup_all"):
        Cache(b_engine, schema=schema).cleanup(all_users=True)  # only the owner (and superusers) may
    assert Cache(b_engine, schema=schema).cleanup() == 2  # his own rows
    assert Cache(engine, schema=schema).cleanup(all_users=True) == 2  # the owner takes alice's


def test_role_granted_nothing_gets_a_clear_error(make_role, engine, pg_url):
    schema = "g_" + make_role("grantee")[0][-8:]
    grantee, _ = make_role("grantee")
    setup_cache(engine=engine, schema=schema, grant_to=grantee)
    try:
        with engine.begin() as connection:  # only grantee may use it: take PUBLIC's default grants away
            connection.execute(text(f'REVOKE ALL ON "{schema}".cache FROM PUBLIC'))
            connection.execute(text(f'REVOKE USAGE ON SCHEMA "{schema}" FROM PUBLIC'))
        _, stranger_url = make_role("stranger")
        stranger = create_engine(stranger_url)
        with pytest.raises(CachePermissionError, match="grant-to") as raised:
            Cache(stranger, schema=schema).get("k")
        assert stranger_url.password not in str(raised.value)
        stranger.dispose()
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


HOSTILE = ["'; DROP TABLE cache; --", "\\", "\\\\'", "%", "_", "*", "[", "[a-", "?", "a'b\"c", "ü日本🐘",
           "user_id = current_user OR 1=1", "%' OR '1'='1", "\t\n\r"]


def test_hostile_keys_and_patterns_do_not_cross_or_inject(users, schema):
    (_, a_engine), (_, b_engine) = users["alice"], users["bob"]
    a, b = Cache(a_engine, schema=schema), Cache(b_engine, schema=schema)
    a.set_many({key: f"alice:{key}" for key in HOSTILE})
    for key in HOSTILE:
        b.set(key, f"bob:{key}")
    for key in HOSTILE:
        assert a.get(key) == f"alice:{key}" and b.get(key) == f"bob:{key}"
        assert a.keys(key.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?").replace("[", "\\[")) == [key]
    for pattern in HOSTILE + ["*", "**", "[", "[^]", "\\"]:
        assert set(b.keys(pattern)) <= set(HOSTILE)
        assert set(b.keys(pattern)) == set(a.keys(pattern))
    assert len(a.keys("*")) == len(HOSTILE) and a.get("'; DROP TABLE cache; --") is not None
    with pytest.raises(ValueError, match="1024"):
        b.get("k" * 1_000_000)
    with pytest.raises(ValueError, match="pattern"):
        b.keys("*" * 1_000_000)
    assert a.get_many(HOSTILE) == {key: f"alice:{key}" for key in HOSTILE}


def test_secrets_never_in_reprs_logs_or_errors(make_role, schema, caplog):
    role, url = make_role("secretive")
    secret = url.password
    caplog.set_level(logging.DEBUG)
    with FastPgCache(url=url, schema=schema) as cache:
        cache.set("k", "v")
        seen = [repr(cache), str(cache), repr(cache.bind), repr(cache.bind.url), str(cache.bind.url)]
        with pytest.raises(Exception) as raised:
            Cache(cache.bind, schema="missing_" + role).get("k")
        seen.append(str(raised.value))
    bad = url.set(port=1)
    with pytest.raises(Exception) as raised:
        FastPgCache(url=bad)
    seen += [str(raised.value), caplog.text]
    assert all(secret not in text_ for text_ in seen)


def test_role_names_of_any_shape_write_as_themselves(engine, pg_url, schema):
    # A write's credential is the secret in hex, then the role's name, split by the secret's fixed length:
    # names with spaces, quotes, percent signs, non-ASCII letters or a run of hex digits work as any other.

    names = ['we ird %s "quoted" it\'s', "zoë_ça_日本", "ab" * 31 + "c", "0123456789abcdef" * 3 + "x"]
    quote = engine.dialect.identifier_preparer.quote_identifier
    with engine.begin() as connection:
        for name in names:
            connection.exec_driver_sql(f"CREATE ROLE {quote(name)} LOGIN NOSUPERUSER NOBYPASSRLS")
    try:
        caches = [FastPgCache(url=make_url(pg_url).set(username=name), schema=schema, use_cuckoo_filter=False)
                  for name in names]
        for name, cache in zip(names, caches, strict=True):
            assert cache.set("k", name) is True and cache.set("k", "again", nx=True) is False
            assert cache.incr("n", 2) == 2 and cache.expire("k", 60) is True
        for name, cache in zip(names, caches, strict=True):
            assert cache.get("k") == name and cache.ttl("k") > 0 and cache.delete("n") is True
            cache.close()
        with engine.connect() as connection:
            rows = connection.execute(text(f'SELECT user_id, convert_from(value, \'UTF8\') FROM "{schema}".cache'
                                           " WHERE key = 'k'")).all()
        assert sorted(rows) == sorted((name, name) for name in names)
    finally:
        drop_roles(engine, names)


def test_a_secret_of_another_length_is_refused_with_what_to_do():
    from fastpgcache.identity import Identity

    assert Identity("alice", bytes(32)).credential == "00" * 32 + "alice"
    with pytest.raises(ValueError, match="is 16 bytes, not 32: delete that role's row"):
        Identity("alice", bytes(16))
