"""Databricks OAuth tokens as PostgreSQL passwords: a provider that keeps one valid, and the hook that uses it.

Databricks-managed PostgreSQL takes a short-lived OAuth token as the password.
`DatabricksTokenProvider` fetches tokens through the Databricks SDK (the optional
`databricks` extra) and renews them before they expire; `attach()` makes every
new connection of an Engine log in with the current token::

    from databricks.sdk import WorkspaceClient
    from sqlalchemy import create_engine
    from fastpgcache.databricks import DatabricksTokenProvider, attach

    provider = DatabricksTokenProvider(WorkspaceClient(), instance_names=["my_instance"])
    engine = create_engine("postgresql+psycopg2://me%40company.com@my-host/databricks_postgres")
    attach(engine, provider)
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import event
from sqlalchemy.engine import Engine

from .errors import CacheConnectionError, CacheError, first_line

log = logging.getLogger(__name__)

INSTALL_HINT = "Databricks support needs the databricks-sdk package: pip install 'fastpgcache[databricks]'"

DEFAULT_REFRESH_MARGIN = 300.0
"""Seconds before a credential's own expiry at which it is renewed (clock skew, slow logins)."""

RETRY_DELAY = 15.0
"""Seconds between renewal attempts after a failure, while the old token is still valid."""

_SHORTEST_PAUSE = 0.05
"""Floor of the background thread's sleep, so a credential that is due at once cannot make it spin."""


class DatabricksSdkMissingError(CacheError, ImportError):
    """The `databricks` extra (databricks-sdk) is not installed."""


class DatabricksTokenError(CacheConnectionError):
    """No usable Databricks token: the credential request failed (and the last token, if any, expired)."""


@dataclass(frozen=True)
class Credential:
    """One token, when to renew it, and when it stops working (Unix times)."""

    token: str = field(repr=False)
    renew_at: float
    expires_at: float

    def fresh(self, now: float) -> bool:
        return now < self.renew_at

    def valid(self, now: float) -> bool:
        return now < self.expires_at


