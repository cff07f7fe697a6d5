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


def test_a_setting_change_clears_the_results_and_says_press_run(quick_zoo: Path, empty_store: str) -> None:
    from workbench.widgets import compare

    panel = compare(store=empty_store, model="zoo:code-target", technique="speculative", **TINY)
    assert panel.status.value == "ready: press Run"  # presetting the controls is no change
    panel.max_items.value = 3
    assert panel.status.value == "settings changed: press Run"
    _click_and_wait(panel)
    assert panel.last_result.status == "ok" and "workbench-run-table" in panel.table.value and panel.figures
    panel.param_widgets["num_assistant_tokens"].value = 2  # a technique's own control counts too
    assert panel.status.value == "settings changed: press Run"
    assert panel.table.value == "" and panel.figures == {} and panel.output.outputs == ()
    assert panel.last_result is not None  # the data stays; only the display goes


def test_a_bad_input_is_one_line_beside_run_and_clears_the_old_results(quick_zoo: Path, empty_store: str,
                                                                        tmp_path: Path) -> None:
    import shutil

    from workbench.widgets import compare

    # 1. A run from a model folder that then disappears: the next Run fails validation, nothing is stale.
    folder = tmp_path / "my-classifier"
    shutil.copytree(quick_zoo / "code-classifier", folder)
    panel = compare(store=empty_store, model=str(folder), workload="code-snippets", technique="quantization",
                    **TINY)
    _click_and_wait(panel)
    assert panel.last_result.status == "ok" and "workbench-run-table" in panel.table.value
    shutil.rmtree(folder)
    _click_and_wait(panel, 60)
    assert panel.table.value == "" and panel.figures == {} and panel.output.outputs == ()
    assert len(panel.errors) == 1 and "\n" not in panel.errors[0] and str(folder) in panel.errors[0]
    assert "workbench-error" in panel.error.value and "see the line below" in panel.status.value
    # 2. The status and the error line sit right under the Run button, before any result.
    children = list(panel.widget.children)
    buttons = next(i for i, c in enumerate(children) if panel.run_button in getattr(c, "children", ()))
    assert children[buttons + 1:buttons + 3] == [panel.status, panel.error]
    assert children.index(panel.table) > buttons + 2
    # 3. An unknown model and a bad technique parameter name themselves; the spec's own check too.
    panel.technique.value = "speculative"
    panel.model.value = "zoo:nope"
    _click_and_wait(panel, 60)
    assert "unknown zoo model 'nope'" in panel.errors[-1] and "code-target" in panel.errors[-1]
    panel.model.value = "zoo:code-target"
    panel.param_widgets["num_assistant_tokens"].value = 0
    _click_and_wait(panel, 60)
    assert "num_assistant_tokens=0" in panel.errors[-1] and "num_assistant_tokens=0" in panel.error.value
    panel.model.value = ""  # the spec rejects it inside the click callback
    panel.run_button.click()
    assert panel.errors[-1].startswith("error in Run") and "empty" in panel.errors[-1]
    assert not panel.run_button.disabled  # usable again
    assert Store(empty_store).count() == 1  # bad settings store nothing


def test_compare_runs_in_a_worker_counts_calls_and_shows_a_narrow_table(quick_zoo: Path, empty_store: str) -> None:
    from workbench.widgets import compare
    from workbench.widgets.tables import KEY_COLUMNS

    # 1. Enough calls (4 inputs x (1 warm-up + 3 repeats) x 2 variants) for the bar to move in steps.
    panel = compare(store=empty_store, model="zoo:code-target", technique="speculative", max_items=4,
                    max_new_tokens=16, repeats=3)
    panel.run_button.click()
    seen, statuses = [], set()
    deadline = time.monotonic() + 240
    while panel.running and time.monotonic() < deadline:
        job = panel.job
        if job is not None and job.calls_total is not None:
            seen.append((job.calls_done, job.calls_total, panel.progress.value))
        statuses.add(panel.status.value.split(" (")[0])
        time.sleep(0.05)
    assert not panel.running and panel.errors == []
    # 2. The bar followed the worker's calls, not a clock.
    assert {total for _, total, _ in seen} == {32}
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and len(set(done)) >= 3, seen
    assert any(s.startswith("measuring: ") and s.endswith("/32 calls") for s in statuses), statuses
    assert panel.progress.value == 1.0 and "32/32 calls" in panel.status.value
    # 3. The result: measured in another process, stored, a table of the key columns in words.
    result = panel.last_result
    assert result.status == "ok", result.failure_reason
    assert result.internals["worker"]["pid"] != os.getpid()  # measured outside the "kernel"
    key = panel.table.value.split("more figures")[0]
    assert "workbench-run-table" in key and all(f"<th>{c}</th>" in key for c in KEY_COLUMNS)
    assert "speculative decoding (draft zoo:code-draft)" in key and "latency_median_ms" not in panel.table.value
    assert result.run_id[:8] in panel.status.value and result.run_id not in panel.status.value
    assert {"latency", "speedup", "quality", "memory", "internals"} <= set(panel.figures)
    assert len(panel.figures["latency"].data) == 2  # baseline and technique
    assert panel.figures["internals"].layout.title.text.startswith("Acceptance")
    assert len(panel.output.outputs) == len(panel.figures)
    stored = Store(empty_store).runs()
    assert stored["run_id"].tolist() == [result.run_id] and stored["status"].tolist() == ["ok"]


