"""`Cache`: the Redis-style facade. Each method validates, encodes, and yields its statements (statements.py)."""
from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from . import codec
from .errors import CachePermissionError, CacheTimeoutError, check_positive_int, pool_timeout_error, sqlstate, translate
from .execution import (
    DECLINED,
    Executor,
    Steps,
    all_rows,
    answer,
    first_row,
    nothing,
    operation,
    returned_any,
    scalar,
    scalars,
)
from .expiry import NOTHING_DUE, ExpiryOnWrite
from .failsafe import DATABASE_ERRORS, Failsafe
from .identity import Identity
from .keys import MAX_KEY_BYTES, key_list, normalize_key, normalize_ttl, pattern_regex
from .leases import leases_for
from .model import DEFAULT_SCHEMA, DEFAULT_TABLE
from .statements import bytea_array, int_array, statements_for, text_array

__all__ = ["BaseCache", "Cache", "MAX_KEY_BYTES", "normalize_key", "normalize_ttl"]

_MISSING = object()
C = TypeVar("C", bound="BaseCache")


def _default_argument(cache, key, default=None, **options):
    # get()'s failsafe answer: the caller's own default, exactly as for a miss.
    return default


def _stats_without_database(cache):
    # stats() while the database fails: no counts from SQL, this process's counters still.
    return {"entries": None, "expired": None, **cache._counters()}


