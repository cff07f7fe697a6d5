"""What ``workbench learn``, ``recommend`` and ``explain`` do, as functions returning data and text.

The CLI only parses options and prints what these return.

Example:
    >>> report = learn("sqlite:///data/seed/seed.sqlite", out="/tmp/learner.skops")  # doctest: +SKIP
    >>> print(report["text"])  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.meta import evaluate, explain, features, persist, plots
from workbench.meta.learner import LEARNERS, Budget
from workbench.meta.recommend import NO_RUNS_HINT, Recommendation, recommend, train


def learn(store_url: str | None = None, out: str | Path | None = None, learner: str = "boosting",
          budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9", since: str | None = None, random_state: int = 0) -> dict[str, Any]:
    """Evaluate (leave one group out), train on everything, save; returns the table, the path and text."""
    from workbench.store import Store

    # 1. Check the settings, read the runs.
    if learner not in LEARNERS:
        raise WorkbenchError(f"--learner {learner!r} is unknown: use one of {', '.join(LEARNERS)}")
    parsed = Budget.parse(budget)
    store = Store(store_url)
    runs = store.runs(since=since)
    table = features.training_table(features.run_features(runs))
    if len(table) < 2:
        raise WorkbenchError(f"no stored runs to learn from ({len(runs)} run(s), {len(table)} usable comparison(s) "
                             f"in {store.url}): {NO_RUNS_HINT}")
    # 2. Evaluate every learner and baseline, then fit the chosen learner on all data and save it.
    results = evaluate.evaluate(table, parsed, random_state=random_state)
    fitted = train(runs, learner=learner, random_state=random_state, source=store.url)
    path = persist.save(fitted, out)
    # 3. Text.
    misses = evaluate.shortfalls(results)
    text = "\n".join([
        f"learned from {store.url}: {len(runs)} runs, {int(table['n_runs'].sum())} usable, "
        f"{table['context'].nunique()} contexts, {table['configuration'].nunique()} configurations, "
        f"{table['model'].nunique()} models, {table['workload'].nunique()} workloads, "
        f"{table['machine_id'].nunique()} machine(s)",
        f"leave-one-group-out evaluation (budget {parsed.text}; choices scored by measured speedup):",
        _table_text(results),
        evaluate.ANCHOR,
        "regret (oracle speedup - achieved, lower is better):",
        *[f"  - {line}" for line in evaluate.regret_verdicts(results)],
        *(["where the meta-learner does not beat a baseline:"] + [f"  - {line}" for line in misses]
          if misses else ["the meta-learner beats every baseline in every grouping"]),
        f"saved the {learner} meta-learner to {path} (no pickle; trained on {len(fitted.provenance_['run_ids'])} "
        f"runs from {len(fitted.provenance_['machine_ids'])} machine(s))",
    ])
    return {"evaluation": results, "path": path, "text": text}


def _table_text(results: pd.DataFrame) -> str:
    shown = results.copy()
    shown["note"] = shown["note"].fillna("")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 80):
        return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


def recommend_for(model: str, workload: str, budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9", learner_path: str | Path | None = None,
                  device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 32, batch_size: int = 1,
                  steps: int = 50, threads: int | None = None) -> Recommendation:
    """Load the learner, describe the context from files and this machine, recommend."""
    from workbench.specs import WorkloadSpec

    parsed = Budget.parse(budget)  # a bad budget fails before anything is loaded
    learner = persist.load(learner_path)
    spec = WorkloadSpec(workload, max_new_tokens=max_new_tokens, batch_size=batch_size, num_inference_steps=steps)
    context = features.context_for(model, spec, device=device, dtype=dtype, threads=threads)
    return recommend(learner, context, parsed)


def explain_learner(learner_path: str | Path | None = None, html: str | Path | None = None,
                    random_state: int = 0) -> dict[str, Any]:
    """Global explanation of a saved learner as data and text; ``html`` also writes the plotly figures."""
    # 1. Data.
    learner = persist.load(learner_path)
    table = learner.training_table_
    data = explain.global_explanation(learner, table, random_state=random_state)
    # 2. Text.
    with pd.option_context("display.width", 200):
        importance = data["importance"].head(12).to_string(index=False, float_format=lambda v: f"{v:.4f}")
    dependence = data["partial_dependence"]
    slopes = [f"  {name}: predicted speedup {part['predicted_speedup'].iloc[0]:.2f}x at {part['value'].iloc[0]:.3g} "
              f"-> {part['predicted_speedup'].iloc[-1]:.2f}x at {part['value'].iloc[-1]:.3g}"
              for name, part in dependence.groupby("feature", sort=False)]
    lines = [f"meta-learner ({learner.learner}) trained {learner.provenance_.get('trained_at')} on "
             f"{len(learner.provenance_.get('run_ids', []))} runs, machines {', '.join(learner.provenance_.get('machine_ids', []))}",
             "permutation importance (rise in mean absolute error of log speedup when the feature is shuffled):",
             importance, "partial dependence (average over the training contexts):", *(slopes or ["  (no numeric "
                                                                                                  "feature varies)"]),
             "rules of the glass-box tree:" if learner.learner == "tree" else
             "first tree of the boosting ensemble (train with --learner tree for the glass box):", data["rules"]]
    # 3. Figures, built from the data, when asked.
    if html is not None:
        figures = [plots.importance_figure(data["importance"]), plots.partial_dependence_figure(dependence)]
        Path(html).parent.mkdir(parents=True, exist_ok=True)
        with open(html, "w", encoding="utf-8") as handle:
            handle.write("<html><head><meta charset='utf-8'><title>workbench meta-learner</title></head><body>")
            for i, figure in enumerate(figures):
                handle.write(figure.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
            handle.write("</body></html>")
        lines.append(f"wrote {html}")
    return {**data, "text": "\n".join(lines)}