class DatabricksTokenProvider:
    """Keeps a valid Databricks database token, renewing it ahead of its expiry.

    ::

        from databricks.sdk import WorkspaceClient
        from fastpgcache import DatabricksTokenProvider

        provider = DatabricksTokenProvider(WorkspaceClient(profile="DEFAULT"), instance_names=["my_instance"])
        password = provider.get_token()
        provider.stop()

    Tokens come from `workspace_client.database.generate_database_credential`
    for `instance_names`, or from `workspace_client.postgres.generate_database_credential`
    for an autoscaling `endpoint` ("projects/P/branches/B/endpoints/E"). A token is
    renewed `refresh_margin` seconds before the expiry Databricks reports (half
    way through its life if that is shorter), and at least every
    `refresh_interval` seconds. The first token is fetched here, so wrong
    credentials fail at once; with `auto_refresh` a daemon thread renews the
    rest. `get_token()` never waits while a valid token exists, and only one
    thread at a time asks Databricks.
    """

    def __init__(self, workspace_client, instance_names: Iterable[str] | str | None = None,
                 refresh_interval: float = 3600, auto_refresh: bool = True, *, endpoint: str | None = None,
                 refresh_margin: float = DEFAULT_REFRESH_MARGIN, clock: Callable[[], float] = time.time):
        self.instance_names = _names(instance_names)
        self.endpoint = endpoint
        if bool(self.instance_names) == (endpoint is not None):
            raise ValueError("give either instance_names=['my_instance'] (a database instance) or "
                             "endpoint='projects/P/branches/B/endpoints/E' (autoscaling), not both or neither")
        self.refresh_interval = _seconds("refresh_interval", refresh_interval, allow_zero=False)
        self.refresh_margin = _seconds("refresh_margin", refresh_margin, allow_zero=True)
        self._client = workspace_client
        self._clock = clock
        self._lock = threading.Lock()  # held only by the one thread talking to Databricks
        self._attempts = 0
        self._failure: DatabricksTokenError | None = None
        self._retry_at = -math.inf
        self._stopped = threading.Event()
        self._credential = self._fetch()
        self._thread = None
        if auto_refresh:
            self._thread = threading.Thread(target=self._renew_in_background, daemon=True,
                                            name="fastpgcache-databricks-token")
            self._thread.start()

    def __repr__(self) -> str:
        running = "on" if self._thread is not None and self._thread.is_alive() else "off"
        return (f"<DatabricksTokenProvider {self._target} token valid until "
                f"{_utc(self._credential.expires_at)} auto_refresh={running}>")

    @property
    def _target(self) -> str:
        return f"endpoint {self.endpoint}" if self.endpoint else f"instance {', '.join(self.instance_names)}"

    def get_token(self) -> str:
        """The current token, renewed first when due; never waits while a valid token exists.

        ::

            connection = psycopg2.connect(host=host, user=user, password=provider.get_token())
        """
        attempt, credential, now = self._attempts, self._credential, self._clock()
        if credential.fresh(now):
            return credential.token
        if credential.valid(now):
            # Renewal window: whoever gets the lock renews, everyone else keeps the still-valid token.
            if now < self._retry_at:
                return credential.token
            return self._renew(attempt, wait=False).token
        return self._renew(attempt, wait=True).token

    def refresh_token(self, rejected: str | None = None) -> str:
        """Fetch a new token now and return it; raises `DatabricksTokenError` if Databricks refuses.

        With `rejected` (a token the server refused), a token another thread has
        fetched since is returned instead of asking Databricks again::

            new_token = provider.refresh_token()
        """
        attempt, credential = self._attempts, self._credential
        if rejected is not None and credential.token != rejected:
            return credential.token
        return self._renew(attempt, wait=True, strict=True).token

    def stop(self) -> None:
        """Stop the background renewal; calling it twice is harmless, the last token stays readable."""
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def __enter__(self) -> DatabricksTokenProvider:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- renewal -------------------------------------------------------------------------

    def _renew(self, seen_attempt: int, *, wait: bool, strict: bool = False) -> Credential:
        """Renew unless another thread tried since `seen_attempt`; returns the newest usable credential.

        `strict` raises when that attempt failed, judged under the lock: once it is
        released, a later attempt by another thread may overwrite the outcome.
        """
        if not self._lock.acquire(blocking=wait):
            return self._credential
        try:
            if self._attempts == seen_attempt:
                self._attempt()
            failure = self._failure
            if strict and failure is not None:
                raise DatabricksTokenError(str(failure)) from failure.__cause__
            return self._usable()
        finally:
            self._lock.release()

    def _attempt(self) -> None:
        # The caller holds the lock; a failure is kept so every waiting thread reports the same cause.
        # The count goes up only once the outcome is stored: a thread that read it mid-request still waits for it.
        try:
            self._credential = self._fetch()
            self._failure = None
        except DatabricksTokenError as error:
            self._failure = error
            self._retry_at = self._clock() + RETRY_DELAY
            log.warning("%s; keeping the current token, valid until %s", error, _utc(self._credential.expires_at))
        finally:
            self._attempts += 1

    def _usable(self) -> Credential:
        # A just-fetched credential is used even if our clock calls it expired: the server decides.
        credential = self._credential
        if self._failure is None or credential.valid(self._clock()):
            return credential
        raise DatabricksTokenError(f"the Databricks token for {self._target} expired at "
                                   f"{_utc(credential.expires_at)} and renewing it failed: {self._failure}")

    def _renew_in_background(self) -> None:
        while not self._stopped.wait(self._pause()):
            if not self._credential.fresh(self._clock()):
                with contextlib.suppress(DatabricksTokenError):
                    self._renew(self._attempts, wait=True)

    def _pause(self) -> float:
        # Until the credential is due, or until the next retry after a failure.
        due = max(self._credential.renew_at, self._retry_at)
        return max(_SHORTEST_PAUSE, due - self._clock())

    # -- talking to Databricks -----------------------------------------------------------

    def _fetch(self) -> Credential:
        """Ask Databricks for a new credential: the only place its API is called."""
        fetched_at = self._clock()
        try:
            response = self._request()
        except Exception as error:
            raise DatabricksTokenError(
                f"could not get a Databricks database credential for {self._target}: {type(error).__name__}: "
                f"{first_line(error)} (check the workspace authentication, e.g. the --profile/profile, "
                "and that the instance exists and you may use it)") from error
        token = getattr(response, "token", None)
        if not isinstance(token, str) or not token:
            raise DatabricksTokenError(f"Databricks returned no token for {self._target}")
        expires_at = _expiry(response)
        log.info("new Databricks database credential for %s, valid until %s", self._target, _utc(expires_at))
        return Credential(token, self._renew_time(fetched_at, expires_at), expires_at)

    def _request(self):
        if self.endpoint:
            return self._client.postgres.generate_database_credential(endpoint=self.endpoint)
        return self._client.database.generate_database_credential(request_id=str(uuid.uuid4()),
                                                                  instance_names=list(self.instance_names))

    def _renew_time(self, fetched_at: float, expires_at: float) -> float:
        margin = max(0.0, min(self.refresh_margin, (expires_at - fetched_at) / 2))
        return min(fetched_at + self.refresh_interval, expires_at - margin)


