"""The Django and Flask backends on a cache table distributed by Citus, entering through the coordinator and
through a worker as an ordinary LOGIN role."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import pytest
from sqlalchemy import create_engine, text

from fastpgcache import Cache, CacheError

pytestmark = [pytest.mark.citus, pytest.mark.own_server]

# Django's settings can be configured once per process, and tests/test_django.py configures them for the
# server under test: this runs in a process of its own.
DJANGO_SCRIPT = textwrap.dedent('''
    import sys, time, uuid
    import django
    from django.conf import settings

    url, schema = sys.argv[1], sys.argv[2]
    settings.configure(SECRET_KEY="tests-only-" + uuid.uuid4().hex, USE_TZ=True, CACHES={"default": {
        "BACKEND": "fastpgcache.contrib.django.FastPgCache", "LOCATION": url, "OPTIONS": {"schema": schema}}})
    django.setup()
    from django.core.cache import cache

    assert cache.set("a", {"n": (1, 2)}) is None and cache.get("a") == {"n": (1, 2)}
    assert cache.add("a", 2) is False and cache.add("b", 2) is True
    cache.set_many({f"m{i}": i for i in range(20)}, timeout=60)
    assert cache.get_many([f"m{i}" for i in range(20)] + ["none"]) == {f"m{i}": i for i in range(20)}
    assert cache.incr("b", 5) == 7 and cache.decr("b") == 6
    try:
        cache.incr("missing")
    except ValueError:
        pass
    else:
        raise AssertionError("incr of a missing key must raise")
    assert cache.touch("a", 1) is True and cache.has_key("a")
    time.sleep(1.1)
    assert cache.get("a", "gone") == "gone"
    assert cache.get_or_set("c", lambda: "computed") == "computed" and cache.get("c") == "computed"
    assert cache.delete("c") is True and cache.delete("c") is False
    cache.delete_many(["m0", "m1"])
    assert cache.get("m0") is None and cache.get("m2") == 2
    cache.clear()
    assert cache.get("m2") is None
    print("django ok")
''')


@pytest.mark.parametrize("entry", ["coordinator", "worker1"])
def test_the_django_backend_on_a_distributed_table(citus_shared, citus_role, entry):
    _, urls = citus_role("django")
    url = urls[entry].render_as_string(hide_password=False)
    done = subprocess.run([sys.executable, "-c", DJANGO_SCRIPT, url, citus_shared], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "django ok", done.stderr[-3000:]


flask = pytest.importorskip("flask")
flask_caching = pytest.importorskip("flask_caching")
flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")


def test_the_flask_backend_and_cached_views_on_a_distributed_table(citus_shared, citus_role):
    _, urls = citus_role("flask")
    app = flask.Flask(f"app_{uuid.uuid4().hex[:6]}")
    app.config.update(CACHE_TYPE="fastpgcache.contrib.flask.FastPgCache", SECRET_KEY="tests-only-" + uuid.uuid4().hex,
                      CACHE_FASTPGCACHE_URL=urls["worker0"].render_as_string(hide_password=False),
                      CACHE_FASTPGCACHE_SCHEMA=citus_shared)
    views = flask_caching.Cache(app)
    backend = views.cache
    calls = []

    @app.get("/report/<day>")
    @views.cached(timeout=60)
    def report(day):
        calls.append(day)
        return {"day": day, "calls": len(calls)}

    client = app.test_client()
    assert [client.get(f"/report/{day}").get_json()["calls"] for day in ("mon", "tue", "mon", "tue")] == [1, 2, 1, 2]
    assert backend.set("a", {"x": (1, 2)}) is True and backend.get("a") == {"x": (1, 2)}
    assert backend.add("a", 1) is False
    assert backend.set_many({f"k{i}": i for i in range(10)}) == [f"k{i}" for i in range(10)]
    assert backend.get_many("k0", "k9", "none") == [0, 9, None]
    assert backend.inc("n", 3) == 3 and backend.dec("n") == 2
    assert backend.delete_many("k0", "k1") == ["k0", "k1"] and backend.has("k2") and not backend.has("k0")
    assert backend.clear() is True and backend.get("k2") is None
    assert client.get("/report/mon").get_json()["calls"] == 3  # cleared: computed again


def test_cache_writes_in_a_flask_request_commit_or_roll_back_across_workers(citus, citus_shared, citus_role,
                                                                           citus_admin):
    name, urls = citus_role("notes")
    table = f'"{citus_shared}".notes_{uuid.uuid4().hex[:6]}'
    with citus_admin.begin() as connection:
        connection.execute(text(f"CREATE TABLE {table} (name text PRIMARY KEY, body text)"))
        connection.execute(text(f"SELECT create_distributed_table('{table}', 'name')"))
        connection.execute(text(f'GRANT SELECT, INSERT ON {table} TO "{name}"'))
    db = flask_sqlalchemy.SQLAlchemy()
    pgcache = Cache(db.session, schema=citus_shared)
    app = flask.Flask("notes")
    app.config.update(SQLALCHEMY_DATABASE_URI=urls["coordinator"].render_as_string(hide_password=False),
                      TESTING=True)  # a view's exception reaches the test
    db.init_app(app)

    @app.post("/notes/<note>")
    def save(note):
        body = flask.request.get_data(as_text=True)
        assert pgcache.get(f"note:{note}") is None  # reads come first: see test_citus.py on reading after writing
        db.session.execute(text(f"INSERT INTO {table} VALUES (:name, :body)"), {"name": note, "body": body})
        pgcache.set_many({f"note:{note}": body, f"len:{note}": len(body), f"words:{note}": body.split()})
        if "spam" in body:
            flask.abort(400)
        db.session.commit()
        return {"saved": note}

    @app.get("/notes/<note>/again")
    def write_then_read(note):
        pgcache.set(f"note:{note}", "changed")
        return {"body": pgcache.get(f"note:{note}")}

    client = app.test_client()
    outside = Cache(create_engine(urls["worker1"]), schema=citus_shared)
    assert client.post("/notes/hello", data="hi there").status_code == 200
    assert outside.get_many(["note:hello", "len:hello", "words:hello"]) == {
        "note:hello": "hi there", "len:hello": 8, "words:hello": ["hi", "there"]}
    assert client.post("/notes/junk", data="buy spam").status_code == 400
    assert outside.get_many(["note:junk", "len:junk", "words:junk"]) == {}
    with pytest.raises(CacheError, match="distributed by Citus"):
        client.get("/notes/hello/again")
    with app.app_context():
        db.session.rollback()
        db.engine.dispose()
    assert outside.get("note:hello") == "hi there"
    outside.bind.dispose()
