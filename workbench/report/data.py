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


def machine_label(machine_id: Any, device: Any, environment: Any = None, threads: Any = None,
                  dtype: Any = None) -> str:
    """A machine (and how it ran) for people: ``2-core AMD EPYC (cpu), 1 thread, bfloat16``.

    Example:
        >>> machine_label("5b7bbcfd0a", "cpu")
        '5b7bbcfd (cpu)'
        >>> machine_label("5b7bbcfd0a", "cpu", {"cpu_model": "AMD EPYC", "cpu_cores_physical": 2}, 1, "bfloat16")
        '2-core AMD EPYC (cpu), 1 thread, bfloat16'
    """
    from workbench.names import machine_name

    parts = [machine_name(environment, machine_id, device)]
    if threads is not None and not (isinstance(threads, float) and math.isnan(threads)):
        parts.append(f"{threads:g} thread{'' if float(threads) == 1 else 's'}")
    if dtype and str(dtype) != "float32":
        parts.append(str(dtype))
    return ", ".join(parts)


def workload_label(workload: Any, batch_size: Any) -> str:
    """``code-snippets`` or ``code-snippets, batch 16``."""
    try:
        batch = int(batch_size)
    except (TypeError, ValueError):
        return str(workload)
    return f"{workload}, batch {batch}" if batch > 1 else str(workload)


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

    from workbench.names import configuration_name

    columns = ["model", "workload", "batch_size", "context", "machine", "machine_id", "device", "dtype", "threads",
               "modality", "technique", "configuration", "name", "n_runs", "noisy_runs", "speedup", "speedup_ci_low",
               "speedup_ci_high", "latency_saving_percent", "verdict", "quality_loss", "quality_loss_text", "lossless",
               "within_budget", "quality"]
    table = features.run_features(runs) if not runs.empty else pd.DataFrame()
    if table.empty:
        return pd.DataFrame(columns=columns)
    extra = runs[["run_id", "speedup", "speedup_ci_low", "speedup_ci_high", "quality", "quality_metrics", "device",
                  "technique", "environment"]]
    table = table.drop(columns=[c for c in ("device", "technique") if c in table.columns]).merge(extra, on="run_id")
    table["batch_size"] = pd.to_numeric(table["batch_size"], errors="coerce").fillna(1).astype(int)
    table["threads"] = pd.to_numeric(table["threads"], errors="coerce")
    parsed = Budget.parse(budget)
    rows = []
    keys = ["model", "workload", "batch_size", "machine_id", "device", "dtype", "threads", "modality", "technique",
            "configuration"]
    for key, group in table.sort_values("created_at").groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key))
        speedup = float(group["speedup"].median())
        low = float(group["speedup_ci_low"].median()) if group["speedup_ci_low"].notna().any() else math.nan
        high = float(group["speedup_ci_high"].median()) if group["speedup_ci_high"].notna().any() else math.nan
        loss = float(group["quality_loss"].mean()) if group["quality_loss"].notna().any() else math.nan
        lossless = bool(group["lossless"].iloc[-1])
        row.update(machine=machine_label(row["machine_id"], row["device"], group["environment"].iloc[-1],
                                         row["threads"], row["dtype"]),
                   context=workload_label(row["workload"], row["batch_size"]),
                   name=configuration_name(row["configuration"]), n_runs=len(group),
                   noisy_runs=int(group["noisy"].sum()), speedup=speedup,
                   speedup_ci_low=low, speedup_ci_high=high, latency_saving_percent=100.0 * (1.0 - 1.0 / speedup),
                   verdict=verdict(low, high), quality_loss=loss, quality_loss_text=loss_text(loss, row["modality"]),
                   lossless=lossless, within_budget=parsed.allows(lossless, loss, row["modality"]),
                   quality=quality_text(group["quality"].iloc[-1] or {}, group["quality_metrics"].iloc[-1]))
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def best_choices(results: pd.DataFrame) -> pd.DataFrame:
    """Per (model, workload and batch, machine): the fastest configuration within budget whose verdict is
    "faster" (its interval clears the +-2% band), or a ``baseline`` row when none is (then
    ``best_measured`` names the fastest one anyway)."""
    rows = []
    for (model, context, machine), group in results.groupby(["model", "context", "machine"], sort=True):
        sure = group[group["within_budget"] & (group["verdict"] == "faster")].sort_values("speedup", ascending=False)
        fastest = group.sort_values("speedup", ascending=False).iloc[0]
        chosen = fastest if sure.empty else sure.iloc[0]
        rows.append({"model": model, "context": context, "workload": chosen["workload"], "machine": machine,
                     "choice": "baseline" if sure.empty else chosen["configuration"],
                     "best_measured": fastest["configuration"], "row": chosen.to_dict()})
    return pd.DataFrame(rows, columns=["model", "context", "workload", "machine", "choice", "best_measured", "row"])


