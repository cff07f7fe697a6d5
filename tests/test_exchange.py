"""Pooling across machines: export runs to a parquet bundle and import them, exactly and only once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from workbench.errors import WorkbenchError
from workbench.exchange import export_runs, import_runs, read_bundle
from workbench.store import JSON_COLUMNS, Store


@pytest.fixture(scope="module")
def source_url(quick_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with real runs: one quantization comparison on a classifier and one on a causal LM."""
    from workbench import runner
    from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec

    url = f"sqlite:///{tmp_path_factory.mktemp('exchange') / 'source.sqlite'}"
    store = Store(url)
    for model, workload in (("zoo:code-classifier", "code-snippets"), ("zoo:code-target", "code-prompts")):
        spec = RunSpec(ModelSpec(model), WorkloadSpec(workload, max_items=2, max_new_tokens=4),
                       TechniqueSpec("quantization"), repeats=2, warmup=0)
        assert runner.run(spec, store=store, progress=False).status == "ok"
    return url


def test_round_trip_reproduces_the_rows(source_url: str, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.parquet"
    assert export_runs(Store(source_url), bundle) == 2
    # JSON columns stay JSON text inside the file.
    column = pq.read_table(bundle).column("summary").to_pylist()
    assert all(isinstance(text, str) and text.startswith("{") for text in column)
    target = Store(f"sqlite:///{tmp_path / 'target.sqlite'}")
    assert import_runs(bundle, target) == {"read": 2, "added": 2, "already_stored": 0}
    pd.testing.assert_frame_equal(Store(source_url).runs(), target.runs())
    assert set(read_bundle(bundle).columns) >= JSON_COLUMNS


def test_importing_twice_adds_nothing(source_url: str, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.parquet"
    export_runs(Store(source_url), bundle)
    target = Store(f"sqlite:///{tmp_path / 'target.sqlite'}")
    import_runs(bundle, target)
    assert import_runs(bundle, target) == {"read": 2, "added": 0, "already_stored": 2}
    assert target.count() == 2


def test_since_filters_the_export(source_url: str, tmp_path: Path) -> None:
    assert export_runs(Store(source_url), tmp_path / "none.parquet", since="2999-01-01") == 0


def test_cli_export_and_import(source_url: str, tmp_path: Path, cli_env: dict, workbench_cmd: list) -> None:
    bundle, target = tmp_path / "runs.parquet", f"sqlite:///{tmp_path / 'cli.sqlite'}"
    done = subprocess.run([*workbench_cmd, "export", "--store", source_url, "--out", str(bundle)], env=cli_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "exported 2 runs" in done.stdout
    for expected in ("imported 2 of 2 runs", "imported 0 of 2 runs"):
        done = subprocess.run([*workbench_cmd, "import", str(bundle), "--store", target], env=cli_env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout
    missing = subprocess.run([*workbench_cmd, "import", str(tmp_path / "nope.parquet"), "--store", target],
                             env=cli_env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_bad_bundles_get_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(WorkbenchError, match=r"\.parquet"):
        export_runs(Store("sqlite:///:memory:"), tmp_path / "runs.csv")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(WorkbenchError, match="not a parquet bundle"):
        read_bundle(junk)
