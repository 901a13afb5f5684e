"""The standalone CuckooFilter: no false negatives up to 95% load, compact, saved and loaded."""
from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpgcache import CuckooFilter
from fastpgcache.cuckoo import _HEADER


def fill(f: CuckooFilter, load: float, prefix: str = "key") -> list[str]:
    """Insert items until `load` of the slots are used; every insert must succeed."""
    items = [f"{prefix}:{i}" for i in range(math.ceil(f.capacity * load))]
    assert all(f.insert(item) for item in items)
    return items


def test_insert_lookup_delete_len_and_in():
    f = CuckooFilter(1000)
    assert f.insert("user:1") is True
    assert f.lookup("user:1") and "user:1" in f and len(f) == 1
    assert f.delete("user:1") is True
    assert "user:1" not in f and len(f) == 0
    assert f.delete("user:1") is False


def test_items_may_be_str_bytes_or_int_and_nothing_else():
    f = CuckooFilter(100)
    for item in ("text", b"\x00\xffraw", 12345, -7, 2**80):
        assert f.insert(item) and item in f
    with pytest.raises(TypeError, match="str, bytes or int, not float"):
        f.insert(1.5)
    with pytest.raises(TypeError, match="not NoneType"):
        f.lookup(None)


@pytest.mark.parametrize("capacity", [1, 3, 4, 5, 1000, 100_001])
def test_bucket_count_is_a_power_of_two_covering_the_capacity(capacity):
    f = CuckooFilter(capacity)
    assert f.num_buckets & (f.num_buckets - 1) == 0
    assert f.capacity >= capacity and f.capacity == f.num_buckets * f.bucket_size


