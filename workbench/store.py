"""The local results store: one flat row per run, in SQLite by default or any SQLAlchemy database.

Written with SQLAlchemy Core (no ORM) so the same code runs on a SQLite file and on PostgreSQL for a
team. JSON columns are stored as text (``json.dumps(sort_keys=True, allow_nan=False)``, NaN and inf
turned into None first) and read back with ``json.loads``; nothing stored is ever unpickled or eval'd.

Example::

    >>> store = Store("sqlite:///:memory:")
    >>> run_id = store.append({
    ...     "spec_key": "abc", "status": "ok", "model": "tiny-gpt2", "workload": "prompts-8",
    ...     "technique": "baseline", "device": "cpu", "dtype": "float32", "seed": 0, "repeats": 5,
    ...     "warmup": 1, "machine_id": "5b7bbcfd151925ca", "summary": {"latency_s_median": 0.012},
    ... })
    >>> store.runs(model="tiny-gpt2", since="7d")["summary"][0]
    {'latency_s_median': 0.012}
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Engine, make_url

from workbench import __version__, paths
from workbench.errors import WorkbenchError

SCHEMA_VERSION = 3  # 1: first release; 2: index on (spec_key, status) for resuming sweeps;
# 3: the typed technique report as columns (lossless, bytes, quality metrics, features, headline), the
# per-variant resources and the model's content digest

#: Seconds to wait for a database server before giving up (the store never hangs a scheduled job).
CONNECT_TIMEOUT_S = 5
#: Milliseconds a SQLite writer waits for another process's lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Attempts at an operation that failed with "database is locked"/"busy" (SQLite can report these
#: without waiting, e.g. while another process creates or migrates the store).
LOCKED_ATTEMPTS = 8

UTC = dt.timezone.utc

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


class StoreError(WorkbenchError):
    """A store problem explained in one line that names the bad value and the fix."""


# ----------------------------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------------------------


class UTCDateTime(sa.types.TypeDecorator):
    """A timezone-aware UTC datetime on every database (SQLite keeps no offset, so store UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        value = _to_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Any) -> dt.datetime | None:
        return None if value is None else _to_utc(value)


metadata = sa.MetaData()

meta_table = sa.Table(
    "workbench_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

runs_table = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String(36), primary_key=True),  # str(uuid4())
    sa.Column("spec_key", sa.String(64), nullable=False, index=True),  # hash of the RunSpec
    sa.Column("created_at", UTCDateTime, nullable=False, index=True),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("workbench_version", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),  # "ok" | "failed" | "skipped"
    sa.Column("failure_reason", sa.Text, nullable=True),
    sa.Column("model", sa.String(512), nullable=False, index=True),
    sa.Column("workload", sa.String(255), nullable=False),
    sa.Column("technique", sa.String(128), nullable=False, index=True),
    sa.Column("draft", sa.String(512), nullable=True),
    sa.Column("params", sa.Text, nullable=False),  # JSON
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("dtype", sa.String(32), nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("repeats", sa.Integer, nullable=False),
    sa.Column("warmup", sa.Integer, nullable=False),
    sa.Column("machine_id", sa.String(64), nullable=True, index=True),
    sa.Column("environment", sa.Text, nullable=True),  # JSON
    sa.Column("spec", sa.Text, nullable=True),  # JSON
    sa.Column("summary", sa.Text, nullable=True),  # JSON
    sa.Column("samples", sa.Text, nullable=True),  # JSON
    sa.Column("quality", sa.Text, nullable=True),  # JSON
    sa.Column("internals", sa.Text, nullable=True),  # JSON
    sa.Column("outputs", sa.Text, nullable=True),  # JSON
    sa.Column("speedup", sa.Float, nullable=True),  # baseline time / this run's time
    sa.Column("speedup_ci_low", sa.Float, nullable=True),
    sa.Column("speedup_ci_high", sa.Float, nullable=True),
    sa.Column("significant", sa.Boolean, nullable=True),  # CI excludes 1.0
    # schema 3: the technique's typed report (TechniqueReport), one field a column
    sa.Column("model_digest", sa.String(64), nullable=True),  # content digest of the model files
    sa.Column("lossless", sa.Boolean, nullable=True),  # outputs promised identical to the baseline's
    sa.Column("model_bytes", sa.BigInteger, nullable=True),  # bytes of the weights the technique used
    sa.Column("bytes_read_per_token", sa.Float, nullable=True),  # weight bytes read per generated token
    sa.Column("headline", sa.Text, nullable=True),  # the technique's one-line summary
    sa.Column("quality_metrics", sa.Text, nullable=True),  # JSON: [{name, value, unit, higher_is_better ...}]
    sa.Column("technique_features", sa.Text, nullable=True),  # JSON: the technique's meta-learner features
    sa.Column("resources", sa.Text, nullable=True),  # JSON: variant -> model_bytes, roofline_fraction ...
    sa.Index("ix_runs_model_created_at", "model", "created_at"),
    sa.Index("ix_runs_spec_key_status", "spec_key", "status"),  # schema 2: resume lookups
)

