"""Fixtures: a real PostgreSQL (FASTPGCACHE_TEST_URL, else an embedded server) and a fresh schema per test."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
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


def _with_test_driver(url) -> str:
    """FASTPGCACHE_TEST_DRIVER=psycopg reruns tests on psycopg 3; unset, the URL's own driver, and for a
    bare postgresql:// the library's default, psycopg2 (SQLAlchemy 2.1 would pick psycopg 3)."""
    parsed = make_url(url)
    own = parsed.get_driver_name() if "+" in parsed.drivername else "psycopg2"
    driver = os.environ.get("FASTPGCACHE_TEST_DRIVER") or own
    return parsed.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


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


@pytest.fixture
def explain(engine):
    """explain(cache, statement, params): the plan of the SQL `cache` really sends for `statement`."""

    def plan(cache, statement, params) -> str:
        compiled = cache._compile(statement, engine.dialect)
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(f"EXPLAIN {compiled.string}", compiled.construct_params(params))
            return "\n".join(row[0] for row in rows)

    return plan


@pytest.fixture
def nested_plans(engine):
    """nested_plans(cache, statement, params, settings=()): the plans of every statement the call runs, the
    ones inside the write functions included (auto_explain, logged to the client as notices; rolled back
    after); `settings` are SET statements run first."""

    def plans(cache, statement, params, settings=()) -> str:
        identity = cache._identity_now()
        compiled = cache._compile(statement, engine.dialect)
        values = compiled.construct_params({**params, "credential": identity.credential})
        with engine.connect() as connection:
            for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                            "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_level = notice",
                            *settings):
                connection.exec_driver_sql(setting)
            raw = connection.connection.dbapi_connection  # its own cursor: SQLAlchemy would take the notices
            notices = raw.notices if hasattr(raw, "notices") else []  # psycopg2 collects them; psycopg 3 calls back
            del notices[:]
            def heard(diagnostic):
                notices.append(diagnostic.message_primary)
            if hasattr(raw, "add_notice_handler"):
                raw.add_notice_handler(heard)
            with raw.cursor() as cursor:
                cursor.execute(compiled.string, values)
            if hasattr(raw, "remove_notice_handler"):
                raw.remove_notice_handler(heard)
            found = "\n".join(notices)
            connection.rollback()
            return found

    return plans


@pytest.fixture
def record_statements():
    """record_statements(engine): a list that fills with the SQL of every statement sent on `engine` from now
    on (a cursor listener, removed after the test)."""
    from sqlalchemy import event

    listening = []

    def start(engine) -> list:
        sent = []

        def record(connection, cursor, statement, *args):
            sent.append(statement)

        event.listen(engine, "before_cursor_execute", record)
        listening.append((engine, record))
        return sent

    yield start
    for engine, record in listening:
        event.remove(engine, "before_cursor_execute", record)


@pytest.fixture
def in_threads():
    """in_threads(work, count, timeout): run work(0..count-1) in threads; the errors they raised,
    and a hang as an error of its own, so `== []` names what went wrong."""

    def run_all(work, count: int, timeout: float) -> list:
        errors = []

        def run(index):
            try:
                work(index)
            except Exception as error:  # collected, so the caller's assertion names it
                errors.append(error)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout)
        hung = [worker.name for worker in workers if worker.is_alive()]
        return errors + ([TimeoutError(f"threads still running after {timeout} s: {hung}")] if hung else [])

    return run_all


def drop_roles(engine, names) -> None:
    """Drop test roles and everything they own (on Citus, on every node)."""
    quote = engine.dialect.identifier_preparer.quote_identifier
    with engine.begin() as connection:
        for name in names:
            # Without parameters the driver leaves '%' alone (text() would double it for pyformat).
            connection.exec_driver_sql(f"DROP OWNED BY {quote(name)} CASCADE")
            connection.exec_driver_sql(f"DROP ROLE IF EXISTS {quote(name)}")


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
    drop_roles(engine, created)