def test_run_tables_put_the_key_columns_first_in_words(store_url: str) -> None:
    from workbench.widgets.figures import result_from_row
    from workbench.widgets.tables import KEY_COLUMNS, run_tables

    row = Store(store_url).runs(technique="quantization", model="zoo:code-target").to_dict(orient="records")[0]
    key, more = run_tables(result_from_row(row))
    assert key.columns.tolist() == KEY_COLUMNS
    assert key["variant"].tolist() == ["baseline", "int8 dynamic quantization"]
    assert key["speedup (95% CI)"].iloc[0] == "1x (reference)"
    assert key["speedup (95% CI)"].iloc[1].split("x")[0] == f"{row['speedup']:.3g}"
    assert "perplexity" in key["quality"].iloc[1]
    assert "tokens/s" in more.columns and "peak memory (MB)" in more.columns


def test_the_quality_figure_puts_each_unit_on_its_own_axis(store_url: str) -> None:
    from workbench.widgets.figures import quality_figure, result_from_row

    row = Store(store_url).runs(technique="quantization", model="zoo:code-target").to_dict(orient="records")[0]
    fig = quality_figure(result_from_row(row))
    axes = {trace.name: trace.yaxis for trace in fig.data}
    assert set(axes) == {"perplexity", "agreement"} and axes["perplexity"] != axes["agreement"]
    titles = [fig.layout[name].title.text for name in ("yaxis", "yaxis2")]
    assert "perplexity" in titles[0] and "fraction" in titles[1] and "1 = identical" in titles[1]
    assert max(fig.data[0].y) > 50 and max(fig.data[1].y) <= 1.0  # the reason they may not share an axis


