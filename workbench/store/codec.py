"""Rows in and out: a row checked and turned into column values (JSON as canonical text, NaN as null),
and query results turned back into a pandas DataFrame; nothing is ever unpickled or eval'd."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from workbench import __version__
from workbench.store._base import StoreError, _now, _to_utc
from workbench.store.schema import (JSON_COLUMNS, REQUIRED_KEYS, RUN_COLUMNS, SCHEMA_VERSION, STATUSES, _BOOL_COLUMNS,
                                    _FLOAT_COLUMNS, _INT_COLUMNS, _STR_COLUMNS)

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


def _loads_column(texts: Sequence[str | None], damaged: dict[int, str] | None = None,
                  name: str = "") -> list[Any]:
    """Parse a column of JSON texts; identical texts (the environment of one machine) are parsed
    once and share one object, so treat parsed values as read-only. A text that is not JSON becomes
    None and, when ``damaged`` is given, its position is recorded there with the reason."""
    memo: dict[str | None, Any] = {}
    parsed = []
    for i, text in enumerate(texts):
        value = memo.get(text, _MISSING)
        if value is _MISSING:
            try:
                value = memo[text] = _loads(text)
            except (ValueError, RecursionError, TypeError) as err:
                if damaged is None:
                    raise
                damaged.setdefault(i, f"column {name} is not valid JSON ({type(err).__name__})")
                value = None
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


def _frame(rows: Sequence[Any], names: list[str], damaged: dict[int, str] | None = None) -> pd.DataFrame:
    """Rows as a DataFrame; with ``damaged``, rows whose JSON cannot be parsed are recorded there
    (position -> reason) instead of failing the whole read (the caller drops them)."""
    data = dict(zip(names, zip(*rows))) if rows else {name: () for name in names}
    frame: dict[str, Any] = {}
    for name in names:
        values = data[name]
        if name in JSON_COLUMNS:
            frame[name] = pd.Series(_loads_column(values, damaged, name), dtype=object)
        elif name == "created_at":
            frame[name] = _tolerant(_utc_series, values, name, damaged, _one_time,
                                    lambda cells: pd.Series(pd.to_datetime(cells, utc=True)))
        elif name in _FLOAT_COLUMNS:
            frame[name] = _tolerant(_float_series, values, name, damaged, _one_float, _float_series)
        elif name in _BOOL_COLUMNS:
            frame[name] = _tolerant(_bool_series, values, name, damaged, _one_bool, _bool_series)
        elif not values:  # an empty frame still gets the dtypes a full one would have
            frame[name] = pd.Series([], dtype="int64" if name in _INT_COLUMNS else "str")
        else:
            frame[name] = pd.Series(values)
    return pd.DataFrame(frame, columns=names)


def _tolerant(convert: Any, values: Sequence[Any], name: str, damaged: dict[int, str] | None, one: Any,
              rebuild: Any) -> pd.Series:
    """``convert(values)``; when a damaged cell makes that fail and ``damaged`` is given, each cell is
    converted with ``one`` instead, the rows it fails on are recorded (position -> reason) and left
    missing, and ``rebuild`` makes the column from the converted cells."""
    try:
        return convert(values)
    except (ValueError, TypeError, OverflowError, StoreError):
        if damaged is None:
            raise
    cells = []
    for i, value in enumerate(values):
        try:
            cells.append(None if value is None else one(value))
        except (ValueError, TypeError, OverflowError, StoreError):
            damaged.setdefault(i, f"column {name} holds a {type(value).__name__} that is not a valid {name}")
            cells.append(None)
    return rebuild(cells)


def _float_series(values: Sequence[Any]) -> pd.Series:
    return pd.Series(values, dtype="float64").astype("float64")


def _bool_series(values: Sequence[Any]) -> pd.Series:
    return pd.Series(values, dtype="boolean")


def _one_float(value: Any) -> float:
    if isinstance(value, (str, bytes, bool)):
        raise ValueError(value)
    return float(value)


def _one_bool(value: Any) -> bool:
    if value not in (0, 1) or isinstance(value, (str, bytes, float)):
        raise ValueError(value)
    return bool(value)


def _one_time(value: Any) -> pd.Timestamp:
    stamp = pd.Timestamp(value) if isinstance(value, str) else pd.Timestamp(_to_utc(value))
    if pd.isna(stamp):
        raise ValueError(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _utc_series(values: Sequence[Any]) -> pd.Series:
    if not values:
        return pd.Series([], dtype="datetime64[us, UTC]")
    if isinstance(values[0], str):  # SQLite text, e.g. "2024-05-01 12:00:00.000000", in UTC
        return pd.Series(pd.to_datetime(list(values), utc=True, format="ISO8601"))
    return pd.Series(pd.to_datetime([_to_utc(v) for v in values], utc=True))
