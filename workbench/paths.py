"""Where workbench keeps its files: the store, the model zoo and caches.

Order of precedence: the ``WORKBENCH_DATA`` environment variable; the ``data/`` folder of the source
checkout when workbench runs from one (an editable install); otherwise ``~/.cache/workbench``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError


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
    source = "WORKBENCH_DATA=" if env else "the data folder "
    if path.exists() and not path.is_dir():
        raise WorkbenchError(f"{source}{str(path)!r} is a file, not a folder: point WORKBENCH_DATA at a folder "
                             "(it is created if missing), or unset it to use data/")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WorkbenchError(f"cannot create {source}{str(path)!r} ({err.strerror or err}): point WORKBENCH_DATA "
                             "at a writable folder") from None
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


def write_atomically(out: Path, write: Any) -> None:
    """``write(temporary_path)`` beside ``out``, then rename it over ``out``: readers and a full disk never
    see half a file, and the old file stays whole until the new one is complete."""
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, out.stat().st_mode & 0o777 if out.exists() else 0o666 & ~umask)  # not mkstemp's 0600
        os.replace(temporary, out)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WorkbenchError(f"could not write {str(out)!r} ({err.strerror or err}); the old file, if any, is "
                                 "unchanged: free some space or choose another folder") from None
        raise
