"""A real PostgreSQL server for the tests: Debian's binaries, a fresh cluster in a temporary folder,
listening on loopback only, a password-protected user, one new database per test that asks for one.

``make test`` installs Debian's ``postgresql`` package where it can (root with apt-get); without the
binaries the tests that need a server are skipped with the install hint. PostgreSQL refuses to run as
root, so under root the cluster is created and started as the ``postgres`` system user (``runuser``).

Example::

    server = PostgresServer.start()
    url = server.new_database()   # postgresql+psycopg://workbench:***@127.0.0.1:PORT/t_3f2a...
    server.stop()
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

INSTALL_HINT = "apt-get install -y postgresql (Debian/Ubuntu; `make test` does this as root), then rerun"
USER = "workbench"


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One running PostgreSQL cluster on 127.0.0.1 (see the module docstring)."""

    def __init__(self, bindir: Path, root: Path, port: int, password: str) -> None:
        self.bindir, self.root, self.port, self.password = bindir, root, port, password
        self.data = root / "data"

    # -- life ----------------------------------------------------------------------------------------

    @classmethod
    def start(cls) -> PostgresServer:
        """initdb + pg_ctl start (waits until it accepts connections); raises RuntimeError with the log."""
        bindir = find_bindir()
        if bindir is None:
            raise FileNotFoundError(f"no PostgreSQL server binaries (pg_ctl) found: {INSTALL_HINT}")
        root = Path(tempfile.mkdtemp(prefix="workbench-pg-"))
        root.chmod(0o755)
        server = cls(bindir, root, _free_port(), "pw-" + secrets.token_hex(8))
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            shutil.chown(pwfile, "postgres")
        server._run("initdb", "-D", str(server.data), "-U", USER, "--pwfile", str(pwfile), "-A", "scram-sha-256",
                    "-E", "UTF8", "--no-sync")
        options = f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        server._run("pg_ctl", "-D", str(server.data), "-l", str(root / "server.log"), "-o", options, "-w",
                    "-t", "60", "start")
        return server

    def stop(self) -> None:
        """Stop the server at once and delete its files."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n{tail}")

    # -- databases -------------------------------------------------------------------------------------

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        """A SQLAlchemy URL for ``database`` (psycopg 3 driver)."""
        secret = self.password if password is None else password
        return f"postgresql+psycopg://{USER}:{secret}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database and return its URL."""
        name = "t_" + uuid.uuid4().hex[:16]
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Run one statement (autocommit) and return its rows, if any."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname=database,
                             autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []
