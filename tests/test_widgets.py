"""The JupyterLab panels, driven as a user would: set values, click, wait, read what appears.

The test process stands in for the kernel: a crashing run must leave it alive and the next run working.
Runs are tiny (2 inputs, 4 new tokens, 1 repeat) on the quick zoo.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from workbench.store import Store

TINY = {"max_items": 2, "max_new_tokens": 4, "repeats": 1}


def filled_store(folder: Path) -> str:
    """A store with real quick-zoo runs (two models, three techniques), built once per data folder."""
    from workbench import runner
    from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec

    path = folder / "widgets-filled.sqlite"
    url = f"sqlite:///{path}"
    if path.exists() and Store(url).count(status="ok") >= 3:
        return url
    store = Store(url)
    lm = WorkloadSpec("code-prompts", max_items=2, max_new_tokens=4)
    specs = [
        RunSpec(ModelSpec("zoo:code-target"), lm, TechniqueSpec("quantization"), repeats=1),
        RunSpec(ModelSpec("zoo:code-target"), lm, TechniqueSpec("speculative", draft=ModelSpec("zoo:code-draft")),
                repeats=1),
        RunSpec(ModelSpec("zoo:code-classifier"), WorkloadSpec("code-snippets", max_items=4),
                TechniqueSpec("quantization"), repeats=1),
    ]
    for spec in specs:
        runner.run(spec, store=store, progress=False)
    return url


@pytest.fixture(scope="module")
def store_url(quick_zoo: Path, data_dir: Path) -> str:
    return filled_store(data_dir)


@pytest.fixture
def empty_store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'panel.sqlite'}"


def _click_and_wait(panel, timeout_s: float = 240.0) -> list[float]:
    """Click Run and wait, recording the progress bar; the kernel stand-in keeps working meanwhile."""
    seen = []
    panel.run_button.click()
    deadline = time.monotonic() + timeout_s
    while panel.running and time.monotonic() < deadline:
        seen.append(panel.progress.value)
        time.sleep(0.25)
    assert not panel.running, "the run did not finish in time"
    return seen


def test_controls_follow_the_technique(quick_zoo: Path, empty_store: str) -> None:
    from workbench import techniques
    from workbench.widgets import compare

    panel = compare(store=empty_store)
    assert "zoo:code-target" in panel.model.options
    for name in techniques.names():
        panel.technique.value = name
        cls = techniques.get(name)
        assert set(panel.param_widgets) == set(cls.params)
        assert (panel.draft.layout.display != "none") == cls.takes_draft
    panel.technique.value = "speculative"
    panel.param_widgets["num_assistant_tokens"].value = 2
    panel.model.value = "zoo:code-target"
    spec = panel.spec()
    assert spec.technique.param_dict == {"num_assistant_tokens": 2}
    assert spec.technique.draft.name == "zoo:code-draft"


def test_errors_in_callbacks_are_shown_in_the_panel(quick_zoo: Path, empty_store: str) -> None:
    from workbench.widgets import compare

    panel = compare(store=empty_store, model="zoo:code-target", technique="quantization", **TINY)
    panel.workload.value = "no-such-workload.jsonl"
    _click_and_wait(panel, 60)
    panel.repeats.value = 1
    panel.model.value = ""  # the spec rejects it inside the click callback
    panel.run_button.click()
    assert len(panel.errors) == 2, panel.errors
    shown = " ".join(str(o["data"].get("text/plain")) for o in panel.output.outputs)
    assert "error in the run" in shown and "error in Run" in shown and "empty" in shown
    assert Store(empty_store).count() == 0  # a bad setting stores nothing


def test_compare_runs_in_a_worker_shows_table_figures_and_stores(quick_zoo: Path, empty_store: str) -> None:
    from workbench.widgets import compare

    panel = compare(store=empty_store, model="zoo:code-target", technique="speculative", **TINY)
    seen = _click_and_wait(panel)
    assert panel.errors == []
    assert any(0.0 < v < 1.0 for v in seen), seen  # the bar moved during the run
    assert panel.progress.value == 1.0
    result = panel.last_result
    assert result.status == "ok", result.failure_reason
    assert result.internals["worker"]["pid"] != os.getpid()  # measured outside the "kernel"
    assert "workbench-run-table" in panel.table.value and "speculative" in panel.table.value
    assert {"latency", "speedup", "quality", "memory", "internals"} <= set(panel.figures)
    assert len(panel.figures["latency"].data) == 2  # baseline and technique
    assert panel.figures["internals"].layout.title.text.startswith("Acceptance")
    assert len(panel.output.outputs) == len(panel.figures)
    stored = Store(empty_store).runs()
    assert stored["run_id"].tolist() == [result.run_id] and stored["status"].tolist() == ["ok"]


def test_a_crashing_run_is_failed_and_the_next_run_works(quick_zoo: Path, empty_store: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.widgets import compare

    panel = compare(store=empty_store, model="zoo:code-classifier", workload="code-snippets",
                    technique="quantization", **TINY)
    monkeypatch.setenv("WORKBENCH_FAULT_INJECT", "segfault:0")
    _click_and_wait(panel)
    assert panel.last_result.status == "failed"
    assert "SIGSEGV" in panel.last_result.failure_reason
    assert "workbench-failed" in panel.table.value and "SIGSEGV" in panel.table.value
    monkeypatch.delenv("WORKBENCH_FAULT_INJECT")
    _click_and_wait(panel)  # the kernel stand-in is alive and the panel still works
    assert panel.last_result.status == "ok", panel.last_result.failure_reason
    assert Store(empty_store).runs()["status"].tolist() == ["failed", "ok"]


def test_stop_kills_the_worker_and_stores_nothing(quick_zoo: Path, empty_store: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.widgets import compare

    monkeypatch.setenv("WORKBENCH_FAULT_INJECT", "hang:0")
    panel = compare(store=empty_store, model="zoo:code-classifier", workload="code-snippets",
                    technique="quantization", **TINY)
    panel.run_button.click()
    deadline = time.monotonic() + 120
    while (panel.job is None or panel.job.phase != "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    job = panel.job
    assert job is not None and job.phase == "running"
    panel.stop_button.click()
    assert panel.wait(30)
    assert not job._process.is_alive()
    assert "stopped" in panel.status.value and panel.last_result is None
    assert Store(empty_store).count() == 0
    assert not panel.run_button.disabled and panel.stop_button.disabled


def test_history_filters_compares_and_plots_the_frontier(store_url: str) -> None:
    from workbench.widgets import history

    panel = history(store=store_url)
    assert len(panel.table) >= 3 and panel.errors == []
    panel.technique.value = "quantization"
    assert set(panel.table["technique"]) == {"quantization"} and len(panel.table) >= 2
    panel.model.value = "zoo:code-target"
    assert set(panel.table["model"]) == {"zoo:code-target"}
    panel.model.value = "(all)"
    panel.runs.value = tuple(value for _, value in panel.runs.options[:2])
    panel.compare_button.click()
    assert panel.selected_table.shape[1] == 2 and "speedup" in panel.selected_table.index
    assert "workbench-selected" in panel.compare_html.value
    scatter = [t for t in panel.figure.data if t.mode == "markers"]
    assert sum(len(t.x) for t in scatter) == len(panel.table)
    panel.runs.value = ()
    panel.compare_button.click()
    assert panel.errors and "no runs selected" in panel.errors[-1]


def test_advisor_trains_explains_and_answers_what_if(store_url: str) -> None:
    from workbench.widgets import advisor

    panel = advisor(store=store_url)
    assert panel.errors == [], panel.errors
    assert not panel.evaluation.empty and "workbench-evaluation" in panel.evaluation_html.value
    assert {"importance", "partial_dependence"} <= set(panel.figures)
    assert "threads" in panel.sliders and panel.recommendation is not None
    before = panel.recommendation
    panel.sliders["threads"].value = panel.sliders["threads"].value + 3
    assert panel.recommendation is not before  # recomputed on the change
    assert "recommendation:" in panel.recommendation_html.value
    assert int(panel.recommendation.context["threads"]) == panel.sliders["threads"].value
