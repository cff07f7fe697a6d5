"""Opening a database: parse the URL, create the engine (SQLite WAL, timeouts, the driver's own
connect timeout), reach the server in bounded time, and retry what SQLite reports as locked."""

from __future__ import annotations

import os
import threading
import time
from urllib.parse import quote
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Engine, make_url

from workbench.store._base import StoreError, _first_line, _mask_password, _safe_url

CONNECT_TIMEOUT_S = 5
#: Milliseconds a SQLite writer waits for another process's lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Attempts at an operation that failed with "database is locked"/"busy" (SQLite can report these
#: without waiting, e.g. while another process creates or migrates the store).
LOCKED_ATTEMPTS = 8

# pip package that provides each DBAPI module SQLAlchemy may try to import.
_DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000",
    "MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "mysql": "mysql-connector-python",
    "oracledb": "oracledb", "pyodbc": "pyodbc", "pymssql": "pymssql", "asyncpg": "psycopg[binary]",
}
# connect_args key that bounds the connection time, per driver (seconds).
_TIMEOUT_ARGS = {
    "psycopg": "connect_timeout", "psycopg2": "connect_timeout", "pg8000": "timeout",
    "pymysql": "connect_timeout", "mysqldb": "connect_timeout", "mysqlconnector": "connection_timeout",
    "oracledb": "tcp_connect_timeout",
}
_SQLITE_MAGIC = b"SQLite format 3\x00"
_EXAMPLE_URLS = "sqlite:///path/to/workbench.sqlite or postgresql://user:password@host/dbname"



def _parse_url(url: str) -> URL:
    if isinstance(url, URL):
        return url
    if not isinstance(url, str):
        hint = f"; for a file use 'sqlite:///{url}'" if isinstance(url, Path) else ""
        raise StoreError(f"store URL {url!r} is a {type(url).__name__}, not a string{hint}")
    try:
        return make_url(url)
    except (exc.ArgumentError, ValueError):
        hint = f"; for a file use 'sqlite:///{url}'" if url and "://" not in url else ""
        raise StoreError(
            f"cannot parse store URL {_mask_password(url)!r}: use a URL such as {_EXAMPLE_URLS}{hint}"
        ) from None


def _create_engine(url: URL) -> Engine:
    # 1. SQLite: make the folder and refuse a file that is not a SQLite database, before connecting.
    backend = url.get_backend_name()
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        _prepare_sqlite_file(url)
        connect_args["timeout"] = SQLITE_BUSY_TIMEOUT_MS / 1000
    # 2. Resolve the dialect and import the driver.
    try:
        dialect_cls = url.get_dialect()
    except exc.NoSuchModuleError:
        raise StoreError(
            f"unknown database '{url.drivername}' in store URL {_safe_url(url)!r}: use a URL such as "
            f"{_EXAMPLE_URLS}"
        ) from None
    if getattr(dialect_cls, "is_async", False):
        raise StoreError(
            f"store URL {_safe_url(url)!r} names an asyncio driver '{url.get_driver_name()}'; use a "
            f"synchronous one, e.g. '{backend}://...' or 'postgresql+psycopg://...'"
        )
    timeout_arg = _TIMEOUT_ARGS.get(url.get_driver_name() or "")
    if timeout_arg and timeout_arg not in url.query:
        connect_args[timeout_arg] = CONNECT_TIMEOUT_S
    # 3. Build the engine (this imports the DBAPI module).
    try:
        engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=backend != "sqlite")
    except ImportError as err:
        module = (getattr(err, "name", None) or str(err)).split(".")[0]
        package = _DRIVER_PACKAGES.get(module, module)
        raise StoreError(
            f"store URL {_safe_url(url)!r} needs the Python driver '{module}', which is not "
            f"installed; install it with: pip install '{package}'"
        ) from None
    except (exc.ArgumentError, TypeError, ValueError) as err:
        raise StoreError(
            f"cannot open store URL {_safe_url(url)!r}: {_first_line(err)}; use a URL such as "
            f"{_EXAMPLE_URLS}"
        ) from None
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings; none of them writes to the database file."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _is_memory_sqlite(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or "mode=memory" in database


