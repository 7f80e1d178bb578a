"""A real, throwaway PostgreSQL cluster for tests.

This is a helper module, not a test module: ``tests/conftest.py`` imports it
and wraps :class:`PostgresCluster` in a session-scoped fixture.

The cluster lives in a fresh temporary folder, listens on 127.0.0.1 on a free
port (plus a Unix socket inside the folder), uses ``trust`` authentication and
``fsync=off``, and has a superuser ``qualify`` and a database ``qualify``::

    bin_dir = find_pg_bin()
    cluster = PostgresCluster(bin_dir)
    cluster.start()
    ...  # psycopg.connect(cluster.dsn)
    cluster.stop()

``initdb``, ``pg_ctl`` and ``postgres`` refuse to run as root. When this
process runs as root (as CI does), they are run as the ``postgres`` OS user
(``subprocess`` ``user=``/``group=``), and the temporary folder is chowned to
that user.

Set ``QUALIFY_PG_BIN`` to a folder holding ``initdb``/``pg_ctl``/``postgres``
to override the search done by :func:`find_pg_bin`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

__all__ = [
    "PostgresCluster",
    "PostgresError",
    "find_pg_bin",
    "postgres_cluster",
]

_REQUIRED = ("initdb", "pg_ctl", "postgres")
_RUN_AS = "postgres"  # OS user the server runs as when we are root
_START_ATTEMPTS = 3  # retries if the free port got taken meanwhile


class PostgresError(RuntimeError):
    """The throwaway cluster could not be created, started or used."""


def _has_all(folder: pathlib.Path) -> bool:
    return all(
        (folder / name).is_file() and os.access(folder / name, os.X_OK)
        for name in _REQUIRED
    )


def _version_key(path: pathlib.Path) -> tuple:
    # /usr/lib/postgresql/<version>/bin ; numeric versions sort numerically
    parts = re.split(r"[.\-]", path.parent.name)
    return tuple((0, int(p)) if p.isdigit() else (-1, p) for p in parts)


def find_pg_bin() -> pathlib.Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None.

    Looked up in this order: ``$QUALIFY_PG_BIN``; ``PATH`` (the folder of
    ``initdb``, if ``pg_ctl`` and ``postgres`` sit next to it);
    ``/usr/lib/postgresql/*/bin`` (Debian/Ubuntu layout, highest version
    first).
    """
    override = os.environ.get("QUALIFY_PG_BIN")
    if override:
        folder = pathlib.Path(override)
        return folder if _has_all(folder) else None

    initdb = shutil.which("initdb")
    if initdb:
        folder = pathlib.Path(initdb).parent
        if _has_all(folder):
            return folder

    candidates = sorted(
        pathlib.Path("/usr/lib/postgresql").glob("*/bin"),
        key=_version_key,
        reverse=True,
    )
    for folder in candidates:
        if _has_all(folder):
            return folder
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log file {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log file empty)"


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temporary folder.

    Attributes (valid after :meth:`start`): ``dsn``, ``host``, ``port``,
    ``user``, ``dbname``, ``base_dir`` (temporary folder), ``data_dir``,
    ``socket_dir``, ``log_file``.
    """

    def __init__(
        self,
        bin_dir: str | os.PathLike[str],
        *,
        user: str = "qualify",
        dbname: str = "qualify",
        server_options: dict[str, str] | None = None,
    ) -> None:
        self.bin_dir = pathlib.Path(bin_dir)
        self.user = user
        self.dbname = dbname
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.dsn: str | None = None
        self.base_dir: pathlib.Path | None = None
        self.data_dir: pathlib.Path | None = None
        self.socket_dir: pathlib.Path | None = None
        self.log_file: pathlib.Path | None = None
        self.server_options = dict(server_options or {})
        self._running = False
        self._run_kwargs: dict = {}
        for name in _REQUIRED:
            if not (self.bin_dir / name).exists():
                raise PostgresError(f"{self.bin_dir / name} not found")

    # ------------------------------------------------------------------ API

    def start(self) -> None:
        """initdb, start the server, create the database; sets ``dsn``."""
        if self._running:
            return
        try:
            self._prepare_user()
            self.base_dir = pathlib.Path(
                tempfile.mkdtemp(prefix="qualify-pg-", dir=self._tmp_parent())
            )
            self.data_dir = self.base_dir / "data"
            self.socket_dir = self.base_dir
            self.log_file = self.base_dir / "postgres.log"
            if self._run_kwargs:
                os.chown(self.base_dir, self._run_kwargs["user"], self._run_kwargs["group"])
                os.chmod(self.base_dir, 0o700)
            self._initdb()
            self._start_server()
            self._running = True
            atexit.register(self.stop)
            self.dsn = self.dsn_for(self.dbname)
            self.create_database(self.dbname)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (``pg_ctl -m immediate``) and delete the folder.

        Safe to call more than once, and after a failed :meth:`start`.
        """
        if self._running and self.data_dir is not None:
            self._running = False
            with contextlib.suppress(Exception):
                self._run(
                    [self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                     "-w", "-t", "30", "stop"],
                    check=False,
                )
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def dsn_for(self, dbname: str) -> str:
        """A DSN for another database of this cluster."""
        if self.port is None:
            raise PostgresError("cluster not started")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str | None = None, **kwargs):
        """A ``psycopg.Connection`` to ``dbname`` (default: the main database)."""
        import psycopg

        return psycopg.connect(self.dsn_for(dbname or self.dbname), **kwargs)

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """``CREATE DATABASE name``; returns its DSN. Handy for per-test isolation."""
        from psycopg import sql

        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self.connect("postgres", autocommit=True) as conn:
            conn.execute(query)
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE IF EXISTS name WITH (FORCE)`` (kicks out connections)."""
        from psycopg import sql

        with self.connect("postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    @property
    def running(self) -> bool:
        return self._running

    def __enter__(self) -> "PostgresCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PostgresCluster {state} dsn={self.dsn!r} dir={self.base_dir}>"

    # ------------------------------------------------------------ internals

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            self._run_kwargs = {}
            return
        import pwd

        try:
            pw = pwd.getpwnam(_RUN_AS)
        except KeyError:
            raise PostgresError(
                f"running as root, but initdb/pg_ctl refuse to run as root and there is "
                f"no {_RUN_AS!r} OS user to run them as (installing the postgresql "
                f"package creates it; or run the tests as a non-root user)"
            ) from None
        self._run_kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self._home = pw.pw_dir

    def _tmp_parent(self) -> str | None:
        """Where to create the temporary folder.

        As root, the server runs as another user, which must be able to reach
        the folder: $TMPDIR may be under /root (mode 0700), so fall back to
        /tmp when some parent is not traversable by others.
        """
        parent = pathlib.Path(tempfile.gettempdir()).resolve()
        if not self._run_kwargs:
            return str(parent)
        for p in (parent, *parent.parents):
            if not (p.stat().st_mode & 0o001):
                return "/tmp"
        return str(parent)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"  # English messages; locale of the cluster is set explicitly
        env.pop("LANG", None)
        env.pop("LANGUAGE", None)
        if self._run_kwargs:
            env["HOME"] = getattr(self, "_home", "/")
            env["USER"] = env["LOGNAME"] = _RUN_AS
        return env

    def _run(self, cmd: list[str], *, check: bool = True, timeout: float = 120):
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self._env(),
            cwd=str(self.base_dir) if self.base_dir else "/",
            timeout=timeout,
            **self._run_kwargs,
        )
        if check and proc.returncode != 0:
            who = f" (as OS user {_RUN_AS!r})" if self._run_kwargs else ""
            raise PostgresError(
                f"{shlex.join(cmd)}{who} failed with exit code {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout.strip()}\n--- stderr ---\n{proc.stderr.strip()}"
            )
        return proc

    def _initdb(self) -> None:
        self._run(
            [self._bin("initdb"), "-D", str(self.data_dir), "-A", "trust",
             "-U", self.user, "-E", "UTF8", "--locale=C", "--no-sync"],
        )

    def _server_opts(self) -> str:
        opts = {
            "listen_addresses": self.host,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **self.server_options,
        }
        parts = ["-p", str(self.port), "-k", str(self.socket_dir)]
        for key, value in opts.items():
            parts += ["-c", f"{key}={value}"]
        # pg_ctl hands the -o string to /bin/sh, so quote each word
        return shlex.join(parts)

    def _start_server(self) -> None:
        last_error: PostgresError | None = None
        for _attempt in range(_START_ATTEMPTS):
            self.port = _free_port()
            t0 = time.monotonic()
            proc = self._run(
                [self._bin("pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60",
                 "-o", self._server_opts(), "-l", str(self.log_file), "start"],
                check=False,
            )
            if proc.returncode == 0:
                return
            log = _tail(self.log_file)
            last_error = PostgresError(
                f"PostgreSQL failed to start on 127.0.0.1:{self.port} "
                f"(pg_ctl exit code {proc.returncode} after {time.monotonic() - t0:.1f}s)\n"
                f"--- pg_ctl output ---\n{(proc.stdout + proc.stderr).strip()}\n"
                f"--- tail of {self.log_file} ---\n{log}"
            )
            # stop whatever may be half up before retrying / giving up
            self._run(
                [self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                check=False,
            )
            if "could not bind" not in log and "Address already in use" not in log:
                break
        assert last_error is not None
        raise last_error


@contextlib.contextmanager
def postgres_cluster(bin_dir: str | os.PathLike[str] | None = None, **kwargs) -> Iterator[PostgresCluster]:
    """Context manager: a started :class:`PostgresCluster`, stopped on exit.

    ``bin_dir`` defaults to :func:`find_pg_bin`; raises :class:`PostgresError`
    if no binaries are found.
    """
    if bin_dir is None:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise PostgresError("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")
    cluster = PostgresCluster(bin_dir, **kwargs)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
