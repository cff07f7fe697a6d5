"""Train from stored runs, and recommend a configuration for a (possibly never measured) context.

Example:
    >>> from workbench.store import Store
    >>> learner = train(Store("sqlite:///data/seed/seed.sqlite").runs())  # doctest: +SKIP
    >>> rec = recommend(learner, features.context_for("zoo:code-wide", "code-prompts"), "lossless")  # doctest: +SKIP
    >>> print(rec.text())  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.meta import explain, features
from workbench.meta.features import BASELINE_CONFIGURATION, FEATURE_NAMES
from workbench.meta.learner import Budget, MetaLearner, decide
from workbench.measure import MARGIN_PERCENT
from workbench.names import configuration_name, sig, speedup_text
from workbench.quality import LOSS_SCALES, loss_text
from workbench.terminal import TERMINAL_WIDTH, Column, fit_table, printable, wrap_line

NO_RUNS_HINT = ("run `workbench sweep` or import the seed with `workbench import data/seed/runs.parquet`")
#: Columns of the training table kept inside a saved learner (for explanations and provenance).
KEPT_COLUMNS = list(dict.fromkeys(["context", "model", "workload", "machine_id", "configuration", "lossless",
                                   "n_runs", *FEATURE_NAMES, "log_speedup", "quality_loss", "params", "draft",
                                   *features.COST_COLUMNS]))


def train(runs: pd.DataFrame, learner: str = "boosting", random_state: int = 0,
          source: str | None = None) -> MetaLearner:
    """Fit a meta-learner on stored runs and attach what recommending and explaining need.

    Adds ``candidates_`` (configurations seen), ``training_table_`` (the pooled table) and
    ``provenance_`` (run ids, machine ids, store, time) to the fitted learner.

    Raises:
        WorkbenchError: when the runs hold fewer than two successful comparisons.
    """
    # 1. Features and the pooled table.
    table = features.training_table(features.run_features(runs))
    if len(table) < 2:
        raise WorkbenchError(f"no stored runs to learn from ({len(table)} usable comparison(s) in "
                             f"{source or 'the store'}): {NO_RUNS_HINT}")
    # 2. Fit, then keep candidates, the table and provenance beside the learned state.
    fitted = MetaLearner(learner=learner, random_state=random_state).fit(
        table[list(FEATURE_NAMES)], table["log_speedup"], table["quality_loss"], table["weight"])
    fitted.candidates_ = features.candidates(table).to_dict(orient="records")
    fitted.training_table_ = table[KEPT_COLUMNS].reset_index(drop=True)
    fitted.provenance_ = {
        "run_ids": sorted({run_id for ids in table["run_ids"] for run_id in ids}),
        "machine_ids": sorted(table["machine_id"].astype(str).unique()),
        "models": sorted(table["model"].astype(str).unique()),
        "workloads": sorted(table["workload"].astype(str).unique()),
        "source": source,
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return fitted


#: A candidate's applicability in the user's context: (candidate row, context overrides) -> why it cannot
#: run there, or None. Built by ``commands.recommend_for`` from each technique's plan-time ``check``.
Applicability = Callable[[Mapping[str, Any], Mapping[str, Any]], "str | None"]


@dataclass
class Recommendation:
    """A recommendation with its prediction, uncertainty, reasons, counterfactual, fallback and the runs
    that would settle it."""

    context: dict[str, Any]  # the context features it answers
    budget: str  # the quality budget as given
    configuration: str  # the recommended configuration, or "baseline"
    predicted_speedup: float  # point prediction (1.0 for the baseline)
    speedup_low: float  # lower bound of the interval
    speedup_high: float  # upper bound of the interval
    predicted_quality_loss: float  # in the modality's unit (perplexity %, accuracy points, 1 - SSIM); 0: baseline
    fallback: bool  # the baseline was kept because no candidate was good and sure enough
    decision: str  # one sentence: why this choice
    best_candidate: str | None  # the best allowed candidate, even when the baseline was kept
    reasons: list[str] = field(default_factory=list)  # why the explained candidate is predicted so, as sentences
    counterfactual: dict[str, Any] | None = None  # smallest actionable change that flips the choice
    candidates: pd.DataFrame = field(default_factory=pd.DataFrame)  # every applicable candidate's predictions
    contributions: pd.DataFrame = field(default_factory=pd.DataFrame)  # of the explained candidate
    inapplicable: pd.DataFrame = field(default_factory=pd.DataFrame)  # configuration, reason: refused here
    out_of_range: list[str] = field(default_factory=list)  # how the context falls outside the training range
    next_runs: list[dict[str, Any]] = field(default_factory=list)  # what to measure to decide (next_runs.py)
    lossless: bool = False  # the recommended configuration promises identical outputs
    plan_note: str | None = None  # what `--plan` wrote (commands.write_plan)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields above, tables as lists of records."""
        tables = ("candidates", "contributions", "inapplicable")
        data = {k: v for k, v in self.__dict__.items() if k not in tables}
        for name in tables:
            data[name] = getattr(self, name).to_dict(orient="records")
        return data

    def quality_text(self) -> str:
        """The predicted quality of the recommendation in its modality's unit; lossless is zero by definition."""
        if self.fallback or self.configuration == BASELINE_CONFIGURATION:
            return "unchanged (the baseline)"
        if self.lossless:
            return "identical outputs (lossless: no quality loss by definition)"
        return loss_text(self.predicted_quality_loss, str(self.context.get("modality")))

    def text(self, width: int | None = TERMINAL_WIDTH) -> str:
        """Plain-text report for the terminal: prose wrapped and the candidate table fitted to ``width``
        characters a line; ``width=None``: lines unwrapped and the full candidate table (``--wide``)."""
        refused = [f"  - {row.configuration}: {row.reason}" for row in self.inapplicable.itertuples()]
        if refused:
            refused.insert(0, "not applicable here (refused by the technique's check before anything would load):")
        prose = [*self._summary_lines(), "candidates (predicted; lossless ones lose nothing by definition):"]
        return "\n".join([*_fit_prose(prose, width), *self._candidate_lines(width), *_fit_prose(refused, width)])

    def _summary_lines(self) -> list[str]:
        """Context, budget, the choice with its interval, reasons, counterfactual and what to measure next."""
        c = self.context
        lines = [f"context: {c.get('model')} on {c.get('workload')} ({c.get('modality')}), "
                 f"{c.get('device')}/{c.get('dtype')}, machine {c.get('machine_id')}",
                 f"budget: {Budget.parse(self.budget).describe()}"]
        if self.out_of_range:
            lines.append("outside the training range (intervals widened, the baseline kept unless even the widened "
                         "lower bound clears the +-2% band):")
            lines += [f"  - {flag}" for flag in self.out_of_range]
        if self.fallback:
            lines.append(f"recommendation: baseline (fallback) - {self.decision}")
        else:
            lines.append(f"recommendation: {self.configuration}")
            lines.append(f"predicted speedup: {self.predicted_speedup:.2f}x (80% interval "
                         f"{self.speedup_low:.2f}x - {self.speedup_high:.2f}x), predicted quality: {self.quality_text()}")
            lines.append("fallback: the baseline, if the measured speedup's interval does not clear the "
                         "+-2% band of no practical difference")
        explained = self.configuration if not self.fallback else self.best_candidate
        if explained:
            lines.append(f"why ({explained}):")
            lines += [f"  - {reason}" for reason in self.reasons] or ["  - (no feature moved the prediction)"]
        lines.append("counterfactual: " + (self.counterfactual or {}).get("text", "none computed"))
        if self.next_runs:
            total = sum(run["minutes"] for run in self.next_runs)
            lines.append(f"what to measure next (about {total:.0f} min; `--plan sweep.yaml` writes them for "
                         "`workbench sweep`):")
            lines += [f"  - {run['configuration']} (~{run['minutes']:.0f} min): {run['why']}" for run in self.next_runs]
        if self.plan_note:
            lines.append(self.plan_note)
        return lines

    def _candidate_lines(self, width: int | None) -> list[str]:
        """Every candidate's prediction: by name, the speedup with its 80% interval and the quality loss in
        its unit, 3 significant figures, within ``width``; ``width=None``: the stored columns, uncut."""
        if self.candidates.empty:
            return ["  (none)"]
        scale = LOSS_SCALES.get(str(self.context.get("modality")))
        loss_label = scale.label if scale is not None else "predicted_quality_loss"  # the loss names its unit
        if width is None:
            shown = self.candidates[["configuration", "allowed", "predicted_speedup", "speedup_low", "speedup_high",
                                     "predicted_quality_loss"]]
            shown = shown.rename(columns={"predicted_speedup": "speedup", "speedup_low": "low", "speedup_high": "high",
                                          "predicted_quality_loss": loss_label})
            return [printable(line) for line in shown.to_string(index=False, float_format=sig).splitlines()]
        rows = [{"configuration": configuration_name(row["configuration"]),
                 "allowed": "yes" if row["allowed"] else "no",
                 "speedup": speedup_text(row["predicted_speedup"], row["speedup_low"], row["speedup_high"]),
                 "loss": sig(row["predicted_quality_loss"])}
                for row in self.candidates.to_dict(orient="records")]
        columns = [Column("configuration", "configuration"), Column("allowed", "in budget", 9),
                   Column("speedup", "speedup (80% interval)", 22), Column("loss", loss_label)]
        return fit_table(rows, columns, width).splitlines()