#: Every column of ``runs``, in table order.
RUN_COLUMNS: tuple[str, ...] = tuple(runs_table.c.keys())
#: Columns holding JSON text, parsed back into Python objects when read.
JSON_COLUMNS: frozenset[str] = frozenset(
    {"params", "environment", "spec", "summary", "samples", "quality", "internals", "outputs", "quality_metrics",
     "technique_features", "resources"}
)
#: Columns added by each schema version (a store of an older version lacks them until it is migrated).
COLUMNS_ADDED: dict[int, tuple[str, ...]] = {
    3: ("model_digest", "lossless", "model_bytes", "bytes_read_per_token", "headline", "quality_metrics",
        "technique_features", "resources"),
}
#: Keys every appended row must have.
REQUIRED_KEYS: tuple[str, ...] = (
    "spec_key", "status", "model", "workload", "technique", "device", "dtype", "seed", "repeats",
    "warmup",
)
#: Values of the ``status`` column.
STATUSES: tuple[str, ...] = ("ok", "failed", "skipped")  # skipped: not applicable here (reason kept)
_INT_COLUMNS = ("seed", "repeats", "warmup", "schema_version", "model_bytes")
_FLOAT_COLUMNS = ("speedup", "speedup_ci_low", "speedup_ci_high", "bytes_read_per_token")
_BOOL_COLUMNS = ("significant", "lossless")
_STR_COLUMNS = {  # plain string columns and their length limits (JSON columns are Text)
    c.name: c.type.length
    for c in runs_table.c
    if isinstance(c.type, sa.String) and c.name not in JSON_COLUMNS
}


# ----------------------------------------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------------------------------------


