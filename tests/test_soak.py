"""Sustained load: 4 processes x 4 threads of mixed calls; no errors, no wrong values, exact counters, flat memory.

The size is small so CI runs it in seconds; raise SOAK_OPS (operations per thread)
for a longer soak: `SOAK_OPS=20000 pytest -m soak -s`.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import resource
import threading
import time
from array import array
from collections import Counter

import pytest

from fastpgcache import FastPgCache

PROCESSES, THREADS = 4, 4
OPS = int(os.environ.get("SOAK_OPS", "2000"))
SHARED_KEYS, COUNTERS = 64, 8
MEMORY_SLACK = 8 * 1024 * 1024
"""RSS growth allowed after warm-up: allocator noise, far below what a leak of every call would show."""


def _rss() -> int:
    # Resident memory now (Linux /proc), else the peak, which only grows if memory does.
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _signed(writer: str, seq: int) -> dict:
    # A value that carries its writer's checksum, so a torn or mixed-up value is detected on read.
    payload = os.urandom(random.randint(8, 256)).hex()
    return {"writer": writer, "seq": seq, "payload": payload, "sum": _checksum(writer, seq, payload)}


def _checksum(writer, seq, payload) -> str:
    return hashlib.sha256(f"{writer}|{seq}|{payload}".encode()).hexdigest()[:16]


def _intact(value) -> bool:
    return isinstance(value, dict) and value.get("sum") == _checksum(value.get("writer"), value.get("seq"),
                                                                     value.get("payload"))


class _Thread:
    """One thread's share of the load, and what it must find when it reads."""

    def __init__(self, cache, name: str, seed: int):
        self.cache, self.name, self.random = cache, name, random.Random(seed)
        self.mine: dict[str, dict | None] = {}
        self.added = Counter()
        self.latencies = array("d")  # filled in place by run(): the soak's own bookkeeping must not grow
        self.errors: list[str] = []
        self.wrong = 0

    def run(self, ops: int, warmed: threading.Barrier) -> None:
        self.latencies = array("d", bytes(8 * ops))
        for i in range(ops):
            if i == ops // 4:  # every thread warmed up: the barrier's action samples memory
                warmed.wait(timeout=120)
            start = time.perf_counter()
            try:
                self.step(i)
            except Exception as error:  # every error is a finding, reported by the parent
                self.errors.append(f"{type(error).__name__}: {error}")
            self.latencies[i] = time.perf_counter() - start

    def step(self, i: int) -> None:
        roll = self.random.random()
        if roll < 0.35:
            self.read_shared()
        elif roll < 0.55:
            self.read_mine()
        elif roll < 0.70:
            self.cache.set(f"s:{self.random.randrange(SHARED_KEYS)}", _signed(self.name, i), ttl=60)
        elif roll < 0.82:
            key = f"own:{self.name}:{self.random.randrange(16)}"
            self.mine[key] = _signed(self.name, i)
            self.cache.set(key, self.mine[key], ttl=60)
        elif roll < 0.88:
            key = f"own:{self.name}:{self.random.randrange(16)}"
            self.mine[key] = None
            self.cache.delete(key)
        else:
            counter, amount = f"c:{self.random.randrange(COUNTERS)}", self.random.randint(1, 9)
            self.cache.incr(counter, amount)
            self.added[counter] += amount

    def read_shared(self) -> None:
        value = self.cache.get(f"s:{self.random.randrange(SHARED_KEYS)}")
        if value is not None and not _intact(value):
            self.wrong += 1

    def read_mine(self) -> None:
        key = f"own:{self.name}:{self.random.randrange(16)}"
        if self.cache.get(key) != self.mine.get(key):
            self.wrong += 1


def _process(url: str, schema: str, index: int, ops: int, results) -> None:
    # One process of the soak (module level, for spawn): THREADS threads on one FastPgCache.
    memory = {}
    with FastPgCache(url=url, schema=schema, maxconn=THREADS) as cache:
        loads = [_Thread(cache, f"p{index}t{t}", seed=index * 100 + t) for t in range(THREADS)]
        warmed = threading.Barrier(THREADS, action=lambda: memory.setdefault("warm", _rss()))
        started = time.perf_counter()
        workers = [threading.Thread(target=load.run, args=(ops, warmed)) for load in loads]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        memory["end"] = _rss()
    added = Counter()
    for load in loads:
        added.update(load.added)
    results.put({
        "errors": [error for load in loads for error in load.errors],
        "wrong": sum(load.wrong for load in loads),
        "added": dict(added),
        "latencies": [lat for load in loads for lat in load.latencies],
        "elapsed": elapsed,
        "memory": memory,
    })


@pytest.mark.soak
def test_sustained_mixed_load(pg_url, schema):
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    processes = [spawn.Process(target=_process, args=(pg_url, schema, i, OPS, results)) for i in range(PROCESSES)]
    for process in processes:
        process.start()
    reports = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    errors = [error for report in reports for error in report["errors"]]
    assert errors == []
    assert sum(report["wrong"] for report in reports) == 0
    expected = Counter()
    for report in reports:
        expected.update(report["added"])
    with FastPgCache(url=pg_url, schema=schema, use_cuckoo_filter=False) as cache:
        assert cache.get_many(list(expected)) == dict(expected)
    for report in reports:
        growth = report["memory"]["end"] - report["memory"]["warm"]
        assert growth < MEMORY_SLACK, f"RSS grew {growth / 1e6:.1f} MB after warm-up"

    latencies = sorted(lat for report in reports for lat in report["latencies"])
    total = len(latencies)
    assert total == PROCESSES * THREADS * OPS
    seconds = max(report["elapsed"] for report in reports)
    p50, p99 = latencies[total // 2], latencies[int(total * 0.99)]
    print(f"\nsoak: {total} ops in {seconds:.2f} s = {total / seconds:,.0f} ops/s; "
          f"p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms; RSS growth after warm-up "
          + ", ".join(f"{(r['memory']['end'] - r['memory']['warm']) / 1e6:.1f} MB" for r in reports))
