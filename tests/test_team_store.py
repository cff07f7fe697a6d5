"""A team's store on a real PostgreSQL server: runs measured here and runs from a machine that could not
reach it (a bundle) pool into one store, the meta-learner learns from the pool, and the pool exports back
to a bundle that a SQLite store imports row for row. Everything through the CLI, as a team would."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from workbench.exchange import import_runs
from workbench.store import Store
from workbench.sweep import parse_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "data" / "seed" / "runs.parquet"
SWEEP = """
models: [zoo:code-classifier]
workloads: [{name: code-snippets, max_items: 2}]
techniques: [baseline, quantization]
repeats: 1
warmup: 0
"""


def _cli(workbench_cmd: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*workbench_cmd, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}: {done.stderr[-2000:]}"
    return done


@pytest.mark.slow
def test_a_postgres_store_pools_a_sweep_and_a_bundle_learns_and_exports(
        postgres: Any, quick_zoo: Path, tmp_path: Path, cli_env: dict[str, str], workbench_cmd: list[str]) -> None:
    url = postgres.new_database()
    seed_rows = len(pd.read_parquet(SEED))
    # 1. Runs from another machine that could not reach the store arrive as a bundle; runs measured here go
    #    straight in from a sweep.
    outputs = [_cli(workbench_cmd, cli_env, "import", str(SEED), "--store", url)]
    with Store(url) as store:
        outcome = run_sweep(parse_sweep(SWEEP), store, progress=False)
        pooled = store.runs(columns=["run_id", "machine_id", "status"])
    assert (outcome.ok, outcome.failed) == (2, 0)
    assert len(pooled) == seed_rows + 2 and pooled["machine_id"].nunique() == 2
    # 2. One meta-learner over both machines' runs, read from the server (the tree: 18 s against 43 s for
    #    boosting here; what is tested is the store it reads).
    learner = tmp_path / "team.learner.skops"
    learned = _cli(workbench_cmd, cli_env, "learn", "--store", url, "--out", str(learner), "--learner", "tree")
    outputs.append(learned)
    assert f"{seed_rows + 2} runs" in learned.stdout and "2 machine(s)" in learned.stdout
    assert "from 2 machine(s)" in learned.stdout and learner.is_file()
    # 3. The pool back out as a bundle, into a SQLite store: every row, same ids.
    bundle, local = tmp_path / "pool.parquet", f"sqlite:///{tmp_path / 'local.sqlite'}"
    outputs.append(_cli(workbench_cmd, cli_env, "export", "--store", url, "--out", str(bundle)))
    with Store(local) as store:
        assert import_runs(bundle, store)["added"] == len(pooled)
        copied = store.runs(columns=["run_id", "machine_id", "status"])
    assert sorted(copied["run_id"]) == sorted(pooled["run_id"])
    assert (copied.sort_values("run_id")["status"].tolist() == pooled.sort_values("run_id")["status"].tolist())
    # 4. The server's password is never printed, whatever the command.
    assert not any(postgres.password in done.stdout + done.stderr for done in outputs)
    assert any("workbench:***@127.0.0.1" in done.stdout + done.stderr for done in outputs)
