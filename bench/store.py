"""How fast is the store? Insert 100,000 runs into a fresh SQLite file, then query them back.

Rows look like real ones (a summary of statistics, params, an environment shared by all rows of one
machine, quality figures) but are made up, seeded, spread over 60 days, 20 models and 4 techniques.

Printed (every query on a freshly opened store; "rows/s" is rows returned per second):
- insert: seconds and rows/s for appending all rows (append_many, 2,000 rows per transaction).
- query A: ``store.runs(model=<5 of 20 models>, since=<30 days back>)``, every column (JSON parsed):
  a filtered query over the 100,000 stored runs; held to < 1 s.
- query B: all 100,000 runs back, filtered by model (all 20) and date (the whole range), with the
  columns an analysis reads (created_at, model, technique, status, speedup and its interval,
  summary as parsed JSON); shown, not held to the limit (see below).
- query C: as B with every column (environment, params, quality... all parsed); shown, not held.
- query D: a selective filter (one model, last 7 days, 4 columns), for scale.

Returning all 100,000 rows is dominated by Python, not SQLite: the raw sqlite3 fetch of query B takes
~0.4 s on a 2-core machine, SQLAlchemy's Row objects, JSON parsing and the DataFrame the rest.

Run: ``python bench/store.py [--rows 100000] [--file PATH]``. Exit code 1 when query A takes > 1 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
import time
from pathlib import Path

from workbench.store import Store

LIMIT_S = 1.0
MODELS = [f"zoo:model-{i:02d}" for i in range(20)]
TECHNIQUES = ["baseline", "speculative", "early_exit", "quantization"]


def make_rows(n: int, now: dt.datetime, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    environment = {"machine_id": "5b7bbcfd151925ca", "cpu_model": "bench CPU", "cpu_cores_logical": 2,
                   "torch": "2.x", "transformers": "5.x", "ram_bytes": 8 * 2**30}
    rows = []
    for i in range(n):
        speedup = rng.uniform(0.7, 2.5)
        rows.append({
            "spec_key": f"{i:064x}", "status": "ok" if i % 17 else "failed",
            "failure_reason": None if i % 17 else "RuntimeError: made up",
            "created_at": now - dt.timedelta(seconds=rng.uniform(0, 60 * 86400)),
            "model": MODELS[i % len(MODELS)], "workload": "code-prompts", "technique": TECHNIQUES[i % 4],
            "params": {"num_assistant_tokens": i % 8}, "device": "cpu", "dtype": "float32", "seed": i % 5,
            "repeats": 5, "warmup": 1, "environment": environment,
            "summary": {"latency_s_median": rng.uniform(0.01, 0.2), "latency_s_p90": rng.uniform(0.02, 0.3),
                        "tokens_per_s": rng.uniform(50, 500), "comparison": {"speedup": speedup}},
            "quality": {"token_agreement": rng.uniform(0.9, 1.0)},
            "speedup": speedup, "speedup_ci_low": speedup * 0.95, "speedup_ci_high": speedup * 1.05,
            "significant": bool(i % 3),
        })
    return rows


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="runs to insert")
    parser.add_argument("--file", type=Path, default=None, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    folder = tempfile.TemporaryDirectory()
    path = args.file or Path(folder.name) / "bench.sqlite"
    if path.exists():
        print(f"FAIL: {path} exists; give a new file name")
        return 1
    now = dt.datetime.now(dt.timezone.utc)
    rows = make_rows(args.rows, now)
    store = Store(f"sqlite:///{path}")

    # 1. Insert.
    def insert() -> None:
        for start in range(0, len(rows), 2000):
            store.append_many(rows[start:start + 2000])

    insert_s, _ = timed(insert)
    print(f"insert   {args.rows:>7,} rows  {insert_s:7.3f} s  {args.rows / insert_s:>10,.0f} rows/s  "
          f"({path.stat().st_size / 2**20:.0f} MiB file)")

    # 2. Queries, each timed on a cold-started store object (a new engine and connection).
    results = {}
    whole_range = dict(model=MODELS, since=(now - dt.timedelta(days=61)).isoformat())
    analysis = ["created_at", "model", "technique", "status", "speedup", "speedup_ci_low", "speedup_ci_high",
                "summary"]
    queries = {
        "A": ("5 models, last 30 days, all columns",
              dict(model=MODELS[:5], since=(now - dt.timedelta(days=30)).date().isoformat())),
        "B": ("all 20 models, whole range, 8 analysis columns", dict(whole_range, columns=analysis)),
        "C": ("all 20 models, whole range, all columns", whole_range),
        "D": ("1 model, last 7 days, 4 columns",
              dict(model=MODELS[0], since="7d", columns=["created_at", "technique", "speedup", "status"])),
    }
    for name, (label, filters) in queries.items():
        reader = Store(f"sqlite:///{path}")
        seconds, frame = timed(lambda: reader.runs(**filters))
        reader.close()
        results[name] = seconds
        print(f"query {name}  {len(frame):>7,} rows  {seconds:7.3f} s  {len(frame) / seconds:>10,.0f} rows/s  "
              f"({label})")
    store.close()
    folder.cleanup()
    slow = [name for name in ("A",) if results[name] > LIMIT_S]
    if slow:
        print(f"FAIL: query {', '.join(slow)} took more than {LIMIT_S} s")
        return 1
    print(f"OK: query A (filtered by model and date over {args.rows:,} stored runs) within {LIMIT_S} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
