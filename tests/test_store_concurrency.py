"""The store under concurrency and across schema versions, on a SQLite file and on a real PostgreSQL server.

Two writer processes and a reader open one *new* store (a SQLite file, or an empty PostgreSQL database)
at the same moment (so they also race to create the schema), the writers append rows one by one and in batches while the reader queries, and
afterwards every row is there exactly once. Refusing foreign or corrupt files without touching them is
tested in tests/test_store.py (test_refuses_a_sqlite_file_with_other_tables_without_touching_it,
test_refuses_a_file_that_is_not_a_database_without_touching_it, test_refuses_a_store_with_a_newer_schema).

Set WORKBENCH_CONCURRENCY_REPEATS=20 to run the concurrency test 20 times (default 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from workbench.store import SCHEMA_VERSION, Store

ROWS_PER_WRITER = 150
BATCH = 10  # every other step appends a batch of this many rows in one transaction

WRITER = """
import sys
from workbench.store import Store
url, writer, rows, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = Store(url)
def row(i):
    return {"run_id": f"{writer}-{i:05d}", "spec_key": f"{writer}-{i}", "status": "ok", "model": writer,
            "workload": "w", "technique": "baseline", "device": "cpu", "dtype": "float32", "seed": i,
            "repeats": 1, "warmup": 0, "summary": {"i": i}}
i = 0
while i < rows:
    if (i // batch) % 2:
        n = min(batch, rows - i)
        store.append_many([row(j) for j in range(i, i + n)])
        i += n
    else:
        store.append(row(i))
        i += 1
print("done", writer)
"""

READER = """
import json, sys, time
from pathlib import Path
from workbench.store import Store
url, stop = sys.argv[1], Path(sys.argv[2])
store = Store(url)
counts, reads = [], 0
while True:
    finished = stop.exists()
    frame = store.runs(columns=["run_id", "model"])
    assert frame["run_id"].is_unique, "a read saw a duplicated row"
    counts.append(len(frame))
    assert store.count() >= counts[-1]
    reads += 1
    if finished:
        break
    time.sleep(0.01)
assert counts == sorted(counts), "a later read saw fewer rows"
print(json.dumps({"reads": reads, "last": counts[-1]}))
"""


def _repeats() -> list[int]:
    return list(range(int(os.environ.get("WORKBENCH_CONCURRENCY_REPEATS", "2"))))


@pytest.mark.parametrize("attempt", _repeats())
def test_two_writers_and_a_reader_lose_and_duplicate_nothing(tmp_path: Path, store_url: str, attempt: int) -> None:
    url = store_url  # a new file or database: all three race to create the schema
    stop = tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # 1. Start the reader and both writers at once.
    reader = subprocess.Popen([sys.executable, "-c", READER, url, str(stop)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, url, name, str(ROWS_PER_WRITER), str(BATCH)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in ("writer-a", "writer-b")]
    # 2. Wait for the writers, then let the reader make one last read.
    outputs = [w.communicate(timeout=300) for w in writers]
    stop.touch()
    reader_out, reader_err = reader.communicate(timeout=300)
    for process, (out, err) in zip(writers, outputs):
        assert process.returncode == 0, err
    assert reader.returncode == 0, reader_err
    # 3. Every row exactly once, every writer's rows complete, the reader's last read saw them all.
    frame = Store(url).runs(columns=["run_id", "model", "seed"])
    assert len(frame) == 2 * ROWS_PER_WRITER and frame["run_id"].is_unique
    for name in ("writer-a", "writer-b"):
        assert sorted(frame.loc[frame["model"] == name, "seed"]) == list(range(ROWS_PER_WRITER))
    report = json.loads(reader_out.strip().splitlines()[-1])
    assert report["last"] == 2 * ROWS_PER_WRITER and report["reads"] >= 1


def _older_store(url: str, version: int, spec_key: str) -> None:
    """A store as the release of schema ``version`` wrote it, with one row: 3 had no noise columns, 2 no
    report columns either, 1 not the (spec_key, status) index either."""
    from workbench.store import COLUMNS_ADDED

    store = Store(url)
    store.append({"spec_key": spec_key, "status": "ok", "model": "m", "workload": "w", "technique": "baseline",
                  "device": "cpu", "dtype": "float32", "seed": 0, "repeats": 1, "warmup": 0})
    with store.engine.begin() as conn:
        for added in range(version + 1, max(COLUMNS_ADDED) + 1):
            for name in COLUMNS_ADDED.get(added, ()):
                conn.exec_driver_sql(f"ALTER TABLE runs DROP COLUMN {name}")
        if version < 2:
            conn.exec_driver_sql("DROP INDEX ix_runs_spec_key_status")
        conn.exec_driver_sql(f"UPDATE workbench_meta SET value = '{version}' WHERE key = 'schema_version'")
    store.close()


def test_an_older_store_is_migrated_forward_and_keeps_its_rows(store_url: str) -> None:
    _older_store(store_url, 1, "k")
    reopened = Store(store_url)
    assert reopened.schema_version() == SCHEMA_VERSION == 4
    assert reopened.count() == 1 and reopened.has_ok_run("k")
    inspector = sa.inspect(reopened.engine)
    indexes = {index["name"] for index in inspector.get_indexes("runs")}
    columns = {column["name"] for column in inspector.get_columns("runs")}
    assert "ix_runs_spec_key_status" in indexes
    assert {"lossless", "quality_metrics", "model_digest", "noisy", "noise"} <= columns


def test_a_schema_2_store_gains_the_report_columns_and_keeps_its_rows(store_url: str) -> None:
    _older_store(store_url, 2, "old")
    reopened = Store(store_url)
    assert reopened.schema_version() == 4
    reopened.append({"spec_key": "new", "status": "ok", "model": "m", "workload": "w", "technique": "baseline",
                     "device": "cpu", "dtype": "float32", "seed": 0, "repeats": 1, "warmup": 0, "lossless": True,
                     "model_bytes": 123, "quality_metrics": [{"name": "x", "value": 1.0, "unit": "%"}],
                     "noisy": True, "noise": {"others_cores_during": 1.5}})
    frame = reopened.runs()
    assert frame["noisy"].isna().tolist() == [True, False] and frame["noise"][1]["others_cores_during"] == 1.5
    assert list(frame["spec_key"]) == ["old", "new"]
    assert frame["lossless"].isna().tolist() == [True, False] and bool(frame["lossless"][1])
    assert frame["quality_metrics"][0] is None and frame["quality_metrics"][1][0]["unit"] == "%"