class BaseCache(Executor):
    """What `Cache` and `AsyncCache` share: the options, and every single operation, written once.

    Not made directly: `Cache` runs each operation blocking, `AsyncCache` awaits it.
    """

    def __init__(self, bind, *, schema: str | None = None, table: str | None = None,
                 user_id: str | None = None, pickle: codec.SigningKeys = None, guard=None, failsafe: bool = False,
                 on_error: Callable[[BaseException, str], Any] | None = None,
                 expire_every: int | None = 50, max_entries: int | None = None,
                 cull_max_entries: int | None = None, cull_frequency: int = 3):
        if not isinstance(bind, self._bind_types):
            names = ", ".join(kind.__name__ for kind in self._bind_types[:-1]) + f" or {self._bind_types[-1].__name__}"
            raise TypeError(f"bind must be a SQLAlchemy {names}, not {type(bind).__name__}")
        if user_id is not None and (not isinstance(user_id, str) or not user_id or "\x00" in user_id):
            raise ValueError("user_id must be a non-empty role name, or None for the acting role")
        if failsafe and not isinstance(bind, self._engine_type):
            raise ValueError("failsafe=True needs an Engine: on a Session or Connection a failed statement aborts "
                             "your transaction, which no fallback answer can hide")
        self.bind = bind
        self.schema = schema or DEFAULT_SCHEMA
        self.table = table or DEFAULT_TABLE
        self.user_id = user_id
        self._codec = codec.Codec(pickle)
        # A NegativeLookupGuard (guard.py) answering "definitely absent" without SQL, or None.
        self.guard = guard
        self._lookups = {"hits": 0, "misses": 0, "guard_skips": 0}
        # Database errors: raised, or (failsafe) logged once per burst and answered as a miss.
        self._failsafe = Failsafe(failsafe, on_error)
        # Expiry on write and max_entries trimming: bounded batches, so no cron is needed.
        self._expiry = ExpiryOnWrite(expire_every, max_entries)
        # Django's culling, done by the write functions in the write's own statement (exact, O(entries)).
        check_positive_int("cull_max_entries", cull_max_entries, none_means="to turn culling off")
        if not isinstance(cull_frequency, int) or isinstance(cull_frequency, bool) or cull_frequency < 0:
            raise ValueError(f"cull_frequency must be an int >= 0 (0 empties the cache), got {cull_frequency!r}")
        self._cull = {"cull_max": cull_max_entries, "cull_frequency": cull_frequency if cull_max_entries else None}
        self._s = statements_for(self.schema, self.table, user_id)
        self._where = f"{self.schema}.{self.table}"
        self._compiled = {}
        # The acting role's secret, read at the first write (identity.py).
        self._identity: Identity | None = None
        # Engine binds: the Engine's connections, kept idle between calls where the library owns it (leases.py).
        self._leases = leases_for(bind) if isinstance(bind, Engine) else None

    def __repr__(self) -> str:
        user = f" user {self.user_id}" if self.user_id else ""
        return f"<{type(self).__name__} {self._where} on {type(self.bind).__name__}{user}>"

    @property
    def pickle(self) -> bool:
        """Whether other Python objects are stored as signed pickles (a key was given)."""
        return self._codec.signs

    # -- helpers of every operation ----------------------------------------------------

    def _guard_skips(self, key: str) -> bool:
        # The guard's "definitely absent" saves the round trip; it never says so for a present key.
        if self.guard.definitely_absent(key):
            self._lookups["guard_skips"] += 1
            return True
        return False

    def _remember(self, keys) -> None:
        # Written keys enter the guard before the call returns: this process never misses its own write.
        if self.guard is not None:
            self.guard.remember(keys)

    def _call(self, statement, params: dict) -> Steps[Any]:
        """Steps of one write function call as this cache's role; its result, never None.

        The function answers NULL (and writes nothing) when the identity sent is not
        the acting role's: the role changed (SET ROLE) since it was read. It is read
        again once; still refused means `user_id` names a role this session cannot act as.
        `params` is the call's own dict: the identity is added to it.
        """
        for _ in (1, 2):
            identity = self._identity or (yield from self._identify())
            params["credential"] = identity.credential
            result = yield statement, params, scalar
            if result is not None:
                return result
            self._identity = None
        raise CachePermissionError(self._not_acting_as())

    def _identify(self) -> Steps[Identity]:
        # Steps reading the acting role's secret, creating it at the role's first write.
        row = yield self._s.identity, {}, first_row
        if row is None:
            yield self._s.enroll, {}, nothing
            row = yield self._s.identity, {}, first_row
        if row is None:
            raise CachePermissionError(self._not_acting_as())
        self._identity = Identity(row[0], bytes(row[1]))
        return self._identity

    def _not_acting_as(self) -> str:
        return (f"this session cannot write as {self.user_id!r}: each database role may only write rows whose "
                "user_id is the role it acts as (current_user); create the Cache without user_id, or connect as "
                "that role")

    # -- strings ---------------------------------------------------------------------

    def _set_request(self, key, value, ttl, nx: bool, xx: bool) -> tuple:
        # set's statement and params, the credential aside: shared by its steps and its call at once.
        if nx and xx:
            raise ValueError("nx and xx are mutually exclusive")
        key = normalize_key(key)
        flags, data = self._codec.serialize(value, key)
        params = {"k": key, "val": codec.as_text(flags, data), "ttl": normalize_ttl(ttl), **self._cull}
        return (self._s.set_nx if nx else self._s.set_xx if xx else self._s.set), params

    def _set_at_once(self, key, value, ttl=None, *, nx: bool = False, xx: bool = False):
        # set once the identity is known. A refusal (the role changed) wrote nothing: the steps then
        # read the identity again and write.
        identity = self._identity
        if identity is None:
            return DECLINED
        statement, params = self._set_request(key, value, ttl, nx, xx)
        params["credential"] = identity.credential
        stored = self._execute(statement, params, scalar)
        if stored is None:
            self._identity = None
            return DECLINED
        if stored:
            self._remember([params["k"]])
            due = self._due(1)
            if due is not NOTHING_DUE:
                self._expire_due(due)
        return stored

    @operation(fallback=answer(False), at_once=_set_at_once)
    def set(self, key, value, ttl=None, *, nx: bool = False, xx: bool = False) -> Steps[bool]:
        """Store `value` under `key`, replacing any value and ttl; like Redis SET.

        `nx=True` stores only if the key is absent (or expired), `xx=True` only if
        it is present. Returns True if the value was stored::

            cache.set("lock", "me", ttl=30, nx=True)   # True the first time, then False
        """
        statement, params = self._set_request(key, value, ttl, nx, xx)
        stored = yield from self._call(statement, params)
        if stored:
            self._remember([params["k"]])
            due = self._due(1)
            if due is not NOTHING_DUE:
                yield from self._expire_on_write(due)
        return stored

    def _lookup(self, key) -> str | None:
        # get's key, or None when the guard knows it is absent (then no round trip).
        key = normalize_key(key)
        return None if self.guard is not None and self._guard_skips(key) else key

    def _found(self, row, key: str, default, parse_json: bool):
        # get's answer from the row it read (None: no live row).
        if row is None:
            self._lookups["misses"] += 1
            return default
        value = self._codec.deserialize(row[1], row[0], key=key, parse_json=parse_json, missing=_MISSING)
        if value is _MISSING:  # a pickle whose signature does not verify: a miss
            self._lookups["misses"] += 1
            return default
        self._lookups["hits"] += 1
        return value

    def _get_at_once(self, key, default=None, *, parse_json: bool = True):
        # get without the step protocol: one read, which the executor itself retries on a lost connection.
        wanted = self._lookup(key)
        if wanted is None:
            return default
        return self._found(self._execute(self._s.get, {"k": wanted}, first_row), wanted, default, parse_json)

    @operation(fallback=_default_argument, at_once=_get_at_once)
    def get(self, key, default=None, *, parse_json: bool = True) -> Steps[Any]:
        """The value stored under `key`, or `default` when it is missing or expired.

        `parse_json=False` returns a JSON value (dict, list, number) as its text::

            cache.get("user:1", parse_json=False)   # '{"name":"Alice"}'
        """
        wanted = self._lookup(key)
        if wanted is None:
            return default
        row = yield self._s.get, {"k": wanted}, first_row
        return self._found(row, wanted, default, parse_json)

    @operation(fallback=answer(False))
    def delete(self, key) -> Steps[bool]:
        """Remove `key`; True if a live value was removed."""
        return (yield from self._call(self._s.delete, {"ks": text_array([normalize_key(key)])})) > 0

    @operation(fallback=answer(False))
    def exists(self, key) -> Steps[bool]:
        """True if `key` holds a value that has not expired."""
        key = normalize_key(key)
        if self.guard is not None and self._guard_skips(key):
            return False
        found = yield self._s.exists, {"k": key}, returned_any
        self._lookups["hits" if found else "misses"] += 1
        return found

    @operation(fallback=answer(-2))
    def ttl(self, key) -> Steps[int]:
        """Seconds until `key` expires, rounded up; -1 if it never expires, -2 if missing."""
        seconds = yield self._s.ttl, {"k": normalize_key(key)}, scalar
        return -2 if seconds is None else int(seconds)

    @operation(fallback=answer(False))
    def expire(self, key, ttl) -> Steps[bool]:
        """Give `key` a new ttl (seconds or timedelta); False if the key is missing."""
        params = {"k": normalize_key(key), "ttl": normalize_ttl(ttl)}
        if params["ttl"] is None:
            raise ValueError("expire() needs a ttl; use persist() to remove one")
        return (yield from self._call(self._s.expire, params))

    @operation(fallback=answer(False))
    def persist(self, key) -> Steps[bool]:
        """Remove the ttl of `key`; False if the key is missing or had no ttl."""
        return (yield from self._call(self._s.expire, {"k": normalize_key(key), "ttl": None}))

    @operation(fallback=answer(None))
    def incr(self, key, amount: int = 1, *, create: bool = True) -> Steps[int | None]:
        """Add `amount` to the integer at `key` in one atomic statement; a missing key starts at 0.

        As Redis, the stored value must be a canonical decimal integer ("5", "-12";
        not "05", " 5" or "+5"), else ValueError. The ttl is kept.
        `create=False` leaves a missing key missing and returns None, and counts
        only values stored as ints (Django's incr)::

            cache.incr("hits")        # 1
            cache.incr("hits", 10)    # 11
        """
        _check_amount(amount)
        key = normalize_key(key)
        try:
            result = yield from self._call(self._s.incr, {"k": key, "amount": amount, "create": create})
        except sa_exc.DBAPIError as error:
            state = sqlstate(error)
            if state == "22003":
                raise ValueError(f"incrementing {key!r} by {amount} overflows a 64-bit integer") from None
            if state in ("22P02", "22021"):
                raise ValueError(f"the value at {key!r} is not an integer") from None
            raise
        if not result:
            return None
        self._remember([key])
        due = self._due(1)
        if due is not NOTHING_DUE:
            yield from self._expire_on_write(due)
        return int(result[0])

    # -- batches -----------------------------------------------------------------------

    @operation(fallback=answer(0))
    def set_many(self, mapping: Mapping, ttl=None) -> Steps[int]:
        """Store every item of `mapping` in one statement (one round trip); returns the count.

        The batch is all-or-nothing, and one ttl applies to all of it::

            cache.set_many({"a": 1, "b": [2, 3]}, ttl=60)   # 2
        """
        if not isinstance(mapping, Mapping):
            raise TypeError(f"set_many() takes a mapping of key to value, not {type(mapping).__name__}")
        seconds = normalize_ttl(ttl)
        rows = {}
        for key, value in mapping.items():
            key = normalize_key(key)
            rows[key] = self._codec.serialize(value, key)
        if not rows:
            return 0
        params = {"ks": text_array(rows), "vals": bytea_array(data for _, data in rows.values()),
                  "flgs": int_array(flags for flags, _ in rows.values()), "ttl": seconds, **self._cull}
        count = yield from self._call(self._s.set_many, params)
        self._remember(rows)
        due = self._due(len(rows))
        if due is not NOTHING_DUE:
            yield from self._expire_on_write(due)
        return count

    @operation(fallback=answer({}))
    def get_many(self, keys: Iterable, *, parse_json: bool = True) -> Steps[dict]:
        """The live values of `keys` in one round trip; missing keys are absent from the dict::

            cache.get_many(["a", "b", "nope"])   # {'a': 1, 'b': [2, 3]}
        """
        wanted = [key for key in key_list(keys) if self.guard is None or not self._guard_skips(key)]
        if not wanted:
            return {}
        rows = yield self._s.get_many, {"ks": text_array(wanted)}, all_rows
        found = {}
        for key, value, flags in rows:
            decoded = self._codec.deserialize(flags, value, key=key, parse_json=parse_json, missing=_MISSING)
            if decoded is not _MISSING:
                found[key] = decoded
        self._lookups["hits"] += len(found)
        self._lookups["misses"] += len(wanted) - len(found)
        return found

    @operation(fallback=answer(None))
    def delete_many(self, keys: Iterable) -> Steps[int]:
        """Remove `keys` in one statement; returns how many live values were removed."""
        wanted = key_list(keys)
        if not wanted:
            return 0
        return (yield from self._call(self._s.delete, {"ks": text_array(wanted)}))

    # -- keyspace ----------------------------------------------------------------------

    @operation(fallback=answer([]))
    def _keys_matching(self, regex: str) -> Steps[list[str]]:
        # keys() once its pattern is checked: only database errors reach failsafe mode.
        return (yield self._s.keys, {"regex": regex}, scalars)

    @operation(fallback=answer([]))
    def _scan_batch(self, regex: str, after: str, batch_size: int) -> Steps[list[str]]:
        # One page of scan_iter: keyset pagination, so pages stay cheap however deep.
        return (yield self._s.scan, {"regex": regex, "after": after, "batch": batch_size}, scalars)

    @operation(fallback=answer(None))
    def _clear(self, regex: str | None) -> Steps[int]:
        # clear() once its pattern is checked.
        return (yield from self._call(self._s.clear, {"regex": regex}))

    @operation(fallback=answer(None))
    def cleanup(self, batch_size: int = 1000, *, all_users: bool = False) -> Steps[int]:
        """Delete expired rows in batches of `batch_size`; returns how many were removed.

        Each batch is its own statement, so no single DELETE holds every row.
        `all_users=True` cleans every role's rows; only the table's owner role (and
        superusers) may ask for that (`fastpgcache-admin --cleanup`).
        """
        check_positive_int("batch_size", batch_size)
        total = 0
        while True:
            if all_users:
                removed = yield self._s.cleanup_all, {"batch": batch_size}, scalar
            else:
                removed = yield from self._call(self._s.expire_batch, {"batch": batch_size, "skip_locked": False})
            total += removed
            if removed < batch_size:
                return total

    @operation(fallback=_stats_without_database)
    def stats(self) -> Steps[dict]:
        """This role's live entries and expired rows not yet removed (from SQL), and this
        object's lookups: hits, misses and guard_skips (answered by the guard without SQL),
        database `errors` and the `last_error` (failsafe.py), and rows it removed on
        write: `expired_on_write` and `trimmed` past max_entries (expiry.py)::

            cache.stats()   # {'entries': 3, 'expired': 0, 'hits': 10, 'misses': 2, 'guard_skips': 40,
                            #  'guard': 'trusted', 'errors': 0, 'last_error': None, 'expired_on_write': 0,
                            #  'trimmed': 0}
        """
        live, expired = yield self._s.count, {}, first_row
        return {"entries": live, "expired": expired, **self._counters()}

    def _counters(self) -> dict:
        # What this object counted itself, so stats() can report it even while the database is down.
        guard = self.guard.state if self.guard is not None else "off"
        return {**self._lookups, "guard": guard, **self._failsafe.counters(), **self._expiry.counters()}

    def _due(self, writes: int):
        # Expiry on write (expiry.py) counts Engine binds' writes only: in the caller's transaction a
        # failed batch would abort it, and Engine calls clean up for everyone.
        return self._expiry.due(writes) if self._leases is not None else NOTHING_DUE

    @operation
    def _expire_due(self, due) -> Steps[None]:
        # Expiry on write after a write made at once (set's common case).
        yield from self._expire_on_write(due)

    def _expire_on_write(self, due) -> Steps[None]:
        # The batches a write adds every N writes; their failure never fails the write itself.
        expired = trimmed = 0
        try:
            if due.expire:
                expired = yield from self._call(self._s.expire_batch, {"batch": due.expire, "skip_locked": True})
            if due.trim:
                trimmed = yield from self._call(self._s.trim, {"keep": self._expiry.max_entries, "batch": due.trim})
        except DATABASE_ERRORS as error:
            self._expiry.failed(error)
        self._expiry.removed(expired, trimmed)

    # -- for the negative-lookup guard (guard.py) ----------------------------------------

    @operation
    def _key_page(self, after: str, batch_size: int) -> Steps[list[str]]:
        # One page of the guard's warm-up: keyset pagination over the primary key.
        return (yield self._s.key_page, {"after": after, "batch": batch_size}, scalars)

    @operation(fallback=answer(None))
    def _identity_now(self) -> Steps[Identity]:
        # The acting role's identity, read now (the guard's tokens and channel derive from it).
        return (yield from self._identify())

    # -- shared by get_or_set in both forms ------------------------------------------

    def _absorb_connect_error(self, error) -> None:
        """Failsafe's answer to a connection get_or_set could not get: absorb it, or raise it as a cache error."""
        problem = pool_timeout_error(self.bind.pool) if isinstance(error, sa_exc.TimeoutError) else \
            translate(error, self._where)
        if not self._failsafe.absorb(problem, "get_or_set"):
            raise problem from (None if problem is error else error)

    def _bound_to(self: C, connection) -> C:
        # This cache on one connection, so the claim and the store share one transaction. Its
        # reads skip the guard: a waiter wakes at the holder's commit, maybe before the guard hears of it.
        twin = self._unguarded()
        twin.bind, twin._leases = connection, None
        return twin

    def _unguarded(self: C) -> C:
        # This cache without the guard, for get_or_set's re-read of what the holder of a claim stored.
        twin = copy.copy(self)
        twin.guard = None
        return twin

    @operation(fallback=answer(None))
    def _claim(self, key, wait: float) -> Steps[bool | None]:
        # get_or_set: True if this transaction now holds the key's claim, False if a live value is
        # there (maybe stored while we waited), None if waiting took longer than `wait` seconds.
        milliseconds = max(1, round(wait * 1000))
        limits = {"lock_ms": str(milliseconds), "statement_ms": str(milliseconds + 1000)}
        yield self._s.lock_wait, limits, nothing
        try:
            return (yield from self._call(self._s.claim, {"k": normalize_key(key)}))
        except CacheTimeoutError:
            return None


