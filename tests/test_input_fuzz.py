"""Property-based (issue 20): random model folders and random store files never give a traceback.

A model folder is the zoo's classifier with its ``config.json`` replaced by random JSON or random bytes,
its tokenizer files kept or removed and weight files added or removed; planning a run on it gives a plan
or one clean WorkbenchError line, and never loads weights. A store file is random bytes, a SQLite file
with other tables, or a real store whose cells were overwritten with random values; opening and reading
it gives rows (damaged ones left out, with a warning) or one clean StoreError line, and the file is left
byte for byte as it was when the open is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from workbench import runner
from workbench.errors import WorkbenchError
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.store import JSON_COLUMNS, Store

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
CONFIG_KEYS = st.sampled_from(["architectures", "model_type", "num_labels", "id2label", "label2id",
                               "max_position_embeddings", "n_positions", "vocab_size", "hidden_size"])
CONFIGS = st.one_of(
    st.dictionaries(CONFIG_KEYS, JSON_VALUES, max_size=5).map(lambda d: json.dumps(d).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)


pytestmark = pytest.mark.usefixtures("no_weight_loading")  # validation never loads a model (conftest)


@FUZZ
@given(config=CONFIGS, keep_base=st.booleans(), tokenizer=st.booleans(),
       weights=st.sampled_from(["safetensors", "pickle", "both", "none"]))
def test_random_model_folders_are_a_plan_or_one_clean_error(quick_zoo, tmp_path_factory, config, keep_base,
                                                            tokenizer, weights):
    folder = tmp_path_factory.mktemp("model")
    shutil.copytree(quick_zoo / "code-classifier", folder, dirs_exist_ok=True)
    if keep_base:  # the real config with random keys merged in: the deeper checks are reached too
        try:
            extra = json.loads(config)
        except ValueError:
            extra = None
        if isinstance(extra, dict):
            base = json.loads((folder / "config.json").read_text())
            config = json.dumps({**base, **extra}).encode()
    (folder / "config.json").write_bytes(config)
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    if weights in ("pickle", "both"):
        (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    if weights in ("pickle", "none"):
        (folder / "model.safetensors").unlink()
    spec = RunSpec(ModelSpec(str(folder)), WorkloadSpec("code-snippets", max_items=2), TechniqueSpec("baseline"))
    try:
        runner.plan(spec)
    except WorkbenchError as err:
        assert str(err) and "\n" not in str(err) and "Traceback" not in str(err)
        event(f"refused: {type(err).__name__}")
        return
    event("planned")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "-"


@pytest.fixture(scope="module")
def real_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "real.sqlite"
    with Store(f"sqlite:///{path}") as store:
        for i in range(4):
            store.append({"spec_key": f"k{i}", "status": "ok", "model": "m", "workload": "w", "technique": "baseline",
                          "device": "cpu", "dtype": "float32", "seed": i, "repeats": 1, "warmup": 0,
                          "summary": {"i": i}})
    return path


CELLS = st.one_of(st.text(max_size=16), st.binary(max_size=16), st.integers(-2**63, 2**63 - 1), st.floats(),
                  st.none())


@FUZZ
@given(kind=st.sampled_from(["bytes", "foreign", "cells"]), noise=st.binary(min_size=0, max_size=256),
       column=st.sampled_from(sorted(JSON_COLUMNS) + ["created_at", "seed", "status", "speedup"]),
       row=st.integers(0, 3), cell=CELLS)
def test_random_store_files_read_or_refuse_in_one_line(real_store, tmp_path_factory, kind, noise, column, row, cell):
    path = tmp_path_factory.mktemp("fuzz") / "store.sqlite"
    if kind == "bytes":
        path.write_bytes(noise)
    elif kind == "foreign":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE notes (body BLOB)")
            conn.execute("INSERT INTO notes VALUES (?)", (noise,))
        conn.close()
    else:
        shutil.copy(real_store, path)
        conn = sqlite3.connect(path)
        try:
            run_id = conn.execute("SELECT run_id FROM runs ORDER BY seed LIMIT 1 OFFSET ?", (row,)).fetchone()[0]
            with conn:
                conn.execute(f"UPDATE runs SET {column} = ? WHERE run_id = ?", (cell, run_id))
        except sqlite3.IntegrityError:  # NULL in a NOT NULL column: SQLite itself refuses that damage
            assume(False)
        finally:
            conn.close()
    before = _digest(path)
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            with Store(f"sqlite:///{path}", create=False) as store:
                frame = store.runs()
                store.count()
    except WorkbenchError as err:
        assert str(err) and "\n" not in str(err)
        if kind != "cells":
            assert _digest(path) == before, "a refused file was changed"
        event(f"refused {kind}")
        return
    assert len(frame) <= 4
    event(f"read {kind}: {len(frame)} rows")
