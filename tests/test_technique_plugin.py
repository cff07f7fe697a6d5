"""A new technique is one file: tests/plugins/magnitude_pruning.py, registered through WORKBENCH_TECHNIQUES
with no edit anywhere else, runs through `workbench run`, a sweep, the store, `workbench learn`, the
report and the compare panel, with its quality metric shown by name and unit."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from workbench.store import Store
from workbench.techniques import base

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).resolve().parent / "plugins" / "magnitude_pruning.py"
NAME = "magnitude_pruning"
METRIC_TEXT = re.compile(r"linear weights zeroed \d+(\.\d+)? %")  # label, value, unit

SWEEP = """
name: pruning-vs-int8
models: [zoo:code-draft]
workloads: [{name: code-prompts, max_items: 2, max_new_tokens: 4}]
techniques:
  - {name: magnitude_pruning, params: {sparsity: 0.6}}
  - {name: quantization, params: {scheme: int8-dynamic}}
repeats: 2
timeout_per_run_s: 300
"""


@pytest.fixture
def plugin_env(cli_env: dict[str, str]) -> dict[str, str]:
    return {**cli_env, base.PLUGINS_ENV: str(PLUGIN)}


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch):
    """The plugin registered in this process too (as a kernel that has the variable set would)."""
    monkeypatch.setenv(base.PLUGINS_ENV, str(PLUGIN))
    yield base.get(NAME)
    base._REGISTRY.pop(NAME, None)
    base._LOADED_PLUGINS.discard(str(PLUGIN))


def test_nothing_outside_the_plugin_file_names_it():
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "workbench").rglob("*") if p.is_file()
            and p.suffix in (".py", ".ipynb") and NAME in p.read_text(encoding="utf-8")]
    assert hits == []


def _cli(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(os.sys.executable)), "-m", "workbench.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_technique_in_one_file_runs_through_run_sweep_store_learn_and_report(quick_zoo, plugin_env, registered,
                                                                                tmp_path):
    url = f"sqlite:///{tmp_path / 'plugin.sqlite'}"
    # 1. `workbench run`: the table shows the plugin's metric by name and unit.
    done = _cli(plugin_env, "run", "--model", "zoo:code-classifier", "--technique", NAME, "--workload",
                "code-snippets", "--max-items", "8", "--batch-size", "4", "--repeats", "2", "--param",
                "sparsity=0.5", "--store", url, "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert METRIC_TEXT.search(done.stdout), done.stdout
    assert "dense kernels still multiply them" in done.stdout  # its headline
    # 2. A sweep: every run in its own worker, which imports the plugin from the same variable.
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(SWEEP)
    done = _cli(plugin_env, "sweep", str(sweep_file), "--store", url, "--quiet")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 ok, 0 failed" in done.stdout
    # 3. The store: the typed report's fields as columns.
    runs = Store(url).runs(technique=NAME)
    assert list(runs["status"]) == ["ok"] * 2
    for metrics, features, lossless in zip(runs["quality_metrics"], runs["technique_features"], runs["lossless"]):
        assert metrics == [{"name": "weights_zeroed_percent", "value": metrics[0]["value"], "unit": "%",
                            "higher_is_better": None, "label": "linear weights zeroed", "headline": True}]
        assert features["step_policy"].startswith("sparsity=") and not lossless
    # 4. `workbench learn`: its configurations are candidates, described by its own features.
    done = _cli(plugin_env, "learn", "--store", url, "--out", str(tmp_path / "learner.skops"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 contexts, 3 configurations, 2 models" in done.stdout, done.stdout
    from workbench.meta import features

    table = features.training_table(features.run_features(Store(url).runs()))
    mine = table[table["technique"] == NAME]
    assert set(mine["configuration"]) == {f"{NAME}[sparsity=0.5]", f"{NAME}[sparsity=0.6]"}
    assert set(mine["step_policy"]) == {"sparsity=0.5", "sparsity=0.6"}
    # 5. The report: its runs, by name, with the metric in words.
    html_path = tmp_path / "report.html"
    done = _cli(plugin_env, "report", "--store", url, "--since", "1d", "--out", str(html_path), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    html = html_path.read_text(encoding="utf-8")
    assert NAME in html and METRIC_TEXT.search(html)


def test_the_compare_panel_runs_it_in_a_worker(quick_zoo, registered, tmp_path):
    import time

    from workbench.widgets import compare

    panel = compare(store=f"sqlite:///{tmp_path / 'panel.sqlite'}", model="zoo:code-classifier",
                    workload="code-snippets", technique=NAME, repeats=1, max_items=4)
    assert set(panel.param_widgets) == {"sparsity"}
    panel.run_button.click()
    deadline = time.monotonic() + 240
    while panel.running and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not panel.running and panel.errors == []
    assert panel.last_result.status == "ok", panel.last_result.failure_reason
    assert METRIC_TEXT.search(panel.table.value), panel.table.value
    stored = Store(f"sqlite:///{tmp_path / 'panel.sqlite'}").runs()
    assert list(stored["technique"]) == [NAME]
    assert json.loads(json.dumps(stored["quality_metrics"][0]))[0]["unit"] == "%"


def test_a_plugin_that_cannot_be_imported_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path):
    from workbench.errors import WorkbenchError

    missing = tmp_path / "nowhere.py"
    monkeypatch.setenv(base.PLUGINS_ENV, str(missing))
    with pytest.raises(WorkbenchError, match="cannot be imported") as err:
        base.names()
    assert "\n" not in str(err.value) and str(missing) in str(err.value)
    monkeypatch.delenv(base.PLUGINS_ENV)
    base._LOADED_PLUGINS.discard(str(missing))