class Store:
    """Append run rows and query them back as pandas DataFrames.

    Args:
        url: any SQLAlchemy URL (``sqlite:///results.sqlite``, ``postgresql://user@host/db``);
            None uses ``paths.default_store_url()``, a SQLite file under ``data/``.

    Raises:
        StoreError: one line naming the bad value and the fix, when the URL cannot be parsed, its
            driver is missing, the server cannot be reached, the SQLite folder cannot be created,
            the database exists but is not a workbench store (it is left untouched), or its schema
            is newer than this code.

    Example::

        >>> store = Store("sqlite:///:memory:")
        >>> store.count()
        0
    """

    def __init__(self, url: str | None = None) -> None:
        # 1. Parse the URL and build the engine (imports the driver).
        self._url = _parse_url(paths.default_store_url() if url is None else url)
        self.engine: Engine = _create_engine(self._url)
        # 2. Refuse what is not (or not yet) a workbench store; create the tables in a new one.
        try:
            _connect_with_timeout(self.engine, self._url)
            _check_or_create_schema(self.engine, self._url)
        except BaseException:
            self.engine.dispose()
            raise
        # 3. SQLite: write-ahead logging lets readers work while a sweep writes (persists in the file).
        if self.engine.dialect.name == "sqlite" and not _is_memory_sqlite(self._url):
            def switch_to_wal() -> None:
                with self.engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")

            try:
                _retry_locked(switch_to_wal)
            except exc.DBAPIError as err:
                self.engine.dispose()
                raise StoreError(
                    f"cannot switch {self.url} to WAL mode ({_first_line(err.orig)}); make the file "
                    "and its folder writable"
                ) from None

    # -- identity --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The store URL with any password replaced by ``***``."""
        return _safe_url(self._url)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def close(self) -> None:
        """Close every pooled connection (the store can still be used; it reconnects)."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------------

    def append(self, row: Mapping[str, Any]) -> str:
        """Validate and insert one run row in its own transaction; return its ``run_id``.

        ``run_id``, ``created_at`` (now, UTC), ``schema_version`` and ``workbench_version`` are
        filled in when absent; ``machine_id`` defaults to ``environment["machine_id"]``.
        """
        return self.append_many([row])[0]

    def append_many(self, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        """Validate every row, then insert them all in one transaction (all or none); return run_ids."""
        records = [_prepare_row(row, i) for i, row in enumerate(rows)]
        if not records:
            return []
        ids = [r["run_id"] for r in records]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise StoreError(f"run_id {duplicates[0]!r} appears twice in one batch; give each run its own id")

        def insert() -> None:
            with self.engine.begin() as conn:
                conn.execute(runs_table.insert(), records)

        try:
            _retry_locked(insert)
        except exc.IntegrityError as err:
            raise StoreError(
                f"could not append to {self.url}: a run_id in this batch is already stored or a "
                f"required value is missing ({_first_line(err.orig)}); nothing from the batch was kept"
            ) from None
        except exc.DBAPIError as err:
            raise StoreError(
                f"could not append to {self.url}: {_first_line(err.orig)}; nothing from the batch "
                "was kept, check the database is writable and not full"
            ) from None
        return ids

    # -- reading -----------------------------------------------------------------------------------

    def runs(
        self,
        since: dt.datetime | str | None = None,
        until: dt.datetime | str | None = None,
        model: str | Sequence[str] | None = None,
        technique: str | Sequence[str] | None = None,
        status: str | Sequence[str] | None = None,
        machine_id: str | Sequence[str] | None = None,
        spec_key: str | Sequence[str] | None = None,
        limit: int | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Runs matching every given filter, oldest first, one row per run.

        Args:
            since, until: a datetime (naive means UTC), a duration back from now (``"7d"``, ``"12h"``,
                ``"30m"``, ``"2w"``) or an ISO date / datetime; ``since`` is inclusive, ``until``
                exclusive.
            model, technique, status, machine_id, spec_key: one value or a list of accepted values.
            limit: at most this many rows (the oldest matching ones).
            columns: only these columns (faster); default all of ``RUN_COLUMNS``.

        Returns:
            A DataFrame with the selected columns; JSON columns hold Python objects, ``created_at`` is
            ``datetime64[..., UTC]``. No match gives an empty frame with the same columns.
        """
        names = _check_columns(columns)
        stmt = sa.select(*[_select_column(runs_table.c[n], self.engine) for n in names])
        stmt = stmt.where(*_filters(since, until, model, technique, status, machine_id, spec_key))
        stmt = stmt.order_by(runs_table.c.created_at, runs_table.c.run_id)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise StoreError(f"limit={limit!r} is not a count; pass a whole number >= 0 or None")
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return _frame(rows, names)

    def get(self, run_id: str) -> dict[str, Any]:
        """One run as a dict (JSON columns parsed, ``created_at`` an aware UTC datetime)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs_table).where(runs_table.c.run_id == str(run_id))).first()
        if row is None:
            raise StoreError(f"no run with run_id {run_id!r} in {self.url}; list runs with Store.runs()")
        record = dict(row._mapping)
        for name in JSON_COLUMNS:
            record[name] = _loads(record[name])
        return record

    def count(
        self,
        since: dt.datetime | str | None = None,
        until: dt.datetime | str | None = None,
        model: str | Sequence[str] | None = None,
        technique: str | Sequence[str] | None = None,
        status: str | Sequence[str] | None = None,
        machine_id: str | Sequence[str] | None = None,
        spec_key: str | Sequence[str] | None = None,
    ) -> int:
        """How many runs match the filters (same meaning as in ``runs``)."""
        stmt = sa.select(sa.func.count()).select_from(runs_table)
        stmt = stmt.where(*_filters(since, until, model, technique, status, machine_id, spec_key))
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def has_ok_run(self, spec_key: str) -> bool:
        """Whether a successful run of ``spec_key`` is stored (an interrupted sweep skips it)."""
        stmt = (
            sa.select(runs_table.c.run_id)
            .where(runs_table.c.spec_key == spec_key, runs_table.c.status == "ok")
            .limit(1)
        )
        with self.engine.connect() as conn:
            return conn.execute(stmt).first() is not None

    def schema_version(self) -> int:
        """The schema version recorded in the store."""
        with self.engine.connect() as conn:
            return _stored_schema_version(conn, self._url) or SCHEMA_VERSION


# ----------------------------------------------------------------------------------------------------
# opening a store: URL, engine, reachability, schema
# ----------------------------------------------------------------------------------------------------


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


def _check_or_create_schema(engine: Engine, url: URL) -> None:
    """Check, create or migrate the schema; retried when another process holds the lock meanwhile.

    Two processes opening one new SQLite file at once both see no tables and both try to create
    them; the loser's error is retried, and on the retry it finds the winner's complete store.
    """
    for attempt in range(LOCKED_ATTEMPTS):
        try:
            return _check_or_create_schema_once(engine, url, last_attempt=attempt == LOCKED_ATTEMPTS - 1)
        except _SchemaRace:
            time.sleep(0.05 * 2**attempt)


class _SchemaRace(Exception):
    """Another process created or migrated the schema at the same moment; look again."""


def _check_or_create_schema_once(engine: Engine, url: URL, last_attempt: bool) -> None:
    """Refuse a database that is not a workbench store or is newer than this code; else create tables."""
    # 1. Look before touching: which tables exist?
    try:
        tables = set(sa.inspect(engine).get_table_names())
    except exc.DBAPIError as err:
        raise StoreError(
            f"'{_safe_url(url)}' could not be read as a database ({_first_line(err.orig)}); it was left "
            "untouched: choose a new file name or an existing workbench store"
        ) from None
    ours = {runs_table.name, meta_table.name}
    foreign = sorted(tables - ours)
    # 2. A SQLite file is one workbench store and nothing else; a server database may be shared.
    if engine.dialect.name == "sqlite" and foreign:
        raise StoreError(
            f"'{_safe_url(url)}' is a database with other tables ({', '.join(foreign[:5])}), not a "
            "workbench store; it was left untouched: choose a new file name or an existing workbench store"
        )
    if tables & ours and meta_table.name not in tables:
        raise StoreError(
            f"'{_safe_url(url)}' has a 'runs' table that workbench did not create; it was left "
            "untouched: use another database, or a new file name"
        )
    # 3. An existing store: check its version and columns.
    if meta_table.name in tables:
        with engine.connect() as conn:
            version = _stored_schema_version(conn, url)
        if version is not None:
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {_safe_url(url)!r} has schema version {version}, newer than this workbench "
                    f"({__version__}, schema {SCHEMA_VERSION}); upgrade workbench: pip install -U workbench"
                )
            _check_runs_columns(engine, url, version)
            if version < SCHEMA_VERSION:
                _migrate(engine, url, version, last_attempt)
            return
    # 4. A new store: create the tables and record the schema version, in one transaction.
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
            if _stored_schema_version(conn, url) is None:
                conn.execute(meta_table.insert(), {"key": "schema_version", "value": str(SCHEMA_VERSION)})
    except exc.DBAPIError as err:
        if not last_attempt and _is_race(err):
            raise _SchemaRace() from None
        raise StoreError(
            f"cannot create the workbench tables in {_safe_url(url)!r} ({_first_line(err.orig)}); make "
            "the database writable, or give the user permission to create tables"
        ) from None


def _add_spec_key_status_index(conn: sa.Connection) -> None:
    """Schema 1 -> 2: an index on (spec_key, status), so resuming a large sweep looks runs up fast."""
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_runs_spec_key_status ON runs (spec_key, status)")


def _add_report_columns(conn: sa.Connection) -> None:
    """Schema 2 -> 3: the typed technique report's columns; older rows keep NULL there (their figures
    stay where they were: model bytes and roofline in the summary, quality in the quality column)."""
    present = {c["name"] for c in sa.inspect(conn).get_columns(runs_table.name)}
    for name in COLUMNS_ADDED[3]:
        if name not in present:
            column = runs_table.c[name]
            type_sql = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE runs ADD COLUMN {name} {type_sql}")


#: Forward migrations: ``_MIGRATIONS[v]`` upgrades a store from schema ``v`` to ``v + 1``. Each one is
#: idempotent (two processes may run it at once) and runs in the same transaction as the version bump.
_MIGRATIONS: dict[int, Any] = {1: _add_spec_key_status_index, 2: _add_report_columns}


def _migrate(engine: Engine, url: URL, version: int, last_attempt: bool) -> None:
    """Upgrade an older store to ``SCHEMA_VERSION`` in place, one step per version, rows kept."""
    try:
        with engine.begin() as conn:
            current = _stored_schema_version(conn, url) or version
            for step in range(current, SCHEMA_VERSION):
                _MIGRATIONS[step](conn)
            conn.execute(
                meta_table.update().where(meta_table.c.key == "schema_version"),
                {"value": str(max(current, SCHEMA_VERSION))},
            )
    except exc.DBAPIError as err:
        if not last_attempt and _is_race(err):
            raise _SchemaRace() from None
        raise StoreError(
            f"cannot migrate store {_safe_url(url)!r} from schema {version} to {SCHEMA_VERSION} "
            f"({_first_line(err.orig)}); make the database writable, or open it with the older workbench"
        ) from None


def _is_race(err: exc.DBAPIError) -> bool:
    """Whether an error comes from another process creating or migrating the schema meanwhile."""
    text = str(err.orig).lower()
    return isinstance(err, exc.IntegrityError) or any(
        word in text for word in ("locked", "busy", "already exists", "unique constraint")
    )


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


def _stored_schema_version(conn: sa.Connection, url: URL) -> int | None:
    value = conn.execute(
        sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
    ).scalar_one_or_none()
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise StoreError(
            f"store {_safe_url(url)!r} records schema_version {value!r}, not a whole number; the store "
            "is damaged: restore it from a backup or start a new file"
        ) from None


def _check_runs_columns(engine: Engine, url: URL, version: int = SCHEMA_VERSION) -> None:
    present = {c["name"] for c in sa.inspect(engine).get_columns(runs_table.name)}
    later = {name for v, names in COLUMNS_ADDED.items() if v > version for name in names}
    missing = [name for name in RUN_COLUMNS if name not in present and name not in later]
    if missing:
        raise StoreError(
            f"store {_safe_url(url)!r} lacks the runs column(s) {', '.join(missing)}; the store is "
            "damaged: restore it from a backup or start a new file"
        )


# ----------------------------------------------------------------------------------------------------
# rows in: validation and JSON
# ----------------------------------------------------------------------------------------------------


def _prepare_row(row: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Check one row and turn it into column values (JSON columns as text)."""
    # 1. Keys.
    if not isinstance(row, Mapping):
        raise StoreError(f"row {index} is a {type(row).__name__}, not a dict; pass one dict per run")
    unknown = sorted(set(row) - set(RUN_COLUMNS))
    if unknown:
        raise StoreError(
            f"row {index} has unknown key(s) {', '.join(map(repr, unknown))}; valid keys are "
            f"{', '.join(RUN_COLUMNS)}"
        )
    missing = [key for key in REQUIRED_KEYS if row.get(key) is None]
    if missing:
        raise StoreError(f"row {index} lacks required key(s) {', '.join(missing)}; add them to the row")
    record = {key: row.get(key) for key in RUN_COLUMNS}

    # 2. Defaults.
    record["run_id"] = str(record["run_id"] or uuid.uuid4())
    record["created_at"] = _to_utc(record["created_at"]) if record["created_at"] is not None else _now()
    record["schema_version"] = record["schema_version"] or SCHEMA_VERSION
    record["workbench_version"] = record["workbench_version"] or __version__
    if record["params"] is None:
        record["params"] = {}
    if record["machine_id"] is None and isinstance(record["environment"], Mapping):
        record["machine_id"] = record["environment"].get("machine_id")

    # 3. Values.
    if record["status"] not in STATUSES:
        raise StoreError(f"row {index} has status={record['status']!r}; use one of {', '.join(STATUSES)}")
    if record["status"] in ("failed", "skipped") and not record["failure_reason"]:
        record["failure_reason"] = f"{record['status']} without a message"  # keep the run, never drop it
    for name in _INT_COLUMNS:
        record[name] = _as_int(record[name], name, index)
    for name in _FLOAT_COLUMNS:
        record[name] = _as_float(record[name], name, index)
    for name in _BOOL_COLUMNS:
        if record[name] is not None:
            if str(record[name]) not in ("True", "False"):  # bool and numpy.bool_
                raise StoreError(f"row {index} has {name}={record[name]!r}; use True, False or None")
            record[name] = bool(record[name])
    for name, length in _STR_COLUMNS.items():
        value = record[name]
        if value is None:
            continue
        record[name] = value = str(value)
        if length is not None and len(value) > length:
            raise StoreError(f"row {index} has a {name} of {len(value)} characters; the limit is {length}")
    for name in JSON_COLUMNS:
        record[name] = None if record[name] is None else to_json(record[name], name)
    return record