@pytest.fixture
def role_engine(make_role):
    """role_engine(prefix): (name, engine) of a new LOGIN role (no superuser, no BYPASSRLS), disposed afterwards."""
    engines = []

    def make(prefix: str = "role"):
        name, url = make_role(prefix)
        engines.append(create_engine(url))
        return name, engines[-1]

    yield make
    for made in engines:
        made.dispose()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def start_pgbouncer(pg_url):
    """Start pgbouncers in transaction mode in front of the server under test; each call returns its URL.

    `ignore` is pgbouncer's ignore_startup_parameters: by default it drops the libpq
    `options` FastPgCache sends for its timeouts (pgbouncer's own default refuses them).
    """
    binary = shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(path)), None)
    if binary is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)")
    started = []

    def start(ignore: str = "extra_float_digits,options"):
        server, port = make_url(pg_url), _free_port()
        workdir = tempfile.mkdtemp(prefix="fastpgcache-pgbouncer-")
        os.chmod(workdir, 0o777)  # pgbouncer refuses to run as root, so it may run as nobody
        with open(os.path.join(workdir, "userlist.txt"), "w") as handle:
            handle.write(f'"{server.username}" ""\n')
        with open(os.path.join(workdir, "pgbouncer.ini"), "w") as handle:
            handle.write(f"[databases]\n* = host={server.host} port={server.port}\n[pgbouncer]\n"
                         f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\n"
                         f"auth_file = {workdir}/userlist.txt\npool_mode = transaction\n"
                         f"ignore_startup_parameters = {ignore}\ndefault_pool_size = 4\n"
                         f"logfile = {workdir}/pgbouncer.log\n")
        for name in ("userlist.txt", "pgbouncer.ini"):
            os.chmod(os.path.join(workdir, name), 0o644)
        switch_user = ["-u", "nobody"] if os.geteuid() == 0 else []
        process = subprocess.Popen([binary, *switch_user, os.path.join(workdir, "pgbouncer.ini")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append((process, workdir))
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert process.poll() is None, "pgbouncer exited: " + open(f"{workdir}/pgbouncer.log").read()[-500:]
            assert time.monotonic() < deadline, "pgbouncer did not start listening"
            time.sleep(0.05)
        return server.set(drivername="postgresql+psycopg2", host="127.0.0.1", port=port)

    yield start
    for process, workdir in started:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def citus():
    """A started Citus cluster (coordinator + 2 workers, embedded PostgreSQL 18); stopped at the end."""
    from citus_cluster import CitusCluster, citus_available

    if not citus_available():
        pytest.skip("Citus is not built into this virtualenv's embedded PostgreSQL: run ../shared/tools/citus.sh build")
    with CitusCluster() as cluster:
        yield cluster


ANOTHER_PROCESS_WRITER = """
import os
from fastpgcache import FastPgCache
cache = FastPgCache(url=os.environ["FPC_URL"], schema=os.environ["FPC_SCHEMA"], use_cuckoo_filter=False, maxconn=1)
cache.set(os.environ["FPC_KEY"], "from another process")
cache.close()
"""


@pytest.fixture
def write_from_another_process(pg_url):
    """write(schema, key): "from another process" stored at `key` by a separate Python process."""
    def write(schema: str, key: str) -> None:
        # The URL travels in the environment, never on a command line.
        env = {**os.environ, "FPC_URL": make_url(pg_url).render_as_string(hide_password=False),
               "FPC_SCHEMA": schema, "FPC_KEY": key}
        subprocess.run([sys.executable, "-c", ANOTHER_PROCESS_WRITER], env=env, check=True, timeout=60)
    return write


@pytest.fixture(scope="session")
def citus_admin(citus):
    """An Engine on the Citus coordinator as its superuser."""
    engine = create_engine(citus.coordinator_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def citus_role(citus, citus_admin):
    """citus_role(prefix): (name, {"coordinator": url, "worker0": url, "worker1": url}) of a new LOGIN role
    (no superuser, no BYPASSRLS) that exists on every node; dropped at the end."""
    created = []

    def make(prefix: str = "role"):
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with citus_admin.begin() as connection:  # Citus creates the role on every worker too
            connection.execute(text(f'CREATE ROLE "{name}" LOGIN NOSUPERUSER NOBYPASSRLS'))
        created.append(name)
        urls = {"coordinator": make_url(citus.coordinator_url).set(username=name)}
        urls.update({f"worker{i}": make_url(url).set(username=name) for i, url in enumerate(citus.worker_urls)})
        return name, urls

    yield make
    drop_roles(citus_admin, created)


@contextlib.contextmanager
def _distributed_schemas(citus_admin):
    # make(**setup options): a new schema with a cache table set up distributed (8 shards unless told
    # otherwise); every one made is dropped on leaving.
    made = []

    def make(**options):
        name = f"c_{uuid.uuid4().hex[:10]}"
        made.append(name)
        setup_cache(engine=citus_admin, schema=name, **{"distributed": True, "shard_count": 8, **options})
        return name

    try:
        yield make
    finally:
        with citus_admin.begin() as connection:
            for name in made:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@pytest.fixture
def citus_schema(citus_admin):
    """citus_schema(**setup options): a new schema with a cache table set up distributed (8 shards unless
    told otherwise); every one made is dropped afterwards."""
    with _distributed_schemas(citus_admin) as make:
        yield make


@pytest.fixture(scope="module")
def citus_shared(citus_admin):
    """One distributed cache schema (8 shards) for the tests of a module that only touch their own keys."""
    with _distributed_schemas(citus_admin) as make:
        yield make()
