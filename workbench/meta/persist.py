"""Save and load a trained meta-learner without pickle.

The file is a ``skops.io`` archive holding a dict: the scikit-learn models, and one JSON text with
everything else (settings, encoding, feature schema, candidates, training table and provenance: run
ids and machine ids). Loading refuses any type outside ``TRUSTED_TYPES`` (scikit-learn trees and
losses, numpy arrays and builtins), so a tampered file cannot run code.

Example:
    >>> from workbench.meta.recommend import train  # doctest: +SKIP
    >>> save(learner, "data/meta/learner.skops"); load("data/meta/learner.skops").predict(X)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench import paths
from workbench.errors import WorkbenchError
from workbench.meta import features
from workbench.meta.trust import TrainingRange
from workbench.meta.learner import MetaLearner

FORMAT = "workbench-meta-learner"
FORMAT_VERSION = 3  # 2: the learner keeps its priors (speed_prior_, quality_prior_); 3: models per technique
#: The only types a learner file may contain besides builtins (checked before anything is built).
TRUSTED_TYPES: tuple[str, ...] = (
    "sklearn.ensemble._gb.GradientBoostingRegressor",
    "sklearn.tree._classes.DecisionTreeRegressor",
    "sklearn.tree._tree.Tree",
    "sklearn.dummy.DummyRegressor",
    "sklearn._loss.loss.HalfSquaredError",
    "sklearn._loss.loss.PinballLoss",
    "sklearn._loss.link.IdentityLink",
    "sklearn._loss.link.Interval",
    "sklearn._loss._loss.CyHalfSquaredError",
    "sklearn._loss._loss.CyPinballLoss",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.float64",
    "numpy.int64",
    "numpy.random.mtrand.RandomState",  # a fitted GradientBoostingRegressor's _rng (numpy rebuilds it from its state)
    "builtins.slice",
)
#: Plain containers and scalars a learner file holds; skops trusts more by default, this file type does not.
BUILTIN_TYPES: tuple[str, ...] = ("builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int",
                                  "builtins.float", "builtins.bool", "builtins.NoneType", "builtins.bytes")
MAX_UNPACKED_BYTES = 512 * 2**20  # a learner file unpacking to more than this is refused before reading it
MAX_MEMBERS = 20_000  # nor one holding more arrays than this
_MODELS = ("speed_model_", "speed_low_model_", "speed_high_model_", "quality_model_", "technique_models_")
_STATE = ("categories_", "encoded_columns_", "feature_names_", "n_features_in_", "reference_", "residual_std_",
          "speed_prior_", "quality_prior_",
          "candidates_", "provenance_")


def default_path(store_url: str | None = None) -> Path:
    """Where ``workbench learn`` saves a learner and ``recommend``/``explain`` look for one: beside the
    store it learned from (``runs.sqlite`` -> ``runs.learner.skops`` in the same folder; the default
    store's is ``<data>/workbench.learner.skops``), never inside the checkout unless the store is there; a
    server store's learners go to ``<data>/meta/learner.skops``."""
    from sqlalchemy.engine import make_url

    url = make_url(store_url or paths.default_store_url())
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        location = Path(url.database).expanduser()
        return location.with_name(f"{location.stem}.learner.skops")
    return paths.data_dir() / "meta" / "learner.skops"


def _default_for_reading() -> Path:
    """The default store's learner, else one saved where older versions saved it (``<data>/meta``)."""
    path = default_path()
    legacy = paths.data_dir() / "meta" / "learner.skops"
    return legacy if not path.is_file() and legacy.is_file() else path


def save(learner: MetaLearner, path: str | Path | None = None) -> Path:
    """Write a fitted learner (from ``recommend.train``) to ``path``; returns the path."""
    import skops.io

    path = Path(path) if path is not None else default_path()
    if not hasattr(learner, "speed_model_"):
        raise WorkbenchError("the meta-learner is not trained: train it with `workbench learn` first")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "params": learner.get_params(),
        "feature_schema": features.schema_table().to_dict(orient="records"),
        "state": {name: getattr(learner, name) for name in _STATE if hasattr(learner, name)},
        "training_table": _records(learner.training_table_) if hasattr(learner, "training_table_") else None,
    }
    for name in ("leaf_ids_", "leaf_low_", "leaf_high_"):
        if hasattr(learner, name):
            meta["state"][name] = getattr(learner, name).tolist()
    models = {name: getattr(learner, name) for name in _MODELS if hasattr(learner, name)}
    if path.is_dir():
        raise WorkbenchError(f"--out {str(path)!r} is a folder: name a file in it, e.g. {str(path / 'learner.skops')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": json.dumps(_json_safe(meta), sort_keys=True, allow_nan=False), "models": models}
    paths.write_atomically(path, lambda temporary: skops.io.dump(payload, temporary))  # the old learner stays whole
    return path