def _fit_prose(lines: list[str], width: int | None) -> list[str]:
    """Prose lines wrapped at ``width`` (None: as they are), printable either way."""
    if width is None:
        return [printable(line) for line in lines]
    return [part for line in lines for part in wrap_line(line, width)]


def recommend(learner: MetaLearner, context: dict[str, Any], budget: str | Budget = "perplexity<=2%,accuracy<=1,ssim>=0.9",
              min_speedup: float = 1.0 + MARGIN_PERCENT / 100.0, check: Applicability | None = None,
              min_low: float | None = None) -> Recommendation:
    """Predict every applicable known configuration in ``context`` and choose under ``budget``.

    Args:
        learner: a fitted learner from :func:`train` (or ``persist.load``).
        context: context features, from ``features.context_for(...)`` or a training row.
        budget: ``lossless``, ``any`` or clauses ``perplexity<=X%``, ``accuracy<=X``, ``ssim>=X``.
        min_speedup: the point prediction a candidate must beat, else the baseline is kept (default: the edge
            of the +-2% band of no practical difference).
        min_low: the floor on its interval's lower bound (default ``learner.MIN_LOW_SPEEDUP``).
        check: the candidates' applicability here (see :data:`Applicability`); those it refuses are listed
            in ``inapplicable`` with the reason and never scored. None: only the learner's own filters.
    """
    from workbench.meta import next_runs

    # 1. Candidates for this context: applicable ones predicted, refused ones set apart with the reason.
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    rows = features.candidate_rows(context, pd.DataFrame(learner.candidates_))
    refused = []
    if check is not None and not rows.empty:
        reasons_ = [check(row, {}) for row in rows.to_dict(orient="records")]
        refused = [(c, r) for c, r in zip(rows["configuration"], reasons_) if r]
        rows = rows[[r is None for r in reasons_]]
    inapplicable = pd.DataFrame(refused, columns=["configuration", "reason"])
    flags = learner.out_of_range(pd.DataFrame([context]))[0] if hasattr(learner, "range_") else []
    if rows.empty:
        why = (f"no configuration in the training data ran on {context.get('modality')} workloads"
               if inapplicable.empty else "no measured configuration applies to this model and workload here")
        return Recommendation(context, budget.text, BASELINE_CONFIGURATION, 1.0, 1.0, 1.0, 0.0, True,
                              f"{why}: keep the baseline; measure some with `workbench sweep`", None,
                              inapplicable=inapplicable, out_of_range=flags)
    predicted = pd.concat([rows[["configuration", "lossless"]], learner.predict_frame(rows)], axis=1)
    predicted["allowed"] = budget.allowed(predicted, "predicted_quality_loss")
    predicted = predicted.sort_values("predicted_speedup", ascending=False)
    # 2. The decision, and the candidate it is about.
    decision = decide(predicted, budget, min_speedup=min_speedup, min_low=min_low)
    allowed = predicted[predicted["allowed"]]
    best = allowed.index[0] if not allowed.empty else None
    explained = best if decision.fallback else predicted.index[predicted["configuration"] == decision.configuration][0]
    # 3. Reasons, a counterfactual, and the runs that would settle it.
    parts = explain.contributions(learner, rows.loc[[explained]]) if explained is not None else pd.DataFrame()
    flip = explain.counterfactual(learner, rows, budget, decision, check=check, min_speedup=min_speedup,
                                  min_low=min_low)
    chosen = predicted.loc[explained] if not decision.fallback else None
    why = explain.reasons(parts, learner, rows.loc[explained], predicted.loc[explained]) if explained is not None \
        and not parts.empty else []
    return Recommendation(
        context=dict(context), budget=budget.text, configuration=decision.configuration,
        predicted_speedup=float(chosen["predicted_speedup"]) if chosen is not None else 1.0,
        speedup_low=float(chosen["speedup_low"]) if chosen is not None else 1.0,
        speedup_high=float(chosen["speedup_high"]) if chosen is not None else 1.0,
        predicted_quality_loss=float(chosen["predicted_quality_loss"]) if chosen is not None else 0.0,
        fallback=decision.fallback, decision=decision.reason,
        best_candidate=str(predicted.loc[best, "configuration"]) if best is not None else None,
        reasons=why, counterfactual=flip, candidates=predicted.reset_index(drop=True), contributions=parts,
        inapplicable=inapplicable, out_of_range=flags,
        next_runs=next_runs.runs_to_decide(learner, rows, predicted, decision, min_speedup),
        lossless=bool(chosen["lossless"]) if chosen is not None else False,
    )
