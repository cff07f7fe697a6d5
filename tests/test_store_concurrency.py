"""The store under concurrency and across schema versions.

Two writer processes and a reader open one *new* SQLite file at the same moment (so they also race to
create the schema), the writers append rows one by one and in batches while the reader queries, and
afterwards every row is there exactly once. Refusing foreign or corrupt files without touching them is
tested in tests/test_store.py (test_refuses_a_sqlite_file_with_other_tables_without_touching_it,
test_refuses_a_file_that_is_not_a_database_without_touching_it, test_refuses_a_store_with_a_newer_schema).

Set WORKBENCH_CONCURRENCY_REPEATS=20 to run the concurrency test 20 times (default 2).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

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
def test_two_writers_and_a_reader_lose_and_duplicate_nothing(tmp_path: Path, attempt: int) -> None:
    url = f"sqlite:///{tmp_path / f'shared-{attempt}.sqlite'}"  # a new file: all three race to create it
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


def _older_store(path: Path, version: int, spec_key: str) -> None:
    """A store as the release of schema ``version`` wrote it, with one row: 3 had no noise columns, 2 no
    report columns either, 1 not the (spec_key, status) index either."""
    from workbench.store import COLUMNS_ADDED

    store = Store(f"sqlite:///{path}")
    store.append({"spec_key": spec_key, "status": "ok", "model": "m", "workload": "w", "technique": "baseline",
                  "device": "cpu", "dtype": "float32", "seed": 0, "repeats": 1, "warmup": 0})
    store.close()
    with sqlite3.connect(path) as conn:
        for added in range(version + 1, max(COLUMNS_ADDED) + 1):
            for name in COLUMNS_ADDED.get(added, ()):
                conn.execute(f"ALTER TABLE runs DROP COLUMN {name}")
        if version < 2:
            conn.execute("DROP INDEX ix_runs_spec_key_status")
        conn.execute(f"UPDATE workbench_meta SET value = '{version}' WHERE key = 'schema_version'")
    conn.close()


def test_an_older_store_is_migrated_forward_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _older_store(path, 1, "k")
    reopened = Store(f"sqlite:///{path}")
    assert reopened.schema_version() == SCHEMA_VERSION == 4
    assert reopened.count() == 1 and reopened.has_ok_run("k")
    with sqlite3.connect(path) as conn:
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(runs)")}
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    conn.close()
    assert "ix_runs_spec_key_status" in indexes
    assert {"lossless", "quality_metrics", "model_digest", "noisy", "noise"} <= columns


def test_a_schema_2_store_gains_the_report_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite"
    _older_store(path, 2, "old")
    reopened = Store(f"sqlite:///{path}")
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
