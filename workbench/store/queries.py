"""Rows out: the filters of ``Store.runs`` (times, models, techniques, statuses) and the columns asked for."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from workbench.store._base import UTC, StoreError, _now, _to_utc
from workbench.store.schema import RUN_COLUMNS, STATUSES, runs_table

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


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
