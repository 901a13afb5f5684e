"""The negative-lookup guard: a per-process Bloom filter kept coherent through LISTEN/NOTIFY.

A Bloom filter never forgets, so deletes and expiry only leave harmless false
positives; what must never happen is a key present in the table reading as
absent. The guard therefore answers only while it is *trusted*: its LISTEN
connection is up, and after LISTEN was in place it has read every key of its
role from the table (expired rows too: an upsert that revives one announces
nothing). Inserts made anywhere after LISTEN arrive as notifications, sent by
the write functions of migration 0004 on the role's own channel (named after
the role's secret, so no other role can listen, send or forge) with keyed
hashes of the keys; writes made through this process are added before the
call returns.

The guard trusts the functions only while the catalogs say nobody can write
around them (catalog.py), and steps aside while PostgreSQL's notification
queue fills (writers stop notifying at half full). On a table distributed by
Citus it stays off: a notification reaches only the node whose function sent
it, and clients may enter through any node.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import select
import threading
import time
import weakref
from collections.abc import Sequence

from sqlalchemy.engine import Engine

from .cache import Cache
from .catalog import inspect_cache
from .errors import check_positive_int, check_positive_seconds
from .execution import first_row, nothing
from .identity import RECENT_KEYS, Identity
from .statements import NOTIFY

log = logging.getLogger(__name__)

PAGE_SIZE = 10_000
"""Keys per warm-up query: each page is its own short statement."""

HEARTBEAT_SECONDS = 2.0
"""The listener re-issues LISTEN (so a dead connection is noticed) and re-checks the catalogs this often."""

QUEUE_CHECK_SECONDS = 0.5
"""How often the listener reads the notification queue's usage."""

QUEUE_OFF, QUEUE_ON = 0.25, 0.10
"""The guard stops answering at this share of the notification queue, and resumes below the second.
Writers stop notifying at 0.5 (migration 0004): a quarter of the queue (2 GB by default) lies between."""

MIN_QUEUE_MARGIN_BYTES = 256 * 1024 * 1024
"""Below this much queue between the guard's stop and the writers' (a small max_notify_queue_pages),
a burst could cross it between two checks: the guard stays off."""

RESET_SECONDS = 1.0
"""After a "reset" (a batch too large to list), at most one re-read of the table this often."""

PSYCOPG3_FLOOR = (3, 3)
"""Older psycopg 3 can lose notifications and lacks notifies(timeout=, stop_after=)."""

WAKE_SECONDS = 0.1
"""The idle listener wakes this often to notice stop(), so closing a client is quick."""

BATCH_SECONDS = 0.005
"""After taking notifications the listener sleeps this long (without the GIL), so a busy table wakes it at
most 200 times a second instead of once per write; another process's key is seen this much later."""

_RUNNING: weakref.WeakSet[NegativeLookupGuard] = weakref.WeakSet()


def listen_sql(channel: str) -> str:
    """`LISTEN` for a channel name made of [a-z0-9_] (the secrets table's `channel`)."""
    if not re.fullmatch(r"[a-z0-9_]{1,63}", channel):
        raise ValueError(f"invalid channel name {channel!r}")
    return f"LISTEN {channel}"


class _TurnOff(Exception):
    """The guard cannot work here; the message says why and what to do."""