def decision(results: pd.DataFrame, runs: pd.DataFrame, top: int = 5) -> dict[str, Any]:
    """The one-screen decision: the ``top`` measured actions (a technique faster with confidence within the
    budget, largest time saving first) and what the rest of the window amounts to, in counts.

    Returns ``{"actions": DataFrame, "more_actions": int, "keep_baseline": int, "slower": int,
    "contexts": int, "runs": int, "noisy": int, "failed": int}``; every figure is a measurement (the
    meta-learner's predictions stay in its own section).
    """
    columns = ["model", "context", "machine", "use", "configuration", "time_saved_percent", "speedup",
               "speedup_ci_low", "speedup_ci_high", "n_runs", "quality", "lossless"]
    choices = best_choices(results) if not results.empty else pd.DataFrame(columns=["choice", "row"])
    acting = [c for c in choices.to_dict(orient="records") if c["choice"] != "baseline"]
    acting.sort(key=lambda c: -c["row"]["latency_saving_percent"])
    actions = pd.DataFrame([{
        "model": c["model"], "context": c["context"], "machine": c["machine"], "use": c["row"]["name"],
        "configuration": c["choice"], "time_saved_percent": c["row"]["latency_saving_percent"],
        "speedup": c["row"]["speedup"], "speedup_ci_low": c["row"]["speedup_ci_low"],
        "speedup_ci_high": c["row"]["speedup_ci_high"], "n_runs": c["row"]["n_runs"],
        "quality": "identical outputs (lossless)" if c["row"]["lossless"] else c["row"]["quality_loss_text"],
        "lossless": c["row"]["lossless"]} for c in acting[:top]], columns=columns)
    noisy = int((runs["noisy"] == True).sum()) if not runs.empty and "noisy" in runs.columns else 0  # noqa: E712
    return {"actions": actions, "more_actions": max(0, len(acting) - top),
            "keep_baseline": len(choices) - len(acting),
            "slower": int((results["verdict"] == "slower").sum()) if not results.empty else 0,
            "contexts": len(choices), "runs": len(runs), "noisy": noisy,
            "failed": int((runs["status"] != "ok").sum()) if not runs.empty else 0}


def _ci_text(row: Any) -> str:
    from workbench.names import sig

    low, high = row["speedup_ci_low"], row["speedup_ci_high"]
    interval = f"95% CI {sig(low)}-{sig(high)}x" if math.isfinite(low) and math.isfinite(high) else "no interval"
    return f"{sig(row['speedup'])}x ({interval}, {row['n_runs']} run{'s' if row['n_runs'] != 1 else ''})"


def summary_sentences(results: pd.DataFrame, runs: pd.DataFrame, window_text: str) -> list[str]:
    """The findings in plain words, one per (model, workload, machine) (plain text; render escapes it)."""
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
    slower = results[results["verdict"] == "slower"]
    for choice in best_choices(results).to_dict(orient="records"):
        row, where = choice["row"], f"{choice['context']} with {choice['model']} on {choice['machine']}"
        if choice["choice"] == "baseline":
            line = (f"{where}: keep the baseline; nothing was faster with confidence within the quality budget "
                    f"(fastest measured: {row['name']}, {_ci_text(row)}, {row['quality_loss_text']}).")
        else:
            line = (f"{where}: use {row['name']}, about {row['latency_saving_percent']:.0f}% less time "
                    f"({_ci_text(row)}); quality: {row['quality']}.")
        here = slower[(slower["model"] == choice["model"]) & (slower["context"] == choice["context"])
                      & (slower["machine"] == choice["machine"])]
        if len(here):
            line += f" Slower than the baseline: {', '.join(here['name'])}."
        lines.append(line)
    return lines


def changes_since(results: pd.DataFrame, previous: pd.DataFrame, previous_runs: pd.DataFrame,
                  runs: pd.DataFrame, top: int = 8) -> list[str]:
    """What changed against the previous window of the same length (plain sentences)."""
    from workbench.names import sig

    if previous_runs.empty:
        return [f"No runs in the previous window of the same length: nothing to compare with "
                f"({len(runs)} runs now)."]
    lines = [f"{len(runs)} runs in this window against {len(previous_runs)} in the previous one."]
    keys = ["model", "context", "machine", "configuration"]
    merged = results.merge(previous, on=keys, how="outer", suffixes=("", "_before"), indicator=True)
    both = merged[merged["_merge"] == "both"].copy()
    both["change"] = (both["speedup"] / both["speedup_before"]).apply(lambda r: abs(math.log(r)) if r > 0 else 0)
    for row in both.sort_values("change", ascending=False).head(top).to_dict(orient="records"):
        lines.append(f"{row['name']} ({row['context']}, {row['model']}, {row['machine']}): speedup "
                     f"{sig(row['speedup_before'])}x -> {sig(row['speedup'])}x, quality "
                     f"{loss_text(row['quality_loss_before'], row['modality'])} -> "
                     f"{loss_text(row['quality_loss'], row['modality'])}.")
    new = merged[merged["_merge"] == "left_only"]
    gone = merged[merged["_merge"] == "right_only"]
    if len(new):
        lines.append(f"Newly measured: {', '.join(sorted(set(new['name'])))}.")
    if len(gone):
        lines.append(f"Not measured this time: {', '.join(sorted(set(gone['name_before'].fillna(gone['configuration']))))}.")
    return lines


