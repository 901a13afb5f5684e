"""The negative-lookup guard: a per-process Bloom filter kept coherent through LISTEN/NOTIFY.

A Bloom filter never forgets, so deletes and expiry only leave harmless false
positives; what must never happen is a key present in the table reading as
absent. The guard therefore answers only while it is *trusted*: its LISTEN
connection is up, and after LISTEN was in place it has read every key of its
user from the table (expired rows too: an upsert that revives one fires no
INSERT trigger). Inserts made anywhere after LISTEN arrive as notifications
from the trigger of migration 0002, as short hashes of (user, key); writes made
through this process are added before the call returns.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import select
import threading
import time
import weakref

from sqlalchemy.engine import Engine

from .cache import Cache, listen_sql
from .errors import check_positive_int, check_positive_seconds

log = logging.getLogger(__name__)

HASH_BYTES = 8
"""Bytes of sha256(user NUL key) a notification carries per key (as hex); the trigger uses the same."""

PAGE_SIZE = 10_000
"""Keys per warm-up query: each page is its own short statement."""

HEARTBEAT_SECONDS = 2.0
"""The listener re-issues LISTEN (so a dead connection is noticed) and re-checks the trigger this often."""

PSYCOPG3_FLOOR = (3, 3)
"""Older psycopg 3 can lose notifications and lacks notifies(timeout=, stop_after=)."""

WAKE_SECONDS = 0.1
"""The idle listener wakes this often to notice stop(), so closing a client is quick."""

_RUNNING: "weakref.WeakSet[NegativeLookupGuard]" = weakref.WeakSet()


def key_token(user: str, key: str) -> str:
    """The hash a notification carries for (user, key); the trigger computes the same in SQL::

        key_token("alice", "user:1")   # 16 hex digits
    """
    data = f"{user}\x00{key}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[: 2 * HASH_BYTES]


def notify_channel(schema: str, table: str) -> str:
    """The channel of one cache table: a hash, so the name fits in 63 bytes and needs no quoting."""
    return "fastpgcache_" + hashlib.sha256(f"{schema}\x00{table}".encode()).hexdigest()[:24]


def notify_function_name(table: str) -> str:
    """Name of the trigger and its function, cut to 63 bytes as PostgreSQL would."""
    return f"{table}_notify_insert".encode()[:63].decode("utf-8", "ignore")


class _TurnOff(Exception):
    """The guard cannot work here; the message says why and what to do."""


class _Listener:
    """One connection outside the application's pool, parked on LISTEN."""

    def __init__(self, pool):
        self._pool = pool
        self._fairy = pool.connect()
        self.raw = self._fairy.dbapi_connection
        self.raw.autocommit = True
        if not hasattr(self.raw, "poll") and not hasattr(self.raw, "notifies"):
            self.close()
            raise _TurnOff(f"the {type(self.raw).__module__} driver cannot receive notifications; use psycopg2")
        too_old = None if hasattr(self.raw, "poll") else _psycopg3_too_old()
        if too_old:
            self.close()
            raise _TurnOff(f"psycopg {too_old} can lose notifications; pip install 'psycopg[binary]>=3.3'"
                           " (or use psycopg2)")

    def listen(self, channel: str) -> None:
        cursor = self.raw.cursor()
        try:
            cursor.execute(listen_sql(channel))
        finally:
            cursor.close()

    def receive(self, timeout: float) -> list[str]:
        """Payloads that have arrived, waiting up to `timeout` seconds for the first one."""
        if hasattr(self.raw, "poll"):  # psycopg2
            if timeout > 0 and not self.raw.notifies:
                select.select([self.raw], [], [], timeout)
            self.raw.poll()
            payloads = [note.payload for note in self.raw.notifies]
            del self.raw.notifies[:]
            return payloads
        # psycopg 3: return at the first arrival, then take whatever else is already there.
        notes = list(self.raw.notifies(timeout=max(timeout, 0.0), stop_after=1))
        if notes:
            notes += self.raw.notifies(timeout=0.0)
        return [note.payload for note in notes]

    @property
    def broken(self) -> bool:
        return bool(self.raw.closed)

    def close(self) -> None:
        try:
            self._fairy.invalidate()
        finally:
            self._pool.dispose()


