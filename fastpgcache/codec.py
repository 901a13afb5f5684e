"""Value encoding: every value reads back as the Python type it was stored as.

`flags` records the encoding, so a str that looks like JSON stays a str.
"""
from __future__ import annotations

import json
import pickle

RAW = 0  # bytes as given
TEXT = 1  # str, UTF-8
JSON = 2  # int, float, bool, None, dict, list
PICKLE = 3  # anything else, only when the caller opted in

_SCALAR_TYPES = (str, bool, int, float, type(None))
_SCALARS = frozenset(_SCALAR_TYPES)
"""Exact types JSON stores as themselves; checked by type first, since this runs on every set()."""

# One encoder for every call: json.dumps() with options would build a new one each time.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _refuse(obj):
    raise TypeError(
        f"cannot cache a value of type {type(obj).__name__}: use str, bytes, int, float, bool, None, "
        "or dict/list of those (or create the cache with pickle=True)"
    )


def serialize(value, *, allow_pickle: bool = False) -> tuple[int, bytes]:
    """Encode `value`; raises TypeError naming the type when it cannot be cached.

    >>> serialize("123")
    (1, b'123')
    """
    if isinstance(value, str):
        return TEXT, value.encode("utf-8", "surrogatepass")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return RAW, bytes(value)
    if isinstance(value, (bool, int, float, type(None))):
        return JSON, json.dumps(value).encode()
    if allow_pickle:
        return PICKLE, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    if isinstance(value, (dict, list)):
        _check_json(value)
        return JSON, _ENCODER.encode(value).encode("utf-8")
    _refuse(value)


def _check_json(value) -> None:
    # json.dumps would quietly turn {1: x} into {"1": x} and tuples into lists: refuse what would not read back.
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise TypeError(f"cannot cache a dict with a {type(key).__name__} key ({key!r}): JSON keys are "
                                "str, so it would read back changed (or create the cache with pickle=True)")
            if type(item) not in _SCALARS:
                _check_json(item)
    elif isinstance(value, list):
        for item in value:
            if type(item) not in _SCALARS:
                _check_json(item)
    elif not isinstance(value, _SCALAR_TYPES):
        _refuse(value)


def deserialize(flags: int, data: bytes, *, parse_json: bool = True, allow_pickle: bool = False):
    """Decode what `serialize` produced; parse_json=False returns JSON as its text."""
    if flags == TEXT:
        return bytes(data).decode("utf-8", "surrogatepass")
    if flags == RAW:
        return bytes(data)
    if flags == JSON:
        text = bytes(data).decode("utf-8")
        return json.loads(text) if parse_json else text
    if flags == PICKLE:
        if not allow_pickle:
            raise TypeError("this value was stored pickled; create the cache with pickle=True to read it")
        return pickle.loads(data)
    raise ValueError(f"unknown value encoding flags={flags}; was the row written by another program?")
