"""Databricks token provider and login hook, against a PostgreSQL that really checks passwords.

The server is an embedded PostgreSQL with scram-sha-256 authentication; a login
role's password plays the OAuth token, and a fake workspace client (the SDK
surface only, returning the SDK's own credential types) hands it out.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from databricks.sdk.service import database as sdk_database
from databricks.sdk.service import postgres as sdk_postgres
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fastpgcache import Cache, CacheConnectionError, DatabricksTokenProvider, FastPgCache, setup_cache
from fastpgcache.admin import main as admin_main
from fastpgcache.databricks import DatabricksTokenError, attach

pytestmark = pytest.mark.own_server

HOUR = 3600.0


class FakeClock:
    """A settable wall clock for the provider (Unix seconds)."""

    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeWorkspace:
    """The SDK surface the provider uses; hands out `self.token` as the credential.

    Calls are checked against the real SDK method signatures, and the replies are
    the SDK's own `DatabaseCredential` types, so the provider meets what it will meet.
    """

    def __init__(self, token: str, *, lifetime: float | None = HOUR, clock=time.time):
        self.token = token
        self.lifetime = lifetime
        self.clock = clock
        self.calls: list[dict] = []
        self.failure: Exception | None = None
        self.gate: threading.Event | None = None  # when set, a request waits for it: a slow API
        self.database = SimpleNamespace(generate_database_credential=self._database)
        self.postgres = SimpleNamespace(generate_database_credential=self._postgres)

    def _answer(self, real_method, kwargs):
        inspect.signature(real_method).bind(None, **kwargs)
        self.calls.append(kwargs)
        if self.gate is not None:
            assert self.gate.wait(5), "test gate never opened"
        if self.failure is not None:
            raise self.failure
        return None if self.lifetime is None else self.clock() + self.lifetime

    def _database(self, **kwargs):
        expires = self._answer(sdk_database.DatabaseAPI.generate_database_credential, kwargs)
        stamp = None if expires is None else datetime.fromtimestamp(expires, timezone.utc).isoformat()
        return sdk_database.DatabaseCredential(token=self.token, expiration_time=stamp)

    def _postgres(self, **kwargs):
        expires = self._answer(sdk_postgres.PostgresAPI.generate_database_credential, kwargs)
        stamp = None
        if expires is not None:
            stamp = Timestamp()
            stamp.FromNanoseconds(int(expires * 1e9))
        return sdk_postgres.DatabaseCredential(token=self.token, expire_time=stamp)


@pytest.fixture(scope="module")
def server():
    from fastpgcache.embedded import EmbeddedPostgres

    superuser_password = secrets.token_urlsafe(16)
    pg = EmbeddedPostgres(password=superuser_password).start()
    pg.superuser_password = superuser_password
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def admin_engine(server):
    engine = create_engine(make_url(server.url).set(password=server.superuser_password))
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def cache_schema(admin_engine):
    name = f"dbx_{uuid.uuid4().hex[:8]}"
    setup_cache(engine=admin_engine, schema=name)
    return name


@pytest.fixture
def role(admin_engine):
    """A LOGIN role with a random password; `role.rotate()` changes it (a new token)."""
    name = f"tok_{uuid.uuid4().hex[:8]}"
    role = SimpleNamespace(name=name, password=secrets.token_urlsafe(16))

    def rotate() -> str:
        role.password = secrets.token_urlsafe(16)
        with admin_engine.begin() as connection:
            connection.execute(text(f"ALTER ROLE \"{name}\" PASSWORD '{role.password}'"))
        return role.password

    role.rotate = rotate
    with admin_engine.begin() as connection:
        connection.execute(text(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{role.password}'"))
    yield role
    with admin_engine.begin() as connection:
        connection.execute(text(f'DROP OWNED BY "{name}" CASCADE'))
        connection.execute(text(f'DROP ROLE "{name}"'))


@pytest.fixture
def role_url(server, role):
    return make_url(server.url).set(username=role.name)  # no password: the hook supplies it


def provider_for(workspace, **options) -> DatabricksTokenProvider:
    options.setdefault("auto_refresh", False)
    return DatabricksTokenProvider(workspace, instance_names=["my_instance"], **options)


def whoami(engine) -> str:
    with engine.connect() as connection:
        return connection.execute(text("SELECT current_user")).scalar()


# -- the login hook against real authentication ------------------------------------------

def test_new_connections_use_the_renewed_token_and_open_ones_keep_working(role, role_url):
    workspace = FakeWorkspace(role.password)
    provider = provider_for(workspace)
    engine = create_engine(role_url, pool_size=2, max_overflow=0)
    attach(engine, provider)
    try:
        held = engine.connect()
        assert held.execute(text("SELECT current_user")).scalar() == role.name
        workspace.token = role.rotate()
        provider.refresh_token()
        with engine.connect() as fresh:  # the pool's second slot: a new login with the new token
            assert fresh.execute(text("SELECT current_user")).scalar() == role.name
        assert held.execute(text("SELECT 1")).scalar() == 1  # logged in with the old token, still fine
        held.close()
        assert engine.pool.checkedin() == 2
        assert whoami(engine) == role.name
    finally:
        engine.dispose()
    assert len(workspace.calls) == 2


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_token_the_server_refuses_is_replaced_once(role, role_url, driver):
    workspace = FakeWorkspace(role.password)
    provider = provider_for(workspace)
    engine = create_engine(role_url.set(drivername=f"postgresql+{driver}"))
    attach(engine, provider)
    try:
        workspace.token = role.rotate()  # revoked early: the provider's token is still "fresh"
        assert whoami(engine) == role.name
        assert len(workspace.calls) == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_stale_token_fails_with_a_clear_error(role, role_url, cache_schema, driver):
    old = role.password
    workspace = FakeWorkspace(old)
    provider = provider_for(workspace)
    engine = create_engine(role_url.set(drivername=f"postgresql+{driver}"))
    attach(engine, provider)
    try:
        role.rotate()  # Databricks keeps handing out the old token
        with pytest.raises(CacheConnectionError) as refused:
            Cache(engine, schema=cache_schema).get("k")
        message = str(refused.value)
        assert isinstance(refused.value, DatabricksTokenError)
        assert "refused the Databricks token for instance my_instance" in message
        assert f'password authentication failed for user "{role.name}"' in message
        assert old not in message and role.password not in message
        assert len(workspace.calls) == 2  # one retry with a newer token, then the clear error
    finally:
        engine.dispose()


def test_expired_token_with_failing_renewal_raises_on_next_connect(role, role_url):
    clock = FakeClock()
    workspace = FakeWorkspace(role.password, clock=clock, lifetime=HOUR)
    provider = provider_for(workspace, clock=clock)
    engine = create_engine(role_url)
    attach(engine, provider)
    try:
        workspace.failure = RuntimeError("workspace unreachable")
        clock.advance(HOUR - 60)  # inside the renewal window: renewal fails, the old token still logs in
        assert whoami(engine) == role.name
        clock.advance(120)  # now really expired
        engine.dispose()
        with pytest.raises(DatabricksTokenError) as expired:
            whoami(engine)
        message = str(expired.value)
        assert "expired at" in message and "workspace unreachable" in message and "my_instance" in message
        assert role.password not in message
        workspace.failure = None
        assert whoami(engine) == role.name  # Databricks is back: the next connect works again
    finally:
        engine.dispose()


# -- the provider's timing and locking ---------------------------------------------------

def test_get_token_inside_the_renewal_window_returns_promptly():
    # The original held a non-reentrant lock in get_token() and took it again to refresh: a deadlock.
    clock = FakeClock()
    workspace = FakeWorkspace("token-1", clock=clock)
    provider = provider_for(workspace, clock=clock)
    clock.advance(HOUR - 60)
    workspace.token = "token-2"
    result = []
    caller = threading.Thread(target=lambda: result.append(provider.get_token()), daemon=True)
    caller.start()
    caller.join(timeout=1)
    assert result == ["token-2"]


def test_get_token_does_not_wait_for_a_slow_renewal_while_its_token_is_valid():
    clock = FakeClock()
    workspace = FakeWorkspace("token-1", clock=clock)
    provider = provider_for(workspace, clock=clock)
    clock.advance(HOUR - 60)
    workspace.gate = threading.Event()
    renewer = threading.Thread(target=provider.refresh_token, daemon=True)
    renewer.start()
    deadline = time.monotonic() + 2
    while len(workspace.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    assert provider.get_token() == "token-1"
    assert time.monotonic() - started < 1
    workspace.token = "token-2"
    workspace.gate.set()
    renewer.join(timeout=2)
    assert provider.get_token() == "token-2"


@pytest.mark.parametrize("past_expiry", [False, True], ids=["renewal-window", "expired"])
def test_twenty_threads_cause_exactly_one_credential_request(past_expiry):
    clock = FakeClock()
    workspace = FakeWorkspace("token-1", clock=clock)
    provider = provider_for(workspace, clock=clock)
    clock.advance(2 * HOUR if past_expiry else HOUR - 60)
    workspace.token = "token-2"
    workspace.gate = threading.Event()
    start = threading.Barrier(20)
    tokens = []

    def call():
        start.wait()
        tokens.append(provider.get_token())

    threads = [threading.Thread(target=call, daemon=True) for _ in range(20)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # everyone has asked while the one request is still in flight
    workspace.gate.set()
    for thread in threads:
        thread.join(timeout=2)
    assert len(workspace.calls) == 2  # the first token, then exactly one renewal
    assert len(tokens) == 20
    if past_expiry:
        assert set(tokens) == {"token-2"}  # nobody may use an expired token
    else:
        assert "token-2" in tokens and set(tokens) <= {"token-1", "token-2"}
    assert provider.get_token() == "token-2"


class LockThatLetsAnotherThreadIn:
    """The provider's lock; the first time it is released, another thread runs `between` before the holder goes on.

    That is the worst moment for the thread that just renewed: it has its token but
    has not returned yet. Deterministic, where sleeping and hoping would not be.
    """

    def __init__(self, between):
        self._lock = threading.Lock()
        self._between = between
        self.interleaved = False

    def acquire(self, blocking=True):
        return self._lock.acquire(blocking)

    def release(self):
        self._lock.release()
        if not self.interleaved:
            self.interleaved = True
            other = threading.Thread(target=self._between, daemon=True)
            other.start()
            other.join(timeout=5)


def test_refresh_token_that_got_a_token_returns_it_though_a_later_renewal_failed():
    clock = FakeClock()
    workspace = FakeWorkspace("token-1", clock=clock)
    provider = provider_for(workspace, clock=clock)
    workspace.token = "token-2"

    def background_renewal_fails():
        workspace.failure = RuntimeError("Databricks is down")
        with contextlib.suppress(DatabricksTokenError):
            provider._renew(provider._attempts, wait=True)

    provider._lock = LockThatLetsAnotherThreadIn(background_renewal_fails)
    assert provider.refresh_token() == "token-2"
    assert provider._lock.interleaved and len(workspace.calls) == 3  # the failing renewal really ran in between
    assert provider.get_token() == "token-2"


def test_renews_before_the_reported_expiry_with_a_margin():
    clock = FakeClock()
    workspace = FakeWorkspace("token-1", clock=clock, lifetime=HOUR)
    provider = provider_for(workspace, clock=clock, refresh_interval=10 * HOUR, refresh_margin=300)
    clock.advance(HOUR - 301)
    assert provider.get_token() == "token-1" and len(workspace.calls) == 1
    workspace.token = "token-2"
    clock.advance(2)
    assert provider.get_token() == "token-2" and len(workspace.calls) == 2


def test_without_a_reported_expiry_renews_every_refresh_interval():
    clock = FakeClock()
    workspace = FakeWorkspace("token-1", clock=clock, lifetime=None)
    provider = provider_for(workspace, clock=clock, refresh_interval=600)
    clock.advance(599)
    assert provider.get_token() == "token-1"
    workspace.token = "token-2"
    clock.advance(2)
    assert provider.get_token() == "token-2" and len(workspace.calls) == 2


def test_autoscaling_endpoint_uses_the_postgres_api_and_its_timestamp_expiry():
    clock = FakeClock()
    workspace = FakeWorkspace("token-1", clock=clock, lifetime=900)
    endpoint = "projects/p/branches/b/endpoints/e"
    provider = DatabricksTokenProvider(workspace, endpoint=endpoint, auto_refresh=False, clock=clock)
    assert workspace.calls == [{"endpoint": endpoint}]
    clock.advance(900 - 301)
    assert provider.get_token() == "token-1"
    workspace.token = "token-2"
    clock.advance(2)
    assert provider.get_token() == "token-2"


def test_database_api_gets_the_instance_names_and_a_request_id():
    workspace = FakeWorkspace("token-1")
    provider_for(workspace)
    (call,) = workspace.calls
    assert call["instance_names"] == ["my_instance"]
    assert uuid.UUID(call["request_id"])


def test_background_thread_renews_short_lived_tokens_and_stops():
    workspace = FakeWorkspace("token-1", lifetime=0.4)
    provider = DatabricksTokenProvider(workspace, instance_names="my_instance", refresh_margin=0.1)
    try:
        assert provider._thread.daemon
        deadline = time.monotonic() + 2
        while len(workspace.calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(workspace.calls) >= 4  # renewed 0.1 s before the end of each 0.4 s life
    finally:
        provider.stop()
    assert not provider._thread.is_alive()
    provider.stop()  # twice is harmless
    calls = len(workspace.calls)
    time.sleep(0.5)
    assert len(workspace.calls) == calls
    assert "auto_refresh=off" in repr(provider)


def test_failed_background_renewal_keeps_the_old_token_and_logs_why(caplog):
    clock = FakeClock()
    workspace = FakeWorkspace("token-1", clock=clock)
    provider = provider_for(workspace, clock=clock)
    workspace.failure = ConnectionError("workspace unreachable")
    clock.advance(HOUR - 60)
    with caplog.at_level(logging.WARNING, logger="fastpgcache.databricks"):
        assert provider.get_token() == "token-1"
        assert provider.get_token() == "token-1"
    assert len(workspace.calls) == 2  # no second request before the retry delay
    assert "workspace unreachable" in caplog.text
    with pytest.raises(DatabricksTokenError, match="workspace unreachable"):
        provider.refresh_token()  # an explicit refresh says it failed


def test_first_credential_failure_raises_at_construction():
    workspace = FakeWorkspace("token-1")
    workspace.failure = PermissionError("instance my_instance not found")
    with pytest.raises(DatabricksTokenError, match="could not get a Databricks database credential.*not found"):
        provider_for(workspace)


@pytest.mark.parametrize("options, problem", [
    ({}, "either instance_names"),
    ({"instance_names": ["a"], "endpoint": "projects/p"}, "not both"),
    ({"instance_names": ["a"], "refresh_interval": 0}, "refresh_interval must be"),
    ({"instance_names": ["a"], "refresh_margin": -1}, "refresh_margin must be"),
    ({"instance_names": [""]}, "non-empty instance names"),
])
def test_bad_arguments_say_what_is_expected(options, problem):
    workspace = FakeWorkspace("token-1")
    with pytest.raises((ValueError, TypeError), match=problem):
        DatabricksTokenProvider(workspace, auto_refresh=False, **options)
    assert workspace.calls == []


def test_tokens_never_appear_in_logs_reprs_or_errors(role, role_url, cache_schema, caplog):
    clock = FakeClock()
    tokens = [role.password]
    workspace = FakeWorkspace(role.password, clock=clock)
    with caplog.at_level(logging.DEBUG):
        provider = provider_for(workspace, clock=clock)
        engine = create_engine(role_url, echo=True, echo_pool="debug")
        attach(engine, provider)
        cache = Cache(engine, schema=cache_schema)
        cache.set("k", "v")
        assert whoami(engine) == role.name
        tokens.append(role.rotate())
        workspace.token = role.password
        engine.dispose()
        assert cache.get("k") == "v"  # refused token replaced through the hook
        role.rotate()
        tokens.append(role.password)
        workspace.failure = RuntimeError("down")
        engine.dispose()
        errors = []
        for attempt in (lambda: cache.get("k"), provider.refresh_token):
            with pytest.raises(CacheConnectionError) as failed:
                attempt()
            errors.append(failed.value)
        clock.advance(2 * HOUR)
        with pytest.raises(DatabricksTokenError) as expired:
            provider.get_token()
        errors.append(expired.value)
        engine.dispose()
    shown = [caplog.text, repr(provider), repr(provider._credential), repr(engine.url)]
    shown += [str(error) for error in errors] + [repr(error) for error in errors]
    assert "Databricks" in caplog.text and "SELECT" in caplog.text  # the logs did record the work
    for token in tokens:
        for text_shown in shown:
            assert token not in text_shown


# -- the client and the admin command ----------------------------------------------------

@pytest.fixture
def fake_sdk(monkeypatch):
    """Replace the SDK's WorkspaceClient constructor with one returning a FakeWorkspace."""
    import databricks.sdk

    made = SimpleNamespace(kwargs=[], workspace=None, token=None)

    def construct(**kwargs):
        inspect.signature(databricks.sdk.WorkspaceClient).bind(**kwargs)
        made.kwargs.append(kwargs)
        made.workspace = FakeWorkspace(made.token)
        return made.workspace

    monkeypatch.setattr(databricks.sdk, "WorkspaceClient", construct)
    return made


