"""Expiry on write: a busy cache removes its own dead rows and stays under `max_entries`, no cron needed.

Every `expire_every` writes, the write that crosses the mark also deletes up to
twice as many expired rows as were written since the last batch (found through
the expires_at index, so the batch costs about as much as the rows it
removes). Removing rows twice as fast as they can be written means expired
rows never pile up, as in Rails' Solid Cache.

With `max_entries`, the same writes now and then delete this role's oldest
entries (first in, first out by `created_at`) beyond the newest `max_entries`.
The check reads this role's rows, so it runs only every
`max(expire_every, min(max_entries // 100, 5000))` writes: its cost per write
stays small, and the cache may pass the cap by that many writes per writing
process before it is trimmed back.
"""
from __future__ import annotations

import logging
import threading
from typing import NamedTuple

from .errors import check_positive_int, first_line

log = logging.getLogger("fastpgcache")

DEFAULT_EVERY = 50
"""Writes between two expiry batches (Solid Cache runs one every 50 writes too)."""

MAX_BATCH = 10_000
"""Most rows one expiry statement removes, so a huge set_many never triggers a huge DELETE."""


class Due(NamedTuple):
    """Rows to remove now: `expire` expired rows at most, `trim` rows past max_entries at most (0 = none)."""

    expire: int
    trim: int


NOTHING_DUE = Due(0, 0)


class ExpiryOnWrite:
    """Counts one cache's writes and says when a bounded cleanup batch is due.

    ::

        policy = ExpiryOnWrite(every=50, max_entries=100_000)
        policy.due(1)      # Due(expire=0, trim=0) most of the time
    """

    def __init__(self, every: int | None = DEFAULT_EVERY, max_entries: int | None = None):
        check_positive_int("expire_every", every, none_means="to turn it off")
        check_positive_int("max_entries", max_entries, none_means="to turn it off")
        self.every = every
        self.max_entries = max_entries
        self.trim_every = max(every or DEFAULT_EVERY, min(max_entries // 100, MAX_BATCH // 2)) if max_entries else None
        self.expired = 0
        self.trimmed = 0
        self.failures = 0
        self._since_expiry = 0
        self._since_trim = 0
        # Writes not yet counted, and how many make a batch possibly due: below that, due() takes no lock.
        self._pending = 0
        self._threshold = min(n for n in (every, self.trim_every, MAX_BATCH) if n)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ExpiryOnWrite every={self.every} max_entries={self.max_entries}>"

    def due(self, writes: int) -> Due:
        """Record `writes` rows written; the batch sizes to remove now, if any.

        Runs on every write, so the common case is one addition and one comparison (an
        increment lost to a race between threads only delays a batch a little).
        """
        if not (self.every or self.max_entries):
            return NOTHING_DUE
        self._pending += writes
        if self._pending < self._threshold:
            return NOTHING_DUE
        with self._lock:
            writes, self._pending = self._pending, 0
            self._since_expiry += writes
            self._since_trim += writes
            expire = self._take_expiry()
            trim = self._take_trim()
        return Due(expire, trim) if expire or trim else NOTHING_DUE

    def removed(self, expired: int, trimmed: int) -> None:
        """Add what a batch actually removed to the counters `stats()` reports."""
        with self._lock:
            self.expired += expired
            self.trimmed += trimmed

    def failed(self, error: BaseException) -> None:
        """A batch failed after its write succeeded: say so the first time, count it always."""
        self.failures += 1
        if self.failures == 1:
            log.warning("fastpgcache: expiry on write failed (%s: %s); the writes themselves succeeded, and "
                        "cleanup() or pg_cron can remove expired rows instead", type(error).__name__,
                        first_line(error))

    def counters(self) -> dict:
        """Rows this process removed on write: `expired_on_write` and `trimmed` (past max_entries)."""
        return {"expired_on_write": self.expired, "trimmed": self.trimmed}

    def _take_expiry(self) -> int:
        if not self.every or self._since_expiry < self.every:
            return 0
        batch, self._since_expiry = min(2 * self._since_expiry, MAX_BATCH), 0
        return batch

    def _take_trim(self) -> int:
        if self.trim_every is None or self._since_trim < self.trim_every:
            return 0
        batch, self._since_trim = min(2 * self._since_trim, MAX_BATCH), 0
        return batch

