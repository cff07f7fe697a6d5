"""The results store on real SQLite files and a real PostgreSQL server: round trips, filters, refusals and
transactions. Tests taking ``store`` or ``store_url`` run on both (``[sqlite]``, ``[postgresql]``; the server
is started by tests/pg_server.py, skipped with the install hint without its binaries)."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from workbench.store import JSON_COLUMNS, RUN_COLUMNS, SCHEMA_VERSION, Store, StoreError, parse_since

UTC = dt.timezone.utc


def make_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "spec_key": "spec-1",
        "status": "ok",
        "model": "tiny-gpt2",
        "workload": "prompts-8",
        "technique": "baseline",
        "device": "cpu",
        "dtype": "float32",
        "seed": 0,
        "repeats": 5,
        "warmup": 1,
        "machine_id": "0123456789abcdef",
    }
    row.update(overrides)
    return row


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "folder" / "runs.sqlite"


@pytest.fixture
def store(store_url: str) -> Store:
    with Store(store_url) as opened:
        yield opened


def raw(store: Store, sql: str) -> list[tuple]:
    """Rows of a SQL statement run on the store's database directly (not through the Store API)."""
    with store.engine.begin() as conn:
        result = conn.exec_driver_sql(sql)
        return [tuple(row) for row in result] if result.returns_rows else []


# -- round trip ------------------------------------------------------------------------------------