#: The least the learner section needs: usable (context, configuration) pairs over distinct models,
#: so that holding one model out still leaves something to learn from.
MIN_LEARNER_PAIRS, MIN_LEARNER_MODELS = 20, 3


def learner_evaluation(runs: pd.DataFrame, budget: str, learner: str = "boosting") -> dict[str, Any]:
    """Train the meta-learner on the window's runs and evaluate it on held-out models and hardware.

    Returns ``{"learner": MetaLearner | None, "evaluated": bool, "gap_closed": float, "held_out":
    DataFrame, "note": str}``. ``evaluated`` is False (and ``note`` says why, plainly) when the window
    has too little data to hold a model out; the report then leaves the learner section out rather
    than show a model nobody can check.
    """
    from workbench.meta import evaluate, features
    from workbench.meta.learner import Budget
    from workbench.meta.recommend import train

    empty = {"learner": None, "evaluated": False, "gap_closed": math.nan, "held_out": pd.DataFrame()}
    table = features.training_table(features.run_features(runs)) if not runs.empty else pd.DataFrame()
    models = table["model"].nunique() if not table.empty else 0
    if len(table) < MIN_LEARNER_PAIRS or models < MIN_LEARNER_MODELS:
        return {**empty, "note": f"The meta-learner is left out: this window has {len(table)} usable comparisons "
                                 f"over {models} model(s), and evaluating it on a held-out model needs at least "
                                 f"{MIN_LEARNER_PAIRS} over {MIN_LEARNER_MODELS}. The decision above rests on "
                                 "the measurements alone."}
    try:
        fitted = train(runs, learner=learner)
        results = evaluate.evaluate(table, Budget.parse(budget), learners=(learner,),
                                    groupings=("model", "hardware"), plain_boosting=False)
    except WorkbenchError as err:
        return {**empty, "note": f"The meta-learner could not be trained: {err}"}
    own = results[results["policy"] == f"meta-learner ({learner})"].reset_index(drop=True)
    by_model = own[own["grouping"] == "model"]
    gap = float(by_model["gap_closed"].iloc[0]) if len(by_model) and pd.notna(by_model["gap_closed"].iloc[0]) \
        else math.nan
    note = (f"Meta-learner ({learner}) trained on {len(fitted.provenance_['run_ids'])} runs in this window, "
            f"{len(table)} (context, configuration) pairs over {models} models; budget "
            f"{Budget.parse(budget).describe()}. " + held_out_note(own))
    return {"learner": fitted, "evaluated": bool(len(by_model) and not by_model["note"].iloc[0]),
            "gap_closed": gap, "held_out": own, "note": note}


def held_out_note(own: pd.DataFrame) -> str:
    """How the learner did when one model (and one hardware configuration) at a time was held out: the
    share of the single-best-to-oracle gap it closed and its interval coverage, or why it cannot be told."""
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
    """The latest environment fingerprint of each machine: one row per key (bytes in GiB or GB/s), one
    column per machine, headed by its name for people and its id."""
    from workbench.names import machine_name

    if runs.empty:
        return pd.DataFrame()
    latest = runs.sort_values("created_at").groupby("machine_id", sort=True).last()
    columns = {}
    for machine_id, row in latest.iterrows():
        env = row["environment"] if isinstance(row["environment"], dict) else {}
        values = {}
        for key, value in env.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value, default=str)
            elif key.endswith("_bytes_per_s") and isinstance(value, (int, float)):
                key, value = key.replace("_bytes_per_s", " (GB/s)"), f"{value / 1e9:.3g}"
            elif key.endswith("_bytes") and isinstance(value, (int, float)):
                key, value = key.replace("_bytes", " (GiB)"), f"{value / 2**30:.3g}"
            values[key.replace("_", " ")] = value
        columns[f"{machine_name(env, machine_id, row.get('device'))} [{str(machine_id)[:8]}]"] = values
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
    store = Store(params.store_url, create=params.store_url is None)
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
    # 3. The meta-learner, when the window can evaluate it: held-out figures and the global explanation.
    learned = learner_evaluation(runs, params.budget, params.learner)
    explanation = None
    if learned["evaluated"]:
        explanation = explain.global_explanation(learned["learner"], learned["learner"].training_table_)
    return {
        "params": params, "window": window, "window_text": window_text, "store_url": store.url,
        "generated_at": now, "runs": runs, "previous_runs": previous_runs, "results": results,
        "previous_results": previous, "failed": failed, "decision": decision(results, runs),
        "summary": summary_sentences(results, runs, window_text),
        "changes": changes_since(results, previous, previous_runs, runs) if not runs.empty else [],
        "learner": learned, "learner_note": learned["note"], "explanation": explanation,
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
