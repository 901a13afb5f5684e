"""Where the bench's client and a local server run: CPU layouts, pinning, and undoing it."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from sqlalchemy import text

LAYOUTS = ("split", "same", "none")
"""Where the client and a local server run: split CPUs, the same CPU, or wherever the scheduler puts them."""


def cpu_count() -> int:
    return os.cpu_count() or 1


def check_layout(layout: str) -> str:
    """Return `layout` when it is one of LAYOUTS, else raise a ValueError naming them::

        check_layout("split")   # "split"
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown CPU layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout


class Pinned(NamedTuple):
    """What `apply_layout` did: the layout in effect, how to undo it, and the line for the report's notes."""

    layout: str
    undo: Callable[[], None]
    note: str


def apply_layout(layout: str, engine, redis_url: str | None = None) -> Pinned:
    """Pin this process and the local servers behind `engine` and `redis_url` as `layout` says.

    "split": the client on the first CPU this process may use, a local PostgreSQL
    and Redis on the second (with fewer than two usable CPUs it falls back to
    "same" and the note says so); "same": all of them on the first CPU; "none":
    nothing pinned. Call `undo` when done, also after a failure::

        pinned = apply_layout("split", engine, "redis://127.0.0.1:6379")
        try:
            ...                # measure
        finally:
            pinned.undo()
        print(pinned.note)     # e.g. "layout split: client pinned to CPU 0; PostgreSQL (...) pinned to CPU 1"
    """
    check_layout(layout)
    if layout == "none":
        return Pinned("none", lambda: None, "layout none: nothing pinned, the scheduler places client and servers")
    cpus = _usable_cpus()
    fallback = ""
    if layout == "split" and len(cpus) < 2:
        fallback = f" (split asked for, but this process may use {len(cpus)} CPU only: fell back to same)"
        layout = "same"
    client = cpus[0]
    undo, what = pin_to_cpu(client, engine, redis_url, server_cpu=cpus[1] if layout == "split" else client)
    return Pinned(layout, undo, f"layout {layout}{fallback}: {what or 'nothing could be pinned'}")


def _usable_cpus() -> list[int]:
    # The CPUs this process may run on (a cpuset or taskset can exclude some); all of them where unknown.

    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # no affinity calls on this platform: nothing will be pinned anyway
        return list(range(cpu_count()))


def pin_to_cpu(client_cpu: int, engine, redis_url: str | None = None, *,
               server_cpu: int | None = None) -> tuple[Callable[[], None], str | None]:
    """Pin this process to `client_cpu`, and a local PostgreSQL and Redis to `server_cpu` (default: the same).

    Returns the undo and a line saying what was pinned where (None when nothing
    could be). Processes that are not local or not ours to change are left alone::

        undo, note = pin_to_cpu(0, engine, "redis://127.0.0.1:6379", server_cpu=1)
        try:
            ...     # measure
        finally:
            undo()  # every affinity back, including backends forked meanwhile

    Unpinned, the scheduler decides per connection whether client and backend
    share a core, and ratios swung 2x between runs on a 2-vCPU machine. Both
    pinned layouts remove that luck but measure different things:

    - server on another CPU (the "split" layout): how deployments run, the
      application and PostgreSQL never sharing a core. Every round trip pays a
      cross-CPU wake-up (about 85-100 µs here against 40-50 µs on one core), yet
      the ratios were just as stable between runs (get hit 1.10, then 1.05).
    - one CPU for all (the "same" layout): the cheapest round trip, but client
      and backend take turns on one core and evict each other's cache lines, so
      client-side work that touches memory is charged extra: 6.4 µs of JSON
      encoding per call added 12 µs to a raw psycopg2 loop, while 2 µs of pure
      arithmetic added about nothing. This layout magnifies what the library
      does in Python; it is kept as the harsher of the two views.
    """

    server_cpu = client_cpu if server_cpu is None else server_cpu
    with engine.connect() as connection:  # read the parent while the backend lives (a NullPool ends it at close)
        backend = connection.execute(text("SELECT pg_backend_pid()")).scalar()
        postmaster = _local_parent(backend, "postgres")
    saved: dict = {}

    def pin(pid: int, cpu: int) -> None:
        try:
            saved[pid] = os.sched_getaffinity(pid)
            os.sched_setaffinity(pid, {cpu})
        except (OSError, AttributeError):  # not permitted, gone, or no such call on this platform
            saved.pop(pid, None)

    pin(0, client_cpu)
    children = []
    if postmaster:
        pin(postmaster, server_cpu)
        # Listed only now: a backend forked from here on inherits the postmaster's new CPU.
        children = _local_children(postmaster) if postmaster in saved else []
        for pid in children:
            pin(pid, server_cpu)
    redis = _local_redis_pid(redis_url) if redis_url else []
    for pid in redis:
        pin(pid, server_cpu)

    def undo():
        if postmaster in saved:
            _set_affinity(postmaster, saved[postmaster])
            # Listed after the postmaster is restored, so backends forked while pinned get its old CPUs too.
            for pid in _local_children(postmaster):
                _set_affinity(pid, saved.get(pid, saved[postmaster]))
        for pid, cpus in saved.items():
            _set_affinity(pid, cpus)

    return undo, _pinned_note(saved, client_cpu, server_cpu, postmaster, children, redis)


def _set_affinity(pid: int, cpus: set) -> None:
    # Undo is best effort: a backend may have exited since it was pinned.

    try:
        os.sched_setaffinity(pid, cpus)
    except OSError:
        pass


def _pinned_note(saved: dict, client_cpu: int, server_cpu: int, postmaster: int | None, children: list,
                 redis: list) -> str | None:
    # Names only what was really pinned: a remote or foreign server is said to be left alone.
    servers = []
    if postmaster in saved:
        servers.append(f"PostgreSQL (postmaster and {sum(pid in saved for pid in children)} processes)")
    if any(pid in saved for pid in redis):
        servers.append("Redis")
    names, client = " and ".join(servers), 0 in saved
    if not client and not servers:
        return None
    if not servers:
        return f"client pinned to CPU {client_cpu}; no local PostgreSQL or Redis could be pinned"
    if not client:
        return f"{names} pinned to CPU {server_cpu} (the client could not be)"
    if client_cpu == server_cpu:
        return f"client, {names} pinned to CPU {client_cpu}"
    return f"client pinned to CPU {client_cpu}; {names} pinned to CPU {server_cpu}"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    # (command name, parent pid) from /proc, or None when the process is not visible here.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    name = stat[stat.index("(") + 1: stat.rindex(")")]
    return name, int(stat[stat.rindex(")") + 2:].split()[1])


def _local_parent(pid: int, name: str) -> int | None:
    # The parent of a local process called `name` (a server's backend); None for a remote server.
    stat = _proc_stat(pid)
    return stat[1] if stat and stat[0] == name else None


def local_backend(pid: int) -> bool:
    """Whether `pid` (from pg_backend_pid()) is a PostgreSQL backend on this machine, whose /proc we can read."""
    return _local_parent(pid, "postgres") is not None


def _local_children(parent: int) -> list[int]:

    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and (_proc_stat(int(pid)) or ("", 0))[1] == parent]


def _local_redis_pid(redis_url: str) -> list[int]:
    try:
        import redis

        pid = int(redis.Redis.from_url(redis_url, socket_connect_timeout=2).info("server")["process_id"])
    except Exception:  # no Redis, or an answer without a pid: nothing to pin
        return []
    stat = _proc_stat(pid)
    return [pid] if stat and stat[0].startswith("redis") else []