class Cache(BaseCache):
    """A Redis-style cache on one PostgreSQL table, run on a SQLAlchemy bind.

    Given a `Session` or `Connection`, every statement runs on it and the caller
    commits or rolls back: a `set()` rolled back with the caller's transaction
    never happened. Given an `Engine`, each call is its own short transaction::

        from sqlalchemy import create_engine
        from fastpgcache import Cache

        cache = Cache(create_engine("postgresql+psycopg2://app@localhost/app"))
        cache.set("user:1", {"name": "Alice"}, ttl=3600)
        cache.get("user:1")          # {'name': 'Alice'}
        cache.ttl("user:1")          # 3600

    Every entry belongs to the role the session acts as when it calls (the role
    set by SET ROLE, else the login role): reads see only that role's rows, and
    writes go through the table's functions, which store only that role's rows.

    `failsafe=True` (Engine binds only) turns database errors into cache misses
    (reads return the default, writes False, 0, or None for an unknown count), logged once per burst and passed to
    `on_error(error, operation_name)`. Every `expire_every` writes (50; None
    turns it off) a write also deletes a bounded batch of expired rows, and
    with `max_entries` this role's oldest entries past the cap (expiry.py).
    `pickle` takes a signing key (or a list of keys, the first signing) to store
    other Python objects as signed pickles (codec.py). `cull_max_entries` culls
    as Django's DatabaseCache does: a write that finds more entries of this role
    removes the expired ones, then 1/`cull_frequency` of the rest, oldest first.
    """

    def decr(self, key, amount: int = 1, *, create: bool = True) -> int | None:
        """Subtract `amount` from the integer at `key`; see `incr`."""
        return self.incr(key, _negate(amount), create=create)

    def keys(self, pattern: str = "*") -> list[str]:
        """Live keys matching a Redis glob pattern, sorted: `keys("user:*")`.

        `*`, `?`, `[abc]`, `[^a]`, `[a-z]` and `\\` escapes work as in Redis; `%`
        and `_` are ordinary characters. A bad pattern raises ValueError, even in
        failsafe mode; `escape_glob()` makes any text a literal pattern.
        """
        return self._keys_matching(pattern_regex(pattern))

    def scan_iter(self, pattern: str = "*", batch_size: int = 1000) -> Iterator[str]:
        """Iterate over matching live keys, fetching `batch_size` at a time, in key order."""
        regex, after = pattern_regex(pattern), ""
        check_positive_int("batch_size", batch_size)
        while True:
            batch = self._scan_batch(regex, after, batch_size)
            yield from batch
            if len(batch) < batch_size:
                return
            after = batch[-1]

    def clear(self, pattern: str | None = None) -> int | None:
        """Remove every entry of this role, or those whose key matches a glob; returns how many.

        One statement either way::

            cache.clear("session:*")   # this role's session entries, live or expired
        """
        return self._clear(None if pattern is None else pattern_regex(pattern))

    def get_or_set(self, key, fn: Callable[[], Any], ttl=None, *, lock: bool = True, wait: float = 5.0):
        """Return the cached value of `key`, computing and storing `fn()` on a miss::

            profile = cache.get_or_set(f"profile:{uid}", lambda: load_profile(uid), ttl=300)

        With `lock=True` a stampede computes once: the first caller to miss claims
        the key (an uncommitted placeholder row) in its own transaction, computes,
        stores and commits; the others wait up to `wait` seconds for that commit and
        return what it stored (past `wait` they compute it themselves and return it
        unstored, the holder's value being on its way; if `fn` raised, the next
        waiter takes the claim). Only callers acting as the same
        role can ever wait on each other. This needs an Engine bind: on a Session
        or Connection the claim would last until the caller commits, so it is skipped.
        """
        normalize_ttl(ttl)
        _check_wait(wait)
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        if lock and isinstance(self.bind, self._engine_type):
            return self._fill_claimed(key, fn, ttl, wait)
        return self._fill(key, fn, ttl)

    def _fill(self, key, fn, ttl):
        # The plain miss path: compute, store, return.
        value = fn()
        self.set(key, value, ttl)
        return value

    def _fill_claimed(self, key, fn, ttl, wait):
        # The first caller to miss computes under its claim on the key; the rest wait for its commit, then read.
        # A role's first write creates its secret: not inside the claim's transaction, which would hold
        # the new row (and every other session's first write) until it commits.
        if self._identity is None and self._identity_now() is None:
            return self._fill(key, fn, ttl)  # failsafe answered for an unreachable database
        connection = self._claim_connection()
        if connection is not None:
            with connection, connection.begin():
                twin = self._bound_to(connection)
                claimed = twin._claim(key, wait)
                if claimed is None:  # waited `wait` for another caller: compute, and leave storing to it
                    return fn()
                if claimed:
                    value = twin._fill(key, fn, ttl)
                    self._remember([normalize_key(key)])
                    return value
            # A live value is there (maybe stored while we waited), read once the claim's transaction is over:
            # on Citus the claim wrote the key's shard as the table's owner, and Citus cannot then read that
            # shard as this role in the same transaction.
            value = self._unguarded().get(key, _MISSING)
            if value is not _MISSING:
                return value
        return self._fill(key, fn, ttl)

    def _claim_connection(self):
        # A pooled connection of its own for the claim's transaction (READ COMMITTED, so waiters see the commit).
        try:
            return self.bind.connect().execution_options(isolation_level="READ COMMITTED")
        except (sa_exc.DBAPIError, sa_exc.TimeoutError) as error:
            self._absorb_connect_error(error)
            return None

    def cached(self, ttl=None, key: str | Callable[..., str] | None = None, *, lock: bool = True):
        """Decorator caching a function's result per arguments::

            @cache.cached(ttl=60)
            def report(day): ...

        `key` is a fixed key, or a function of the call's arguments returning one;
        by default the key is the function's name and a hash of its arguments.
        `lock` protects against stampedes as in `get_or_set`.
        """
        normalize_ttl(ttl)

        def decorate(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                cache_key = _call_key(fn, key, args, kwargs)
                return self.get_or_set(cache_key, lambda: fn(*args, **kwargs), ttl, lock=lock)

            return wrapper

        return decorate


def _call_key(fn, key, args, kwargs) -> str:
    # The key a cached() call is stored under (shared with the async decorator).
    if callable(key):
        return key(*args, **kwargs)
    if key is not None:
        return key
    digest = hashlib.sha256(repr((args, sorted(kwargs.items()))).encode()).hexdigest()[:32]
    return f"cached:{fn.__module__}.{fn.__qualname__}:{digest}"


def _check_wait(wait) -> None:
    # get_or_set's lock wait, checked before any SQL (shared with AsyncCache).
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not 0 < wait <= 3600:
        raise ValueError(f"wait must be a number of seconds in (0, 3600], got {wait!r}")


def _check_amount(amount) -> None:
    # Counters are 64-bit in SQL; a larger amount would be sent as numeric and slip past the overflow check.
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError(f"amount must be an int, not {type(amount).__name__}")
    if not -(2**63) <= amount < 2**63:
        raise ValueError(f"amount {amount} does not fit in a signed 64-bit integer")


def _negate(amount) -> int:
    _check_amount(amount)
    return -amount
