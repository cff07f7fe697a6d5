"""The advisor panel: train the meta-learner on the store, show its evaluation and explanation, and a
what-if panel whose sliders re-run the recommendation (with its reasons) on every change.

Example:
    >>> from workbench.widgets import advisor
    >>> panel = advisor(store="sqlite:///data/seed/seed.sqlite")  # doctest: +SKIP
    >>> panel.sliders["threads"].value = 1  # doctest: +SKIP
    >>> panel.recommendation.configuration  # doctest: +SKIP
    'speculative[num_assistant_tokens=4]+zoo:code-draft'
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as W
import pandas as pd

from workbench.quality import loss_text

from workbench.widgets._common import figure_bundle, html_bundle, open_store, show, shows_errors, table_html

#: The what-if sliders: feature -> (label, minimum, maximum, step). Shown when the feature is known.
WHAT_IF_FEATURES: dict[str, tuple[str, float, float, float]] = {
    "threads": ("threads", 1, 64, 1),
    "batch_size": ("batch size", 1, 64, 1),
    "prompt_chars_mean": ("prompt length (chars)", 1, 4000, 1),
    "output_tokens": ("output tokens", 1, 1024, 1),
    "draft_cost_ratio": ("draft cost ratio", 0.001, 1.0, 0.001),
    "diffusion_steps": ("diffusion steps", 1, 200, 1),
}
_STYLE = {"description_width": "170px"}


def train_advisor(runs: pd.DataFrame, budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9", learner: str = "boosting",
                  random_state: int = 0) -> dict[str, Any]:
    """Evaluate (leave one group out), fit on all runs and explain; returns data only.

    Returns:
        ``{"learner", "evaluation" (DataFrame), "explanation" (importance, partial_dependence, rules)}``.
    """
    from workbench.meta import evaluate, explain, features
    from workbench.meta.learner import Budget
    from workbench.meta.recommend import train

    parsed = Budget.parse(budget)
    fitted = train(runs, learner=learner, random_state=random_state)  # raises a clear error on too few runs
    table = features.training_table(features.run_features(runs))
    evaluation = evaluate.evaluate(table, parsed, random_state=random_state)
    explanation = explain.global_explanation(fitted, fitted.training_table_, random_state=random_state)
    return {"learner": fitted, "evaluation": evaluation, "explanation": explanation}


class AdvisorPanel:
    """``train_button`` (trains on the store), ``budget``, ``evaluation`` (DataFrame), ``explanation``,
    ``context`` (a training context to start the what-if from), ``sliders`` (feature -> slider),
    ``recommendation`` (the latest :class:`~workbench.meta.recommend.Recommendation`), ``recommendation_html``,
    ``output`` (figures, error lines), ``errors``."""

    def __init__(self, store: Any = None, budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9", learner: str = "boosting",
                 train_now: bool = True) -> None:
        self.store = open_store(store)
        self.errors: list[str] = []
        self.learner: Any = None
        self.evaluation = pd.DataFrame()
        self.explanation: dict[str, Any] = {}
        self.recommendation: Any = None
        self.figures: dict[str, Any] = {}
        self.budget = W.Text(value=budget, description="quality budget", style=_STYLE,
                             tooltip="lossless, any, or perplexity<=X% (LMs), accuracy<=X (points), ssim>=X (images)")
        self.learner_kind = W.Dropdown(options=["boosting", "tree"], value=learner, description="learner",
                                       style=_STYLE)
        self.train_button = W.Button(description="Train on the store", button_style="primary", icon="cogs")
        self.status = W.HTML("not trained yet")
        self.evaluation_html = W.HTML()
        self.context = W.Dropdown(description="start from context", style=_STYLE, layout=W.Layout(width="95%"))
        self.sliders: dict[str, W.Widget] = {}
        self.sliders_box = W.VBox()
        self.recommendation_html = W.HTML()
        self.output = W.Output()
        self.train_button.on_click(self._on_train)
        self.context.observe(self._on_context, names="value")
        self.budget.observe(self._on_what_if, names="value")
        self.widget = W.VBox([
            W.HTML("<b>workbench: meta-learner advisor</b>"), W.HBox([self.budget, self.learner_kind]),
            self.train_button, self.status, self.evaluation_html,
            W.HTML("<b>what if</b>"), self.context, self.sliders_box, self.recommendation_html, self.output])
        if train_now:
            self._on_train()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- training ---------------------------------------------------------------------------------
    @shows_errors("training")
    def _on_train(self, _button: Any = None) -> None:
        self.train()

    def train(self) -> None:
        """Train on every stored run; fill the evaluation table, the explanation figures and the what-if panel."""
        from workbench.meta import plots
        from workbench.meta.evaluate import ANCHOR

        self.status.value = "training..."
        runs = self.store.runs()
        trained = train_advisor(runs, budget=self.budget.value, learner=self.learner_kind.value)
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
        table = self.learner.training_table_
        contexts = table.drop_duplicates("context")
        self._quiet = True
        try:
            self.context.options = [(str(c), c) for c in contexts["context"]]
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
        if self.learner is None or self.context.value is None or getattr(self, "_quiet", False):
            return
        context = self.base_context()
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
        """Recommend for the chosen context with the sliders' values; updates ``recommendation`` and its HTML."""
        from workbench.meta.recommend import recommend

        context = self.base_context()
        context.update({feature: slider.value for feature, slider in self.sliders.items()})
        self.recommendation = rec = recommend(self.learner, context, self.budget.value)
        self.recommendation_html.value = self._recommendation_html(rec)
        return rec

    @staticmethod
    def _recommendation_html(rec: Any) -> str:
        if rec.fallback:
            head = f"<b>keep the baseline</b> (fallback): {html.escape(rec.decision)}"
        else:
            head = (f"<b>{html.escape(rec.configuration)}</b>: predicted speedup {rec.predicted_speedup:.2f}x "
                    f"(80% interval {rec.speedup_low:.2f}x - {rec.speedup_high:.2f}x), predicted quality "
                    f"{html.escape(loss_text(rec.predicted_quality_loss, str(rec.context.get('modality'))))}")
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in rec.reasons) or "<li>(no feature moved it)</li>"
        flip = html.escape((rec.counterfactual or {}).get("text", "none computed"))
        return (f"<div class='workbench-recommendation'><p>recommendation: {head}</p><p>reasons:</p><ul>{reasons}"
                f"</ul><p>what would change it: {flip}</p></div>")


def advisor(store: Any = None, budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9", learner: str = "boosting",
            train_now: bool = True) -> AdvisorPanel:
    """The advisor panel (see :class:`AdvisorPanel`); trains at once unless ``train_now=False``.

    Example:
        >>> panel = advisor("sqlite:///data/seed/seed.sqlite")  # doctest: +SKIP
        >>> panel.evaluation.columns[:2].tolist()  # doctest: +SKIP
    """
    return AdvisorPanel(store=store, budget=budget, learner=learner, train_now=train_now)