def test_a_crashing_run_is_failed_and_the_next_run_works(quick_zoo: Path, empty_store: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.widgets import compare

    panel = compare(store=empty_store, model="zoo:code-classifier", workload="code-snippets",
                    technique="quantization", **TINY)
    monkeypatch.setenv("WORKBENCH_FAULT_INJECT", "segfault:0")
    _click_and_wait(panel)
    assert panel.last_result.status == "failed"
    assert "SIGSEGV" in panel.last_result.failure_reason
    assert "workbench-failed" in panel.error.value and "SIGSEGV" in panel.error.value  # beside Run
    assert panel.table.value == ""
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
    assert panel.errors and "no runs selected" in panel.errors[-1] and "no runs selected" in panel.error.value


def test_history_is_paged_sorted_and_readable(store_url: str) -> None:
    import re

    from workbench.widgets import history
    from workbench.widgets.history import PAGE_COLUMNS

    # 1. Pages of 2 over the stored runs: previous/next move through them, the ends are disabled.
    panel = history(store=store_url, page_size=2)
    total = len(panel.table)
    assert total >= 3 and panel.pages == -(-total // 2)
    assert len(panel.page_rows) == 2 and "page 1 of" in panel.page_label.value and panel.prev_button.disabled
    panel.next_button.click()
    assert panel.page == 1 and len(panel.page_rows) == min(2, total - 2) and not panel.prev_button.disabled
    for _ in range(panel.pages):
        panel.next_button.click()
    assert panel.page == panel.pages - 1 and panel.next_button.disabled
    # 2. Sorted by speedup, highest first, then lowest first; sorting goes back to page 1.
    panel.sort_by.value = "speedup"
    assert panel.page == 0
    speedups = panel.table["speedup"].sort_values(ascending=False).map(lambda v: f"{v:.3g}").tolist()
    assert [s.split("x")[0] for s in panel.page_rows["speedup (95% CI)"]] == speedups[:2]
    panel.order.value = "ascending"
    assert [s.split("x")[0] for s in panel.page_rows["speedup (95% CI)"]] == speedups[::-1][:2]
    # 3. Key columns first, in words: times to the minute, 8-character ids, configurations and machines named.
    panel.sort_by.value = "time"
    assert panel.page_rows.columns.tolist() == [c for c in PAGE_COLUMNS if c not in ("status", "machine")]
    assert re.search(r"all on \d+-core .+ \(cpu\)", panel.page_label.value)  # one machine: said once
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", t) for t in panel.page_rows["when (UTC)"])
    assert all(len(r) == 8 for r in panel.page_rows["run"])
    assert set(panel.table["configuration"]) >= {"int8 dynamic quantization",
                                                  "speculative decoding (draft zoo:code-draft)"}
    assert all("(cpu)" in m and not re.fullmatch(r"[0-9a-f]{16}", m) for m in panel.table["machine"])
    assert "workbench-history" in panel.table_html.value
    assert panel.table["run_id"].iloc[0] not in panel.table_html.value
    assert [label for label, _ in panel.technique.options] == ["(all)", "quantization",
                                                                "speculative decoding"]


def _trained(panel, timeout_s: float = 300.0):
    assert panel.wait(timeout_s), "training did not finish in time"
    return panel


def test_advisor_trains_in_the_background_and_answers_what_if(store_url: str) -> None:
    from workbench.widgets import advisor

    # 1. The panel comes back at once, training in a background thread with a step-by-step status.
    panel = advisor(store=store_url)
    assert panel.training and panel.evaluation.empty and panel.status.value.startswith("training: step")
    assert panel.train_button.disabled and not panel.cancel_button.disabled
    _trained(panel)
    assert panel.errors == [], panel.errors
    assert panel.status.value.startswith("trained a boosting meta-learner")
    assert not panel.train_button.disabled and panel.cancel_button.disabled
    assert not panel.evaluation.empty and "workbench-evaluation" in panel.evaluation_html.value
    assert {"importance", "partial_dependence"} <= set(panel.figures)
    # 2. What if: sliders re-run the recommendation.
    assert "threads" in panel.sliders and panel.recommendation is not None
    before = panel.recommendation
    panel.sliders["threads"].value = panel.sliders["threads"].value + 3
    assert panel.recommendation is not before  # recomputed on the change
    assert "recommendation:" in panel.recommendation_html.value
    assert int(panel.recommendation.context["threads"]) == panel.sliders["threads"].value
    # 3. Outside the training range and where a technique refuses: warned, and never recommended.
    panel.context.value = next(value for label, value in panel.context.options if "code-prompts" in label)
    assert not any("not applicable" in w for w in panel.warnings), panel.warnings  # batch 1: all apply
    assert "speculative" in set(panel.recommendation.candidates["configuration"].str.split("[").str[0])
    panel.sliders["batch_size"].value = 39
    warnings = " | ".join(panel.warnings)
    assert "batch size 39 is outside the measured 1-1" in warnings
    assert "not applicable at these settings: speculative decoding (draft zoo:code-draft)" in warnings
    assert "batch size 1 only" in warnings
    assert not panel.recommendation.configuration.startswith("speculative")
    assert panel.warnings_html.value.count("workbench-warning") == len(panel.warnings)


def test_advisor_bad_budget_is_one_line_beside_train_and_the_panel_stays_usable(store_url: str) -> None:
    from workbench.widgets import advisor

    panel = advisor(store=store_url, budget="perplexity<=banana")
    assert not panel.training and panel.learner is None
    assert len(panel.errors) == 1 and "banana" in panel.errors[0] and "\n" not in panel.errors[0]
    assert "banana" in panel.error.value and "training not started" in panel.status.value
    assert not panel.train_button.disabled
    children = list(panel.widget.children)
    buttons = next(i for i, c in enumerate(children) if panel.train_button in getattr(c, "children", ()))
    assert children[buttons + 1:buttons + 3] == [panel.status, panel.error]
    panel.budget.value = "lossless"
    panel.train_button.click()
    assert panel.error.value == "" and panel.training
    _trained(panel)
    assert len(panel.errors) == 1 and panel.learner is not None and panel.recommendation is not None


def test_advisor_cancel_discards_the_training_and_frees_the_panel(store_url: str) -> None:
    from workbench.widgets import advisor

    panel = advisor(store=store_url)
    assert panel.training
    panel.cancel_button.click()
    assert not panel.training and not panel.train_button.disabled and panel.cancel_button.disabled
    assert "cancelled" in panel.status.value
    _trained(panel)  # the thread stops at its next step
    assert panel.learner is None and panel.evaluation.empty and panel.errors == []
    assert "cancelled" in panel.status.value
