"""Where workbench keeps its files: the store, the model zoo and caches.

Order of precedence: the ``WORKBENCH_DATA`` environment variable; the ``data/`` folder of the source
checkout when workbench runs from one (an editable install); otherwise ``~/.cache/workbench``.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The folder that holds the default store, the zoo and caches (created if missing)."""
    env = os.environ.get("WORKBENCH_DATA")
    if env:
        path = Path(env).expanduser()
    else:
        checkout = Path(__file__).resolve().parents[1]
        if (checkout / "pyproject.toml").is_file() and (checkout / "workbench").is_dir():
            path = checkout / "data"
        else:
            path = Path.home() / ".cache" / "workbench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def zoo_dir() -> Path:
    """The folder the offline tiny zoo is built into: one sub-folder per model."""
    return data_dir() / "zoo"


def cache_dir() -> Path:
    """Per-machine caches (the memory-bandwidth probe, for one)."""
    path = data_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_store_url() -> str:
    """The SQLite file used when no ``--store`` URL is given."""
    return f"sqlite:///{data_dir() / 'workbench.sqlite'}"
