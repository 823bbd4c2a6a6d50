"""A real PostgreSQL server for tests: a private cluster on 127.0.0.1, free port, temp dir.

Usage (fixtures imported into a test module are picked up by pytest)::

    from postgres_server import PostgresServer, require_postgres

    bin_dir = require_postgres()          # skip here, FAIL under CI, when PostgreSQL is absent
    with PostgresServer(bin_dir).start() as pg:
        uri = pg.sqlalchemy_uri           # postgresql+psycopg2://xct:<pw>@127.0.0.1:<port>/mlflow
        with pg.connect() as conn: ...    # psycopg2, as the test role

What :meth:`PostgresServer.start` builds (everything under one ``mkdtemp`` dir in /tmp —
a short path, because unix socket paths are limited to ~107 bytes):

* ``initdb`` of a fresh cluster (UTF8, C locale) with a random superuser password;
  ``pg_hba.conf``: the unix socket (in the temp dir, nobody else can reach it) trusts its
  owner, TCP from 127.0.0.1 needs a SCRAM password, nothing else is accepted.
* ``listen_addresses = '127.0.0.1'`` on a free port only, ``fsync``/``synchronous_commit``/
  ``full_page_writes`` off (a throw-away cluster: speed over durability).
* a LOGIN role (``xct``, random password, no superuser) owning the database (``mlflow``):
  the role a tracking server would get in production.

PostgreSQL refuses to run as root: as root every server command runs as the ``postgres``
system user through ``runuser -u postgres --`` (the temp dir is chowned to it); as any
other user it runs as that user. Readiness is a bounded loop of psycopg2 connects over TCP
with the test role's password (so it proves the auth path as well); start-up failures and
timeouts raise ``RuntimeError`` with the tail of the server log. :meth:`stop` is ``pg_ctl
stop -m fast`` (SIGKILL to the postmaster's process group when that does not finish in
time) and removes the temp dir.

Binaries: ``initdb``/``pg_ctl``/``postgres`` from ``PATH`` (symlinks resolved), else the
newest ``/usr/lib/postgresql/<major>/bin`` (Debian's layout). :func:`require_postgres`
skips a test when they are missing, unless ``CI`` is set: then it FAILS, because CI
(``.ci/run``) installs Debian's ``postgresql`` package before running the suite.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moto_server import HOST, free_port

#: server programs a cluster needs (all from one bin dir)
PROGRAMS = ("initdb", "pg_ctl", "postgres")
#: Debian/Ubuntu install every major version side by side here
DEBIAN_GLOB = "/usr/lib/postgresql/*/bin"
#: the system account PostgreSQL runs as when the tests run as root
SYSTEM_USER = "postgres"


def _has_programs(d: Path) -> bool:
    return all(os.access(d / p, os.X_OK) for p in PROGRAMS)


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``: ``PATH`` first
    (``pg_ctl`` resolved through symlinks, its siblings required), then the newest
    ``/usr/lib/postgresql/<major>/bin``; ``None`` when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found:
        d = Path(found).resolve().parent
        if _has_programs(d):
            return d

    def major(d: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", d.parent.name)) or (0,)

    candidates = [d for d in map(Path, glob.glob(DEBIAN_GLOB)) if _has_programs(d)]
    return max(candidates, key=major) if candidates else None


def ci_is_set() -> bool:
    """``CI`` set to anything but empty/``0``/``false`` (``.ci/run`` exports ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_postgres() -> Path:
    """The PostgreSQL bin dir and an importable psycopg2, or skip the test (developer
    machine without PostgreSQL) — or FAIL it when ``CI`` is set: CI must exercise it."""
    problems = []
    bin_dir = find_bin_dir()
    if bin_dir is None:
        problems.append(f"PostgreSQL server binaries ({', '.join(PROGRAMS)}) not found on PATH or in {DEBIAN_GLOB}")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        problems.append("the psycopg2 driver is not installed (psycopg2-binary, requirements/test.txt)")
    if os.geteuid() == 0 and bin_dir is not None:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            problems.append(f"running as root but there is no {SYSTEM_USER!r} system user to run the server")
        if shutil.which("runuser") is None:
            problems.append("running as root but `runuser` (util-linux) is missing")
    if problems:
        msg = "; ".join(problems)
        if ci_is_set():
            pytest.fail(f"{msg}. CI is set: .ci/run should have installed Debian's postgresql package "
                        "(apt-get install -y --no-install-recommends postgresql) and `make test` psycopg2-binary.",
                        pytrace=False)
        pytest.skip(msg)
    assert bin_dir is not None
    return bin_dir


class PostgresServer:
    """A throw-away PostgreSQL cluster (module docstring); a context manager like MotoServer."""

    def __init__(self, bin_dir: Path | None = None, *, user: str = "xct", database: str = "mlflow"):
        found = bin_dir or find_bin_dir()
        if found is None:
            raise RuntimeError(f"PostgreSQL binaries not found on PATH or in {DEBIAN_GLOB}")
        self.bin_dir = Path(found)
        self.user = user
        self.database = database
        self.password = secrets.token_hex(16)  # hex: URL-safe in a connection URI
        self._superpass = secrets.token_hex(16)
        self.port = 0
        self.root: Path | None = None
        self._as_root = os.geteuid() == 0

    # ------------------------------------------------------------------ paths and commands

    @property
    def data_dir(self) -> Path:
        return self._root / "data"

    @property
    def socket_dir(self) -> Path:
        return self._root / "sock"

    @property
    def log_path(self) -> Path:
        return self._root / "postgres.log"

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise RuntimeError("PostgresServer not started")
        return self.root

    @property
    def sqlalchemy_uri(self) -> str:
        """``postgresql+psycopg2://user:password@127.0.0.1:port/database`` (mlflow's
        ``--backend-store-uri``)."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@{HOST}:{self.port}/{self.database}"

    def dsn(self, **over: Any) -> dict[str, Any]:
        """psycopg2 keyword arguments: the test role over TCP on 127.0.0.1."""
        return {"host": HOST, "port": self.port, "user": self.user, "password": self.password,
                "dbname": self.database, "connect_timeout": 3, **over}

    def connect(self, **over: Any) -> Any:
        """A psycopg2 connection as the test role (close it; ``with conn:`` only ends a transaction)."""
        import psycopg2

        return psycopg2.connect(**self.dsn(**over))

    def _cmd(self, program: str, *args: str) -> list[str]:
        exe = [str(self.bin_dir / program), *args]
        return ["runuser", "-u", SYSTEM_USER, "--", *exe] if self._as_root else exe

    def _run(self, program: str, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a server program (as the postgres user when root) in the temp dir; RuntimeError
        with its output and the log tail when it fails."""
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGTZ": "UTC"}
        for k in ("PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGPASSWORD", "PGDATABASE"):
            env.pop(k, None)
        r = subprocess.run(self._cmd(program, *args), capture_output=True, text=True, timeout=timeout_s,
                           env=env, cwd=self._root, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args[:2])} failed ({r.returncode}):\n"
                               f"{(r.stdout + r.stderr)[-2000:]}\n--- server log ---\n{self.log_tail()}")
        return r

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except (OSError, RuntimeError):
            return "(no server log)"

    # ------------------------------------------------------------------ life cycle

    def _init_cluster(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="xct-pg-", dir="/tmp"))
        self.root = root
        self.socket_dir.mkdir()
        pwfile = root / "superpass"
        pwfile.write_text(self._superpass + "\n")
        if self._as_root:
            ent = pwd.getpwnam(SYSTEM_USER)
            for p in (root, self.socket_dir, pwfile):
                os.chown(p, ent.pw_uid, ent.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", f"--pwfile={pwfile}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-locale",
                  "--no-sync")
        pwfile.unlink()
        (self.data_dir / "pg_hba.conf").write_text(
            "# written by tests/postgres_server.py: private socket for the owner, passwords over TCP\n"
            "local all all trust\n"
            f"host all all {HOST}/32 scram-sha-256\n"
        )
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "50",
            "shared_buffers": "32MB",
            "max_wal_size": "256MB",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# tests/postgres_server.py\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError, RuntimeError):
            return None

    def _superuser_sql(self, *statements: str) -> None:
        """Run statements as the superuser over the private unix socket (autocommit)."""
        import psycopg2

        conn = psycopg2.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres",
                                connect_timeout=3)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for st in statements:
                    cur.execute(st)
        finally:
            conn.close()

    def start(self, timeout_s: float = 60.0) -> PostgresServer:
        """initdb + start on a free port, create the test role and database, wait (≤
        ``timeout_s``) until the role can log in over TCP; RuntimeError with the log tail."""
        import psycopg2

        self.port = free_port()
        try:
            self._init_cluster()
            self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path), "-W")
            deadline = time.monotonic() + timeout_s
            created, last = False, ""
            while time.monotonic() < deadline:
                try:
                    if not created:
                        self._superuser_sql(
                            f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
                            f"CREATE DATABASE {self.database} OWNER {self.user}",
                        )
                        created = True
                    self.connect().close()
                    return self
                except psycopg2.OperationalError as e:
                    last = str(e).strip()
                if "FATAL" in self.log_tail() and self._postmaster_pid() is None:
                    break  # the postmaster died (bad setting, port taken): no point waiting
                time.sleep(0.2)
            raise RuntimeError(f"PostgreSQL did not accept the test role within {timeout_s:.0f} s ({last})")
        except BaseException as e:
            tail = self.log_tail()
            self.stop()
            if isinstance(e, RuntimeError):
                raise RuntimeError(f"{e}\n--- server log ---\n{tail}") from None
            raise

    def stop(self, timeout_s: float = 20.0) -> None:
        """``pg_ctl stop -m fast``; SIGKILL to the postmaster's process group (pg_ctl starts
        it in its own session) when that fails or times out; removes the temp dir."""
        if self.root is None:
            return
        pid = self._postmaster_pid()
        if pid is not None:
            try:
                self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", str(int(timeout_s)),
                          timeout_s=timeout_s + 10)
            except (RuntimeError, subprocess.TimeoutExpired):
                for sig_target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                    try:
                        sig_target()
                        break
                    except (ProcessLookupError, PermissionError):
                        continue
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and _alive(pid):
                    time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    """Is ``pid`` a live process (a zombie waiting for its reaper counts as dead)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A running PostgreSQL for one test (skipped without PostgreSQL, failed under CI)."""
    server = PostgresServer(require_postgres()).start()
    try:
        yield server
    finally:
        server.stop()
