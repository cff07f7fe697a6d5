"""The analyst notebooks run top to bottom under papermill on a fresh kernel, against a filled store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(scope="module")
def store_url(quick_zoo: Path, data_dir: Path) -> str:
    from test_widgets import filled_store

    return filled_store(data_dir)


def _execute(name: str, tmp_path: Path, parameters: dict) -> dict:
    import papermill as pm

    out = tmp_path / name
    pm.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters, kernel_name="python3",
                        cwd=str(tmp_path), progress_bar=False, execution_timeout=300)
    return json.loads(out.read_text())


def _text(notebook: dict) -> str:
    parts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", output
            parts.append(json.dumps(output.get("data", {})) + "".join(output.get("text", "")))
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["01_compare.ipynb", "02_history.ipynb", "03_meta_learner.ipynb"])
def test_first_code_cell_is_tagged_parameters(name: str) -> None:
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert all(len(c["source"]) < 800 for c in code)  # thin: calls into the package


def test_compare_notebook_runs_and_stores(store_url: str, tmp_path: Path) -> None:
    from workbench.store import Store

    store = f"sqlite:///{tmp_path / 'nb.sqlite'}"
    shutil.copy(store_url.removeprefix("sqlite:///"), tmp_path / "nb.sqlite")
    before = Store(store).count()
    text = _text(_execute("01_compare.ipynb", tmp_path, {
        "store": store, "model": "zoo:code-target", "technique": "quantization", "max_items": 2,
        "max_new_tokens": 4, "repeats": 1, "run_now": True}))
    assert "application/vnd.jupyter.widget-view+json" in text
    assert "latency_median_ms" in text and "quantization" in text
    assert Store(store).count(status="ok") == before + 1


def test_history_notebook_runs(store_url: str, tmp_path: Path) -> None:
    text = _text(_execute("02_history.ipynb", tmp_path, {"store": store_url}))
    assert "application/vnd.jupyter.widget-view+json" in text and "speculative" in text


def test_meta_learner_notebook_runs(store_url: str, tmp_path: Path) -> None:
    text = _text(_execute("03_meta_learner.ipynb", tmp_path, {"store": store_url}))
    assert "recommendation" in text and "application/vnd.jupyter.widget-view+json" in text
