"""Stampede protection: many callers miss one key at once, and its function runs once."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest
from sqlalchemy.orm import Session

from fastpgcache import Cache, FastPgCache

SLOW_SECONDS = 0.2


def _stampede(url, schema, key, threads, barrier, runs, results):
    # One process of the stampede: `threads` threads miss `key` together (module level, for spawn).
    with FastPgCache(url=url, schema=schema, maxconn=threads) as cache:
        def compute():
            with runs.get_lock():
                runs.value += 1
            time.sleep(SLOW_SECONDS)
            return {"computed_by": os.getpid(), "thread": threading.get_ident()}

        def one_caller():
            barrier.wait(timeout=60)
            results.put(cache.get_or_set(key, compute, ttl=60))

        workers = [threading.Thread(target=one_caller) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()


def test_twenty_threads_in_two_processes_compute_once(pg_url, schema):
    spawn = multiprocessing.get_context("spawn")
    barrier, runs, results = spawn.Barrier(20), spawn.Value("i", 0), spawn.Queue()
    processes = [spawn.Process(target=_stampede, args=(pg_url, schema, "report", 10, barrier, runs, results))
                 for _ in range(2)]
    for process in processes:
        process.start()
    answers = [results.get(timeout=60) for _ in range(20)]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert runs.value == 1
    assert all(answer == answers[0] for answer in answers)


def _slow_counter(seconds=SLOW_SECONDS):
    # A function that counts its runs and takes `seconds`.
    runs = []

    def compute():
        runs.append(1)
        time.sleep(seconds)
        return len(runs)

    return compute, runs


def _together(count, call):
    # Run `call` in `count` threads released at once; their results, in no particular order.
    barrier, results = threading.Barrier(count), []

    def one():
        barrier.wait(timeout=30)
        results.append(call())

    workers = [threading.Thread(target=one) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    return results


def test_without_the_lock_every_caller_computes(pg_url, schema):
    compute, runs = _slow_counter()
    with FastPgCache(url=pg_url, schema=schema, maxconn=10, use_cuckoo_filter=False) as cache:
        results = _together(10, lambda: cache.get_or_set("k", compute, lock=False))
    assert len(results) == 10
    assert len(runs) > 1


def test_cached_decorator_passes_the_lock_through(pg_url, schema):
    compute, runs = _slow_counter()
    with FastPgCache(url=pg_url, schema=schema, maxconn=8, use_cuckoo_filter=False) as cache:
        @cache.cached(ttl=60)
        def report(day):
            return compute() + day

        results = _together(8, lambda: report(100))
    assert runs == [1]
    assert results == [101] * 8


def test_a_waiter_past_its_wait_computes_for_itself(pg_url, schema):
    release, holder_started = threading.Event(), threading.Event()

    def slow_holder():
        holder_started.set()
        release.wait(10)
        return "holder"

    with FastPgCache(url=pg_url, schema=schema, maxconn=4, use_cuckoo_filter=False) as cache:
        holder = threading.Thread(target=lambda: cache.get_or_set("k", slow_holder, ttl=60))
        holder.start()
        assert holder_started.wait(10)
        try:
            assert cache.get_or_set("k", lambda: "waiter", wait=0.3) == "waiter"
            assert holder.is_alive()  # the waiter gave up while the holder was still computing
        finally:
            release.set()
            holder.join(10)
        assert cache.get("k") in ("holder", "waiter")


def test_when_the_holder_fails_a_waiter_computes(pg_url, schema):
    holder_started, errors = threading.Event(), []

    def failing_holder():
        holder_started.set()
        time.sleep(SLOW_SECONDS)
        raise RuntimeError("upstream down")

    def hold():
        try:
            cache.get_or_set("k", failing_holder)
        except RuntimeError as error:
            errors.append(error)

    with FastPgCache(url=pg_url, schema=schema, maxconn=4, use_cuckoo_filter=False) as cache:
        holder = threading.Thread(target=hold)
        holder.start()
        assert holder_started.wait(10)
        assert cache.get_or_set("k", lambda: "second try", ttl=60) == "second try"
        holder.join(10)
        assert cache.get("k") == "second try"
    assert [str(error) for error in errors] == ["upstream down"]


def test_one_connection_is_enough_and_nothing_deadlocks(pg_url, schema):
    compute, runs = _slow_counter()
    with FastPgCache(url=pg_url, schema=schema, minconn=1, maxconn=1, pool_timeout=10,
                     use_cuckoo_filter=False) as cache:
        results = _together(6, lambda: cache.get_or_set("k", compute))
    assert runs == [1]
    assert results == [1] * 6


def test_a_session_bind_skips_the_lock_and_still_works(engine, schema):
    with Session(engine) as session:
        cache = Cache(session, schema=schema)
        assert cache.get_or_set("k", lambda: "v") == "v"
        assert cache.get_or_set("k", lambda: "other") == "v"
        session.rollback()
        assert cache.get("k") is None


@pytest.mark.parametrize("wait", [0, -1, "5", 10_000])
def test_bad_wait_is_refused(engine, schema, wait):
    with pytest.raises(ValueError, match="wait must be a number of seconds"):
        Cache(engine, schema=schema).get_or_set("k", lambda: 1, wait=wait)