def test_alternate_bucket_is_an_involution():
    f = CuckooFilter(4096)
    for fingerprint in range(1, 2**16, 7):
        for bucket in (0, 1, f.num_buckets // 2, f.num_buckets - 1):
            other = f._alternate(bucket, fingerprint)
            assert 0 <= other < f.num_buckets
            assert f._alternate(other, fingerprint) == bucket


def test_no_false_negative_at_95_percent_load_even_after_deleting_others():
    f = CuckooFilter(20_000, seed=7)
    items = fill(f, 0.95)
    assert f.stats()["load_factor"] >= 0.95
    assert all(item in f for item in items)
    deleted, kept = items[::3], [item for i, item in enumerate(items) if i % 3]
    assert all(f.delete(item) for item in deleted)
    assert all(item in f for item in kept)
    refill = [f"again:{i}" for i in range(len(deleted))]
    assert all(f.insert(item) for item in refill)
    assert all(item in f for item in kept + refill)


def test_a_failed_insert_changes_nothing_and_every_earlier_item_stays():
    f = CuckooFilter(64, max_displacements=50, seed=3)
    stored = []
    for i in range(10_000):
        before = f.to_bytes()
        if not f.insert(i):
            assert f.to_bytes() == before, "a failed insert must leave the filter as it was"
            break
        stored.append(i)
    else:
        pytest.fail("a 64-slot filter never filled up")
    assert len(f) == len(stored) <= f.capacity
    assert all(item in f for item in stored)


def test_false_positive_rate_at_95_percent_load_is_under_one_percent():
    f = CuckooFilter(50_000, seed=11)
    fill(f, 0.95)
    probes = 100_000
    false_positives = sum(f"absent:{i}" in f for i in range(probes))
    assert false_positives / probes < 0.01
    assert f.stats()["estimated_fpr"] < 0.01


def test_uses_at_most_two_bytes_per_slot():
    f = CuckooFilter(100_000)
    stats = f.stats()
    assert stats["memory_bytes"] <= 2 * stats["capacity"]
    assert CuckooFilter(1000, fingerprint_size=8).stats()["memory_bytes"] == 1024


def test_stats_reports_the_seed_fields():
    f = CuckooFilter(1000, bucket_size=2, fingerprint_size=12)
    f.insert("a")
    stats = f.stats()
    assert {"size", "capacity", "load_factor", "estimated_fpr", "bucket_size", "fingerprint_size",
            "memory_bytes"} <= set(stats)
    assert (stats["size"], stats["bucket_size"], stats["fingerprint_size"]) == (1, 2, 12)
    assert stats["load_factor"] == 1 / stats["capacity"]


def test_saved_filter_loads_with_the_same_answers():
    f = CuckooFilter(5000, seed=1)
    items = fill(f, 0.9)
    restored = CuckooFilter.from_bytes(f.to_bytes())
    assert len(restored) == len(f) and restored.stats() == f.stats()
    assert all(item in restored for item in items)
    assert [f"x{i}" in restored for i in range(2000)] == [f"x{i}" in f for i in range(2000)]
    assert restored.insert("more") and restored.delete(items[0])


def test_loading_garbage_says_what_was_expected():
    with pytest.raises(ValueError, match="not a saved CuckooFilter"):
        CuckooFilter.from_bytes(b"hello")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        CuckooFilter.from_bytes(CuckooFilter(100).to_bytes()[:-1])


def saved_with(**fields) -> bytes:
    """A saved 16-slot filter whose header has `fields` changed."""
    names = ("magic", "version", "bucket_size", "bits", "kicks", "buckets", "size")
    header = dict(zip(names, _HEADER.unpack_from(CuckooFilter(16).to_bytes()), strict=True))
    header.update(fields)
    slots = header["buckets"] * header["bucket_size"] * (4 if header["bits"] > 16 else 2)
    return _HEADER.pack(*header.values()) + bytes(max(slots, 0))


@pytest.mark.parametrize("fields, problem", [
    ({"bits": 0}, "fingerprint_size 0 is not from 4 to 32"),
    ({"bits": 3}, "fingerprint_size 3 is not from 4 to 32"),
    ({"bits": 40}, "fingerprint_size 40 is not from 4 to 32"),
    ({"bucket_size": 0, "buckets": 4}, "bucket_size 0 is not from 1 to 64"),
    ({"kicks": 0}, "max_displacements 0 is not from 1 to"),
    ({"buckets": 0}, "num_buckets 0 is not a power of two"),
    ({"buckets": 3}, "num_buckets 3 is not a power of two"),
    ({"size": 17}, "size 17 is more than its 16 slots"),
])
def test_loading_a_bad_header_says_which_field_is_wrong(fields, problem):
    with pytest.raises(ValueError, match=f"saved CuckooFilter has a bad header: {problem}"):
        CuckooFilter.from_bytes(saved_with(**fields))


def test_loading_a_filter_saved_with_the_old_item_encoding_is_refused():
    with pytest.raises(ValueError, match="format version 1"):
        CuckooFilter.from_bytes(saved_with(version=1))


def test_items_of_different_types_are_different_items():
    # Before type tags, 123 was stored as the bytes b"\xff123" and "abc" as b"abc".
    f = CuckooFilter(1 << 16, fingerprint_size=32)
    f.insert(123)
    f.insert("abc")
    assert 123 in f and "abc" in f
    assert b"\xff123" not in f and b"abc" not in f and "123" not in f
    assert f.delete(b"\xff123") is False and f.delete(b"abc") is False and len(f) == 2
    restored = CuckooFilter.from_bytes(f.to_bytes())
    assert 123 in restored and "abc" in restored and b"\xff123" not in restored


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"capacity": "10"}, {"capacity": 10, "bucket_size": 0},
                                    {"capacity": 10, "fingerprint_size": 3},
                                    {"capacity": 10, "fingerprint_size": 33},
                                    {"capacity": 10, "max_displacements": 0}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be an int from"):
        CuckooFilter(**kwargs)


operations = st.lists(st.tuples(st.sampled_from(["insert", "delete", "lookup"]), st.integers(0, 300)),
                      max_size=400)


@settings(max_examples=200, deadline=None)
@given(operations, st.sampled_from([1, 2, 4]), st.sampled_from([4, 8, 16]))
def test_random_operations_never_produce_a_false_negative(ops, bucket_size, bits):
    # Small filters and short fingerprints make collisions and full buckets common.
    f = CuckooFilter(64, bucket_size=bucket_size, fingerprint_size=bits, seed=0)
    present = Counter()
    for op, item in ops:
        if op == "insert":
            if f.insert(item):
                present[item] += 1
        elif op == "delete" and present[item]:
            assert f.delete(item)
            present[item] -= 1
        assert all(key in f for key, copies in present.items() if copies)
    assert len(f) == sum(present.values())
