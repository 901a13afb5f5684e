"""Framework backends (Django, Flask), and what they share within a process: one Engine per URL and
settings, one negative-lookup guard per table and role, and the mapping from a framework's keys to
keys the table can hold."""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL, Engine

from ..cache import Cache
from ..client import _timeout_options, build_url, cache_engine
from ..errors import CacheLimitError, check_positive_seconds
from ..keys import MAX_KEY_BYTES

if TYPE_CHECKING:
    from ..guard import NegativeLookupGuard

log = logging.getLogger("fastpgcache")

# FastPgCache's defaults, for the framework backends' Engines too: no cache call hangs a request.
_STATEMENT_TIMEOUT, _LOCK_TIMEOUT = 5.0, 1.0

# A digest-form key (storable_key): up to _READABLE_BYTES of the key, the mark, 64 hex digits.
_DIGEST_MARK = "~sha256:"
_READABLE_BYTES = MAX_KEY_BYTES - len(_DIGEST_MARK) - 64

_DIGEST_FORM_END = re.compile(re.escape(_DIGEST_MARK) + r"[0-9a-f]{64}\Z")
_NOT_STORABLE_CHARACTERS = re.compile("[\x00\ud800-\udfff]")  # NUL, and surrogates UTF-8 cannot encode

_engines: dict[tuple, Engine] = {}
_engines_lock = threading.Lock()


# -- engines --------------------------------------------------------------------------------

def shared_engine(url: str | URL, engine_options: dict | None = None, *,
                  statement_timeout: float | None = _STATEMENT_TIMEOUT,
                  lock_timeout: float | None = _LOCK_TIMEOUT) -> Engine:
    """The process's Engine for `url`, `engine_options` and timeouts, created on first use.

    Frameworks build a cache backend per thread (Django) or per app (Flask);
    sharing one Engine keeps them on one connection pool. Its connections get
    FastPgCache's timeouts (None: the server's setting)::

        engine = shared_engine("postgresql://app@db/app", {"pool_size": 5}, statement_timeout=2)
    """
    for name, seconds in (("statement_timeout", statement_timeout), ("lock_timeout", lock_timeout)):
        check_positive_seconds(name, seconds, none_means="for the server's own setting")
    options = dict(engine_options or {})
    target = build_url(url=url)
    identity = (target.render_as_string(hide_password=False), repr(sorted(options.items())),
                statement_timeout, lock_timeout)
    with _engines_lock:
        engine = _engines.get(identity)
        if engine is None:
            engine = _engines[identity] = _new_engine(target, options, statement_timeout, lock_timeout)
        return engine


def _new_engine(target: URL, engine_options: dict, statement_timeout: float | None,
                lock_timeout: float | None) -> Engine:
    # The timeouts travel as libpq startup options, as FastPgCache's do; one that the URL's or
    # connect_args' own `options` already sets is theirs to decide.
    connect_args = dict(engine_options.get("connect_args") or {})
    if connect_args.get("options") is not None:
        # connect_args' options replace the URL's (SQLAlchemy's rule): the timeouts join those.
        target = target.update_query_dict({"options": connect_args["options"]})
    given = target.query.get("options") or ""
    given = given if isinstance(given, str) else " ".join(given)
    timeouts = {"statement_timeout": statement_timeout, "lock_timeout": lock_timeout}
    for name in timeouts:
        if re.search(r"(?<![A-Za-z0-9_])" + name.replace("_", "[_-]") + r"\s*=", given):  # not deadlock_timeout
            timeouts[name] = None
    connect_args.update(_timeout_options(target, **timeouts))
    return cache_engine(target, **{**engine_options, "connect_args": connect_args})


# -- the negative-lookup guard --------------------------------------------------------------

_guards: dict[tuple, NegativeLookupGuard] = {}
_guards_lock = threading.Lock()