def to_json(value: Any, name: str = "value") -> str:
    """``value`` as canonical JSON text: sorted keys, NaN/inf as null, numpy/tensors as lists."""
    try:
        return json.dumps(json_safe(value), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(
            f"{name} cannot be stored as JSON ({err}); pass only dicts, lists, strings, numbers, bools "
            "and None"
        ) from None


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(allow_nan=False)`` accepts: NaN and +-inf become None.

    Tuples become lists, dict keys strings, numpy scalars/arrays and tensors Python numbers/lists,
    dataclasses dicts, datetimes ISO strings and paths strings.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v) for v in items]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_safe(value.tolist())
    return value  # json.dumps names the type it cannot encode


_DECODER = json.JSONDecoder()
_MISSING = object()


def _loads(text: str | None) -> Any:
    """Parse stored JSON text (None stays None); ``raw_decode`` skips ``json.loads``' overhead."""
    if text is None:
        return None
    try:
        value, end = _DECODER.raw_decode(text)
        if end == len(text):
            return value
    except ValueError:
        pass
    return json.loads(text)  # surrounding whitespace is fine; anything else raises


def _loads_column(texts: Sequence[str | None]) -> list[Any]:
    """Parse a column of JSON texts; identical texts (the environment of one machine) are parsed
    once and share one object, so treat parsed values as read-only."""
    memo: dict[str | None, Any] = {}
    parsed = []
    for text in texts:
        value = memo.get(text, _MISSING)
        if value is _MISSING:
            value = memo[text] = _loads(text)
        parsed.append(value)
    return parsed