def load(path: str | Path | None = None) -> MetaLearner:
    """Read a learner saved by :func:`save`; refuses files with types outside ``TRUSTED_TYPES``."""
    import skops.io

    # 1. The file exists and holds only trusted types.
    path = Path(path) if path is not None else _default_for_reading()
    if not path.is_file():
        raise WorkbenchError(f"no trained meta-learner at {str(path)!r}: run `workbench learn` first "
                             "(or pass --learner-path)")
    types = stored_types(path)  # every type named in the file, not only those skops would not trust
    refused = sorted(types - set(TRUSTED_TYPES) - set(BUILTIN_TYPES))
    if refused:
        raise WorkbenchError(f"{str(path)!r} holds untrusted type(s) {', '.join(refused[:5])}: refusing to load it; "
                             "retrain with `workbench learn`")
    damaged = f"{str(path)!r} is damaged or not a workbench meta-learner: retrain with `workbench learn`"
    try:
        state = skops.io.load(path, trusted=sorted(types))
        meta = json.loads(state["meta"])
    except Exception:  # whatever a tampered file makes skops or json raise, one line
        raise WorkbenchError(damaged) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version", 0) != FORMAT_VERSION:
        found = meta if not isinstance(meta, dict) else f"{meta.get('format')!r} v{meta.get('format_version')}"
        raise WorkbenchError(f"{str(path)!r} is format {str(found)[:80]}, not {FORMAT} v{FORMAT_VERSION}: retrain "
                             "with `workbench learn`")
    # 2. Rebuild the estimator; a file missing a part, or with parts of the wrong kind, is refused whole.
    try:
        learner = MetaLearner(**meta["params"])
        if not isinstance(state.get("models"), dict) or not set(state["models"]) <= set(_MODELS) \
                or "speed_model_" not in state["models"]:
            raise ValueError("models")
        for name, value in state["models"].items():
            setattr(learner, name, value)
        for name, value in meta["state"].items():
            if name not in _STATE and not name.startswith("leaf_"):
                raise ValueError(name)
            setattr(learner, name, np.asarray(value) if name.startswith("leaf_") else value)
        if meta.get("training_table") is not None:
            learner.training_table_ = pd.DataFrame(meta["training_table"])
            learner.range_ = TrainingRange.of(learner.training_table_)
        learner.feature_schema_ = meta["feature_schema"]
    except Exception:
        raise WorkbenchError(damaged) from None
    return learner


def _npy_claim(archive: Any, member: Any) -> int:
    """Bytes an .npy member's header says its array holds (object arrays count as unbounded)."""
    from numpy.lib import format as npy

    with archive.open(member) as handle:
        major, _ = npy.read_magic(handle)
        read_header = npy.read_array_header_1_0 if major == 1 else npy.read_array_header_2_0
        shape, _, dtype = read_header(handle, max_header_size=10_000)
    if dtype.hasobject:
        return 2**63
    return int(np.prod(shape, dtype=np.float64) * dtype.itemsize)


def stored_types(path: Path) -> set[str]:
    """Every ``module.Class`` a skops file names, read from its schema without building anything; refuses
    files that unpack past ``MAX_UNPACKED_BYTES`` or hold more than ``MAX_MEMBERS`` parts (a zip bomb)."""
    import zipfile

    not_ours = f"{str(path)!r} is not a meta-learner file: train one with `workbench learn`"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            unpacked = sum(member.file_size for member in members)
            if len(members) > MAX_MEMBERS or unpacked > MAX_UNPACKED_BYTES:
                raise WorkbenchError(f"{str(path)!r} unpacks to {unpacked:,} bytes in {len(members):,} parts, more "
                                     "than a meta-learner holds: refusing to read it; retrain with `workbench learn`")
            for member in members:  # an array header may claim more than its bytes (memory blow-up on load)
                if member.filename.endswith(".npy") and _npy_claim(archive, member) > member.file_size:
                    raise WorkbenchError(f"{str(path)!r} holds an array ({member.filename}) larger than its stored "
                                         "bytes: the file is crafted or damaged; retrain with `workbench learn`")
            schema = json.loads(archive.read("schema.json"))
    except WorkbenchError:
        raise
    except Exception:  # not a zip, no schema, bad JSON, nested past the recursion limit
        raise WorkbenchError(not_ours) from None
    types: set[str] = set()
    pending: list[Any] = [schema]
    while pending:  # iterative: a crafted schema cannot exhaust the stack
        node = pending.pop()
        if isinstance(node, dict):
            if "__module__" in node or "__class__" in node:
                types.add(f"{node.get('__module__')}.{node.get('__class__')}")
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return types


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _json_safe(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def _json_safe(value: Any) -> Any:
    """NaN/inf as None and numpy scalars as Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
