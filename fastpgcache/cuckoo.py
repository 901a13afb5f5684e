"""`CuckooFilter`: a compact set-membership filter that supports deletion.

Partial-key cuckoo hashing (Fan et al., 2014): each item has a fingerprint
and two candidate buckets, `i1` and `i2 = i1 XOR h(fingerprint)`. The bucket
count is a power of two and the XOR mask depends on the fingerprint alone, so
the alternate of the alternate is the original bucket: a fingerprint moved
during an insert can always find its way back, and a lookup that checks both
buckets finds every stored item. Fingerprints live in one `array` of 8, 16 or
32-bit integers (0 marks an empty slot), not in Python lists.
"""
from __future__ import annotations

import math
import random
import struct
import sys
from array import array
from hashlib import blake2b

_MAGIC = b"FPCF"
_HEADER = struct.Struct("<4sBBBxIQQ")  # magic, version, bucket size, fingerprint bits, max kicks, buckets, size
_VERSION = 2  # 2: items carry a type tag, so version 1 filters hash differently
_MIX = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads a fingerprint over the high bits
_MASK64 = (1 << 64) - 1


def _typecode(bits: int) -> str:
    # The narrowest array type holding a fingerprint of `bits` bits.
    for code in ("B", "H", "I", "L"):
        if array(code).itemsize * 8 >= bits:
            return code
    raise ValueError(f"no array type holds {bits}-bit fingerprints")


def _item_bytes(item) -> bytes:
    # A leading type tag keeps items of different types apart: 123, "123" and b"123" are three items.
    if isinstance(item, str):
        return b"s" + item.encode("utf-8", "surrogatepass")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return b"b" + bytes(item)
    if isinstance(item, int):
        return b"i" + str(int(item)).encode()
    raise TypeError(f"CuckooFilter items are str, bytes or int, not {type(item).__name__}")