class _Listener:
    """One connection outside the application's pool, parked on LISTEN."""

    def __init__(self, pool):
        self._pool = pool
        self._fairy = pool.connect()
        self.raw = self._fairy.dbapi_connection
        self.raw.autocommit = True
        info = getattr(self.raw, "info", None)  # psycopg 3; psycopg2 has get_backend_pid()
        self.pid = info.backend_pid if hasattr(info, "backend_pid") else self.raw.get_backend_pid()
        if not hasattr(self.raw, "poll") and not hasattr(self.raw, "notifies"):
            self.close()
            raise _TurnOff(f"the {type(self.raw).__module__} driver cannot receive notifications; use psycopg2")
        too_old = None if hasattr(self.raw, "poll") else _psycopg3_too_old()
        if too_old:
            self.close()
            raise _TurnOff(f"psycopg {too_old} can lose notifications; pip install 'psycopg[binary]>=3.3'"
                           " (or use psycopg2)")

    def run(self, sql: str):
        """Run one statement on the listener's own connection; its first value, if any."""
        cursor = self.raw.cursor()
        try:
            cursor.execute(sql)
            return cursor.fetchone()[0] if cursor.description else None
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
    """Answers "definitely absent" for one (database, schema, table, role) without a round trip.

    `FastPgCache` creates one when `use_cuckoo_filter=True`; for a `Cache` on an
    Engine, make one yourself::

        cache = Cache(engine, schema="cache")
        cache.guard = NegativeLookupGuard(cache, capacity=1_000_000).start()
        cache.guard.wait_until_trusted(5)   # optional: lookups go to the database until then

    It turns itself off, with one log line, where it cannot be sure (no
    pybloomfiltermmap3, a table without write functions or that roles may
    write around them, notifications that do not arrive as behind a
    transaction-mode pooler): slower, never wrong.
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
        self.where = f"{cache.schema}.{cache.table}"
        self.state = "starting"
        self.channel: str | None = None
        self._identity: Identity | None = None
        self._active = None  # the filter answering lookups; None while not trusted
        self._targets: list = []  # filters that receive every new key
        # Keys this process has put in every filter of `_targets` lately: a filter never loses a key, so
        # writing one again needs no filter insert. Renewed with `_targets` (_switch_filters).
        self._remembered: dict = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._trusted = threading.Event()
        self._reset_requested = False
        self._last_warm = 0.0
        self._queue_full = False
        self._probe_payload: str | None = None  # the probe this guard waits for
        self._probe_seen = False
        self._failures = 0
        self.warm_ups = 0  # full reads of the table: at most one per RESET_SECONDS after a reset
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<NegativeLookupGuard {self.where} {self.state}>"

    # -- used by Cache on every call ---------------------------------------------------

    def definitely_absent(self, key: str) -> bool:
        """True only when the key cannot be in the table; False means "ask the database"."""
        active, identity = self._active, self._identity
        return active is not None and identity is not None and identity.token(key) not in active

    def remember(self, keys) -> None:
        """Add keys this process has just written, before its call returns."""
        identity, remembered = self._identity, self._remembered
        if self._targets and identity is not None:
            new = [key for key in keys if key not in remembered]
            if new:
                self._add([identity.token(key) for key in new], remembered, new)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> NegativeLookupGuard:
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
        """State, keys in the filter (estimated), its capacity, and how often the table was read."""
        active = self._active
        return {"state": self.state, "filter_keys": len(active) if active is not None else 0,
                "filter_capacity": active.capacity if active is not None else self.capacity,
                "warm_ups": self.warm_ups}

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
        listener = self._listener = _Listener(self._pool)
        try:
            self._check_trust()
            # Read anew at every (re)connect: a table forced anew by the admin gives every role a new secret.
            self._identity = self._cache._identity_now()
            self.channel = self._identity.channel
            self._listen(listener)
            self._check_queue(listener, first=True)
            self._probe(listener)
            self._warm(listener, keep_answering=False)
            self._serve(listener)
        finally:
            listener.close()

    @property
    def _me(self) -> Identity:
        # The listener thread reads the identity before anything that needs it runs.
        if self._identity is None:
            raise RuntimeError("the negative-lookup guard has not read its role's identity yet")
        return self._identity

    def _listen(self, listener: _Listener) -> None:
        try:
            listener.run(listen_sql(self._me.channel))
        except Exception as error:
            if listener.broken:
                raise
            raise _TurnOff(f"LISTEN was refused ({_summary(error)})") from None

    def _probe(self, listener: _Listener) -> None:
        # A pooler in transaction mode accepts LISTEN but never delivers: check that a
        # notification sent from another connection really arrives.
        self._probe_payload, self._probe_seen = f"probe:{secrets.token_hex(8)}", False
        self._cache._execute(NOTIFY, {"channel": self.channel, "payload": self._probe_payload}, nothing)
        deadline = time.monotonic() + self.probe_timeout
        while not self._probe_seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TurnOff("notifications do not reach this process (a transaction-mode pooler such as "
                               "pgbouncer?); connect directly to PostgreSQL to use the guard")
            self._receive(listener, remaining)

    def _check_trust(self) -> None:
        # Every insert must go through the write functions, which announce it; otherwise turn off.
        with self._cache.bind.connect() as connection:
            catalog = inspect_cache(connection, self._cache.schema, self._cache.table, None)
            queue_pages = connection.exec_driver_sql(
                "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'max_notify_queue_pages'").scalar()
        problems = catalog.announcement_problems()
        if problems:
            raise _TurnOff(problems[0])
        if queue_pages is not None and int(queue_pages) * 8192 * (0.5 - QUEUE_OFF) < MIN_QUEUE_MARGIN_BYTES:
            raise _TurnOff(f"the notification queue is too small to watch safely (max_notify_queue_pages = "
                           f"{queue_pages}); raise it to at least {int(MIN_QUEUE_MARGIN_BYTES / 8192 / 0.25)}")

    def _check_queue(self, listener: _Listener, first: bool = False) -> None:
        # Writers stop announcing at half full: stop answering well before, resume well below.
        usage = float(listener.run(QUEUE_USAGE_SQL))
        if not self._queue_full and usage >= QUEUE_OFF:
            self._queue_full = True
            self._untrust()
            self.state = f"paused: the notification queue is {usage:.0%} full"
            log.warning("negative-lookup guard on %s paused: PostgreSQL's notification queue is %.0f%% full "
                        "(a listener that stopped reading?); lookups go to the database until it drains",
                        self.where, 100 * usage)
        elif self._queue_full and usage < QUEUE_ON:
            self._queue_full = False
            log.warning("negative-lookup guard on %s: the notification queue has drained; re-warming", self.where)
            if not first:
                self._reset_requested = True
        if first:
            while self._queue_full and not self._stopping.is_set():
                self._stopping.wait(QUEUE_CHECK_SECONDS)
                self._check_queue(listener)

    def _serve(self, listener: _Listener) -> None:
        next_beat = time.monotonic() + self.heartbeat
        next_queue_check = time.monotonic() + QUEUE_CHECK_SECONDS
        while not self._stopping.is_set():
            if self._receive(listener, WAKE_SECONDS):
                self._stopping.wait(BATCH_SECONDS)
            now = time.monotonic()
            if now >= next_queue_check:
                self._check_queue(listener)
                next_queue_check = now + QUEUE_CHECK_SECONDS
            if now >= next_beat:
                self._heartbeat(listener)
                next_beat = time.monotonic() + self.heartbeat
            if self._queue_full:
                continue
            if self._reset_requested and time.monotonic() - self._last_warm >= RESET_SECONDS:
                self._warm(listener, keep_answering=False)
            elif self._active is not None and len(self._active) > self._active.capacity:
                self._warm(listener, keep_answering=True)

    def _heartbeat(self, listener: _Listener) -> None:
        """Re-LISTEN, so a dead connection shows, and check that nothing can write around the functions.

        The check waits for a pooled connection, and notifications are not read
        meanwhile: the filter answers nothing until they have been taken.
        """
        listener.run(listen_sql(self._me.channel))
        with self._lock:
            answering, self._active = self._active, None
        self._check_trust()
        self._receive(listener, 0)
        with self._lock:
            if self._targets:  # not untrusted (reset, stop) meanwhile
                self._active = answering

    def _receive(self, listener: _Listener, timeout: float) -> int:
        """Add the keys of arrived notifications to every filter; returns how many messages came."""
        payloads = listener.receive(timeout)
        tokens = []
        for payload in payloads:
            if payload == "distributed":
                # The admin has just distributed the table (distributed.py): from this commit on, writes
                # entering through a worker notify only there. Off now, not at the next heartbeat.
                raise _TurnOff(f"{self.where} is now distributed by Citus: a write's notification reaches only "
                               "listeners on the node that ran it")
            if payload == "reset":
                # Some statement inserted more keys than it could list: nothing can be trusted.
                self._reset_requested = True
                self._untrust()
            elif payload.startswith("probe:"):
                self._probe_seen = self._probe_seen or payload == self._probe_payload
            else:
                tokens.extend(payload.split())
        if tokens:
            self._add(tokens)
        return len(payloads)

    def _add(self, tokens: list[str], remembered: dict | None = None, keys: Sequence[str] = ()) -> None:
        """Put tokens in every filter that must hold them: the answering one and one being filled; and
        `keys`, the written keys they hash, in `remembered` if the filters are still the ones it is for."""
        with self._lock:
            for bloom in self._targets:
                bloom.update(tokens)
            if keys and remembered is self._remembered:
                if len(remembered) >= RECENT_KEYS:
                    remembered.clear()
                remembered.update(dict.fromkeys(keys))

    def _warm(self, listener: _Listener, keep_answering: bool) -> None:
        """Fill a new filter from the table, then let it answer.

        LISTEN is already in place, so every insert committed after a page was
        read arrives as a notification; those are taken between pages. A rebuild
        for size keeps the old filter answering meanwhile (it still holds every
        key); a reset or a first warm-up answers nothing until done. The new
        filter is sized by the rows the table holds, never by what was heard.
        """
        while not self._stopping.is_set():
            self._last_warm = time.monotonic()
            self.warm_ups += 1
            previous = self._active if keep_answering else None
            fresh = self._new_filter(self._rows())
            with self._lock:
                self._reset_requested = False
                self._switch_filters(self._active, [bloom for bloom in (previous, fresh) if bloom is not None])
            if not keep_answering:
                self.state = "warming"
            if self._fill(listener, fresh):
                with self._lock:
                    self._switch_filters(fresh, [fresh])
                self.state = "trusted"
                self._failures = 0
                self._trusted.set()
                return
            keep_answering = False  # a reset came while filling: start again, answering nothing
            self._stopping.wait(max(0.0, RESET_SECONDS - (time.monotonic() - self._last_warm)))

    def _rows(self) -> int:
        # This role's rows, expired ones included: what the new filter must hold.
        live, expired = self._cache._execute(self._cache._s.count, {}, first_row)
        return live + expired

    def _fill(self, listener: _Listener, fresh) -> bool:
        # False when a reset arrives (or the guard stops) before the last page.
        after = ""
        while True:
            keys: list[str] = self._cache._key_page(after, PAGE_SIZE)
            fresh.update([self._me.digest(key) for key in keys])
            self._receive(listener, 0)
            if self._reset_requested or self._stopping.is_set():
                return False
            if len(keys) < PAGE_SIZE:
                return True
            after = keys[-1]

    def _new_filter(self, rows: int):
        from pybloomfilter import BloomFilter

        # Room for twice the rows there are, so a growing table does not rebuild over and over.
        return BloomFilter(max(self.capacity, 2 * rows), self.error_rate)

    def _untrust(self) -> None:
        with self._lock:
            self._switch_filters(None, [])
        self._trusted.clear()

    def _switch_filters(self, active, targets: list) -> None:
        # The filter answering lookups and those receiving new keys (under the lock); a new set of
        # filters holds none of the keys remembered for the old one.
        self._active, self._targets, self._remembered = active, targets, {}

    def _turn_off(self, reason: str) -> None:
        self._untrust()
        self.state = f"off: {reason}"
        log.warning("negative-lookup guard on %s is off: %s; every lookup goes to the database", self.where, reason)


QUEUE_USAGE_SQL = "SELECT pg_catalog.pg_notification_queue_usage()"


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
        guard._switch_filters(None, [])
        guard._trusted.clear()
        guard.state = "off: inherited across fork; create the cache after forking"


os.register_at_fork(after_in_child=_forget_in_child)
