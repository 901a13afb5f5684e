"""Keys, ttls and glob patterns: checked and converted before any SQL runs."""
from __future__ import annotations

import datetime as _dt
import math
import re

MAX_KEY_BYTES = 1024
"""Longest key, in UTF-8 bytes; keeps (user_id, key) well inside a btree index entry."""

MAX_TTL_SECONDS = 100 * 365 * 24 * 3600
"""Longest ttl accepted (100 years)."""

MAX_PATTERN_CHARS = 2 * MAX_KEY_BYTES
"""Longest glob pattern: room for a longest key with every character escaped."""

MAX_PATTERN_STARS = 32
"""Most `*` wildcards in one pattern (runs like `**` count once): each one multiplies the regex's work."""

MAX_PATTERN_WILDCARDS = 256
"""Most wildcards of any kind (`*`, `?`, `[...]`) in one pattern."""

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")


def normalize_key(key) -> str:
    """Validate a key the way redis-py converts one: str, bytes (UTF-8), int or float.

    ::

        normalize_key(b"user:1")   # 'user:1'
        normalize_key(42)          # '42'
    """
    if type(key) is str and key.isascii() and 0 < len(key) <= MAX_KEY_BYTES and "\x00" not in key:
        return key  # the common case: ASCII is one byte a character and never a lone surrogate
    if isinstance(key, str):
        text_key = key
    elif isinstance(key, (bytes, bytearray, memoryview)):
        try:
            text_key = bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("bytes keys must be valid UTF-8") from None
    elif isinstance(key, (int, float)) and not isinstance(key, bool):
        text_key = repr(key)
    else:
        raise TypeError(f"invalid key type {type(key).__name__}: use str, bytes, int or float")
    if "\x00" in text_key:
        raise ValueError("keys cannot contain NUL characters (PostgreSQL text cannot store them)")
    try:
        size = len(text_key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("keys must be valid Unicode text (this one holds a lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise ValueError(f"key is {size} bytes; the limit is {MAX_KEY_BYTES} bytes of UTF-8 (hash longer keys)")
    if size == 0:
        raise ValueError("keys cannot be empty")
    return text_key


def key_list(keys) -> list[str]:
    """Normalized keys of an iterable, first occurrence kept, so a batch never names a key twice."""
    if isinstance(keys, (str, bytes)):
        raise TypeError("pass an iterable of keys, not a single key")
    return list(dict.fromkeys(normalize_key(key) for key in keys))


def normalize_ttl(ttl) -> float | None:
    """Seconds as a positive float, or None for no expiry; raises before any SQL runs."""
    if ttl is None:
        return None
    if isinstance(ttl, _dt.timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise TypeError(f"ttl must be seconds (int or float), a timedelta, or None; got {type(ttl).__name__}")
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r} (use None for no expiry)")
    if seconds > MAX_TTL_SECONDS:
        raise ValueError(f"ttl {ttl!r} is longer than the {MAX_TTL_SECONDS} s (100 year) limit")
    return seconds


def escape_glob(text: str) -> str:
    """`text` as a glob that matches exactly itself, for building patterns from input::

        cache.clear(escape_glob(f"session:{user_input}") + "*")   # a '*' in the input stays a '*'
    """
    if not isinstance(text, str):
        raise TypeError(f"escape_glob() takes a str, not {type(text).__name__}")
    return _GLOB_SPECIALS.sub(r"\\\1", text)


def pattern_regex(pattern) -> str:
    """A Redis glob checked against the caps and translated into an anchored PostgreSQL regex.

    Raises ValueError or TypeError (input errors, never absorbed by failsafe mode)::

        pattern_regex("user:*")   # '^user:.*$'
    """
    if isinstance(pattern, bytes):
        pattern = pattern.decode("utf-8")
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str glob, not {type(pattern).__name__}")
    if "\x00" in pattern:
        raise ValueError("patterns cannot contain NUL characters")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"pattern is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}")
    return glob_to_regex(pattern)


def glob_to_regex(pattern: str) -> str:
    """Translate a Redis glob (`*`, `?`, `[a-z]`, `[^x]`, `\\x`) into an anchored PostgreSQL regex.

    As Redis: a run of `*` is one `*`, and a range written backwards (`[z-a]`) is
    swapped. Unlike Redis, which compares bytes, it matches characters, and an
    unclosed `[` is a literal `[`. Caps: MAX_PATTERN_STARS and MAX_PATTERN_WILDCARDS.
    """
    out, i, n = ["^"], 0, len(pattern)
    stars = wildcards = 0
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if ch == "*":
            while i < n and pattern[i] == "*":
                i += 1
            out.append(".*")
            stars += 1
        elif ch == "?":
            out.append(".")
            i += 1
        elif ch == "[" and "]" in pattern[i + 1:]:
            bracket, i = _glob_class(pattern, i + 1)
            out.append(bracket)
        else:
            out.append(re.escape(ch))
            i += 1
            continue
        wildcards += 1
        if stars > MAX_PATTERN_STARS or wildcards > MAX_PATTERN_WILDCARDS:
            raise ValueError(f"pattern has more than {MAX_PATTERN_STARS} '*' or {MAX_PATTERN_WILDCARDS} wildcards "
                             "in all; each one multiplies the work of matching, so narrow it")
    out.append("$")
    return "".join(out)


def _glob_class(pattern: str, i: int) -> tuple[str, int]:
    # A [...] set read as Redis reads it: ^ negates, \ escapes, a-z is a range and z-a the same
    # range; a set still open at the end of the pattern ends there. Returns (regex, next index).
    # Members are written as \U escapes, which PostgreSQL reads literally inside any set.
    n = len(pattern)
    negate = i < n and pattern[i] == "^"
    i += negate
    members = []
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            members.append(_code(pattern[i + 1]))
            i += 2
        elif ch == "]":
            i += 1
            break
        elif i + 2 < n and pattern[i + 1] == "-":
            low, high = sorted((ch, pattern[i + 2]))
            members.append(f"{_code(low)}-{_code(high)}")
            i += 3
        else:
            members.append(_code(ch))
            i += 1
    if not members:  # Redis: "[]" matches nothing, "[^]" any one character
        return ("." if negate else "(?!)"), i
    return f"[{'^' if negate else ''}{''.join(members)}]", i


def _code(char: str) -> str:
    # One character as PostgreSQL's \Ustuvwxyz escape: never a metacharacter, whatever the character.
    return f"\\U{ord(char):08X}"
