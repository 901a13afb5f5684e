"""Framework backends (Django, Flask), and the one Engine per URL they share within a process."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from sqlalchemy.engine import URL, Engine

from ..client import build_url, cache_engine
from ..errors import CacheLimitError

log = logging.getLogger("fastpgcache")

_engines: dict[tuple, Engine] = {}
_engines_lock = threading.Lock()


def shared_engine(url: str | URL, engine_options: dict | None = None) -> Engine:
    """The process's Engine for `url` (and `engine_options`), created on first use.

    Frameworks build a cache backend per thread (Django) or per app (Flask);
    sharing one Engine keeps them on one connection pool::

        engine = shared_engine("postgresql://app@db/app", {"pool_size": 5})
    """
    options = dict(engine_options or {})
    target = build_url(url=url)
    identity = (target.render_as_string(hide_password=False), repr(sorted(options.items())))
    with _engines_lock:
        engine = _engines.get(identity)
        if engine is None:
            engine = _engines[identity] = cache_engine(target, **options)
        return engine


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
