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

The package's modules have one job each: ``schema`` (the table, its column groups, the version and the
migrations), ``engine`` (URLs, engines, bounded connects, retries on a locked SQLite file), ``codec``
(rows in and out: validation, JSON, DataFrames) and ``queries`` (the filters of :meth:`Store.runs`).
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Engine

from workbench import paths
from workbench.store._base import UTC, StoreError, _first_line, _safe_url
from workbench.store.codec import _frame, _loads, _prepare_row, json_safe, to_json
from workbench.store.engine import (CONNECT_TIMEOUT_S, LOCKED_ATTEMPTS, SQLITE_BUSY_TIMEOUT_MS, _check_sqlite_exists,
                                    _connect_with_timeout, _create_engine, _is_memory_sqlite, _parse_url,
                                    _read_only_sqlite, _retry_locked)
from workbench.store.queries import _check_columns, _filters, _select_column, parse_since
from workbench.store.schema import (COLUMNS_ADDED, JSON_COLUMNS, REQUIRED_KEYS, RUN_COLUMNS, SCHEMA_VERSION, STATUSES,
                                    _check_or_create_schema, _stored_schema_version, meta_table, metadata,
                                    runs_table)

__all__ = ["COLUMNS_ADDED", "DamagedRowsWarning", "CONNECT_TIMEOUT_S", "JSON_COLUMNS", "LOCKED_ATTEMPTS", "REQUIRED_KEYS", "RUN_COLUMNS",
           "SCHEMA_VERSION", "SQLITE_BUSY_TIMEOUT_MS", "STATUSES", "UTC", "Store", "StoreError", "json_safe",
           "meta_table", "metadata", "parse_since", "runs_table", "to_json"]


class DamagedRowsWarning(UserWarning):
    """Some stored rows could not be read (corrupt JSON); they were left out of the result."""


class Store:
    """Append run rows and query them back as pandas DataFrames.

    Args:
        url: any SQLAlchemy URL (``sqlite:///results.sqlite``, ``postgresql://user@host/db``);
            None uses ``paths.default_store_url()``, a SQLite file under ``data/``.
        create: make a new store when there is none (writers); False for readers, which refuse a
            store that does not exist (a typo'd path must not read as "no runs").

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

    def __init__(self, url: str | None = None, create: bool = True) -> None:
        # 1. Parse the URL; a reader (create=False) refuses a store that does not exist yet, before the
        #    engine would make a SQLite file's folders. Then build the engine (imports the driver).
        self._url = _parse_url(paths.default_store_url() if url is None else url)
        read_only = None
        if not create:
            _check_sqlite_exists(self._url)
            read_only = _read_only_sqlite(self._url)  # a file on read-only media: opened immutable, no WAL
        self.engine: Engine = _create_engine(read_only or self._url)
        # 2. Refuse what is not (or not yet) a workbench store; create the tables in a new one.
        try:
            _connect_with_timeout(self.engine, self._url)
            _check_or_create_schema(self.engine, self._url, create=create)
        except BaseException:
            self.engine.dispose()
            raise
        # 3. SQLite: write-ahead logging lets readers work while a sweep writes (persists in the file).
        if self.engine.dialect.name == "sqlite" and not _is_memory_sqlite(self._url) and read_only is None:
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
        damaged: dict[int, str] = {}
        frame = _frame(rows, names, damaged)
        if damaged:  # one bad row never blocks the rest: it is left out, and said so
            frame = frame.drop(index=sorted(damaged)).reset_index(drop=True)
            self._report_damaged(rows, names, damaged)
        return frame

    def _report_damaged(self, rows: Sequence[Any], names: list[str], damaged: dict[int, str]) -> None:
        first = min(damaged)
        which = f"run_id {rows[first][names.index('run_id')]!r}" if "run_id" in names else f"row {first}"
        warnings.warn(DamagedRowsWarning(
            f"{self.url}: skipped {len(damaged)} damaged run(s) whose stored JSON cannot be read (first: {which}, "
            f"{damaged[first]}); the other runs are read as usual: restore the store from a backup, or delete "
            "the damaged rows"), stacklevel=3)

    def get(self, run_id: str) -> dict[str, Any]:
        """One run as a dict (JSON columns parsed, ``created_at`` an aware UTC datetime)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs_table).where(runs_table.c.run_id == str(run_id))).first()
        if row is None:
            raise StoreError(f"no run with run_id {run_id!r} in {self.url}; list runs with Store.runs()")
        record = dict(row._mapping)
        for name in JSON_COLUMNS:
            try:
                record[name] = _loads(record[name])
            except (ValueError, RecursionError, TypeError):
                raise StoreError(f"run {run_id!r} in {self.url} is damaged: its {name} column is not valid JSON; "
                                 "restore the store from a backup, or delete that run") from None
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