def shared_guard(cache: Cache):
    """The process's started `NegativeLookupGuard` for `cache`'s Engine, table and role.

    Every backend instance on that table shares it (Django makes one per thread):
    one listener connection and one filter per process, however many instances.
    A guard that was stopped is replaced by a new one.
    """
    from ..guard import NegativeLookupGuard

    identity = (cache.bind, cache.schema, cache.table, cache.user_id)
    with _guards_lock:
        guard = _guards.get(identity)
        if guard is None or guard.state == "stopped":
            guard = _guards[identity] = NegativeLookupGuard(cache).start()
        return guard


@atexit.register
def _stop_guards() -> None:
    # Close the listener connections cleanly rather than leaving daemon threads to die mid-read.
    for guard in list(_guards.values()):
        guard.stop()


def _forget_guards_in_child() -> None:
    # A forked child's inherited guards switch off (guard.py): backends made in the child get new ones.
    global _guards_lock
    _guards_lock = threading.Lock()
    _guards.clear()


os.register_at_fork(after_in_child=_forget_guards_in_child)


# -- keys -----------------------------------------------------------------------------------

def key_text(key) -> str:
    """A key as text, converted as `Cache` and redis-py do: str as is, bytes as UTF-8, int and float by repr."""
    if isinstance(key, str):
        return key
    if isinstance(key, (bytes, bytearray, memoryview)):
        try:
            return bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("bytes keys must be valid UTF-8") from None
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        return repr(key)
    raise TypeError(f"invalid key type {type(key).__name__}: use str, bytes, int or float")


def storable_key(key) -> str:
    """The key a framework backend stores for `key`: itself when the table can hold it, else its digest form.

    The table holds 1 to 1024 bytes of UTF-8 without NUL. Any other text (longer,
    empty, with NUL or an unpaired surrogate) is stored as its first 952 bytes
    (NUL and unpaired surrogates shown as U+FFFD), then "~sha256:" and the hex
    SHA-256 of the whole key. So is a key that already ends like a digest form:
    no key can pose as another key's digest form::

        storable_key("view/" + "a" * 2000)   # 'view/aaa…a~sha256:3f1c…' (1024 bytes)
        storable_key("view/x\\x00y")          # 'view/x\\ufffdy~sha256:…'
    """
    text = key_text(key)
    if _table_holds(text) and not _DIGEST_FORM_END.search(text):
        return text
    return _digest_form(text)


def _table_holds(text: str) -> bool:
    if not text or "\x00" in text:
        return False
    try:
        return len(text.encode("utf-8")) <= MAX_KEY_BYTES
    except UnicodeEncodeError:  # an unpaired surrogate
        return False


def _digest_form(text: str) -> str:
    # surrogatepass encodes every str, and differently for different ones: distinct keys, distinct digests.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    readable = _NOT_STORABLE_CHARACTERS.sub("\ufffd", text).encode("utf-8")[:_READABLE_BYTES]
    # A character cut in half at the end is dropped.
    return readable.decode("utf-8", "ignore") + _DIGEST_MARK + digest


def check_key_prefix(prefix) -> str:
    """`prefix` if every key under it keeps it, digest forms included; ValueError or TypeError otherwise."""
    if not isinstance(prefix, str):
        raise TypeError(f"a key prefix must be a str, not {type(prefix).__name__}")
    if _NOT_STORABLE_CHARACTERS.search(prefix):
        raise ValueError("a key prefix cannot contain NUL or unpaired surrogates (PostgreSQL text cannot store them)")
    if len(prefix.encode("utf-8")) > _READABLE_BYTES:
        raise ValueError(f"a key prefix may have at most {_READABLE_BYTES} bytes of UTF-8, so that keys too long for "
                         "the table keep it in their digest form")
    return prefix


# -- writes ---------------------------------------------------------------------------------

def stored(store, stale: list, write: Callable[[], bool]) -> bool:
    """`write()`'s answer; past a limit of the table (a value too large, a quota) False instead, logged,
    with the keys in `stale` deleted so no old value outlives the failed write (as memcached does)."""
    try:
        return write()
    except CacheLimitError as error:
        log.warning("fastpgcache: not stored: %s", error)
        if stale:
            store.delete_many(stale)
        return False
