"""Value encoding: every value reads back as the Python type it was stored as.

`flags` records the encoding, so a str that looks like JSON stays a str.
Pickles are signed: unpickling runs code, and whoever can write a row (the
table's owner role and its members, superusers) must not be able to make an
application run theirs. A pickle is stored behind an HMAC-SHA256 tag over the
key and the pickle, under a key only the application holds; one without a
valid tag is never unpickled: it reads as a miss, and is logged.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import json.scanner
import logging
import pickle
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

log = logging.getLogger("fastpgcache")

SigningKeys = str | bytes | Sequence[str | bytes] | None  # the newest first; None: no pickles

RAW = 0  # bytes as given
TEXT = 1  # str, UTF-8
JSON = 2  # int, float, bool, None, dict, list
PICKLE = 3  # anything else, only when the caller opted in; signed

TAG_BYTES = 32
"""HMAC-SHA256 tag in front of every pickle."""

MIN_KEY_BYTES = 16
"""Shortest signing key accepted; Django's generated SECRET_KEY has 50 characters."""

_SCALAR_TYPES = (str, bool, int, float, type(None))
_SCALARS = frozenset(_SCALAR_TYPES)
"""Exact types JSON stores as themselves; checked by type first, since this runs on every set()."""

# One encoder and one decoder for every call: json.dumps() with options would build a new encoder
# each time, and json.loads() adds a type check around the same decoder.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_DECODE = json.JSONDecoder().decode


def _unreachable(obj) -> NoReturn:
    raise TypeError(f"cannot cache a value of type {type(obj).__name__}")  # _check_json refused it before


# The C encoder and scanner behind json, made once: JSONEncoder.encode builds a new C encoder for every
# call, and JSONDecoder.decode matches whitespace around the value; for a 100-byte dict that was
# 3.0 instead of 1.0 µs to encode and 1.5 instead of 0.6 µs to decode (benchmarks/overhead.py).
_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODE = _MAKE_ENCODER and _MAKE_ENCODER(
    None, _unreachable, json.encoder.encode_basestring, None, ":", ",", False, False, True)
_SCAN = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # typeshed misnames its argument type


def encode_json(value) -> bytes:
    """`value` (already checked to be JSON that reads back exactly) as compact UTF-8 JSON."""
    if _C_ENCODE is None:  # an interpreter without json's C accelerator
        return _ENCODE(value).encode("utf-8")
    return "".join(_C_ENCODE(value, 0)).encode("utf-8")


