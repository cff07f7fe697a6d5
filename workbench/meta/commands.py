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

from workbench import paths
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
    if out is not None and Path(out).is_dir():  # before minutes of evaluation, not after
        raise WorkbenchError(f"--out {str(out)!r} is a folder: name a file in it, e.g. {str(Path(out) / 'learner.skops')!r}")
    store = Store(store_url, create=store_url is None)  # a named store must exist: a typo is not "no runs"
    runs = store.runs(since=since)
    table = features.training_table(features.run_features(runs))
    if len(table) < 2:
        raise WorkbenchError(f"no stored runs to learn from ({len(runs)} run(s), {len(table)} usable comparison(s) "
                             f"in {store.url}): {NO_RUNS_HINT}")
    # 2. Evaluate every learner and baseline, then fit the chosen learner on all data and save it.
    results = evaluate.evaluate(table, parsed, learners=(learner,), random_state=random_state)
    fitted = train(runs, learner=learner, random_state=random_state, source=store.url)
    path = persist.save(fitted, out if out is not None else persist.default_path(store.url))
    # 3. Text.
    misses = evaluate.shortfalls(results)
    text = "\n".join([
        f"learned from {store.url}: {len(runs)} runs, {int(table['n_runs'].sum())} usable, "
        f"{table['context'].nunique()} contexts, {table['configuration'].nunique()} configurations, "
        f"{table['model'].nunique()} models, {table['workload'].nunique()} workloads, "
        f"{table['machine_id'].nunique()} machine(s)",
        f"leave-one-group-out evaluation (budget {parsed.text}; choices scored by measured speedup):",
        _table_text(results),
        "gap closed (ASlib: the share of the gap between always using the best-on-average configuration and "
        "the oracle that a policy closes; 1 is the oracle, 0 no better than best-on-average):",
        *[f"  - {line}" for line in evaluate.gap_verdicts(results)],
        f"per held-out group ({learner} meta-learner; mean measured speedups of the group's contexts):",
        _per_group_text(results, f"meta-learner ({learner})"),
        "interval coverage: the share of held-out measured speedups inside the learner's 80% interval (widened "
        "where a context is outside the training range); near 0.80 is honest, far below is overconfident",
        evaluate.ANCHOR,
        "regret (oracle speedup - achieved, lower is better):",
        *[f"  - {line}" for line in evaluate.regret_verdicts(results)],
        *(["where the meta-learner does not beat a baseline:"] + [f"  - {line}" for line in misses]
          if misses else ["the meta-learner beats every baseline in every grouping"]),
        f"saved the {learner} meta-learner to {path} (no pickle; trained on {len(fitted.provenance_['run_ids'])} "
        f"runs from {len(fitted.provenance_['machine_ids'])} machine(s))",
    ])
    return {"evaluation": results, "path": path, "text": text}


def _per_group_text(results: pd.DataFrame, policy: str) -> str:
    groups = evaluate.gap_closed_by_group(results)
    groups = groups[groups["policy"] == policy].drop(columns=["policy"])
    if groups.empty:
        return "  (no grouping has two groups)"
    groups = groups.rename(columns={"oracle_speedup": "oracle", "single_best_speedup": "best_on_average",
                                    "achieved_speedup": "learner"})
    groups["group"] = groups["group"].map(lambda g: g if len(g) <= 40 else g[:37] + "...")
    return groups.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


def _table_text(results: pd.DataFrame) -> str:
    shown = results.copy()
    shown["note"] = shown["note"].fillna("")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 80):
        return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


def recommend_for(model: str, workload: str, budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9", learner_path: str | Path | None = None,
                  device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 32, batch_size: int = 1,
                  steps: int = 50, threads: int | None = None, max_items: int | None = None,
                  plan: str | Path | None = None) -> Recommendation:
    """Load the learner, describe the context from files and this machine, keep only the candidates the
    techniques' plan-time checks accept here, recommend; ``plan`` also writes the runs that would decide
    (``Recommendation.next_runs``) as a sweep file for ``workbench sweep``."""
    from workbench.specs import WorkloadSpec

    # 1. Everything the user typed is checked before anything is loaded.
    parsed = Budget.parse(budget)
    plan_path = _plan_path(plan) if plan is not None else None
    learner = persist.load(learner_path)
    spec = WorkloadSpec(workload, max_new_tokens=max_new_tokens, batch_size=batch_size, num_inference_steps=steps,
                        max_items=max_items)
    # 2. The context, and each candidate's applicability as the runner would judge it.
    context = features.context_for(model, spec, device=device, dtype=dtype, threads=threads)
    check = applicability(model, spec, device=device, dtype=dtype, threads=threads)
    result = recommend(learner, context, parsed, check=check)
    # 3. The plan, when asked.
    if plan_path is not None:
        write_plan(result, plan_path, model, spec, device, dtype, threads)
    return result