def _check_sqlite_exists(url: URL) -> None:
    """For readers: a SQLite store's file must already exist (nothing is created)."""
    if url.get_backend_name() != "sqlite" or _is_memory_sqlite(url) or (url.database or "").startswith("file:"):
        return
    path = Path(url.database).expanduser()
    if not path.is_file():
        where = "its folder does not exist either" if not path.parent.is_dir() else "no such file"
        raise StoreError(f"store {_safe_url(url)!r} does not exist ({where}): check the path, or give the store "
                         "your runs were written to (--store sqlite:///path/to/file.sqlite)")


def _read_only_sqlite(url: URL) -> URL | None:
    """For readers: a SQLite file whose folder cannot be written (read-only media, a snapshot) as an
    immutable read-only URL, since SQLite would otherwise need to create its -wal/-shm files beside it;
    None for every other store."""
    if url.get_backend_name() != "sqlite" or _is_memory_sqlite(url) or (url.database or "").startswith("file:"):
        return None
    path = Path(url.database).expanduser().resolve()
    if os.access(path.parent, os.W_OK) and os.access(path, os.W_OK):
        return None
    wal = path.with_name(path.name + "-wal")
    if wal.is_file() and wal.stat().st_size > 0:  # immutable reads would silently miss what it holds
        raise StoreError(f"store {_safe_url(url)!r} is on read-only media with writes still in {wal.name} (it was "
                         "copied while open): copy the folder somewhere writable and read it there")
    return make_url(f"sqlite:///file:{quote(str(path))}?mode=ro&immutable=1&uri=true")


def _prepare_sqlite_file(url: URL) -> None:
    """Create the SQLite file's folder; refuse an existing file that is not a SQLite database."""
    if _is_memory_sqlite(url) or url.query.get("uri") or (url.database or "").startswith("file:"):
        return
    path = Path(url.database).expanduser()
    if path.exists() and not path.is_file():
        raise StoreError(
            f"store path '{path}' is a folder, not a file; add a file name, e.g. "
            f"sqlite:///{path / 'workbench.sqlite'}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(
            f"cannot create the folder '{path.parent}' for the SQLite store ({err.strerror or err}); "
            "choose a writable location, e.g. sqlite:///data/workbench.sqlite"
        ) from None
    if not path.is_file() or path.stat().st_size == 0:
        return  # a new (or empty) file: SQLite creates the database
    try:
        with path.open("rb") as fh:
            header = fh.read(len(_SQLITE_MAGIC))
    except OSError as err:
        raise StoreError(
            f"cannot read store file '{path}' ({err.strerror or err}); check its permissions"
        ) from None
    if header != _SQLITE_MAGIC:
        raise StoreError(
            f"'{path}' is not a SQLite database, so not a workbench store; it was left untouched: "
            "choose a new file name or an existing workbench store"
        )


def _connect_with_timeout(engine: Engine, url: URL) -> None:
    """Open one connection, giving up after a few seconds even if the driver ignores its timeout."""
    outcome: dict[str, BaseException | None] = {}

    def attempt() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(sa.select(1))
            outcome["error"] = None
        except BaseException as err:  # handed back to the calling thread
            outcome["error"] = err

    if engine.dialect.name == "sqlite":
        attempt()
    else:
        worker = threading.Thread(target=attempt, name="workbench-store-connect", daemon=True)
        worker.start()
        worker.join(CONNECT_TIMEOUT_S + 2)
        if worker.is_alive():
            raise StoreError(
                f"cannot reach the store at {_safe_url(url)!r} within {CONNECT_TIMEOUT_S + 2} s; "
                "check the host and port, and that the database server is running"
            )
    error = outcome.get("error")
    if error is None:
        return
    if isinstance(error, exc.DBAPIError):
        detail = _first_line(error.orig, secret=url.password)
        if engine.dialect.name == "sqlite":
            raise StoreError(
                f"cannot open SQLite store {_safe_url(url)!r} ({detail}); check the path and its "
                "permissions, or choose a new file"
            ) from None
        raise StoreError(
            f"cannot reach the store at {_safe_url(url)!r} ({detail}); check the host, port, "
            "credentials and that the database server is running"
        ) from None
    raise error


def _retry_locked(operation: Any) -> Any:
    """Run ``operation()``, retrying with back-off while SQLite reports the database locked or busy."""
    for attempt in range(LOCKED_ATTEMPTS):
        try:
            return operation()
        except exc.OperationalError as err:
            text = str(err.orig).lower()
            if attempt == LOCKED_ATTEMPTS - 1 or not ("locked" in text or "busy" in text):
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")