def decode_json(text: str):
    """The value of JSON `text`; errors as json.loads gives them."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:  # blank first, or no JSON at all: the full decoder takes it, or says what is wrong
        return _DECODE(text)
    return value if end == len(text) else _DECODE(text)


def as_text(flags: int, data: bytes) -> str:
    """An encoded value as a set sends it: its flags' digit, then its bytes in hex (statements.value_param).

    >>> as_text(TEXT, b"hi")
    '16869'
    """
    return str(flags) + data.hex()


def _refuse(obj) -> NoReturn:
    raise TypeError(
        f"cannot cache a value of type {type(obj).__name__}: use str, bytes, int, float, bool, None, "
        "or dict/list of those (or give the cache a pickle signing key: pickle=SECRET)"
    )


def serialize(value) -> tuple[int, bytes]:
    """Encode a value that needs no pickle; raises TypeError naming the type otherwise.

    >>> serialize("123")
    (1, b'123')
    """
    kind = type(value)  # exact types first: this runs on every set()
    if kind is str:
        return TEXT, value.encode("utf-8", "surrogatepass")
    if kind is dict or kind is list:
        _check_json(value)
        return JSON, encode_json(value)
    if isinstance(value, str):
        return TEXT, value.encode("utf-8", "surrogatepass")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return RAW, bytes(value)
    if isinstance(value, (bool, int, float, type(None))):
        return JSON, json.dumps(value).encode()
    if isinstance(value, (dict, list)):
        _check_json(value)
        return JSON, _ENCODE(value).encode("utf-8")  # subclasses: the pure encoder honours their overrides
    _refuse(value)


def _check_json(value, nested: bool = False) -> None:
    """Refuse a dict or list that would not read back as it is: json.dumps would quietly turn {1: x}
    into {"1": x} and tuples into lists, and a value nesting past the recursion limit cannot be encoded."""
    try:
        if isinstance(value, dict):
            for key, item in value.items():
                if type(key) is not str and not isinstance(key, str):
                    raise TypeError(f"cannot cache a dict with a {type(key).__name__} key ({key!r}): JSON keys "
                                    "are str, so it would read back changed (or give the cache a pickle signing key)")
                if type(item) not in _SCALARS:
                    _check_json(item, True)
        elif isinstance(value, list):
            for item in value:
                if type(item) not in _SCALARS:
                    _check_json(item, True)
        elif not isinstance(value, _SCALAR_TYPES):
            _refuse(value)
    except RecursionError:
        if nested:
            raise
        raise ValueError("cannot cache a dict or list that contains itself or nests deeper than Python's "
                         "recursion limit: flatten it, or store it as bytes you encode yourself") from None


def deserialize(flags: int, data: bytes, *, parse_json: bool = True):
    """Decode what `serialize` produced (not pickles: see `Codec`); parse_json=False returns JSON as text."""
    if flags == JSON:
        text = str(data, "utf-8")  # bytes or the driver's memoryview, without a copy
        return decode_json(text) if parse_json else text
    if flags == TEXT:
        return str(data, "utf-8", "surrogatepass")
    if flags == RAW:
        return bytes(data)
    if flags == PICKLE:
        raise TypeError("this value was stored as a signed pickle; give the cache the signing key (pickle=SECRET) "
                        "to read it")
    raise ValueError(f"unknown value encoding flags={flags}; was the row written by another program?")


class Codec:
    """Encodes values for one cache; with signing keys, other objects become signed pickles.

    `keys` is None (no pickles), one key (str or bytes), or a sequence of keys:
    the first signs, every one verifies (to rotate, put the new key first)::

        codec = Codec(["new-secret-key-0123", "old-secret-key-0123"])
        flags, data = codec.serialize({1, 2}, "k")
        codec.deserialize(flags, data, key="k")   # {1, 2}
    """

    signs: bool

    def __init__(self, keys: SigningKeys = None):
        if keys is True:
            raise ValueError("pickle=True needs a signing key now: pass pickle=SECRET (str or bytes, at least "
                             f"{MIN_KEY_BYTES} bytes, e.g. your application's SECRET_KEY), so that nobody who can "
                             "write the table can make this process unpickle their code")
        if keys in (None, False):
            keys = []
        elif isinstance(keys, (str, bytes)):
            keys = [keys]
        self._macs = [self._mac_key(key) for key in keys]
        self.signs = bool(self._macs)  # whether other objects are pickled (signed); read on every set and get
        self._refused = 0
        self._last_logged = 0.0
        self._lock = threading.Lock()

    @staticmethod
    def _mac_key(key) -> bytes:
        # A key of its own for this purpose, so a shared secret (Django's SECRET_KEY) signs nothing else here.
        raw = key.encode("utf-8") if isinstance(key, str) else key
        if not isinstance(raw, bytes) or len(raw) < MIN_KEY_BYTES:
            raise ValueError(f"a pickle signing key must be str or bytes of at least {MIN_KEY_BYTES} bytes")
        return hmac.new(raw, b"fastpgcache pickle signing", hashlib.sha256).digest()

    def serialize(self, value, key: str = "") -> tuple[int, bytes]:
        """`value` as (flags, bytes); a pickle carries its tag over (key, pickle) in front.

        With signing keys, values JSON reads back exactly (exact dicts, lists and
        scalars) stay JSON, readable by every client; anything else is pickled.
        """
        if not self.signs:
            return serialize(value)
        kind = type(value)
        if kind in (dict, list) and _exact_json(value):
            return JSON, encode_json(value)
        if kind in _SCALARS or kind in (bytes, bytearray, memoryview):
            return serialize(value)
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return PICKLE, self._tag(self._macs[0], key, data) + data

    def deserialize(self, flags: int, data: bytes, *, key: str = "", parse_json: bool = True, missing=None):
        """The stored value, or `missing` for a pickle whose tag does not verify (logged, never unpickled)."""
        if flags == JSON and parse_json:  # the common case first: it runs on every hit
            return decode_json(str(data, "utf-8"))
        if flags != PICKLE or not self.signs:
            return deserialize(flags, data, parse_json=parse_json)
        data = bytes(data)
        tag, body = data[:TAG_BYTES], data[TAG_BYTES:]
        if any(hmac.compare_digest(tag, self._tag(mac, key, body)) for mac in self._macs):
            return pickle.loads(body)
        self._log_refusal(key)
        return missing

    @staticmethod
    def _tag(mac: bytes, key: str, body: bytes) -> bytes:
        return hmac.new(mac, key.encode("utf-8") + b"\x00" + body, hashlib.sha256).digest()

    def _log_refusal(self, key: str) -> None:
        # Forged or foreign pickles read as misses; say so, at most once a minute with a count.
        with self._lock:
            self._refused += 1
            now = time.monotonic()
            if self._refused > 1 and now - self._last_logged < 60:
                return
            self._last_logged, count = now, self._refused
        log.warning("fastpgcache: refused to unpickle the value at %r: its signature does not verify under this "
                    "cache's key (written by someone else, or under another key); read as a miss "
                    "(%d refused so far)", key, count)


def _exact_json(value) -> bool:
    """Whether JSON reads `value` back as itself; a value that contains itself is left to pickle."""
    try:
        return _exact_json_items(value)
    except RecursionError:
        return False


def _exact_json_items(value) -> bool:
    # Exact dicts (str keys), lists and scalars only: a subclass (OrderedDict, IntEnum) must be pickled
    # to read back as itself.
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is dict:
        return all(type(key) is str and _exact_json_items(item) for key, item in value.items())
    if kind is list:
        return all(_exact_json_items(item) for item in value)
    return False
