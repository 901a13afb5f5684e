"""The framework examples, run as a user would run them: subprocesses against the server under test."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def example_url(engine, pg_url):
    """A database of its own, so the examples' default public.cache table touches nothing else."""
    name = f"examples_{uuid.uuid4().hex[:10]}"
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    with autocommit.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def run(args, *, url: str | None, cwd: Path = EXAMPLES) -> str:
    env = {key: value for key, value in os.environ.items() if key != "FASTPGCACHE_URL"}
    if url:
        env["FASTPGCACHE_URL"] = url
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_sqlalchemy_session_example(example_url):
    out = run(["sqlalchemy_session.py"], url=example_url)
    assert "committed order: cache has {'item': 'book', 'status': 'placed'}" in out
    assert "rolled-back order: cache has None" in out
    assert "orders in the table: 1" in out


def test_flask_example(example_url):
    out = run(["flask_app.py"], url=example_url)
    computed = [line for line in out.splitlines() if line.startswith("GET /report")]
    assert len(computed) == 3 and all("computed_times=1 " in line for line in computed)
    assert "POST /notes/hello -> 200" in out
    assert "POST /notes/junk -> 400" in out
    assert "GET /notes/hello -> {'cached': 'hi there', 'name': 'hello'}" in out
    assert "GET /notes/junk -> {'cached': None, 'name': 'junk'}" in out


def test_django_project_check_and_demo_command(example_url):
    project = EXAMPLES / "django_project"
    assert "no issues" in run(["manage.py", "check"], url=example_url, cwd=project)
    out = run(["manage.py", "cache_demo"], url=example_url, cwd=project)
    assert "cache 'default': public.cache ready (UNLOGGED" in out
    assert "get(greeting) = {'text': 'hello', 'tags': ('a', 'b')}" in out
    assert "add(greeting) again = False" in out
    assert "incr(visits) = 1" in out
    assert "incr(missing) raises ValueError: Key 'demo:1:no-such-counter' not found" in out
    assert "get_or_set(answer) = 42" in out
    assert "ttl(greeting) = 60 s" in out
    assert "after delete_many: has_key(greeting) = False" in out


@pytest.mark.own_server
def test_examples_start_an_embedded_server_without_a_url():
    out = run(["sqlalchemy_session.py"], url=None)
    assert "rolled-back order: cache has None" in out
    project = EXAMPLES / "django_project"
    assert "incr(visits) = 1" in run(["manage.py", "cache_demo"], url=None, cwd=project)


def test_quickstart_example(example_url):
    out = run(["quickstart.py"], url=example_url)
    assert "cache table: public.cache unlogged=True" in out
    assert "session:abc = {'user': 'Alice', 'roles': ['admin']}" in out
    assert "greeting = '123'" in out
    assert "ttl(session:abc) = 3600" in out
    assert "ttl(greeting) = -1" in out and "ttl(missing) = -2" in out
    assert "incr(visits) = 1" in out


@pytest.mark.own_server
def test_quickstart_runs_with_no_server_to_set_up():
    out = run(["quickstart.py"], url=None)
    assert "session:abc = {'user': 'Alice', 'roles': ['admin']}" in out
    assert "ttl(session:abc) = 3600" in out
