"""Who a cache writes as: the acting role's row of `<table>_secrets`, and what its secret derives.

Each role has one random 256-bit secret per cache table, which row-level
security shows to that role alone. The write functions take it as proof of
who is calling; the negative-lookup guard listens on a channel named after it
and hears keys as hashes keyed with it, so no other role can listen in, forge
a message, or confirm a guessed key.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

from .model import CHANNEL_PREFIX, SECRET_BYTES

TOKEN_HEX_DIGITS = 16
"""A key's token is this many hex digits of sha256(secret || key); the write functions send the same."""

RECENT_KEYS = 4096
"""How many keys used lately a process keeps what it derived for: each identity their tokens, so a guarded
get or set skips the SHA-256 (about 2 µs of the call right after a round trip), and the guard whether its
filters hold them, so writing one again skips the filter insert (about 3 µs). About 200 bytes a key of 20
characters, both records together (0.8 MB when full). With 1,024, the bench's mix of workloads (some 2,500
keys a round) emptied the records before a key came back, and a set with the guard cost 1.23x the floor
against 1.13x without it; with 4,096, 1.19x against 1.16x (benchmarks/)."""


@dataclass(frozen=True)
class Identity:
    """One role's identity for one cache table::

        identity = Identity("alice", secret)
        identity.token("user:1")   # 16 hex digits only alice (and the table owner) can compute
    """

    user: str
    secret: bytes = field(repr=False)
    _recent: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(self.secret) != SECRET_BYTES:  # only a row changed by hand: the credential could not be split
            raise ValueError(f"the secret of role {self.user!r} is {len(self.secret)} bytes, not {SECRET_BYTES}: "
                             "delete that role's row of the secrets table, and its next write creates a new one")

    @functools.cached_property
    def credential(self) -> str:
        """What every write sends as proof of identity: the secret in hex, then the role's name (the
        statements split it by the secret's fixed length, statements.py)."""
        return self.secret.hex() + self.user

    @property
    def channel(self) -> str:
        """The role's notification channel, as the secrets table's generated column computes it."""
        return CHANNEL_PREFIX + hashlib.sha256(self.secret + b"\x00").hexdigest()[:32]

    def token(self, key: str) -> str:
        """The keyed hash a notification carries for `key` (kept for the keys used lately)."""
        token = self._recent.get(key)
        if token is None:
            if len(self._recent) >= RECENT_KEYS:
                self._recent.clear()
            token = self._recent[key] = self.digest(key)
        return token

    def digest(self, key: str) -> str:
        """token() computed afresh and kept nowhere: for a warm-up, which hashes every key once."""
        return hashlib.sha256(self.secret + key.encode("utf-8")).hexdigest()[:TOKEN_HEX_DIGITS]
