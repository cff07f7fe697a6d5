"""Pool runs across machines: export stored runs to a parquet bundle, import a bundle into a store.

A bundle is one parquet file with every column of the ``runs`` table; JSON columns stay JSON text
(exactly as the store keeps them), ``created_at`` is a UTC timestamp. Import skips run_ids the store
already has, so importing the same bundle twice adds nothing.

Example:
    >>> from workbench.store import Store
    >>> export_runs(Store("sqlite:///a.sqlite"), "bundle.parquet", since="30d")  # doctest: +SKIP
    12
    >>> import_runs("bundle.parquet", Store("sqlite:///b.sqlite"))  # doctest: +SKIP
    {'read': 12, 'added': 12, 'already_stored': 0}
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.paths import write_atomically
from workbench.store import COLUMNS_ADDED, JSON_COLUMNS, RUN_COLUMNS, Store, StoreError, to_json
from workbench.store.schema import _INT_COLUMNS

BUNDLE_FORMAT = "workbench-runs-bundle"
BUNDLE_VERSION = 1


def export_runs(store: Store, out: str | Path, since: str | None = None, replace_with_empty: bool = False) -> int:
    """Write the store's runs (newer than ``since``, if given) to a parquet bundle; returns the count.

    The bundle is written beside ``out`` and moved into place whole, so a full disk or a crash leaves the old
    file as it was; an existing bundle is never replaced by one with no runs unless ``replace_with_empty``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    if out.is_dir():
        raise WorkbenchError(f"--out {str(out)!r} is a folder: name a file in it, e.g. {str(out / 'runs.parquet')!r}")
    # 1. Read, and turn JSON columns back into canonical JSON text.
    frame = store.runs(since=since)
    if frame.empty and out.exists() and not replace_with_empty:
        window = f" since {since}" if since else ""
        raise WorkbenchError(f"no runs to export from {store.url}{window}: the existing {str(out)!r} was left as it "
                             "is (check --store and --since, or pass --force to replace it with an empty bundle)")
    for name in JSON_COLUMNS:
        frame[name] = [None if value is None else to_json(value, name) for value in frame[name]]
    # 2. Write with the bundle's format in the file metadata, then move it into place.
    if out.suffix != ".parquet":
        raise WorkbenchError(f"bundle path {str(out)!r} does not end in .parquet: use e.g. runs.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame[list(RUN_COLUMNS)], preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[b"workbench"] = json.dumps({"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
                                         "source": store.url}).encode()
    write_atomically(out, lambda path: pq.write_table(table.replace_schema_metadata(metadata), path))
    return len(frame)



def read_bundle(path: str | Path) -> pd.DataFrame:
    """The runs of a bundle as store rows (JSON columns parsed back into Python objects)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"bundle {str(path)!r} does not exist: create one with `workbench export --out {path}`")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise WorkbenchError(f"{str(path)!r} is not a parquet bundle ({type(exc).__name__}): "
                             "create one with `workbench export`") from None
    later = {name for names in COLUMNS_ADDED.values() for name in names}  # a bundle from an older workbench
    missing = [c for c in RUN_COLUMNS if c not in table.column_names and c not in later]
    if missing:
        raise WorkbenchError(f"bundle {str(path)!r} lacks column(s) {', '.join(missing)}: it was not written by "
                             "`workbench export`")
    frame = table.to_pandas()
    for name in RUN_COLUMNS:
        if name not in frame.columns:
            frame[name] = None
    for name in JSON_COLUMNS:
        # A missing cell comes back as None, or as NaN from a column pyarrow stored as all-null.
        frame[name] = [json.loads(value) if isinstance(value, (str, bytes)) else None for value in frame[name]]
    for name in _INT_COLUMNS:  # a whole-number column with missing cells comes back as floats (1329221.0, NaN)
        if name in frame.columns and frame[name].dtype.kind == "f":
            frame[name] = pd.Series([None if pd.isna(v) else int(v) if float(v).is_integer() else v
                                     for v in frame[name]], index=frame.index, dtype=object)
    return frame


IMPORT_ATTEMPTS = 5  # an import racing another import of the same runs looks again this many times


def import_runs(path: str | Path, store: Store) -> dict[str, int]:
    """Append a bundle's runs that the store lacks (dedupe by run_id), all in one transaction.

    A row without a run_id gets one derived from its content, so importing a bundle twice adds it once.
    When another process imports some of the same runs meanwhile, the transaction fails whole and is
    tried again with what is stored now.
    """
    frame = read_bundle(path)
    records = [_row(record) for record in frame.to_dict(orient="records")]
    for record in records:
        if not record.get("run_id"):
            record["run_id"] = _content_id(record)
    for attempt in range(IMPORT_ATTEMPTS):
        known = set(store.runs(columns=["run_id"])["run_id"])
        rows = [record for record in records if record["run_id"] not in known]
        try:
            store.append_many(rows)
            break
        except StoreError as err:
            if "already stored" not in str(err) or attempt == IMPORT_ATTEMPTS - 1:
                raise
    return {"read": len(frame), "added": len(rows), "already_stored": len(frame) - len(rows)}


def _content_id(record: dict[str, Any]) -> str:
    """A run id from a row's content (the same row always gets the same id)."""
    canonical = json.dumps({k: v for k, v in record.items() if k != "run_id"}, sort_keys=True, default=str)
    return str(uuid.UUID(hashlib.sha256(canonical.encode()).hexdigest()[:32]))


def _row(record: dict[str, Any]) -> dict[str, Any]:
    row = {}
    for key, value in record.items():
        if value is not None and not isinstance(value, (dict, list, str)) and pd.isna(value):
            value = None  # NaN/NaT from parquet nulls
        elif hasattr(value, "item") and not isinstance(value, (dict, list, str)):
            value = value.item() if key != "created_at" else value
        row[key] = value
    return row
