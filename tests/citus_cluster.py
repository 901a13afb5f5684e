"""A real Citus cluster for tests: a coordinator and workers, each an embedded PostgreSQL 18.

Needs Citus built into the embedded install (`../shared/tools/citus.sh build` with the
virtualenv active; `.ci/run` does it)::

    with CitusCluster() as cluster:
        cluster.coordinator_url, cluster.worker_urls    # SQLAlchemy URLs, psycopg2, superuser postgres

Every node trusts loopback connections (as EmbeddedPostgres does without a password),
which is also how the coordinator and the workers reach each other.
"""
from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import create_engine, text

from fastpgcache.embedded import EmbeddedPostgres, _bin_dir, _service_account

CITUS_SETTINGS = {
    "shared_preload_libraries": "citus",
    "max_prepared_transactions": 100,  # Citus commits multi-node writes with two-phase commit
}


def citus_available() -> bool:
    """Whether citus.so is in the embedded PostgreSQL's pkglibdir."""
    try:
        pg_config = _bin_dir() / "pg_config"
    except RuntimeError:
        return False
    if not pg_config.exists():
        return False
    libdir = subprocess.run([str(pg_config), "--pkglibdir"], capture_output=True, text=True, check=True).stdout
    return (Path(libdir.strip()) / "citus.so").exists()


class CitusCluster:
    """A coordinator and `workers` workers on free loopback ports, in throwaway data dirs."""

    def __init__(self, workers: int = 2, *, settings: dict[str, str | int | float] | None = None):
        node_settings = {**CITUS_SETTINGS, **(settings or {})}
        self.coordinator = EmbeddedPostgres(settings=node_settings)
        self.workers = [EmbeddedPostgres(settings=node_settings) for _ in range(workers)]

    @property
    def nodes(self) -> list[EmbeddedPostgres]:
        return [self.coordinator, *self.workers]

    @property
    def coordinator_url(self) -> str:
        return self.coordinator.url

    @property
    def worker_urls(self) -> list[str]:
        return [worker.url for worker in self.workers]

    def start(self) -> CitusCluster:
        """Start every node (in parallel), create the extension and register the workers; returns self."""
        def start_node(node: EmbeddedPostgres) -> None:
            node.start()
            self._execute(node.url, "CREATE EXTENSION IF NOT EXISTS citus")

        try:
            _service_account()  # once, before the parallel starts: as root it may create the OS account
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(start_node, self.nodes))
            self._execute(self.coordinator_url, "SELECT citus_set_coordinator_host('127.0.0.1', :port)",
                          port=self.coordinator.port)
            for worker in self.workers:
                self._execute(self.coordinator_url, "SELECT citus_add_node('127.0.0.1', :port)", port=worker.port)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _execute(url: str, sql: str, **params) -> None:
        engine = create_engine(url)
        try:
            with engine.begin() as connection:
                connection.execute(text(sql), params)
        finally:
            engine.dispose()

    def stop(self) -> None:
        """Stop every node that runs and remove the data dirs; raises the first failure after trying all."""
        errors = []
        for node in self.nodes:
            try:
                node.stop()
            except RuntimeError as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self) -> CitusCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