def test_fastpgcache_with_instance_name_logs_in_with_tokens(server, role, cache_schema, fake_sdk):
    fake_sdk.token = role.password
    cache = FastPgCache(host="127.0.0.1", port=server.port, user=role.name, password="ignored-in-databricks-mode",
                        instance_name="my_instance", profile="DEV", schema=cache_schema, minconn=2, maxconn=3)
    try:
        assert fake_sdk.kwargs == [{"profile": "DEV"}]
        assert fake_sdk.workspace.calls[0]["instance_names"] == ["my_instance"]
        cache.set("session", {"user": "Alice"}, ttl=60)
        fake_sdk.workspace.token = role.rotate()
        cache.token_provider.refresh_token()
        cache.bind.dispose()  # force new logins
        assert cache.get("session") == {"user": "Alice"}
        assert role.password not in repr(cache)
        thread = cache.token_provider._thread
        assert thread.is_alive()
    finally:
        cache.close()
    assert not thread.is_alive()


def test_fastpgcache_without_profile_uses_default_authentication(server, role, cache_schema, fake_sdk):
    fake_sdk.token = role.password
    with FastPgCache(host="127.0.0.1", port=server.port, user=role.name, instance_name="my_instance",
                     schema=cache_schema) as cache:
        assert cache.set("k", 1) and cache.get("k") == 1
    assert fake_sdk.kwargs == [{}]


