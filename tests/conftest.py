"""Fixtures: a real PostgreSQL (FASTPGCACHE_TEST_URL, else an embedded server) and a fresh schema per test."""
from __future__ import annotations

import os
import secrets
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fastpgcache import Cache, setup_cache


@pytest.fixture(scope="session")
def pg_url():
    """URL of the server under test, as its superuser."""
    url = os.environ.get("FASTPGCACHE_TEST_URL")
    if url:
        yield _with_test_driver(url)
        return
    from fastpgcache.embedded import EmbeddedPostgres

    server = EmbeddedPostgres().start()
    yield _with_test_driver(server.url)
    server.stop()


def _with_test_driver(url):
    """FASTPGCACHE_TEST_DRIVER=psycopg reruns tests on psycopg 3; unset keeps the URL's driver (psycopg2)."""
    driver = os.environ.get("FASTPGCACHE_TEST_DRIVER")
    return make_url(url).set(drivername=f"postgresql+{driver}") if driver else url


@pytest.fixture(scope="session")
def engine(pg_url):
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def empty_schema(engine):
    """A schema name with nothing in it yet (tests create what they need); dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@pytest.fixture
def schema(engine, empty_schema):
    """A schema holding a cache table created by the real migrations; dropped afterwards."""
    setup_cache(engine=engine, schema=empty_schema)
    return empty_schema


@pytest.fixture
def cache(engine, schema):
    return Cache(engine, schema=schema)


@pytest.fixture(scope="session")
def make_role(engine, pg_url):
    """Create a LOGIN role (no superuser, no BYPASSRLS) and return (name, url); dropped at the end."""
    created = []

    def make(prefix: str, *, login: bool = True):
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        password = secrets.token_urlsafe(16)
        with engine.begin() as connection:
            connection.execute(text(
                f'CREATE ROLE "{name}" {"LOGIN" if login else "NOLOGIN"} NOSUPERUSER NOBYPASSRLS '
                f"PASSWORD '{password}'"))
        created.append(name)
        url = make_url(pg_url).set(username=name, password=password)
        return name, url

    yield make
    with engine.begin() as connection:
        for name in created:
            connection.execute(text(f'DROP OWNED BY "{name}" CASCADE'))
            connection.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
