"""The schema: the runs table (one flat row per run), its column groups, the version, and the forward
migrations that bring an older store up to date with its rows kept."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import URL, Engine

from workbench import __version__
from workbench.store._base import StoreError, _first_line, _safe_url, _to_utc
from workbench.store.engine import LOCKED_ATTEMPTS

SCHEMA_VERSION = 4  # 1: first release; 2: index on (spec_key, status) for resuming sweeps;
# 3: the typed technique report as columns (lossless, bytes, quality metrics, features, headline), the
# per-variant resources and the model's content digest; 4: what else used the machine (noise, noisy)



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
    # schema 4: contention measured before and during the run (workbench.noise)
    sa.Column("noisy", sa.Boolean, nullable=True),  # other work crossed the threshold: figures are suspect
    sa.Column("noise", sa.Text, nullable=True),  # JSON: others' CPU share, steal, load, top processes ...
    sa.Index("ix_runs_model_created_at", "model", "created_at"),
    sa.Index("ix_runs_spec_key_status", "spec_key", "status"),  # schema 2: resume lookups
)

#: Every column of ``runs``, in table order.
RUN_COLUMNS: tuple[str, ...] = tuple(runs_table.c.keys())
#: Columns holding JSON text, parsed back into Python objects when read.
JSON_COLUMNS: frozenset[str] = frozenset(
    {"params", "environment", "spec", "summary", "samples", "quality", "internals", "outputs", "quality_metrics",
     "technique_features", "resources", "noise"}
)
#: Columns added by each schema version (a store of an older version lacks them until it is migrated).
COLUMNS_ADDED: dict[int, tuple[str, ...]] = {
    3: ("model_digest", "lossless", "model_bytes", "bytes_read_per_token", "headline", "quality_metrics",
        "technique_features", "resources"),
    4: ("noisy", "noise"),
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
_BOOL_COLUMNS = ("significant", "lossless", "noisy")
_STR_COLUMNS = {  # plain string columns and their length limits (JSON columns are Text)
    c.name: c.type.length
    for c in runs_table.c
    if isinstance(c.type, sa.String) and c.name not in JSON_COLUMNS
}



def _check_or_create_schema(engine: Engine, url: URL, create: bool = True) -> None:
    """Check, create or migrate the schema; retried when another process holds the lock meanwhile.

    Two processes opening one new SQLite file at once both see no tables and both try to create
    them; the loser's error is retried, and on the retry it finds the winner's complete store.
    """
    for attempt in range(LOCKED_ATTEMPTS):
        try:
            return _check_or_create_schema_once(engine, url, last_attempt=attempt == LOCKED_ATTEMPTS - 1,
                                                create=create)
        except _SchemaRace:
            time.sleep(0.05 * 2**attempt)


class _SchemaRace(Exception):
    """Another process created or migrated the schema at the same moment; look again."""


def _check_or_create_schema_once(engine: Engine, url: URL, last_attempt: bool, create: bool = True) -> None:
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
    # 4. A new store: create the tables and record the schema version, in one transaction (writers only).
    if not create:
        raise StoreError(f"no workbench store at {_safe_url(url)!r} (no runs table there yet): check the URL, or "
                         "give the store your runs were written to")
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
    _add_columns(conn, 3)


def _add_noise_columns(conn: sa.Connection) -> None:
    """Schema 3 -> 4: what else used the machine; older rows keep NULL (contention was not measured)."""
    _add_columns(conn, 4)


def _add_columns(conn: sa.Connection, version: int) -> None:
    present = {c["name"] for c in sa.inspect(conn).get_columns(runs_table.name)}
    for name in COLUMNS_ADDED[version]:
        if name not in present:
            column = runs_table.c[name]
            type_sql = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE runs ADD COLUMN {name} {type_sql}")


#: Forward migrations: ``_MIGRATIONS[v]`` upgrades a store from schema ``v`` to ``v + 1``. Each one is
#: idempotent (two processes may run it at once) and runs in the same transaction as the version bump.
_MIGRATIONS: dict[int, Any] = {1: _add_spec_key_status_index, 2: _add_report_columns, 3: _add_noise_columns}


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
