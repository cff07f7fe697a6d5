"""Shared fixtures: every test session gets its own data folder and a quick zoo built once."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private WORKBENCH_DATA for the session, so tests never touch the user's store or zoo.

    Set WORKBENCH_TEST_DATA to a folder to keep the quick zoo between sessions (for development).
    """
    keep = os.environ.get("WORKBENCH_TEST_DATA")
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # set under `pytest -n N`: one data folder per worker
    if keep:
        path = Path(keep) if worker is None else Path(keep) / "workers" / worker
    else:
        path = tmp_path_factory.mktemp("workbench-data")
    path.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("WORKBENCH_DATA")
    os.environ["WORKBENCH_DATA"] = str(path)
    yield path
    if old is None:
        os.environ.pop("WORKBENCH_DATA", None)
    else:
        os.environ["WORKBENCH_DATA"] = old


@pytest.fixture(scope="session")
def quick_zoo(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick zoo, built once per session into the private data folder.

    Under pytest-xdist the workers build it once, under a file lock, into a folder they share, and each
    worker gets a hard-linked copy of it (its own folder, no second build)."""
    from filelock import FileLock

    from workbench.models import zoo

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        zoo.build(quick=True, progress=False)
        return data_dir / "zoo"
    keep = os.environ.get("WORKBENCH_TEST_DATA")
    shared = Path(keep) if keep else tmp_path_factory.getbasetemp().parent / "shared-data"
    shared.mkdir(parents=True, exist_ok=True)
    with FileLock(str(shared / "quick-zoo.lock")):
        zoo.build(quick=True, progress=False, root=shared / "zoo")
        for model in sorted((shared / "zoo").iterdir()):
            target = data_dir / "zoo" / model.name
            if model.is_dir() and not model.name.startswith(".") and not target.exists():
                shutil.copytree(model, target, copy_function=os.link)
    return data_dir / "zoo"


@pytest.fixture
def cli_env(data_dir: Path) -> dict[str, str]:
    """Environment for running the `workbench` command in a subprocess against the session data."""
    env = dict(os.environ)
    env["WORKBENCH_DATA"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def workbench_cmd() -> list[str]:
    """The command line that starts the CLI with this interpreter."""
    return [sys.executable, "-m", "workbench.cli"]


#: The files that take longest (minutes on 2 cores), longest first. pytest-xdist's --dist loadfile hands
#: whole files to its workers in collection order when told --no-loadscope-reorder (the Makefile does; by
#: default it sorts files by their number of tests), so starting these first keeps one worker from running
#: a long file alone at the end (longest-processing-time-first scheduling). Other files follow in order.
LONGEST_FILES = ("test_meta.py", "test_cluster.py", "test_speculative.py", "test_cli.py", "test_sweep.py",
                 "test_early_exit.py", "test_architectures.py", "test_report.py", "test_technique_plugin.py",
                 "test_team_store.py", "test_hostile_input.py", "test_plan_time_checks.py", "test_pretrained_zoo.py",
                 "test_widgets.py", "test_jupyterlab_browser.py", "test_quantization.py", "test_techniques.py",
                 "test_notebooks.py", "test_draft.py", "test_noise.py", "test_zoo.py", "test_adaptive_steps.py",
                 "test_sampled_quality.py", "test_store.py", "test_store_concurrency.py")
# by total duration, 2026-12-02 (--durations=0); test_cluster (~150 s), test_team_store (~45 s),
# test_hostile_input (~3 min of CLI processes) and the store files (~35 s with PostgreSQL) placed by their
# durations of 2026-12-07


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


@pytest.fixture(scope="session")
def postgres() -> Any:
    """A real PostgreSQL server on loopback for this session (per xdist worker); skipped without the binaries."""
    from pg_server import INSTALL_HINT, PostgresServer, find_bindir

    if find_bindir() is None:
        pytest.skip(f"PostgreSQL server binaries not found: {INSTALL_HINT}")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'workbench[cluster]'")
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of a new, empty store: a SQLite file, then a database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'folder' / 'runs.sqlite'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def no_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation and planning must never load a model: any attempt fails the test loudly."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation tried to load weights")

    monkeypatch.setattr("workbench.runner.load_model", refuse)
    monkeypatch.setattr("workbench.models.loading.load_model", refuse)