class CuckooFilter:
    """A probabilistic set: `lookup` never misses an inserted item, and says "maybe" for others rarely.

    ::

        from fastpgcache import CuckooFilter

        f = CuckooFilter(capacity=100_000)
        f.insert("user:1")       # True (False only when the filter is full)
        "user:1" in f            # True
        "user:2" in f            # False, except with probability ~estimated_fpr
        f.delete("user:1")       # True

    Delete only items that were inserted (deleting an absent item whose
    fingerprint matches would remove someone else's). Inserting an item twice
    stores it twice, so it needs two deletes. Not thread-safe.

    `fingerprint_size` is in bits (4 to 32); the default 16 gives about 0.012%
    false positives at 95% load, in 2 bytes per slot.
    """

    def __init__(self, capacity: int, bucket_size: int = 4, fingerprint_size: int = 16,
                 max_displacements: int = 500, *, seed: int | None = None):
        _check_int("capacity", capacity, 1, 1 << 40)
        _check_int("bucket_size", bucket_size, 1, 64)
        _check_int("fingerprint_size", fingerprint_size, 4, 32)
        _check_int("max_displacements", max_displacements, 1, 1 << 20)
        buckets = 1 << max(0, math.ceil(math.log2(math.ceil(capacity / bucket_size))))
        self._setup(buckets, bucket_size, fingerprint_size, max_displacements, seed)
        code = _typecode(fingerprint_size)
        self._slots = array(code, bytes(array(code).itemsize * buckets * bucket_size))

    def _setup(self, buckets: int, bucket_size: int, fingerprint_size: int, max_displacements: int, seed) -> None:
        # Derived constants shared by __init__ and from_bytes.
        self.bucket_size = bucket_size
        self.fingerprint_size = fingerprint_size
        self.max_displacements = max_displacements
        self.num_buckets = buckets
        self._index_mask = buckets - 1
        self._index_shift = 64 - (buckets.bit_length() - 1)
        self._fingerprints = (1 << fingerprint_size) - 1  # nonzero values a fingerprint can take
        self._random = random.Random(seed)
        self._size = 0

    # -- hashing ---------------------------------------------------------------------------

    def _locate(self, item) -> tuple[int, int]:
        """(first bucket, fingerprint): the low bits pick the bucket, the high bits the fingerprint."""
        h = int.from_bytes(blake2b(_item_bytes(item), digest_size=8).digest(), "little")
        return h & self._index_mask, (h >> 32) % self._fingerprints + 1

    def _alternate(self, bucket: int, fingerprint: int) -> int:
        """The other bucket; an involution, since the XOR mask depends on the fingerprint only."""
        return bucket ^ (((fingerprint * _MIX) & _MASK64) >> self._index_shift)

    # -- the set operations ---------------------------------------------------------------

    def lookup(self, item) -> bool:
        """True if `item` may be in the filter; False means it certainly is not."""
        # _locate and _alternate written out: this is the hot path.
        h = int.from_bytes(blake2b(_item_bytes(item), digest_size=8).digest(), "little")
        bucket, fingerprint = h & self._index_mask, (h >> 32) % self._fingerprints + 1
        b, slots = self.bucket_size, self._slots
        if fingerprint in slots[bucket * b:bucket * b + b]:
            return True
        other = bucket ^ (((fingerprint * _MIX) & _MASK64) >> self._index_shift)
        return fingerprint in slots[other * b:other * b + b]

    __contains__ = lookup

    def insert(self, item) -> bool:
        """Add `item`; False if the filter is too full to place it (nothing else changes then)."""
        bucket, fingerprint = self._locate(item)
        other = self._alternate(bucket, fingerprint)
        if self._put(bucket, fingerprint) or self._put(other, fingerprint):
            self._size += 1
            return True
        return self._relocate(self._random.choice((bucket, other)), fingerprint)

    def _relocate(self, bucket: int, fingerprint: int) -> bool:
        # Evict fingerprints along a random path; if it runs out, undo every move, so
        # each earlier item is exactly where it was and stays findable.
        moves = []
        for _ in range(self.max_displacements):
            position = bucket * self.bucket_size + self._random.randrange(self.bucket_size)
            evicted = self._slots[position]
            self._slots[position] = fingerprint
            moves.append((position, evicted))
            fingerprint = evicted
            bucket = self._alternate(bucket, fingerprint)
            if self._put(bucket, fingerprint):
                self._size += 1
                return True
        for position, evicted in reversed(moves):
            self._slots[position] = evicted
        return False

    def _put(self, bucket: int, fingerprint: int) -> bool:
        # Store in the bucket's first empty slot, if any.
        start = bucket * self.bucket_size
        try:
            position = self._slots.index(0, start, start + self.bucket_size)
        except ValueError:
            return False
        self._slots[position] = fingerprint
        return True

    def delete(self, item) -> bool:
        """Remove one copy of an inserted `item`; False if its fingerprint is in neither bucket."""
        bucket, fingerprint = self._locate(item)
        for candidate in (bucket, self._alternate(bucket, fingerprint)):
            start = candidate * self.bucket_size
            try:
                position = self._slots.index(fingerprint, start, start + self.bucket_size)
            except ValueError:
                continue
            self._slots[position] = 0
            self._size -= 1
            return True
        return False

    # -- size and statistics --------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        """Slots in the filter: a power-of-two bucket count times the bucket size."""
        return self.num_buckets * self.bucket_size

    def stats(self) -> dict:
        """Size, capacity, load factor, estimated false-positive rate and memory::

            CuckooFilter(1000).stats()["memory_bytes"]   # 2048: 1024 slots of 2 bytes
        """
        load = self._size / self.capacity
        # A lookup compares against up to 2 * bucket_size * load stored fingerprints.
        fpr = 1 - (1 - 1 / self._fingerprints) ** (2 * self.bucket_size * load)
        return {"size": self._size, "capacity": self.capacity, "load_factor": load, "estimated_fpr": fpr,
                "bucket_size": self.bucket_size, "fingerprint_size": self.fingerprint_size,
                "num_buckets": self.num_buckets, "memory_bytes": len(self._slots) * self._slots.itemsize}

    def __repr__(self) -> str:
        return f"<CuckooFilter {self._size}/{self.capacity} items, {self.fingerprint_size}-bit fingerprints>"

    # -- saving and loading ---------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The filter as bytes (little-endian, portable), for `CuckooFilter.from_bytes`."""
        header = _HEADER.pack(_MAGIC, _VERSION, self.bucket_size, self.fingerprint_size, self.max_displacements,
                              self.num_buckets, self._size)
        slots = self._slots
        if sys.byteorder == "big":
            slots = array(slots.typecode, slots)
            slots.byteswap()
        return header + slots.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> CuckooFilter:
        """A filter saved by `to_bytes`::

            restored = CuckooFilter.from_bytes(f.to_bytes())
        """
        data = bytes(data)
        if len(data) < _HEADER.size or data[:4] != _MAGIC:
            raise ValueError("not a saved CuckooFilter (use the bytes from CuckooFilter.to_bytes())")
        magic, version, bucket_size, bits, kicks, buckets, size = _HEADER.unpack_from(data)
        if version != _VERSION:
            raise ValueError(f"saved CuckooFilter has format version {version}; this version reads {_VERSION}")
        _check_header(bucket_size, bits, kicks, buckets, size)
        slots = array(_typecode(bits))
        if len(data) - _HEADER.size != buckets * bucket_size * slots.itemsize:
            raise ValueError("saved CuckooFilter is truncated or corrupt")
        slots.frombytes(data[_HEADER.size:])
        if sys.byteorder == "big":
            slots.byteswap()
        restored = cls.__new__(cls)
        restored._setup(buckets, bucket_size, bits, kicks, None)
        restored._slots = slots
        restored._size = size
        return restored


def _check_header(bucket_size: int, bits: int, kicks: int, buckets: int, size: int) -> None:
    # A header __init__ could never have written would load, then fail later in a lookup.
    problems = [f"{name} {value} is not from {low} to {high}" for name, value, low, high in (
        ("bucket_size", bucket_size, 1, 64), ("fingerprint_size", bits, 4, 32),
        ("max_displacements", kicks, 1, 1 << 20)) if not low <= value <= high]
    if buckets < 1 or buckets & (buckets - 1):
        problems.append(f"num_buckets {buckets} is not a power of two")
    elif not problems and size > buckets * bucket_size:
        problems.append(f"size {size} is more than its {buckets * bucket_size} slots")
    if problems:
        raise ValueError(f"saved CuckooFilter has a bad header: {'; '.join(problems)}")


def _check_int(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int from {low} to {high}, got {value!r}")