def test_admin_command_with_databricks_sets_up_the_cache(server, admin_engine, fake_sdk, capsys):
    fake_sdk.token = server.superuser_password
    schema = f"dbx_{uuid.uuid4().hex[:8]}"
    argv = ["--databricks", "--instance-name", "my_instance", "--profile", "DEV", "--host", "127.0.0.1",
            "--port", str(server.port), "--user", "postgres", "--schema", schema]
    assert admin_main(argv) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"{schema}.cache: exists, UNLOGGED, row-level security on")
    assert server.superuser_password not in out.out + out.err
    assert fake_sdk.kwargs == [{"profile": "DEV"}]
    with admin_engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def test_admin_command_reports_a_wrong_token_in_one_line(server, fake_sdk, capsys):
    fake_sdk.token = "not-the-password"
    argv = ["--databricks", "--instance-name", "my_instance", "--host", "127.0.0.1", "--port", str(server.port),
            "--check"]
    assert admin_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused the Databricks token" in err
    assert "not-the-password" not in err


def test_admin_command_needs_an_instance_name(capsys):
    assert admin_main(["--databricks"]) == 2
    assert "--instance-name" in capsys.readouterr().err


def test_setup_cache_with_a_token_provider(server, admin_engine):
    workspace = FakeWorkspace(server.superuser_password)
    schema = f"dbx_{uuid.uuid4().hex[:8]}"
    with provider_for(workspace) as provider:
        status = setup_cache(host="127.0.0.1", port=server.port, user="postgres", password="ignored",
                             schema=schema, token_provider=provider)
    assert status["exists"] and status["revision"]
    with admin_engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def test_without_the_sdk_import_works_and_databricks_mode_says_what_to_install():
    # A fresh interpreter where `import databricks` fails, as on an install without the extra.
    program = (
        "import sys; sys.modules['databricks'] = None\n"
        "import fastpgcache\n"
        "assert 'databricks.sdk' not in sys.modules\n"
        "from fastpgcache.admin import main\n"
        "sys.exit(main(['--databricks', '--instance-name', 'x']))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "pip install 'fastpgcache[databricks]'" in result.stderr


def test_fastpgcache_with_a_refused_token_fails_in_the_constructor_and_stops_renewing(server, role, fake_sdk):
    def renewers():
        return sum(thread.name == "fastpgcache-databricks-token" for thread in threading.enumerate())

    before = renewers()
    fake_sdk.token = "not-the-password"
    with pytest.raises(DatabricksTokenError, match="refused the Databricks token") as refused:
        FastPgCache(host="127.0.0.1", port=server.port, user=role.name, instance_name="my_instance")
    assert "not-the-password" not in str(refused.value)
    assert renewers() == before
