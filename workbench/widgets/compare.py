"""The compare panel: pick a model, workload and technique, press Run, get the side-by-side result.

The run executes in its own worker process (:class:`workbench.worker.IsolatedRun`), polled from a
background thread, so the kernel stays responsive, a crash or an out-of-memory kill marks only that
run failed, and Stop really kills the worker. Every finished run (ok or failed) is appended to the
store; a stopped run is not stored.

Example:
    >>> from workbench.widgets import compare
    >>> panel = compare(store="sqlite:////tmp/example.sqlite", model="zoo:code-target",
    ...                 technique="quantization", max_items=2, max_new_tokens=4, repeats=1)  # doctest: +SKIP
    >>> panel.run_button.click(); panel.wait(300)  # doctest: +SKIP
    >>> panel.last_result.status, sorted(panel.figures)  # doctest: +SKIP
    ('ok', ['latency', 'memory', 'quality', 'speedup'])
"""

from __future__ import annotations

import html
import os
import threading
import time
from pathlib import Path
from typing import Any

import ipywidgets as W

from workbench.widgets._common import (error_line, figure_bundle, open_store, show, show_error, shows_errors,
                                       status_line, table_html)

_DEFAULT = "(default)"
_STYLE = {"description_width": "150px"}


def _wide() -> W.Layout:
    """A fresh Layout per control (a Layout made at import time is never shown by the front end)."""
    return W.Layout(width="420px")