def attach(engine: Engine, provider: DatabricksTokenProvider) -> None:
    """Make every new connection of `engine` log in with the provider's current token.

    ::

        engine = create_engine("postgresql+psycopg2://me%40company.com@my-host/databricks_postgres")
        attach(engine, provider)

    Open connections keep working when the token changes (PostgreSQL checks the
    password only at login). When the server refuses a token, the provider is
    asked once for a newer one; if that is refused too, `DatabricksTokenError` says so.
    """

    def log_in_with_token(dialect, connection_record, cargs, cparams):
        # A refused token is renewed once: Databricks may revoke one before its reported expiry.
        cparams["password"] = provider.get_token()
        for last_try in (False, True):
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as error:
                if not _login_refused(error):
                    raise
                token = None if last_try else provider.refresh_token(rejected=cparams["password"])
                if token in (None, cparams["password"]):
                    raise _refused(provider, error) from None
                cparams["password"] = token

    event.listen(engine, "do_connect", log_in_with_token)


def _login_refused(error: Exception) -> bool:
    return "authentication failed" in str(error).lower()


def _refused(provider: DatabricksTokenProvider, error: Exception) -> DatabricksTokenError:
    # Said in Databricks terms: the generic hint (check PGPASSWORD) would point the wrong way.
    detail = first_line(error).split("FATAL:")[-1].strip()
    return DatabricksTokenError(
        f"the server refused the Databricks token for {provider._target} ({detail}), also after renewing it: "
        "check that this user has a PostgreSQL role in the instance and may log in to this database")


def workspace_client(profile: str | None = None):
    """A Databricks `WorkspaceClient`: with a ~/.databrickscfg `profile` (local IDEs), else default auth (notebooks).

    ::

        client = workspace_client("DEFAULT")
    """
    try:
        from databricks.sdk import WorkspaceClient
    except ImportError:
        raise DatabricksSdkMissingError(INSTALL_HINT) from None
    try:
        return WorkspaceClient(profile=profile) if profile else WorkspaceClient()
    except Exception as error:
        source = f"profile {profile!r}" if profile else "the default authentication (no profile given)"
        raise DatabricksTokenError(
            f"cannot set up the Databricks workspace client from {source}: {first_line(error)}") from error


def provider_for_instance(instance_name: str, profile: str | None = None, **options) -> DatabricksTokenProvider:
    """A running token provider for one database instance; what `FastPgCache(instance_name=...)` uses.

    ::

        provider = provider_for_instance("my_instance", profile="DEFAULT")
    """
    return DatabricksTokenProvider(workspace_client(profile), instance_names=[instance_name], **options)


def _names(instance_names) -> list[str]:
    # A lone string is one instance name, not a sequence of one-letter names.
    if instance_names is None:
        return []
    names = [instance_names] if isinstance(instance_names, str) else list(instance_names)
    if not all(isinstance(name, str) and name for name in names):
        raise TypeError("instance_names must be a list of non-empty instance names, e.g. ['my_instance']")
    return names


def _seconds(name: str, value, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number of seconds {bound}, got {value!r}")
    return float(value)


def _expiry(response) -> float:
    """When the credential expires as a Unix time; infinity when Databricks does not say."""
    # The database API reports an RFC 3339 string, the postgres API a protobuf Timestamp.
    stamp = getattr(response, "expire_time", None) or getattr(response, "expiration_time", None)
    if stamp is None:
        return math.inf
    try:
        if isinstance(stamp, datetime):
            return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()
        return (_rfc3339(stamp) if isinstance(stamp, str) else stamp).ToNanoseconds() / 1e9
    except (ValueError, TypeError, AttributeError):
        log.warning("cannot read the credential's expiry %r; renewing it every refresh_interval", stamp)
        return math.inf


def _rfc3339(text: str):
    # protobuf ships with the SDK and parses every RFC 3339 form, which datetime does not on Python 3.10.
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromJsonString(text)
    return stamp


def _utc(moment: float) -> str:
    if math.isinf(moment):
        return "renewal (no expiry reported)"
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