def _as_int(value: Any, name: str, index: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise StoreError(f"row {index} has {name}={value!r}; use a whole number")
    return int(value)


def _as_float(value: Any, name: str, index: int) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StoreError(f"row {index} has {name}={value!r}; use a number or None") from None
    return number if math.isfinite(number) else None


# ----------------------------------------------------------------------------------------------------
# rows out: filters and DataFrames
# ----------------------------------------------------------------------------------------------------


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str | dt.datetime, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time (aware, UTC) from ``"7d"``, ``"12h"``, ``"30m"``, ``"2w"``, ``"45s"`` (that
    long before ``now``), an ISO date or datetime (``"2024-05-01"``, ``"2024-05-01T12:00+02:00"``;
    naive means UTC) or a datetime.

    Example::

        >>> parse_since("2024-05-01")
        datetime.datetime(2024, 5, 1, 0, 0, tzinfo=datetime.timezone.utc)
    """
    if isinstance(text, dt.datetime):
        return _to_utc(text)
    if isinstance(text, dt.date):
        return dt.datetime(text.year, text.month, text.day, tzinfo=UTC)
    if isinstance(text, str):
        match = _DURATION.match(text)
        if match:
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
            return (now or _now()) - dt.timedelta(seconds=seconds)
        try:
            return _to_utc(dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00")))
        except ValueError:
            pass
    raise StoreError(
        f"cannot read the time {text!r}: use a duration back from now such as 7d, 12h, 30m or 2w, or "
        "an ISO date such as 2024-05-01"
    )


def _filters(
    since: Any, until: Any, model: Any, technique: Any, status: Any, machine_id: Any, spec_key: Any
) -> list[Any]:
    c = runs_table.c
    clauses: list[Any] = []
    if since is not None:
        clauses.append(c.created_at >= parse_since(since))
    if until is not None:
        clauses.append(c.created_at < parse_since(until))
    if status is not None:
        bad = [s for s in _as_list(status, "status") if s not in STATUSES]
        if bad:
            raise StoreError(f"status={bad[0]!r} is not a run status; use one of {', '.join(STATUSES)}")
    for column, value in (
        (c.model, model), (c.technique, technique), (c.status, status),
        (c.machine_id, machine_id), (c.spec_key, spec_key),
    ):
        if value is not None:
            values = _as_list(value, column.name)
            clauses.append(column == values[0] if len(values) == 1 else column.in_(values))
    return clauses


def _as_list(value: Any, name: str) -> list[str]:
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
    if not values or not all(isinstance(v, str) for v in values):
        raise StoreError(f"{name}={value!r} is not a filter; pass a string or a non-empty list of strings")
    return values


def _check_columns(columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return list(RUN_COLUMNS)
    names = [columns] if isinstance(columns, str) else list(columns)
    unknown = [n for n in names if n not in RUN_COLUMNS]
    if unknown or not names:
        raise StoreError(
            f"unknown column(s) {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
            f"{', '.join(RUN_COLUMNS)}"
        )
    return list(dict.fromkeys(names))


def _select_column(column: sa.Column, engine: Engine) -> Any:
    """SQLite datetimes come back as text and are parsed by pandas in one vectorised call."""
    if column.name == "created_at" and engine.dialect.name == "sqlite":
        return sa.type_coerce(column, sa.String).label("created_at")
    return column


def _frame(rows: Sequence[Any], names: list[str]) -> pd.DataFrame:
    data = dict(zip(names, zip(*rows))) if rows else {name: () for name in names}
    frame: dict[str, Any] = {}
    for name in names:
        values = data[name]
        if name in JSON_COLUMNS:
            frame[name] = pd.Series(_loads_column(values), dtype=object)
        elif name == "created_at":
            frame[name] = _utc_series(values)
        elif name in _FLOAT_COLUMNS:
            frame[name] = pd.Series(values, dtype="float64").astype("float64")
        elif name in _BOOL_COLUMNS:
            frame[name] = pd.Series(values, dtype="boolean")
        elif not values:  # an empty frame still gets the dtypes a full one would have
            frame[name] = pd.Series([], dtype="int64" if name in _INT_COLUMNS else "str")
        else:
            frame[name] = pd.Series(values)
    return pd.DataFrame(frame, columns=names)


def _utc_series(values: Sequence[Any]) -> pd.Series:
    if not values:
        return pd.Series([], dtype="datetime64[us, UTC]")
    if isinstance(values[0], str):  # SQLite text, e.g. "2024-05-01 12:00:00.000000", in UTC
        return pd.Series(pd.to_datetime(list(values), utc=True, format="ISO8601"))
    return pd.Series(pd.to_datetime([_to_utc(v) for v in values], utc=True))


# ----------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def _to_utc(value: Any) -> dt.datetime:
    """An aware UTC datetime from a datetime (naive means UTC), a pandas Timestamp or an ISO string."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise StoreError(
                f"created_at={value!r} is not an ISO datetime; use e.g. 2024-05-01T12:00:00Z"
            ) from None
    if hasattr(value, "to_pydatetime"):
        value = value.to_pydatetime()
    if not isinstance(value, dt.datetime):
        raise StoreError(f"created_at={value!r} is not a datetime; pass a datetime or an ISO string")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _safe_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _mask_password(text: str) -> str:
    return re.sub(r"(://[^:/@\s]*:)[^@/\s]*@", r"\1***@", text)


def _first_line(err: object, secret: str | None = None) -> str:
    """The first non-empty line of an error message, with any password blanked out."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if secret:
        text = text.replace(str(secret), "***")
    return _mask_password(text)
