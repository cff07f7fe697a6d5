"""The advisor panel: train the meta-learner on the store, show its evaluation and explanation, and a
what-if panel whose sliders re-run the recommendation (with its reasons) on every change.

Training runs in a background thread, so the panel shows at once with a status line (step k of 4), a
Cancel button and, beside the Train button, the one-line error of a bad budget; the what-if part warns
when a slider leaves the training range or a technique refuses the setting (speculative decoding at
batch size 39).

Example:
    >>> from workbench.widgets import advisor
    >>> panel = advisor(store="sqlite:///data/seed/seed.sqlite")  # doctest: +SKIP
    >>> panel.wait(); panel.sliders["threads"].value = 1  # doctest: +SKIP
    >>> panel.recommendation.configuration  # doctest: +SKIP
    'speculative[num_assistant_tokens=4]+zoo:code-draft'
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as W
import pandas as pd

from workbench.names import configuration_name, speedup_text
from workbench.quality import loss_text

from workbench.widgets._common import (error_line, figure_bundle, html_bundle, open_store, show, show_error,
                                       shows_errors, status_line, table_html)

#: The what-if sliders: feature -> (label, minimum, maximum, step). Shown when the feature is known.
WHAT_IF_FEATURES: dict[str, tuple[str, float, float, float]] = {
    "threads": ("threads", 1, 64, 1),
    "batch_size": ("batch size", 1, 64, 1),
    "prompt_chars_mean": ("prompt length (chars)", 1, 4000, 1),
    "output_tokens": ("output tokens", 1, 1024, 1),
    "draft_cost_ratio": ("draft cost ratio", 0.001, 1.0, 0.001),
    "diffusion_steps": ("diffusion steps", 1, 200, 1),
}
#: The steps of :func:`train_advisor`, as the status line names them.
TRAINING_STEPS = ("reading the store", "fitting the meta-learner", "leave-one-group-out evaluation",
                  "explaining")
_STYLE = {"description_width": "170px"}


class TrainingCancelled(Exception):
    """Raised by an ``on_step`` hook to stop :func:`train_advisor` between two steps."""


def train_advisor(runs: pd.DataFrame | Callable[[], pd.DataFrame], budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9",
                  learner: str = "boosting", random_state: int = 0,
                  on_step: Callable[[int, str], None] | None = None) -> dict[str, Any]:
    """Evaluate (leave one group out), fit on all runs and explain; returns data only.

    Args:
        runs: the stored runs, or a function that reads them (then reading is step 1).
        on_step: called as ``on_step(k, name)`` before step k (1-4) of ``TRAINING_STEPS``; it may raise
            (:class:`TrainingCancelled`) to stop there.

    Returns:
        ``{"learner", "evaluation" (DataFrame), "explanation" (importance, partial_dependence, rules)}``.
    """
    from workbench.meta import evaluate, explain, features
    from workbench.meta.learner import Budget
    from workbench.meta.recommend import train

    def step(number: int) -> None:
        if on_step is not None:
            on_step(number, TRAINING_STEPS[number - 1])

    parsed = Budget.parse(budget)
    # 1. The runs.
    step(1)
    runs = runs() if callable(runs) else runs
    # 2. Fit on all of them (a clear error on too few runs).
    step(2)
    fitted = train(runs, learner=learner, random_state=random_state)
    # 3. Leave one group out, for the chosen learner and the baselines.
    step(3)
    table = features.training_table(features.run_features(runs))
    evaluation = evaluate.evaluate(table, parsed, learners=(learner,), random_state=random_state)
    # 4. The global explanation.
    step(4)
    explanation = explain.global_explanation(fitted, fitted.training_table_, random_state=random_state)
    return {"learner": fitted, "evaluation": evaluation, "explanation": explanation}


def what_if_check(context: dict[str, Any]) -> tuple[Any, str | None]:
    """The plan-time applicability check of the context's model and workload
    (:func:`workbench.meta.commands.applicability`), or (None, why) when the model cannot be planned here
    at all (then nothing is refused, and the panel says the check was skipped)."""
    from workbench.meta.commands import applicability
    from workbench.specs import WorkloadSpec

    model, workload = str(context.get("model")), str(context.get("workload"))
    try:
        check = applicability(model, WorkloadSpec(workload), device=str(context.get("device") or "cpu"),
                              dtype=str(context.get("dtype") or "float32"))
        why = check({"technique": "baseline", "params": {}, "draft": None}, {})
    except Exception as exc:  # a workload or model this machine does not have
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (None, f"which techniques apply was not checked: {why}") if why else (check, None)


class AdvisorPanel:
    """``train_button`` (trains on the store in the background), ``cancel_button``, ``budget``, ``status``
    (training step k of 4), ``error`` (the latest error line, beside the buttons), ``evaluation``
    (DataFrame), ``explanation``, ``context`` (a training context to start the what-if from), ``sliders``
    (feature -> slider), ``recommendation`` (the latest :class:`~workbench.meta.recommend.Recommendation`),
    ``warnings`` (its out-of-range and refused-configuration lines), ``recommendation_html``, ``output``
    (figures), ``errors``; :meth:`wait` blocks until the training in flight ends."""

    def __init__(self, store: Any = None, budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9", learner: str = "boosting",
                 train_now: bool = True) -> None:
        self.store = open_store(store)
        self.errors: list[str] = []
        self.learner: Any = None
        self.evaluation = pd.DataFrame()
        self.explanation: dict[str, Any] = {}
        self.recommendation: Any = None
        self.warnings: list[str] = []
        self.figures: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._check: Any = None  # the applicability check of the chosen context
        self._check_note: str | None = None
        self._quiet = False
        # 1. Controls.
        self.budget = W.Text(value=budget, description="quality budget", style=_STYLE,
                             tooltip="lossless, any, or perplexity<=X% (LMs), accuracy<=X (points), ssim>=X (images)")
        self.learner_kind = W.Dropdown(options=["boosting", "tree"], value=learner, description="learner",
                                       style=_STYLE)
        self.train_button = W.Button(description="Train on the store", button_style="primary", icon="cogs",
                                      layout=W.Layout(width="190px"))
        self.cancel_button = W.Button(description="Cancel", icon="stop", disabled=True)
        self.status = status_line("not trained yet: press Train")
        self.error = error_line()
        self.evaluation_html = W.HTML(layout=W.Layout(max_width="900px"))
        self.context = W.Dropdown(description="start from context", style=_STYLE, layout=W.Layout(width="95%"))
        self.sliders: dict[str, W.Widget] = {}
        self.sliders_box = W.VBox()
        self.warnings_html = W.HTML(layout=W.Layout(max_width="900px"))
        self.recommendation_html = W.HTML(layout=W.Layout(max_width="900px"))
        self.output = W.Output()
        # 2. Wiring.
        self.train_button.on_click(self._on_train)
        self.cancel_button.on_click(self._on_cancel)
        self.context.observe(self._on_context, names="value")
        self.budget.observe(self._on_what_if, names="value")
        # 3. Layout: status and error line right under the buttons.
        self.widget = W.VBox([
            W.HTML("<b>workbench: meta-learner advisor</b>"), W.HBox([self.budget, self.learner_kind]),
            W.HBox([self.train_button, self.cancel_button]), self.status, self.error, self.evaluation_html,
            W.HTML("<b>what if</b>"), self.context, self.sliders_box, self.warnings_html,
            self.recommendation_html, self.output])
        if train_now:
            self._on_train()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- training ---------------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        """A training thread is in flight (and not cancelled)."""
        return self._thread is not None and self._thread.is_alive() and not self._cancel.is_set()

    @shows_errors("Train")
    def _on_train(self, _button: Any = None) -> None:
        self.train()

    def train(self) -> None:
        """Check the budget, then train on every stored run in a background thread; returns at once.

        A bad budget raises its one line here (the panel stays as it was, usable); the thread fills the
        evaluation table, the explanation figures and the what-if panel, or shows its error line.
        """
        from workbench.meta.learner import Budget

        if self.training:
            self.status.value = "training is in progress: wait for it or press Cancel"
            return
        # 1. Everything the user typed, checked before anything starts.
        self.error.value = ""
        budget, learner = self.budget.value, self.learner_kind.value
        Budget.parse(budget)
        # 2. A fresh cancel flag per training: a cancelled thread that finishes later changes nothing.
        self._cancel = cancel = threading.Event()
        self.train_button.disabled, self.cancel_button.disabled = True, False
        self.status.value = f"training: step 1/{len(TRAINING_STEPS)}, {TRAINING_STEPS[0]}"
        self._thread = threading.Thread(target=self._train_in_background, args=(budget, learner, cancel),
                                        name="workbench-advisor", daemon=True)
        self._thread.start()

    def _after_error(self, where: str) -> None:
        if where == "Train":
            self.status.value = "training not started: see the error below, fix it and press Train"

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the training in flight ends (for scripts and tests); True when it has ended."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self._thread is None or not self._thread.is_alive()

    @shows_errors("Cancel")
    def _on_cancel(self, _button: Any = None) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop waiting for the training in flight: its result is discarded, the panel is usable at once
        (the thread stops at its next step)."""
        if not self.training:
            return
        self._cancel.set()
        self.train_button.disabled, self.cancel_button.disabled = False, True
        self.status.value = "training cancelled: its result will be discarded; press Train to start again"

    def _train_in_background(self, budget: str, learner: str, cancel: threading.Event) -> None:
        def on_step(number: int, name: str) -> None:
            if cancel.is_set():
                raise TrainingCancelled(name)
            self.status.value = f"training: step {number}/{len(TRAINING_STEPS)}, {name}"

        try:
            trained = train_advisor(self.store.runs, budget=budget, learner=learner, on_step=on_step)
            if not cancel.is_set():
                self._show_training(trained)
        except TrainingCancelled:
            pass
        except Exception as exc:  # shown beside the button, and the panel usable again
            if not cancel.is_set():
                self.errors.append(show_error(self.error, "Train", exc))
                self.status.value = "training failed: see the line below"
        finally:
            if not cancel.is_set():
                self.train_button.disabled, self.cancel_button.disabled = False, True

    def _show_training(self, trained: dict[str, Any]) -> None:
        """Fill the evaluation table, the explanation figures and the what-if panel from a training."""
        from workbench.meta import plots
        from workbench.meta.evaluate import ANCHOR

        self.learner, self.evaluation, self.explanation = (trained["learner"], trained["evaluation"],
                                                           trained["explanation"])
        provenance = self.learner.provenance_
        self.status.value = (f"trained a {self.learner.learner} meta-learner on {len(provenance['run_ids'])} runs "
                             f"from {len(provenance['machine_ids'])} machine(s)")
        shown = self.evaluation.copy()
        self.evaluation_html.value = ("<p><b>leave-one-group-out evaluation</b> " + html.escape(ANCHOR) + "</p>"
                                      + table_html(shown.round(3), "workbench-evaluation"))
        self.figures = {"importance": plots.importance_figure(self.explanation["importance"]),
                        "partial_dependence": plots.partial_dependence_figure(self.explanation["partial_dependence"])}
        rules = html.escape(self.explanation.get("rules") or "")
        show(self.output, *[figure_bundle(f) for f in self.figures.values()],
             html_bundle(f"<details><summary>rules</summary><pre>{rules}</pre></details>", "rules"), clear=True)
        contexts = self.learner.training_table_.drop_duplicates("context")
        self._quiet = True
        try:
            self.context.options = [(context_label(row), row["context"]) for row in contexts.to_dict(orient="records")]
            self.context.value = self.context.options[0][1] if self.context.options else None
        finally:
            self._quiet = False
        self._on_context()

    # -- what if -----------------------------------------------------------------------------------
    def base_context(self) -> dict[str, Any]:
        """The chosen training context's features (the what-if starts from these)."""
        from workbench.meta.features import CONTEXT_FEATURES

        table = self.learner.training_table_
        row = table[table["context"] == self.context.value].iloc[0]
        keep = [c for c in (*CONTEXT_FEATURES, "context", "model", "workload", "machine_id") if c in row.index]
        return row[keep].to_dict()

    @shows_errors("choosing the context")
    def _on_context(self, _change: Any = None) -> None:
        if self.learner is None or self.context.value is None or self._quiet:
            return
        context = self.base_context()
        self._check, self._check_note = what_if_check(context)
        sliders = {}
        for feature, (label, low, high, step) in WHAT_IF_FEATURES.items():
            value = context.get(feature)
            if value is None or pd.isna(value):
                continue
            cls = W.FloatSlider if isinstance(step, float) else W.IntSlider
            value = min(max(value, low), high)
            slider = cls(value=value if cls is W.FloatSlider else int(round(value)), min=low, max=high, step=step,
                         description=label, style=_STYLE, continuous_update=False, layout=W.Layout(width="600px"))
            slider.observe(self._on_what_if, names="value")
            sliders[feature] = slider
        self.sliders = sliders
        self.sliders_box.children = list(sliders.values())
        self.what_if()

    @shows_errors("what if")
    def _on_what_if(self, _change: Any = None) -> None:
        if self.learner is not None:
            self.what_if()

    def what_if(self) -> Any:
        """Recommend for the chosen context with the sliders' values (only among the configurations the
        techniques accept at those values); updates ``recommendation``, ``warnings`` and their HTML."""
        from workbench.meta.recommend import recommend

        # 1. The context with the sliders' values, and the check with the same values.
        context = self.base_context()
        moved = {feature: slider.value for feature, slider in self.sliders.items()}
        context.update(moved)
        base = self._check

        def check(row: Any, overrides: Any) -> str | None:
            return base(row, {**moved, **dict(overrides)})

        # 2. The recommendation, then what to warn about.
        self.recommendation = rec = recommend(self.learner, context, self.budget.value,
                                              check=check if base is not None else None)
        self.warnings = what_if_warnings(rec, self._check_note)
        self.warnings_html.value = "".join(
            f"<div class='workbench-warning' style='color:#8a4b00'><b>warning</b>: {html.escape(w)}</div>"
            for w in self.warnings)
        self.recommendation_html.value = recommendation_html(rec)
        return rec