def test_round_trip_keeps_every_column_and_turns_nan_into_none(store: Store) -> None:
    created = dt.datetime(2024, 5, 1, 14, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    row = make_row(
        created_at=created,
        technique="speculative",
        draft="tiny-gpt2-draft",
        params={"draft_len": 4, "schedule": ("const", 1.5)},
        environment={"machine_id": "0123456789abcdef", "ram_bytes": 2**34},
        spec={"repeats": 5},
        summary={"latency_s_median": 0.012, "latency_s_p90": float("nan")},
        samples={"latency_s": [0.011, 0.012, float("inf")]},
        quality={"identical_to_greedy": True},
        internals={"acceptance_rate_by_position": [0.9, 0.7]},
        outputs=["hello world"],
        speedup=1.8,
        speedup_ci_low=float("nan"),
        speedup_ci_high=2.1,
        significant=True,
    )

    run_id = store.append(row)
    got = store.get(run_id)

    assert got["created_at"] == dt.datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    assert got["summary"] == {"latency_s_median": 0.012, "latency_s_p90": None}
    assert got["samples"] == {"latency_s": [0.011, 0.012, None]}
    assert got["params"] == {"draft_len": 4, "schedule": ["const", 1.5]}
    assert got["outputs"] == ["hello world"]
    assert got["speedup"] == 1.8 and got["speedup_ci_low"] is None and got["significant"] is True
    assert got["schema_version"] == SCHEMA_VERSION and got["workbench_version"]
    assert got["draft"] == "tiny-gpt2-draft" and got["failure_reason"] is None
    # Stored as plain JSON text, never pickled.
    text = raw(store, "SELECT summary FROM runs")[0][0]
    assert text == '{"latency_s_median": 0.012, "latency_s_p90": null}'

    frame = store.runs()
    assert list(frame.columns) == list(RUN_COLUMNS)
    assert str(frame["created_at"].dtype).endswith(", UTC]")
    assert frame.loc[0, "created_at"] == pd.Timestamp("2024-05-01 12:30", tz="UTC")
    assert frame.loc[0, "quality"] == {"identical_to_greedy": True}
    assert frame.loc[0, "run_id"] == run_id


def test_append_fills_defaults_and_rejects_bad_rows(store: Store) -> None:
    before = dt.datetime.now(UTC)
    run_id = store.append(make_row(environment={"machine_id": "feedfacecafebeef"}, machine_id=None))
    got = store.get(run_id)

    assert len(run_id) == 36
    assert before <= got["created_at"] <= dt.datetime.now(UTC)
    assert got["machine_id"] == "feedfacecafebeef" and got["params"] == {}

    with pytest.raises(StoreError, match="unknown key.*'latency'"):
        store.append(make_row(latency=1.0))
    with pytest.raises(StoreError, match="lacks required key.*model"):
        store.append(make_row(model=None))
    with pytest.raises(StoreError, match="status='done'; use one of ok, failed"):
        store.append(make_row(status="done"))
    failed = store.append(make_row(status="failed", failure_reason=""))  # kept, never dropped
    assert store.get(failed)["failure_reason"] == "failed without a message"
    with pytest.raises(StoreError, match="summary cannot be stored as JSON"):
        store.append(make_row(summary={"f": object()}))
    with pytest.raises(StoreError, match="no run with run_id 'nope'"):
        store.get("nope")
    assert store.count() == 2


# -- filters ---------------------------------------------------------------------------------------


def test_filters_by_time_model_technique_and_status(store: Store) -> None:
    now = dt.datetime.now(UTC)
    store.append_many(
        [
            make_row(spec_key="a", model="m1", technique="baseline", created_at=now - dt.timedelta(days=10)),
            make_row(spec_key="b", model="m1", technique="int8", created_at=now - dt.timedelta(hours=20)),
            make_row(spec_key="c", model="m2", technique="int8", created_at=now - dt.timedelta(minutes=40)),
            make_row(spec_key="d", model="m2", technique="baseline", status="failed",
                     failure_reason="out of memory", created_at=now - dt.timedelta(minutes=5)),
        ]
    )

    assert list(store.runs()["spec_key"]) == ["a", "b", "c", "d"]  # oldest first
    assert list(store.runs(since="7d")["spec_key"]) == ["b", "c", "d"]
    assert list(store.runs(since="12h")["spec_key"]) == ["c", "d"]
    assert list(store.runs(since="30m")["spec_key"]) == ["d"]
    assert list(store.runs(since="2w")["spec_key"]) == ["a", "b", "c", "d"]
    assert list(store.runs(until="12h")["spec_key"]) == ["a", "b"]
    assert list(store.runs(since=now - dt.timedelta(days=1), until=now)["spec_key"]) == ["b", "c", "d"]
    two_days_ago = (now - dt.timedelta(days=2)).date().isoformat()  # an ISO date, midnight UTC
    assert list(store.runs(since=two_days_ago)["spec_key"]) == ["b", "c", "d"]
    assert list(store.runs(model="m1")["spec_key"]) == ["a", "b"]
    assert list(store.runs(technique="int8", model="m2")["spec_key"]) == ["c"]
    assert list(store.runs(technique=["int8", "baseline"], status="ok")["spec_key"]) == ["a", "b", "c"]
    assert list(store.runs(status="failed")["failure_reason"]) == ["out of memory"]
    assert list(store.runs(limit=2)["spec_key"]) == ["a", "b"]
    assert store.count(model="m2") == 2 and store.count(since="7d", status="ok") == 2
    assert store.has_ok_run("c") and not store.has_ok_run("d") and not store.has_ok_run("zzz")

    narrow = store.runs(model="m1", columns=["created_at", "summary", "speedup"])
    assert list(narrow.columns) == ["created_at", "summary", "speedup"]
    with pytest.raises(StoreError, match="unknown column.*'latency'"):
        store.runs(columns=["latency"])

    empty = store.runs(model="no-such-model")
    assert empty.empty and list(empty.columns) == list(RUN_COLUMNS)
    assert str(empty["created_at"].dtype).endswith(", UTC]")


def test_parse_since_forms_and_errors() -> None:
    now = dt.datetime(2024, 5, 15, 12, 0, tzinfo=UTC)
    assert parse_since("7d", now=now) == now - dt.timedelta(days=7)
    assert parse_since("12h", now=now) == now - dt.timedelta(hours=12)
    assert parse_since("30m", now=now) == now - dt.timedelta(minutes=30)
    assert parse_since("2w", now=now) == now - dt.timedelta(weeks=2)
    assert parse_since("2024-05-01") == dt.datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_since("2024-05-01T12:00:00+02:00") == dt.datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert parse_since(dt.datetime(2024, 5, 1)) == dt.datetime(2024, 5, 1, tzinfo=UTC)
    for bad in ("7 days", "yesterday", "-3d", "2024-13-45", ""):
        with pytest.raises(StoreError, match=r"7d, 12h, 30m or 2w.*ISO date") as info:
            parse_since(bad)
        assert repr(bad) in str(info.value) and "\n" not in str(info.value)


def test_bad_since_in_a_query_is_a_store_error(store: Store) -> None:
    with pytest.raises(StoreError, match="'last week'"):
        store.runs(since="last week")


# -- transactions and SQLite settings ---------------------------------------------------------------


def test_failing_append_many_keeps_earlier_rows_and_adds_none(store: Store) -> None:
    kept = store.append(make_row(spec_key="kept", summary={"x": 1}))

    # The second row reuses a stored run_id: the database rejects it mid-batch.
    with pytest.raises(StoreError, match="nothing from the batch was kept"):
        store.append_many([make_row(spec_key="new"), make_row(spec_key="clash", run_id=kept)])
    # A bad row late in a batch is caught before anything is written.
    with pytest.raises(StoreError, match="row 1"):
        store.append_many([make_row(spec_key="new"), make_row(seed="zero")])

    assert store.count() == 1
    assert store.get(kept)["summary"] == {"x": 1} and store.get(kept)["spec_key"] == "kept"
    assert len(store.append_many([make_row(spec_key="n1"), make_row(spec_key="n2")])) == 2
    assert store.count() == 3


def test_sqlite_store_uses_wal_and_foreign_keys(db_path: Path) -> None:
    store = Store(f"sqlite:///{db_path}")
    store.append(make_row())
    assert db_path.is_file()  # parent folders were created
    assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    indexes = {row[1] for row in sqlite3.connect(db_path).execute("PRAGMA index_list('runs')")}
    assert "ix_runs_model_created_at" in indexes


def test_reopening_a_store_keeps_its_rows(store_url: str) -> None:
    url = store_url
    with Store(url) as first:
        run_id = first.append(make_row())
    with Store(url) as second:
        assert second.get(run_id)["model"] == "tiny-gpt2" and second.count() == 1


# -- refusals ----------------------------------------------------------------------------------------


def test_refuses_a_sqlite_file_with_other_tables_without_touching_it(tmp_path: Path) -> None:
    path = tmp_path / "someone-elses.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices VALUES (1, 9.5)")
    conn.close()
    before, files_before = sha256(path), sorted(os.listdir(tmp_path))

    with pytest.raises(StoreError, match="other tables \\(invoices\\).*left untouched") as info:
        Store(f"sqlite:///{path}")

    assert "\n" not in str(info.value)
    assert sha256(path) == before and sorted(os.listdir(tmp_path)) == files_before