def model_choices(zoo_root: str | Path | None = None) -> list[str]:
    """Zoo models (``zoo:NAME``), then Hugging Face ids found in the model caches; free text is allowed too."""
    from workbench.models import zoo
    from workbench.paths import cache_dir

    names = [f"zoo:{r.name}" for r in zoo.list_models(zoo_root)]
    caches = [cache_dir(), Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache" / "huggingface" / "hub"))]
    for folder in caches:
        if folder.is_dir():
            names += sorted(p.name[len("models--"):].replace("--", "/") for p in folder.glob("models--*")
                            if p.is_dir())
    return list(dict.fromkeys(names))


def param_widget(name: str, param: Any) -> W.Widget:
    """A control for one technique :class:`~workbench.techniques.base.Param` (its help as the tooltip)."""
    common = {"description": name, "tooltip": param.help, "style": _STYLE, "layout": _wide()}
    if param.choices:
        options = ([_DEFAULT] if param.default is None else []) + [str(c) for c in param.choices]
        return W.Dropdown(options=options, value=_DEFAULT if param.default is None else str(param.default), **common)
    if param.type is bool:
        return W.Checkbox(value=bool(param.default), indent=False, **common)
    if param.default is None or param.type is str:
        return W.Text(value="" if param.default is None else str(param.default), placeholder=_DEFAULT, **common)
    if param.type is int:
        return W.IntText(value=param.default, **common)
    return W.FloatText(value=param.default, **common)


def param_value(widget: W.Widget, param: Any) -> Any:
    """The control's value as the parameter's type; empty text or '(default)' gives None."""
    value = widget.value
    if value in ("", _DEFAULT):
        return None
    if isinstance(value, str) and param.type in (int, float):
        return param.type(value)
    if param.choices and param.type is not str:
        return param.type(value)
    return value


class ComparePanel:
    """Controls, progress, results table and figures of one comparison at a time.

    Attributes a test (or a notebook) drives: ``model``, ``workload``, ``technique``, ``param_widgets``
    (name -> control of the chosen technique), ``draft``, ``repeats``, ``max_items``, ``max_new_tokens``,
    ``steps``, ``device``, ``dtype``, ``run_button``, ``stop_button``, ``progress`` (calls done of all),
    ``status`` and ``error`` (the latest error line), both right under the buttons, ``table`` (HTML of the
    side-by-side table), ``output`` (figures); after a run ``last_row`` (the stored row), ``last_result``
    (a RunResult), ``figures`` (name -> plotly Figure), ``history`` (every finished run) and ``errors``
    (every error line shown). Pressing Run, or changing any setting, clears the previous run's table and
    figures, so what is shown always belongs to the settings shown.
    """

    def __init__(self, store: Any = None, model: str | None = None, workload: str = "code-prompts",
                 technique: str = "speculative", draft: str | None = None, repeats: int = 3,
                 max_items: int = 4, max_new_tokens: int = 16, steps: int = 20, device: str = "cpu",
                 params: dict[str, Any] | None = None, timeout_s: float | None = 600.0,
                 max_memory_gb: float | None = None) -> None:
        from workbench import techniques
        from workbench.specs import DTYPES
        from workbench.workloads import BUILTIN
        from workbench.worker import WorkerLimits

        self.store = open_store(store)
        self.limits = WorkerLimits(timeout_s=timeout_s, max_memory_gb=max_memory_gb)
        self.errors: list[str] = []
        self.history: list[Any] = []
        self.last_row: dict[str, Any] | None = None
        self.last_result: Any = None
        self.figures: dict[str, Any] = {}
        self.job: Any = None  # the IsolatedRun in flight
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop_requested = False
        self._building = True  # presetting the controls is not a change of settings
        # 1. Controls.
        models = model_choices()
        self.model = W.Combobox(value=model or (models[0] if models else ""), options=models, ensure_option=False,
                                placeholder="zoo:NAME, a Hugging Face id or a folder", description="model",
                                style=_STYLE, layout=_wide())
        self.workload = W.Combobox(value=workload, options=list(BUILTIN), ensure_option=False,
                                   placeholder="built-in name or a .jsonl path", description="workload",
                                   style=_STYLE, layout=_wide())
        self.technique = W.Dropdown(options=techniques.names(), value=technique, description="technique",
                                    style=_STYLE, layout=_wide())
        self.draft = W.Combobox(value=draft or ("zoo:code-draft" if "zoo:code-draft" in models else ""),
                                options=models, ensure_option=False, description="draft model", style=_STYLE,
                                layout=_wide())
        self.repeats = W.BoundedIntText(value=repeats, min=1, max=1000, description="repeats", style=_STYLE)
        self.max_items = W.BoundedIntText(value=max_items, min=1, max=100000, description="inputs (max)",
                                          style=_STYLE)
        self.max_new_tokens = W.BoundedIntText(value=max_new_tokens, min=1, max=100000,
                                               description="new tokens (max)", style=_STYLE)
        self.steps = W.BoundedIntText(value=steps, min=1, max=10000, description="diffusion steps", style=_STYLE)
        self.device = W.Dropdown(options=["cpu", "cuda"], value=device, description="device", style=_STYLE)
        self.dtype = W.Dropdown(options=list(DTYPES), value="float32", description="dtype", style=_STYLE)
        self.param_widgets: dict[str, W.Widget] = {}
        self.params_box = W.VBox()
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, layout=W.Layout(width="300px"))
        self.status = status_line("ready: press Run")
        self.error = error_line()
        self.table = W.HTML(value="", layout=W.Layout(max_width="900px"))
        self.output = W.Output()
        # 2. Wiring: Run and Stop, the technique's own controls, and every setting clears old results.
        self.technique.observe(self._on_technique, names="value")
        self.run_button.on_click(self._on_run)
        self.stop_button.on_click(self._on_stop)
        self._on_technique({"new": technique})
        for key, value in (params or {}).items():
            self.param_widgets[key].value = value
        for control in (self.model, self.workload, self.technique, self.draft, self.repeats, self.max_items,
                        self.max_new_tokens, self.steps, self.device, self.dtype):
            control.observe(self._on_setting, names="value")
        self._building = False
        # 3. Layout: the status and the error line directly under the buttons, results below them.
        self.widget = W.VBox([
            W.HTML("<b>workbench: compare a technique with the baseline</b>"),
            self.model, self.workload, self.technique, self.params_box, self.draft,
            W.HBox([self.repeats, self.max_items]), W.HBox([self.max_new_tokens, self.steps]),
            W.HBox([self.device, self.dtype]),
            W.HBox([self.run_button, self.stop_button, self.progress]), self.status, self.error,
            self.table, self.output,
        ])

    # -- display ---------------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- controls -> spec ------------------------------------------------------------------------
    @shows_errors("choosing the technique")
    def _on_technique(self, change: dict[str, Any]) -> None:
        from workbench import techniques

        cls = techniques.get(change["new"])
        self.param_widgets = {name: param_widget(name, p) for name, p in cls.params.items()}
        for control in self.param_widgets.values():
            control.observe(self._on_setting, names="value")
        self.params_box.children = [W.HTML(f"<i>{html.escape(cls.description)}</i>"), *self.param_widgets.values()]
        self.draft.layout.display = None if cls.takes_draft else "none"

    def _on_setting(self, _change: Any = None) -> None:
        """A setting changed: the shown results no longer describe the settings, so they go."""
        if self._building or self.running:
            return
        self.clear_results()
        self.progress.value, self.progress.bar_style = 0.0, ""
        self.status.value = "settings changed: press Run"

    def clear_results(self) -> None:
        """Remove the previous run's table, figures and error line (``last_result`` keeps its data)."""
        self.table.value, self.error.value = "", ""
        self.figures = {}
        show(self.output, clear=True)

    def _after_error(self, where: str) -> None:
        """After an error line: nothing stale stays on screen, and the status points at the line."""
        self.table.value, self.figures = "", {}
        show(self.output, clear=True)
        self.progress.value, self.progress.bar_style = 0.0, "danger"
        self.status.value = f"error in {where}: see the line below, fix it and press Run"

    def params(self) -> dict[str, Any]:
        """The chosen technique's parameters that differ from their defaults."""
        from workbench import techniques

        declared = techniques.get(self.technique.value).params
        values = {name: param_value(w, declared[name]) for name, w in self.param_widgets.items()}
        return {k: v for k, v in values.items() if v != declared[k].default}

    def spec(self) -> Any:
        """The RunSpec the controls describe (raises a one-line SpecError on a bad value)."""
        from workbench import techniques
        from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec

        takes_draft = techniques.get(self.technique.value).takes_draft
        draft = ModelSpec(self.draft.value.strip()) if takes_draft and self.draft.value.strip() else None
        return RunSpec(
            model=ModelSpec(self.model.value.strip()),
            workload=WorkloadSpec(self.workload.value.strip(), max_items=self.max_items.value,
                                  max_new_tokens=self.max_new_tokens.value, num_inference_steps=self.steps.value),
            technique=TechniqueSpec(self.technique.value, self.params(), draft),
            device=self.device.value, dtype=self.dtype.value, repeats=self.repeats.value,
            labels=(("source", "compare-panel"),))

    # -- run, poll, stop -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @shows_errors("Run")
    def _on_run(self, _button: Any = None) -> None:
        self.run()

    def run(self) -> None:
        """Start the run the controls describe, in a worker polled by a background thread; returns at once."""
        if self.running:
            self.status.value = "a run is in progress: wait for it or press Stop"
            return
        self.clear_results()  # whatever happens next, the previous run's results are gone
        spec = self.spec()  # a bad value raises here, before anything starts
        self._stop_requested = False
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.progress.value, self.progress.bar_style = 0.0, ""
        self.status.value = "checking the settings"
        self._thread = threading.Thread(target=self._run_in_background, args=(spec,), name="workbench-compare",
                                        daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the run in flight ends (for scripts and tests); True when it has ended."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.running

    @shows_errors("Stop")
    def _on_stop(self, _button: Any = None) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill the worker of the run in flight; the run is shown as stopped and not stored."""
        self._stop_requested = True
        with self._lock:  # "stopping" first: the polling thread's "stopped ..." must come after it, never before
            self.status.value = "stopping"
            if self.job is not None:
                self.job.kill("stopped by the user")

    def _run_in_background(self, spec: Any) -> None:
        try:
            self._poll_worker(spec)
        except Exception as exc:  # the thread's exceptions are shown beside the button, never lost
            self.errors.append(show_error(self.error, "the run", exc))
            self._after_error("the run")
        finally:
            with self._lock:
                self.job = None
            self.run_button.disabled, self.stop_button.disabled = False, True

    def _poll_worker(self, spec: Any) -> None:
        from workbench import runner
        from workbench.worker import IsolatedRun

        # 1. Validate cheaply in the kernel (a clear error, nothing stored), then start the worker.
        planned = runner.plan(spec)
        with self._lock:
            if self._stop_requested:
                self.status.value = "stopped before the worker started"
                return
            self.job = job = IsolatedRun(planned, self.limits)
        # 2. Poll: the bar counts the worker's finished calls (warm-up included) until the row comes back.
        while (row := job.poll()) is None:
            self._show_progress(job)
            time.sleep(0.2)
        # 3. Stopped: show it, store nothing. Otherwise store the row (ok or failed) and show it.
        if self._stop_requested:
            self.progress.bar_style = "warning"
            self.status.value = f"stopped after {job.elapsed_s:.1f} s: worker killed, nothing stored"
            return
        if not row.get("environment"):
            from workbench.environment import fingerprint

            row["environment"] = fingerprint(device=spec.device.split(":")[0])
            row["machine_id"] = row["environment"].get("machine_id")
        self.store.append(row)
        self._show_row(row, job)

    def _show_progress(self, job: Any) -> None:
        """Status and bar of a run in flight: starting, loading, then 'measuring: 12/40 calls'."""
        if job.phase == "starting":
            self.status.value = f"starting the worker: {job.elapsed_s:.1f} s (pid {job.pid})"
        elif job.calls_total is None:
            self.status.value = f"loading the model, preparing the technique: {job.elapsed_s:.1f} s (pid {job.pid})"
        elif job.calls_done < job.calls_total:
            self.progress.value = job.calls_done / max(job.calls_total, 1)
            self.status.value = f"measuring: {calls_text(job)} ({job.elapsed_s:.1f} s)"
        else:
            self.progress.value = 1.0
            self.status.value = f"judging quality: {calls_text(job)} timed ({job.elapsed_s:.1f} s)"

    def _show_row(self, row: dict[str, Any], job: Any) -> None:
        from workbench.display import speedup_lines, technique_lines
        from workbench.noise import summary_text as noise_text
        from workbench.widgets.figures import result_from_row, run_figures
        from workbench.widgets.tables import run_tables

        # 1. The data: the result, kept; the bar full.
        result = result_from_row(row)
        self.last_row, self.last_result = row, result
        self.history.append(result)
        self.progress.value = 1.0
        short_id = html.escape(result.run_id[:8])
        # 2. A failed run: its reason where the eye is, as the error line.
        if result.status != "ok":
            self.progress.bar_style = "danger"
            self.figures = {}
            self.status.value = f"run failed after {job.elapsed_s:.1f} s ({calls_text(job)}), stored as run {short_id}"
            self.error.value = (f"<div class='workbench-failed' style='color:#b00020'><b>run failed</b>: "
                                f"{html.escape(result.failure_reason or 'no reason given')}</div>")
            show(self.output, clear=True)
            return
        # 3. An ok run: the key table, the rest folded, the speedup in words, then the figures.
        self.progress.bar_style = "success"
        self.figures = run_figures(result)
        key, more = run_tables(result)
        lines = technique_lines(result)
        noisy = noise_text(result.noise)
        self.status.value = (f"done in {job.elapsed_s:.1f} s: {calls_text(job)}, stored as run {short_id}"
                             + (" (noisy machine)" if noisy else ""))
        self.table.value = (
            table_html(key, "workbench-run-table")
            + (f"<p class='workbench-noisy' style='color:#b00020'><b>{html.escape(noisy)}</b>: speed figures "
               "suspect, rerun when the machine is quiet</p>" if noisy else "")
            + f"<details><summary>more figures</summary>{table_html(more, 'workbench-run-more')}"
            + f"<p>{html.escape('; '.join(speedup_lines(result.comparison)))}</p>"
            + (f"<pre style='white-space:pre-wrap'>{html.escape(chr(10).join(lines))}</pre>" if lines else "")
            + "</details>")
        show(self.output, *[figure_bundle(f) for f in self.figures.values()], clear=True)


def calls_text(job: Any) -> str:
    """``12/40 calls`` from an :class:`~workbench.worker.IsolatedRun`, ``no calls timed`` before any count."""
    if job.calls_total is None:
        return "no calls timed"
    return f"{job.calls_done}/{job.calls_total} calls"


def compare(store: Any = None, **settings: Any) -> ComparePanel:
    """The compare panel (see :class:`ComparePanel`); ``settings`` preset its controls.

    Example:
        >>> panel = compare(model="zoo:code-target", technique="quantization")  # doctest: +SKIP
        >>> panel  # in JupyterLab: the panel  # doctest: +SKIP
    """
    return ComparePanel(store=store, **settings)