def _plan_path(plan: str | Path) -> Path:
    path = Path(plan).expanduser()
    if path.is_dir():
        raise WorkbenchError(f"--plan {str(plan)!r} is a folder: give a file name, e.g. --plan sweep.yaml")
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise WorkbenchError(f"--plan {str(plan)!r} is not a .yaml file: give e.g. --plan sweep.yaml")
    return path


def write_plan(result: Recommendation, path: Path, model: str, spec: Any, device: str, dtype: str,
               threads: int | None) -> None:
    """Write ``result.next_runs`` as a sweep file at ``path`` (checked by the sweep parser first; an empty
    plan is not written: the decision needs no run)."""
    import dataclasses

    from workbench.meta.next_runs import sweep_yaml
    from workbench.sweep import parse_sweep

    if not result.next_runs:
        result.plan_note = f"nothing written to {path}: the prediction already decides (no overlapping candidates)"
        return
    workload = {k: v for k, v in dataclasses.asdict(spec).items() if k in ("name", "max_items", "max_new_tokens",
                                                                         "batch_size", "num_inference_steps")}
    text = sweep_yaml(result.next_runs, {"model": model, "workload": workload, "device": device, "dtype": dtype,
                                         "threads": threads})
    parse_sweep(text, source=str(path))  # what we write, `workbench sweep` reads
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    result.plan_note = f"wrote {len(result.next_runs)} run(s) to {path}: run them with `workbench sweep {path}`"


def applicability(model: str, spec: Any, device: str = "cpu", dtype: str = "float32",
                  threads: int | None = None) -> Any:
    """A :data:`~workbench.meta.recommend.Applicability` for this model and workload: each candidate is
    planned as ``workbench run`` would plan it (``runner.plan``: the technique's ``check`` against the
    model's and the draft's file facts, the batch size, the device), with the context overrides of a
    counterfactual applied to the workload; the one-line refusal is the reason."""
    import dataclasses
    import json

    from workbench.runner import plan as plan_run
    from workbench.specs import ModelSpec, RunSpec, TechniqueSpec

    fields = {"batch_size": "batch_size", "output_tokens": "max_new_tokens", "diffusion_steps": "num_inference_steps"}
    cache: dict[tuple, str | None] = {}

    def check(row: Any, overrides: Any) -> str | None:
        params = json.loads(row["params"]) if isinstance(row.get("params"), str) else dict(row.get("params") or {})
        draft = row.get("draft") if isinstance(row.get("draft"), str) and row.get("draft") else None
        changes = {fields[k]: int(v) for k, v in dict(overrides).items() if k in fields}
        run_threads = int(overrides["threads"]) if "threads" in overrides else threads
        key = (row["technique"], json.dumps(params, sort_keys=True), draft, tuple(sorted(changes.items())), run_threads)
        if key not in cache:
            try:
                technique = TechniqueSpec(row["technique"], params, ModelSpec(draft) if draft else None)
                plan_run(RunSpec(ModelSpec(model), dataclasses.replace(spec, **changes), technique, device=device,
                                 dtype=dtype, threads=run_threads))
                cache[key] = None
            except WorkbenchError as err:
                cache[key] = str(err)
        return cache[key]

    return check


def explain_learner(learner_path: str | Path | None = None, html: str | Path | None = None,
                    random_state: int = 0) -> dict[str, Any]:
    """Global explanation of a saved learner as data and text; ``html`` also writes the plotly figures."""
    # 1. Data (a bad --html is refused before the work).
    if html is not None and Path(html).is_dir():
        raise WorkbenchError(f"--html {str(html)!r} is a folder: name a file in it, e.g. "
                             f"{str(Path(html) / 'explain.html')!r}")
    if html is not None:
        Path(html).parent.mkdir(parents=True, exist_ok=True)
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
        page = "".join(["<html><head><meta charset='utf-8'><title>workbench meta-learner</title></head><body>",
                        *(figure.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
                          for i, figure in enumerate(figures)), "</body></html>"])
        paths.write_atomically(Path(html), lambda temporary: Path(temporary).write_text(page, encoding="utf-8"))
        lines.append(f"wrote {html}")
    return {**data, "text": "\n".join(lines)}