def test_refuses_a_file_that_is_not_a_database_without_touching_it(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite"
    path.write_bytes(os.urandom(4096))
    before = sha256(path)

    with pytest.raises(StoreError, match="not a SQLite database.*left untouched") as info:
        Store(f"sqlite:///{path}")

    assert "\n" not in str(info.value)
    assert sha256(path) == before and sorted(os.listdir(tmp_path)) == ["notes.sqlite"]


def test_refuses_a_store_with_a_newer_schema(store_url: str) -> None:
    with Store(store_url) as store:
        store.append(make_row())
        raw(store, f"UPDATE workbench_meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")

    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer.*upgrade workbench") as info:
        Store(store_url)
    assert "\n" not in str(info.value)


def test_unparsable_and_unknown_urls_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot parse store URL 'results.sqlite'.*sqlite:///results.sqlite"):
        Store("results.sqlite")
    with pytest.raises(StoreError, match="unknown database 'nosuchdb'"):
        Store("nosuchdb://host/db")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the folder .*a-file") as info:
        Store(f"sqlite:///{blocker}/sub/runs.sqlite")
    assert "\n" not in str(info.value)


def test_unreachable_postgres_fails_fast_in_one_line() -> None:
    url = "postgresql://u:secret@127.0.0.1:1/db"
    started = time.perf_counter()

    with pytest.raises(StoreError) as info:
        Store(url)

    message = str(info.value)
    assert time.perf_counter() - started < 10
    assert "\n" not in message and "secret" not in message and "u:***@127.0.0.1" in message
    if importlib.util.find_spec("psycopg") is None:
        assert "pip install" in message and "psycopg" in message
    else:
        assert "cannot reach the store" in message


def test_url_hides_the_password() -> None:
    store = Store("sqlite://")  # in memory
    assert store.url == "sqlite://" and repr(store) == "Store('sqlite://')"
    with pytest.raises(StoreError) as info:
        Store("postgresql+psycopg2://admin:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(info.value)


def test_json_columns_are_the_documented_ones() -> None:
    assert JSON_COLUMNS == {
        "params", "environment", "spec", "summary", "samples", "quality", "internals", "outputs",
        "quality_metrics", "technique_features", "resources", "noise",
    }


# -- PostgreSQL: a real server ------------------------------------------------------------------------


def test_postgres_refuses_a_runs_table_it_did_not_create_and_leaves_it(postgres: Any) -> None:
    url = postgres.new_database()
    database = url.rsplit("/", 1)[1]
    postgres.execute("CREATE TABLE runs (id integer PRIMARY KEY, total real)", database)
    postgres.execute("INSERT INTO runs VALUES (1, 9.5)", database)

    with pytest.raises(StoreError, match="has a 'runs' table that workbench did not create.*untouched") as info:
        Store(url)

    assert "\n" not in str(info.value) and postgres.password not in str(info.value)
    assert postgres.execute("SELECT id, total FROM runs", database) == [(1, 9.5)]
    tables = {row[0] for row in postgres.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                                                  database)}
    assert tables == {"runs"}  # nothing was created beside it


def test_postgres_shares_a_database_with_other_tables_and_keeps_them(postgres: Any) -> None:
    url = postgres.new_database()
    database = url.rsplit("/", 1)[1]
    postgres.execute("CREATE TABLE invoices (id integer PRIMARY KEY)", database)
    postgres.execute("INSERT INTO invoices VALUES (7)", database)

    with Store(url) as store:
        store.append(make_row())
        assert store.count() == 1

    assert postgres.execute("SELECT id FROM invoices", database) == [(7,)]


def test_postgres_wrong_password_is_one_line_that_never_prints_a_password(postgres: Any) -> None:
    wrong = "Wrong-Secret-" + "9" * 6
    url = postgres.url(postgres.new_database().rsplit("/", 1)[1], password=wrong)

    with pytest.raises(StoreError, match="cannot reach the store.*password authentication failed") as info:
        Store(url)

    message = str(info.value)
    assert "\n" not in message and wrong not in message and postgres.password not in message
    assert "workbench:***@127.0.0.1" in message


def test_a_server_that_accepts_and_never_answers_times_out_in_one_line() -> None:
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'workbench[cluster]'")
    import socket
    import threading

    from workbench.store import CONNECT_TIMEOUT_S

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []

    def accept_and_stay_silent() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_stay_silent, daemon=True).start()
    url = f"postgresql://u:Silent-Pass-1@127.0.0.1:{listener.getsockname()[1]}/db"
    started = time.perf_counter()
    try:
        with pytest.raises(StoreError, match="cannot reach the store") as info:
            Store(url)
        elapsed_s = time.perf_counter() - started
    finally:
        listener.close()
        for conn in accepted:
            conn.close()

    message = str(info.value)
    assert accepted, "the client never connected, so nothing was tested"
    assert elapsed_s < CONNECT_TIMEOUT_S + 5  # bounded: the driver's timeout, or the store's own watchdog
    assert "\n" not in message and "Silent-Pass-1" not in message and "u:***@127.0.0.1" in message