class NegativeLookupGuard:
    """Answers "definitely absent" for one (database, schema, table, user) without a round trip.

    `FastPgCache` creates one when `use_cuckoo_filter=True`; for a `Cache` on an
    Engine, make one yourself::

        cache = Cache(engine, schema="cache")
        cache.guard = NegativeLookupGuard(cache, capacity=1_000_000).start()
        cache.guard.wait_until_trusted(5)   # optional: lookups go to the database until then

    It turns itself off, with one log line, where it cannot be sure (no
    pybloomfiltermmap3, no trigger, notifications that do not arrive as behind
    a transaction-mode pooler): slower, never wrong.
    """

    def __init__(self, cache: Cache, capacity: int = 1_000_000, *, error_rate: float = 0.01,
                 probe_timeout: float = 2.0, heartbeat: float = HEARTBEAT_SECONDS):
        if not isinstance(cache.bind, Engine):
            raise TypeError("the negative-lookup guard needs a Cache on an Engine (it opens its own listener)")
        check_positive_int("capacity", capacity)
        if not 0 < error_rate < 1:
            raise ValueError(f"error_rate must be between 0 and 1, got {error_rate!r}")
        check_positive_seconds("heartbeat", heartbeat)
        # A twin without a guard runs the warm-up, so the guard never consults itself.
        self._cache = Cache(cache.bind, schema=cache.schema, table=cache.table, user_id=cache.user_id)
        self.capacity = capacity
        self.error_rate = error_rate
        self.probe_timeout = probe_timeout
        self.heartbeat = heartbeat
        self.channel = notify_channel(cache.schema, cache.table)
        self.where = f"{cache.schema}.{cache.table}"
        self.state = "starting"
        self._user: str | None = None
        self._active = None  # the filter answering lookups; None while not trusted
        self._targets: list = []  # filters that receive every new key
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._trusted = threading.Event()
        self._reset_requested = False
        self._probe_payload: str | None = None  # the probe this guard waits for
        self._probe_seen = False
        self._failures = 0
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<NegativeLookupGuard {self.where} {self.state}>"

    # -- used by Cache on every call ---------------------------------------------------

    def definitely_absent(self, key: str) -> bool:
        """True only when the key cannot be in the table; False means "ask the database"."""
        active = self._active
        return active is not None and key_token(self._user, key) not in active

    def remember(self, keys) -> None:
        """Add keys this process has just written, before its call returns."""
        if self._targets:
            self._add([key_token(self._user, key) for key in keys])

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "NegativeLookupGuard":
        """Start listening and warming in a background thread; returns self."""
        try:
            import pybloomfilter  # noqa: F401
        except ImportError:
            self._turn_off("pybloomfiltermmap3 is not installed (pip install 'fastpgcache[bloom]')")
            return self
        self._pool = self._cache.bind.pool.recreate()
        self._thread = threading.Thread(target=self._run, name=f"fastpgcache-guard {self.where}", daemon=True)
        _RUNNING.add(self)
        self._thread.start()
        return self

    def wait_until_trusted(self, timeout: float | None = None) -> bool:
        """Block until the guard answers lookups (True), or `timeout` passes or it turned off (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._trusted.wait(0.05):
            if self.state.startswith("off") or self.state == "stopped":
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
        return True

    def stop(self) -> None:
        """Stop the listener thread and answer nothing more."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._untrust()
        self.state = "stopped"

    def stats(self) -> dict:
        """State, keys in the filter (estimated) and its capacity."""
        active = self._active
        return {"state": self.state, "filter_keys": len(active) if active is not None else 0,
                "filter_capacity": active.capacity if active is not None else self.capacity}

    # -- the listener thread ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen_and_serve()
            except _TurnOff as reason:
                self._turn_off(str(reason))
                return
            except Exception as error:  # a lost or refused connection: untrusted until re-warmed
                self._untrust()
                self.state = "reconnecting"
                if self._failures == 0:
                    log.warning("negative-lookup guard on %s has no working listener (%s); lookups go to "
                                "the database until it has reconnected and re-warmed", self.where, _summary(error))
                self._failures += 1
                self._stopping.wait(min(30.0, 0.25 * 2 ** min(self._failures, 7)))

    def _listen_and_serve(self) -> None:
        listener = _Listener(self._pool)
        try:
            self._listen(listener)
            self._check_trigger()
            self._user = self._user or self._cache._current_user()
            self._probe(listener)
            self._warm(listener, keep_answering=False)
            self._serve(listener)
        finally:
            listener.close()

    def _listen(self, listener: _Listener) -> None:
        try:
            listener.listen(self.channel)
        except Exception as error:
            if listener.broken:
                raise
            raise _TurnOff(f"LISTEN was refused ({_summary(error)})") from None

    def _probe(self, listener: _Listener) -> None:
        # A pooler in transaction mode accepts LISTEN but never delivers: check that a
        # notification sent from another connection really arrives.
        self._probe_payload, self._probe_seen = f"probe:{secrets.token_hex(8)}", False
        self._cache._notify(self.channel, self._probe_payload)
        deadline = time.monotonic() + self.probe_timeout
        while not self._probe_seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TurnOff("notifications do not reach this process (a transaction-mode pooler such as "
                               "pgbouncer?); connect directly to PostgreSQL to use the guard")
            self._receive(listener, remaining)

    def _check_trigger(self) -> None:
        # Without the trigger firing for every session, other processes' inserts go unnoticed.
        if not self._cache._has_notify_trigger(notify_function_name(self._cache.table)):
            raise _TurnOff("the table has no insert-notification trigger, or it is disabled; upgrade it with "
                           f"`fastpgcache-admin` or ALTER TABLE ... ENABLE ALWAYS TRIGGER "
                           f"{notify_function_name(self._cache.table)}")

    def _serve(self, listener: _Listener) -> None:
        next_beat = time.monotonic() + self.heartbeat
        while not self._stopping.is_set():
            self._receive(listener, WAKE_SECONDS)
            if time.monotonic() >= next_beat:
                self._heartbeat(listener)
                next_beat = time.monotonic() + self.heartbeat
            if self._reset_requested:
                self._warm(listener, keep_answering=False)
            elif self._active is not None and len(self._active) > self._active.capacity:
                self._warm(listener, keep_answering=True)

    def _heartbeat(self, listener: _Listener) -> None:
        """Re-LISTEN, so a dead connection shows, and check that the trigger still fires.

        The check waits for a pooled connection, and notifications are not read
        meanwhile: the filter answers nothing until they have been taken.
        """
        listener.listen(self.channel)
        with self._lock:
            answering, self._active = self._active, None
        self._check_trigger()
        self._receive(listener, 0)
        with self._lock:
            if self._targets:  # not untrusted (reset, stop) meanwhile
                self._active = answering

    def _receive(self, listener: _Listener, timeout: float) -> int:
        """Add the keys of arrived notifications to every filter; returns how many messages came."""
        payloads = listener.receive(timeout)
        tokens = []
        for payload in payloads:
            if payload == "reset":
                # Some statement inserted more keys than it could list: nothing can be trusted.
                self._reset_requested = True
                self._untrust()
            elif payload.startswith("probe:"):  # other processes' probes arrive here too
                self._probe_seen = self._probe_seen or payload == self._probe_payload
            else:
                tokens.extend(payload.split())
        if tokens:
            self._add(tokens)
        return len(payloads)

    def _add(self, tokens: list[str]) -> None:
        """Put tokens in every filter that must hold them: the answering one and one being filled."""
        with self._lock:
            for bloom in self._targets:
                bloom.update(tokens)

    def _warm(self, listener: _Listener, keep_answering: bool) -> None:
        """Fill a new filter from the table, then let it answer.

        LISTEN is already in place, so every insert committed after a page was
        read arrives as a notification; those are taken between pages. A rebuild
        for size keeps the old filter answering meanwhile (it still holds every
        key); a reset or a first warm-up answers nothing until done.
        """
        while not self._stopping.is_set():
            previous = self._active if keep_answering else None
            fresh = self._new_filter(len(previous) if previous is not None else 0)
            with self._lock:
                self._reset_requested = False
                self._targets = [bloom for bloom in (previous, fresh) if bloom is not None]
            if not keep_answering:
                self.state = "warming"
            if self._fill(listener, fresh):
                with self._lock:
                    self._active, self._targets = fresh, [fresh]
                self.state = "trusted"
                self._failures = 0
                self._trusted.set()
                return
            keep_answering = False  # a reset came while filling: start again, answering nothing

    def _fill(self, listener: _Listener, fresh) -> bool:
        # False when a reset arrives (or the guard stops) before the last page.
        after = ""
        while True:
            keys = self._cache._key_page(after, PAGE_SIZE)
            fresh.update([key_token(self._user, key) for key in keys])
            self._receive(listener, 0)
            if self._reset_requested or self._stopping.is_set():
                return False
            if len(keys) < PAGE_SIZE:
                return True
            after = keys[-1]

    def _new_filter(self, expected: int):
        from pybloomfilter import BloomFilter

        # A user with more keys than the capacity gets room for twice as many,
        # so a full filter does not rebuild over and over.
        return BloomFilter(max(self.capacity, 2 * expected), self.error_rate)

    def _untrust(self) -> None:
        with self._lock:
            self._active, self._targets = None, []
        self._trusted.clear()

    def _turn_off(self, reason: str) -> None:
        self._untrust()
        self.state = f"off: {reason}"
        log.warning("negative-lookup guard on %s is off: %s; every lookup goes to the database", self.where, reason)


def _psycopg3_too_old() -> str | None:
    # The installed psycopg 3 version when it is below PSYCOPG3_FLOOR, else None.
    import psycopg

    if tuple(int(part) for part in re.findall(r"\d+", psycopg.__version__)[:2]) < PSYCOPG3_FLOOR:
        return psycopg.__version__
    return None


def _summary(error: Exception) -> str:
    # First line only: enough to act on, and driver messages never carry the password.
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _forget_in_child() -> None:
    # A forked child has the filter but not the listener thread: it would go stale.
    for guard in list(_RUNNING):
        guard._lock = threading.Lock()
        guard._active, guard._targets = None, []
        guard._trusted.clear()
        guard.state = "off: inherited across fork; create the cache after forking"


os.register_at_fork(after_in_child=_forget_in_child)
