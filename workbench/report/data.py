"""Report data: stored runs -> per-configuration results with intervals, the comparison with the previous
window, failed runs, the meta-learner's recommendations and explanation, each machine's environment."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.quality import loss_text
from workbench.report.params import ReportParams


def _window(since: str, now: dt.datetime) -> dict[str, dt.datetime]:
    """This window [start, now) and the previous one of the same length [previous_start, start)."""
    from workbench.store import parse_since

    start = parse_since(since, now=now)
    return {"start": start, "end": now, "previous_start": start - (now - start)}


def _filtered_runs(store: Any, params: ReportParams, since: dt.datetime, until: dt.datetime) -> pd.DataFrame:
    runs = store.runs(since=since, until=until, model=list(params.models) or None,
                      technique=list(params.techniques) or None, machine_id=list(params.machines) or None)
    return runs.reset_index(drop=True)


def machine_label(machine_id: Any, device: Any) -> str:
    """A short name for a machine and device: ``5b7bbcfd (cpu)``."""
    return f"{str(machine_id or 'unknown')[:8]} ({device or 'cpu'})"


def results_table(runs: pd.DataFrame, budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9") -> pd.DataFrame:
    """One row per (model, workload, machine, configuration) measured successfully: speed and quality.

    Speed is the median speedup over the baseline across runs (per output token for generation), with
    the median of the runs' own 95% bootstrap intervals (``speedup_ci_low`` / ``_high``) and the verdict
    of that interval against the +-2% band of no practical difference; ``latency_saving_percent`` is
    ``100 * (1 - 1/speedup)`` (negative: slower). Quality is ``quality_loss`` in the modality's own unit
    (perplexity %, accuracy points, 1 - SSIM), also in words with its unit (``quality_loss_text``), beside
    the last run's quality figures. ``noisy_runs`` counts runs measured on a noisy machine.

    Example:
        >>> results_table(pd.DataFrame()).empty
        True
    """
    from workbench.display import quality_text
    from workbench.measure import verdict
    from workbench.meta import features
    from workbench.meta.learner import Budget
    from workbench.quality import loss_text

    columns = ["model", "workload", "machine", "machine_id", "device", "modality", "technique", "configuration",
               "n_runs", "noisy_runs", "speedup", "speedup_ci_low", "speedup_ci_high", "latency_saving_percent",
               "verdict", "quality_loss", "quality_loss_text", "lossless", "within_budget", "quality"]
    table = features.run_features(runs) if not runs.empty else pd.DataFrame()
    if table.empty:
        return pd.DataFrame(columns=columns)
    extra = runs[["run_id", "speedup", "speedup_ci_low", "speedup_ci_high", "quality", "quality_metrics", "device",
                  "technique"]]
    table = table.drop(columns=[c for c in ("device", "technique") if c in table.columns]).merge(extra, on="run_id")
    parsed = Budget.parse(budget)
    rows = []
    keys = ["model", "workload", "machine_id", "device", "modality", "technique", "configuration"]
    for key, group in table.sort_values("created_at").groupby(keys, sort=True):
        row = dict(zip(keys, key))
        speedup = float(group["speedup"].median())
        low = float(group["speedup_ci_low"].median()) if group["speedup_ci_low"].notna().any() else math.nan
        high = float(group["speedup_ci_high"].median()) if group["speedup_ci_high"].notna().any() else math.nan
        loss = float(group["quality_loss"].mean()) if group["quality_loss"].notna().any() else math.nan
        lossless = bool(group["lossless"].iloc[-1])
        row.update(machine=machine_label(row["machine_id"], row["device"]), n_runs=len(group),
                   noisy_runs=int(group["noisy"].sum()), speedup=speedup,
                   speedup_ci_low=low, speedup_ci_high=high, latency_saving_percent=100.0 * (1.0 - 1.0 / speedup),
                   verdict=verdict(low, high), quality_loss=loss, quality_loss_text=loss_text(loss, row["modality"]),
                   lossless=lossless, within_budget=parsed.allows(lossless, loss, row["modality"]),
                   quality=quality_text(group["quality"].iloc[-1] or {}, group["quality_metrics"].iloc[-1]))
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def best_choices(results: pd.DataFrame) -> pd.DataFrame:
    """Per (model, workload, machine): the fastest configuration within budget whose verdict is "faster"
    (its interval clears the +-2% band), or a ``baseline`` row when none is (then ``best_measured`` names
    the fastest one anyway)."""
    rows = []
    for (model, workload, machine), group in results.groupby(["model", "workload", "machine"], sort=True):
        sure = group[group["within_budget"] & (group["verdict"] == "faster")].sort_values("speedup", ascending=False)
        fastest = group.sort_values("speedup", ascending=False).iloc[0]
        if sure.empty:
            rows.append({"model": model, "workload": workload, "machine": machine, "choice": "baseline",
                         "best_measured": fastest["configuration"], "row": fastest.to_dict()})
        else:
            rows.append({"model": model, "workload": workload, "machine": machine,
                         "choice": sure.iloc[0]["configuration"], "best_measured": fastest["configuration"],
                         "row": sure.iloc[0].to_dict()})
    return pd.DataFrame(rows, columns=["model", "workload", "machine", "choice", "best_measured", "row"])


def _ci_text(row: Any) -> str:
    low, high = row["speedup_ci_low"], row["speedup_ci_high"]
    interval = f"95% CI {low:.2f}-{high:.2f}x" if math.isfinite(low) and math.isfinite(high) else "no interval"
    return f"{row['speedup']:.2f}x ({interval}, {row['n_runs']} run{'s' if row['n_runs'] != 1 else ''})"


def summary_sentences(results: pd.DataFrame, runs: pd.DataFrame, window_text: str) -> list[str]:
    """The executive summary in plain words (plain text; render escapes it)."""
    if runs.empty:
        return [f"No runs in this window ({window_text}): nothing to report. "
                "Run `workbench run ...` or widen --since."]
    ok = int((runs["status"] == "ok").sum())
    lines = [f"{len(runs)} runs in this window ({window_text}): {ok} succeeded, {len(runs) - ok} failed or skipped."]
    noisy = int((runs["noisy"] == True).sum()) if "noisy" in runs.columns else 0  # noqa: E712 (NULL: not measured)
    if noisy:
        lines.append(f"{noisy} of them ran on a noisy machine (other processes used the cores meanwhile): their "
                     "speed figures are suspect and count less in the recommendations.")
    if results.empty:
        return lines + ["No successful comparison with a baseline in this window: no technique can be recommended."]
    for choice in best_choices(results).to_dict(orient="records"):
        row, where = choice["row"], f"{choice['workload']} with {choice['model']} on machine {choice['machine']}"
        if choice["choice"] == "baseline":
            lines.append(f"For {where}: keep the baseline (no acceleration). No technique was faster with "
                         f"confidence (beyond the +-2% band of no practical difference) within the quality budget; "
                         f"the fastest measured was {row['configuration']} "
                         f"at {_ci_text(row)}, quality: {row['quality']}.")
        else:
            lines.append(f"For {where}: use {row['configuration']}. Expected latency saving about "
                         f"{row['latency_saving_percent']:.0f}% ({_ci_text(row)}); quality: {row['quality']}.")
    slower = results[results["verdict"] == "slower"]
    for (model, workload, machine), group in slower.groupby(["model", "workload", "machine"], sort=True):
        items = "; ".join(f"{row['configuration']} {_ci_text(row)}, {-row['latency_saving_percent']:.0f}% more "
                          "latency" for row in group.to_dict(orient="records"))
        lines.append(f"Slower than the baseline for {workload} with {model} on {machine}: {items}.")
    return lines


def changes_since(results: pd.DataFrame, previous: pd.DataFrame, previous_runs: pd.DataFrame,
                  runs: pd.DataFrame, top: int = 8) -> list[str]:
    """What changed against the previous window of the same length (plain sentences)."""
    if previous_runs.empty:
        return [f"No runs in the previous window of the same length: nothing to compare with "
                f"({len(runs)} runs now)."]
    lines = [f"{len(runs)} runs in this window against {len(previous_runs)} in the previous one."]
    keys = ["model", "workload", "machine", "configuration"]
    merged = results.merge(previous, on=keys, how="outer", suffixes=("", "_before"), indicator=True)
    both = merged[merged["_merge"] == "both"].copy()
    both["change"] = (both["speedup"] / both["speedup_before"]).apply(lambda r: abs(math.log(r)) if r > 0 else 0)
    for row in both.sort_values("change", ascending=False).head(top).to_dict(orient="records"):
        lines.append(f"{row['configuration']} ({row['workload']}, {row['model']}, {row['machine']}): speedup "
                     f"{row['speedup_before']:.2f}x -> {row['speedup']:.2f}x, quality "
                     f"{loss_text(row['quality_loss_before'], row['modality'])} -> "
                     f"{loss_text(row['quality_loss'], row['modality'])}.")
    new = merged[merged["_merge"] == "left_only"]
    gone = merged[merged["_merge"] == "right_only"]
    if len(new):
        lines.append(f"Newly measured: {', '.join(sorted(set(new['configuration'])))}.")
    if len(gone):
        lines.append(f"Not measured this time: {', '.join(sorted(set(gone['configuration'])))}.")
    return lines


def recommendations(runs: pd.DataFrame, budget: str, learner: str = "boosting") -> dict[str, Any]:
    """Train the meta-learner on the window's runs and recommend for every measured context.

    Returns ``{"table": DataFrame, "note": str, "learner": MetaLearner | None}``; with too few runs the
    table is empty and ``note`` says so plainly (never an exception).
    """
    from workbench.meta import features
    from workbench.meta.learner import Budget
    from workbench.meta.recommend import recommend, train

    columns = ["model", "workload", "machine", "recommendation", "predicted_speedup", "interval_80",
               "predicted_quality", "reasons", "fallback", "decision"]
    empty = pd.DataFrame(columns=columns)
    usable = len(features.training_table(features.run_features(runs))) if not runs.empty else 0
    if usable < 2:
        return {"table": empty, "learner": None,
                "note": f"Too few runs for the meta-learner: {usable} usable comparison(s) in this window, at "
                        "least 2 are needed. The summary above rests on the measurements alone."}
    try:
        fitted = train(runs, learner=learner)
    except WorkbenchError as err:
        return {"table": empty, "learner": None, "note": f"The meta-learner could not be trained: {err}"}
    rows = []
    table = fitted.training_table_
    # One recommendation per (model, workload, machine): the most recent context measured there.
    for _, first in table.drop_duplicates(["model", "workload", "machine_id"], keep="last").iterrows():
        context = {name: first[name] for name in features.CONTEXT_FEATURES}
        context.update(context=first["context"], model=first["model"], workload=first["workload"],
                       machine_id=first["machine_id"])
        rec = recommend(fitted, context, budget)
        rows.append({
            "model": rec.context["model"], "workload": rec.context["workload"],
            "machine": machine_label(rec.context["machine_id"], rec.context.get("device")),
            "recommendation": rec.configuration + (" (fallback)" if rec.fallback else ""),
            "predicted_speedup": rec.predicted_speedup,
            "interval_80": f"{rec.speedup_low:.2f}-{rec.speedup_high:.2f}x",
            "predicted_quality": rec.quality_text(),
            "reasons": "; ".join(rec.reasons) or "-",
            "fallback": "baseline if the measured interval does not clear the +-2% band" if not rec.fallback else
                        f"baseline kept; best candidate {rec.best_candidate or 'none'}",
            "decision": rec.decision,
        })
    note = (f"Meta-learner ({learner}) trained on {len(fitted.provenance_['run_ids'])} runs in this window, "
            f"{len(table)} (context, configuration) pairs; budget {Budget.parse(budget).describe()}. "
            + held_out_note(features.training_table(features.run_features(runs)), budget, learner))
    return {"table": pd.DataFrame(rows, columns=columns), "note": note, "learner": fitted}


def held_out_note(table: pd.DataFrame, budget: str, learner: str = "boosting") -> str:
    """How the learner did when one model (and one hardware configuration) at a time was held out: the
    share of the single-best-to-oracle gap it closed and its interval coverage, or why it cannot be told."""
    from workbench.meta import evaluate
    from workbench.meta.learner import Budget

    results = evaluate.evaluate(table, Budget.parse(budget), learners=(learner,), groupings=("model", "hardware"))
    own = results[results["policy"] == f"meta-learner ({learner})"]
    parts = []
    for _, row in own.iterrows():
        what = "one model" if row["grouping"] == "model" else "one hardware configuration"
        if row["note"]:
            parts.append(f"Holding out {what} is impossible here ({row['note']}), so its recommendations are untested.")
        elif pd.notna(row["gap_closed"]):
            parts.append(f"Holding out {what} at a time, it closed {row['gap_closed']:.0%} of the gap between always "
                         f"using the best-on-average configuration and the oracle (target 70%), and its 80% "
                         f"intervals held the measured speedup {row['interval_coverage']:.0%} of the time.")
        else:
            parts.append(f"Holding out {what} at a time, the best-on-average configuration was already the oracle: "
                         f"no gap to close (interval coverage {row['interval_coverage']:.0%}).")
    return " ".join(parts)


def environments(runs: pd.DataFrame) -> pd.DataFrame:
    """The latest environment fingerprint of each machine: one row per key, one column per machine."""
    if runs.empty:
        return pd.DataFrame()
    latest = runs.sort_values("created_at").groupby("machine_id", sort=True).last()
    columns = {}
    for machine_id, row in latest.iterrows():
        env = row["environment"] if isinstance(row["environment"], dict) else {}
        columns[str(machine_id)] = {k: (json.dumps(v, default=str) if isinstance(v, (dict, list)) else v)
                                    for k, v in env.items()}
    frame = pd.DataFrame(columns)
    frame.index.name = "key"
    return frame.reset_index()


def build_report(params: ReportParams, now: dt.datetime | None = None) -> dict[str, Any]:
    """Everything the report shows, as data.

    Example:
        >>> data = build_report(ReportParams(store_url="sqlite:///:memory:"))
        >>> sorted(data)[:4]
        ['changes', 'environments', 'explanation', 'failed']
    """
    from workbench.meta import explain
    from workbench.store import Store

    # 1. The two windows, filtered.
    now = now or dt.datetime.now(dt.timezone.utc)
    window = _window(params.since, now)
    store = Store(params.store_url)
    try:
        runs = _filtered_runs(store, params, window["start"], window["end"])
        previous_runs = _filtered_runs(store, params, window["previous_start"], window["start"])
    finally:
        store.close()
    window_text = f"since {params.since}" if _is_date(params.since) else f"the last {params.since}"
    # 2. Measured results, both windows; failures.
    results = results_table(runs, params.budget)
    previous = results_table(previous_runs, params.budget)
    failed = runs[runs["status"] != "ok"] if not runs.empty else runs
    # 3. The meta-learner: recommendations and the global explanation.
    recs = recommendations(runs, params.budget)
    explanation = None
    if recs["learner"] is not None:
        explanation = explain.global_explanation(recs["learner"], recs["learner"].training_table_)
    return {
        "params": params, "window": window, "window_text": window_text, "store_url": store.url,
        "generated_at": now, "runs": runs, "previous_runs": previous_runs, "results": results,
        "previous_results": previous, "failed": failed,
        "summary": summary_sentences(results, runs, window_text),
        "changes": changes_since(results, previous, previous_runs, runs) if not runs.empty else [],
        "recommendations": recs["table"], "recommendation_note": recs["note"], "explanation": explanation,
        "environments": environments(runs),
    }


def _is_date(since: str) -> bool:
    try:
        dt.datetime.fromisoformat(since.strip().replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


def run_counts(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs per technique and status (evidence)."""
    if runs.empty:
        return pd.DataFrame(columns=["technique", "status", "runs"])
    return runs.groupby(["technique", "status"]).size().rename("runs").reset_index()