def context_label(row: dict[str, Any]) -> str:
    """``zoo:code-target on code-prompts (cpu/float32, batch 1, 1 thread(s), machine 805462a3)``."""
    def whole(value: Any) -> str:
        return "-" if value is None or pd.isna(value) else f"{value:g}"

    return (f"{row.get('model')} on {row.get('workload')} ({row.get('device')}/{row.get('dtype')}, batch "
            f"{whole(row.get('batch_size'))}, {whole(row.get('threads'))} thread(s), machine "
            f"{str(row.get('machine_id'))[:8]})")


def what_if_warnings(rec: Any, check_note: str | None = None) -> list[str]:
    """The lines a what-if answer must carry: each way the context leaves the training range, each
    configuration a technique refuses at these settings, and a skipped applicability check."""
    lines = [f"outside the training range: {flag} (interval widened; the prediction is an extrapolation)"
             for flag in rec.out_of_range]
    if not rec.inapplicable.empty:
        lines += [f"not applicable at these settings: {configuration_name(row.configuration)}: {row.reason}"
                  for row in rec.inapplicable.itertuples()]
    if check_note:
        lines.append(check_note)
    return lines


def recommendation_html(rec: Any) -> str:
    """The recommendation, its reasons and its counterfactual, escaped."""
    if rec.fallback:
        head = f"<b>keep the baseline</b> (fallback): {html.escape(rec.decision)}"
    else:
        head = (f"<b>{html.escape(configuration_name(rec.configuration))}</b>: predicted speedup "
                f"{html.escape(speedup_text(rec.predicted_speedup, rec.speedup_low, rec.speedup_high))} (80% interval), "
                f"predicted quality {html.escape(loss_text(rec.predicted_quality_loss, str(rec.context.get('modality'))))}")
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in rec.reasons) or "<li>(no feature moved it)</li>"
    flip = html.escape((rec.counterfactual or {}).get("text", "none computed"))
    return (f"<div class='workbench-recommendation'><p>recommendation: {head}</p><p>reasons:</p><ul>{reasons}"
            f"</ul><p>what would change it: {flip}</p></div>")


def advisor(store: Any = None, budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9", learner: str = "boosting",
            train_now: bool = True) -> AdvisorPanel:
    """The advisor panel (see :class:`AdvisorPanel`); starts training in the background unless
    ``train_now=False`` (the panel shows at once; :meth:`AdvisorPanel.wait` blocks until it ends).

    Example:
        >>> panel = advisor("sqlite:///data/seed/seed.sqlite")  # doctest: +SKIP
        >>> panel.wait(); panel.evaluation.columns[:2].tolist()  # doctest: +SKIP
    """
    return AdvisorPanel(store=store, budget=budget, learner=learner, train_now=train_now)
