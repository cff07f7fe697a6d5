"""Scheduled reports: stored runs -> report data -> HTML sections -> one self-contained HTML file.

Three layers, each usable alone:

1. :class:`ReportParams` and :func:`check_store` validate what a scheduled job asked for, fast.
2. :func:`build_report` reads the store and returns the report as data (DataFrames, dicts, sentences):
   per-configuration results with confidence intervals, the comparison with the previous window, failed
   runs, the meta-learner's recommendations and explanation, each machine's environment.
3. ``*_html`` / ``*_figure`` functions render that data (every string from the store escaped), and
   :func:`render_report` executes ``notebooks/report.ipynb`` with papermill on a fresh kernel, converts it
   with nbconvert (no code, no prompts, plotly.js inlined once) and swaps the HTML into place atomically.

Example:
    >>> params = ReportParams(store_url="sqlite:///:memory:", since="7d")
    >>> data = build_report(params)
    >>> data["summary"][0]
    'No runs in this window (the last 7d): nothing to report. Run `workbench run ...` or widen --since.'
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from workbench.errors import WorkbenchError

#: The parameterized notebook that ``workbench report`` executes.
REPORT_NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "report.ipynb"
AUDIENCES = ("manager", "engineer")  # manager: summary-first, fewer tables; engineer: every run listed
PARAM_KEYS = ("store_url", "since", "models", "machines", "techniques", "budget", "title", "audience")
KERNEL_NAME = "workbench-report"  # a private kernelspec that points at this interpreter

# A template on top of JupyterLab's that loads nothing from the network (no require.js, MathJax, mermaid).
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""

_CSS = """<style>
.wb-report {font-family: system-ui, sans-serif; max-width: 1100px}
.wb-report table {border-collapse: collapse; font-size: 13px; margin: 6px 0 14px}
.wb-report .scroll {overflow-x: auto; max-width: 100%}
.wb-report th, .wb-report td {border: 1px solid #ccc; padding: 3px 6px; text-align: left !important;
  vertical-align: top; max-width: 26em; overflow-wrap: anywhere}
.wb-report th {background: #f3f3f3}
.wb-report .note {color: #555}
.wb-report .slower {color: #a33}
</style>"""


# ------------------------------------------------------------------------------------------------
# 1. parameters
# ------------------------------------------------------------------------------------------------


def _names(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A comma-separated string or a list -> a tuple of non-empty names."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


@dataclass(frozen=True)
class ReportParams:
    """What one report covers; validated on creation (the error names the bad value and the fix).

    Example:
        >>> ReportParams(since="7d", techniques="speculative,quantization").techniques
        ('speculative', 'quantization')
        >>> ReportParams(since="yesterday")
        Traceback (most recent call last):
        ...
        workbench.store.StoreError: cannot read the time 'yesterday': use a duration back from now such as 7d, 12h, 30m or 2w, or an ISO date such as 2024-05-01
    """

    store_url: str | None = None  # SQLAlchemy URL; None: the default SQLite store under data/
    since: str = "7d"  # the window: a duration back from now (7d, 12h) or an ISO date
    models: tuple[str, ...] = ()  # only these models (empty: all)
    machines: tuple[str, ...] = ()  # only these machine ids (empty: all)
    techniques: tuple[str, ...] = ()  # only these techniques (empty: all)
    budget: str = "accuracy<=1"  # quality budget of recommendations: lossless, any, accuracy<=X points
    title: str = "Inference acceleration report"  # the heading of the page
    audience: str = "manager"  # manager (summary first, fewer tables) or engineer (every run listed)

    def __post_init__(self) -> None:
        from workbench.meta.learner import Budget
        from workbench.store import parse_since

        for name in ("models", "machines", "techniques"):
            object.__setattr__(self, name, _names(getattr(self, name)))
        object.__setattr__(self, "store_url", self.store_url or None)
        parse_since(self.since)  # raises StoreError naming the bad value
        Budget.parse(self.budget)
        if self.audience not in AUDIENCES:
            raise WorkbenchError(f"audience {self.audience!r} is unknown: use one of {', '.join(AUDIENCES)}")
        if not str(self.title).strip():
            raise WorkbenchError("title is empty: pass a title such as --param title='Weekly report'")

    @classmethod
    def from_pairs(cls, pairs: Sequence[str] = (), **given: Any) -> ReportParams:
        """Build from ``key=value`` strings (the CLI's ``--param``) on top of keyword values.

        Example:
            >>> ReportParams.from_pairs(["budget=lossless", "models=zoo:a,zoo:b"]).models
            ('zoo:a', 'zoo:b')
        """
        values = {k: v for k, v in given.items() if v is not None}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in PARAM_KEYS:
                raise WorkbenchError(f"--param {pair!r} is not key=value with a known key: use one of "
                                     f"{', '.join(PARAM_KEYS)}, e.g. --param budget=lossless")
            values[key] = value.strip()
        return cls(**values)

    def notebook_parameters(self) -> dict[str, Any]:
        """The values papermill injects (lists as comma-separated strings, the notebook's types)."""
        values = asdict(self)
        for name in ("models", "machines", "techniques"):
            values[name] = ",".join(values[name])
        values["store_url"] = values["store_url"] or ""
        return values


def check_store(url: str | None) -> str:
    """Open the store once (fast) and return its display URL; a missing SQLite file is an error here,
    because a report must never create an empty store by accident.

    Example:
        >>> check_store("sqlite:////nonexistent/x.sqlite")
        Traceback (most recent call last):
        ...
        workbench.errors.WorkbenchError: store file /nonexistent/x.sqlite does not exist: pass --store with an existing store URL (e.g. sqlite:///data/store.sqlite) or run `workbench run ...` first
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from workbench import paths
    from workbench.store import Store

    text = url or paths.default_store_url()
    try:
        parsed = make_url(text)
    except ArgumentError:
        raise WorkbenchError(f"store URL {text!r} cannot be read: use a SQLAlchemy URL such as "
                             "sqlite:///data/store.sqlite or postgresql://user@host/db") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:" \
            and not parsed.database.startswith("file:") and not Path(parsed.database).exists():
        raise WorkbenchError(f"store file {parsed.database} does not exist: pass --store with an existing store "
                             "URL (e.g. sqlite:///data/store.sqlite) or run `workbench run ...` first")
    store = Store(text)
    store.close()
    return store.url


# ------------------------------------------------------------------------------------------------
# 2. data
# ------------------------------------------------------------------------------------------------


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


def results_table(runs: pd.DataFrame, budget: str = "accuracy<=1") -> pd.DataFrame:
    """One row per (model, workload, machine, configuration) measured successfully: speed and quality.

    Speed is the median speedup over the baseline across runs, with the median of the runs' own 95%
    bootstrap intervals (``speedup_ci_low`` / ``_high``); ``latency_saving_percent`` is
    ``100 * (1 - 1/speedup)`` (negative: slower). Quality is ``quality_loss_points`` (0 = identical
    output) beside the last run's quality in words.

    Example:
        >>> results_table(pd.DataFrame()).empty
        True
    """
    from workbench.display import quality_text
    from workbench.meta import features
    from workbench.meta.learner import Budget

    columns = ["model", "workload", "machine", "machine_id", "device", "technique", "configuration", "n_runs",
               "speedup", "speedup_ci_low", "speedup_ci_high", "latency_saving_percent", "verdict",
               "quality_loss_points", "lossless", "within_budget", "quality"]
    table = features.run_features(runs) if not runs.empty else pd.DataFrame()
    if table.empty:
        return pd.DataFrame(columns=columns)
    extra = runs[["run_id", "speedup", "speedup_ci_low", "speedup_ci_high", "quality", "quality_metrics", "device",
                  "technique"]]
    table = table.drop(columns=[c for c in ("device", "technique") if c in table.columns]).merge(extra, on="run_id")
    parsed = Budget.parse(budget)
    rows = []
    keys = ["model", "workload", "machine_id", "device", "technique", "configuration"]
    for key, group in table.sort_values("created_at").groupby(keys, sort=True):
        row = dict(zip(keys, key))
        speedup = float(group["speedup"].median())
        low = float(group["speedup_ci_low"].median()) if group["speedup_ci_low"].notna().any() else math.nan
        high = float(group["speedup_ci_high"].median()) if group["speedup_ci_high"].notna().any() else math.nan
        loss = float(group["quality_loss_points"].mean())
        lossless = bool(group["lossless"].iloc[-1])
        row.update(machine=machine_label(row["machine_id"], row["device"]), n_runs=len(group), speedup=speedup,
                   speedup_ci_low=low, speedup_ci_high=high, latency_saving_percent=100.0 * (1.0 - 1.0 / speedup),
                   verdict="faster" if low > 1.0 else "slower" if high < 1.0 else "no clear difference",
                   quality_loss_points=loss, lossless=lossless,
                   within_budget=parsed.allows(lossless, loss if math.isfinite(loss) else 0.0),
                   quality=quality_text(group["quality"].iloc[-1] or {}, group["quality_metrics"].iloc[-1]))
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def best_choices(results: pd.DataFrame) -> pd.DataFrame:
    """Per (model, workload, machine): the fastest configuration within budget whose interval is above
    1.0, or a ``baseline`` row when none is (then ``best_measured`` names the fastest one anyway)."""
    rows = []
    for (model, workload, machine), group in results.groupby(["model", "workload", "machine"], sort=True):
        sure = group[group["within_budget"] & (group["speedup_ci_low"] > 1.0)].sort_values("speedup", ascending=False)
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
    if results.empty:
        return lines + ["No successful comparison with a baseline in this window: no technique can be recommended."]
    for choice in best_choices(results).to_dict(orient="records"):
        row, where = choice["row"], f"{choice['workload']} with {choice['model']} on machine {choice['machine']}"
        if choice["choice"] == "baseline":
            lines.append(f"For {where}: keep the baseline (no acceleration). No technique was faster with "
                         f"confidence within the quality budget; the fastest measured was {row['configuration']} "
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
                     f"{row['speedup_before']:.2f}x -> {row['speedup']:.2f}x, quality loss "
                     f"{row['quality_loss_points_before']:.2f} -> {row['quality_loss_points']:.2f} points.")
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
    from workbench.meta.recommend import recommend, train

    columns = ["model", "workload", "machine", "recommendation", "predicted_speedup", "interval_80",
               "predicted_quality_loss_points", "reasons", "fallback", "decision"]
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
            "predicted_quality_loss_points": rec.predicted_quality_loss_points,
            "reasons": "; ".join(rec.reasons) or "-",
            "fallback": "baseline if the measured interval contains 1.0" if not rec.fallback else
                        f"baseline kept; best candidate {rec.best_candidate or 'none'}",
            "decision": rec.decision,
        })
    note = (f"Meta-learner ({learner}) trained on {len(fitted.provenance_['run_ids'])} runs in this window, "
            f"{len(table)} (context, configuration) pairs; budget {budget}.")
    return {"table": pd.DataFrame(rows, columns=columns), "note": note, "learner": fitted}


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


# ------------------------------------------------------------------------------------------------
# 3. display: HTML strings and plotly figures, built from the data above
# ------------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    """Any value as escaped text for HTML."""
    return html.escape(str(value), quote=True)


def table_html(frame: pd.DataFrame, float_digits: int = 3) -> str:
    """A DataFrame as an HTML table with every cell escaped."""
    if frame is None or frame.empty:
        return "<p class='note'>(none)</p>"
    body = frame.to_html(index=False, escape=True, na_rep="-", border=0,
                         float_format=lambda v: f"{v:.{float_digits}f}")
    return f"<div class='scroll'>{body}</div>"


def _sentences_html(lines: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>"


def header_html(data: dict[str, Any]) -> str:
    """Title, window, store and parameters."""
    p: ReportParams = data["params"]
    filters = ", ".join(f"{name}: {', '.join(getattr(p, name))}" for name in ("models", "machines", "techniques")
                        if getattr(p, name)) or "none"
    return (f"{_CSS}<div class='wb-report'><h1>{esc(p.title)}</h1><p class='note'>Window: {esc(data['window_text'])} "
            f"({esc(data['window']['start'].strftime('%Y-%m-%d %H:%M'))} to "
            f"{esc(data['window']['end'].strftime('%Y-%m-%d %H:%M'))} UTC). Store: {esc(data['store_url'])}. "
            f"Filters: {esc(filters)}. Quality budget: {esc(p.budget)}. For: {esc(p.audience)}.</p></div>")


def summary_html(data: dict[str, Any]) -> str:
    """The executive summary and the change since the previous window."""
    parts = ["<div class='wb-report'><h2>Executive summary</h2>", _sentences_html(data["summary"])]
    if data["changes"]:
        parts += ["<h3>What changed since the previous window</h3>", _sentences_html(data["changes"])]
    return "".join(parts) + "</div>"


def recommendations_html(data: dict[str, Any]) -> str:
    """The meta-learner's recommendations with reasons and the fallback, or why there are none."""
    return (f"<div class='wb-report'><h2>Recommendations (meta-learner)</h2><p>{esc(data['recommendation_note'])}"
            f"</p>{table_html(data['recommendations']) if not data['recommendations'].empty else ''}</div>")


def tradeoff_figure(results: pd.DataFrame) -> Any:
    """Speedup (with 95% CI error bars) against quality loss, one colour per technique, one panel per
    machine; the dashed line at 1.0x is the baseline (below it: slower)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    machines = sorted(results["machine"].unique())
    fig = make_subplots(rows=1, cols=len(machines), subplot_titles=[esc(m) for m in machines], shared_yaxes=True)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for t, technique in enumerate(sorted(results["technique"].unique())):
        for m, machine in enumerate(machines, start=1):
            part = results[(results["technique"] == technique) & (results["machine"] == machine)]
            if part.empty:
                continue
            hover = [esc(f"{r.configuration} | {r.model} | {r.workload} | {r.quality}") for r in part.itertuples()]
            fig.add_trace(go.Scatter(
                x=part["quality_loss_points"], y=part["speedup"], mode="markers", name=esc(technique),
                legendgroup=technique, showlegend=m == 1, marker={"size": 11, "color": palette[t % len(palette)]},
                error_y={"type": "data", "symmetric": False,
                         "array": (part["speedup_ci_high"] - part["speedup"]).clip(lower=0),
                         "arrayminus": (part["speedup"] - part["speedup_ci_low"]).clip(lower=0)},
                hovertext=hover, hoverinfo="text+x+y"), row=1, col=m)
            fig.update_xaxes(title_text="quality loss (points, 0 = identical)", row=1, col=m)
        fig.add_hline(y=1.0, line_dash="dash", line_color="grey")
    fig.update_yaxes(title_text="speedup over baseline (x, 95% CI)", type="log", row=1, col=1)
    fig.update_layout(title="Trade-off: speed against quality, per technique and machine", height=460,
                      legend_title_text="technique")
    return fig


def evidence_html(data: dict[str, Any]) -> str:
    """Run counts, every configuration's speed beside its quality and uncertainty, failed runs and why."""
    results = data["results"].copy()
    shown = ["model", "workload", "machine", "configuration", "n_runs", "speedup", "speedup_ci_low",
             "speedup_ci_high", "latency_saving_percent", "verdict", "quality_loss_points", "quality"]
    failed = data["failed"]
    failed_view = (failed[["created_at", "run_id", "status", "model", "technique", "failure_reason"]].assign(
        run_id=lambda f: f["run_id"].str[:12], created_at=lambda f: f["created_at"].dt.strftime("%Y-%m-%d %H:%M"))
        if not failed.empty else failed)
    parts = ["<div class='wb-report'><h2>Evidence</h2><h3>Runs per technique and status</h3>",
             table_html(run_counts(data["runs"])),
             "<h3>Speed beside quality (median over runs; 95% bootstrap interval of the speedup)</h3>",
             table_html(results[shown] if not results.empty else results),
             f"<h3>Failed and skipped runs ({len(failed)})</h3>", table_html(failed_view)]
    if data["params"].audience == "engineer" and not data["runs"].empty:
        runs = data["runs"][["created_at", "run_id", "status", "model", "workload", "technique", "machine_id",
                             "speedup", "speedup_ci_low", "speedup_ci_high"]].assign(
            created_at=lambda f: f["created_at"].dt.strftime("%Y-%m-%d %H:%M:%S"),
            run_id=lambda f: f["run_id"].str[:12])
        parts += ["<h3>Every run in the window</h3>", table_html(runs)]
    return "".join(parts) + "</div>"


def explanation_html(data: dict[str, Any]) -> str:
    """The meta-learner's global explanation in words (figures come from :func:`explanation_figures`)."""
    if data["explanation"] is None:
        return (f"<div class='wb-report'><h2>Why: the meta-learner's explanation</h2>"
                f"<p>{esc(data['recommendation_note'])}</p></div>")
    rules = data["explanation"]["rules"]
    return ("<div class='wb-report'><h2>Why: the meta-learner's explanation</h2><p>Permutation importance: how "
            "much the error in predicted log speedup rises when a feature is shuffled. Partial dependence: the "
            "average predicted speedup as one feature varies.</p><h3>Rules (first tree)</h3><pre>"
            f"{esc(rules)}</pre></div>")


def explanation_figures(data: dict[str, Any]) -> list[Any]:
    """Importance and partial-dependence figures, or none without a learner."""
    from workbench.meta import plots

    if data["explanation"] is None:
        return []
    figures = [plots.importance_figure(data["explanation"]["importance"])]
    if not data["explanation"]["partial_dependence"].empty:
        figures.append(plots.partial_dependence_figure(data["explanation"]["partial_dependence"]))
    return figures


def environment_html(data: dict[str, Any]) -> str:
    """Appendix: the environment of each machine."""
    return ("<div class='wb-report'><h2>Appendix: environment of each machine</h2>"
            f"{table_html(data['environments'])}</div>")


@dataclass
class FigureEmbedder:
    """Figures -> HTML fragments; plotly.js is inlined with the first figure only (offline, once).

    Example:
        >>> import plotly.graph_objects as go
        >>> embed = FigureEmbedder()
        >>> len(embed.html(go.Figure())) > len(embed.html(go.Figure()))
        True
    """

    inlined: bool = False  # plotly.js already written into the page
    config: dict[str, Any] = field(default_factory=lambda: {"displaylogo": False, "responsive": True})

    def html(self, fig: Any) -> str:
        fragment = fig.to_html(full_html=False, include_plotlyjs=not self.inlined, config=self.config)
        self.inlined = True
        return fragment


# ------------------------------------------------------------------------------------------------
# 4. render: papermill on a fresh kernel -> nbconvert -> atomic rename
# ------------------------------------------------------------------------------------------------


def render_report(params: ReportParams, out: str | Path, cell_timeout_s: float = 300.0,
                  total_timeout_s: float = 900.0, notebook: str | Path = REPORT_NOTEBOOK) -> dict[str, Any]:
    """Execute the report notebook, convert it, and put ``out`` (HTML) and ``out``.ipynb in place.

    Both files are written to a temporary folder beside ``out`` and renamed into place only when
    everything succeeded, so a failure never replaces an earlier good report.

    Returns:
        ``{"html": Path, "notebook": Path, "html_bytes": int, "seconds": float}``

    Example:
        >>> render_report(ReportParams(), "reports/weekly.html")  # doctest: +SKIP
    """
    import time

    # 1. Validate before any long work.
    started = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".html":
        raise WorkbenchError(f"--out {str(out)!r} must end in .html, e.g. reports/weekly.html")
    if not Path(notebook).exists():
        raise WorkbenchError(f"report notebook {notebook} is missing: reinstall workbench from its repository")
    check_store(params.store_url)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}-", dir=out.parent))
    try:
        # 2. Execute in a child process with a private kernelspec (this interpreter); kill it on timeout.
        executed = work / f"{out.stem}.ipynb"
        kernels = work / "jupyter" / "kernels" / KERNEL_NAME
        kernels.mkdir(parents=True)
        (kernels / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "workbench report", "language": "python"}))
        job = {"notebook": str(notebook), "executed": str(executed), "parameters": params.notebook_parameters(),
               "cell_timeout_s": cell_timeout_s, "cwd": str(Path.cwd())}
        env = dict(os.environ, JUPYTER_PATH=str(work / "jupyter"), PYTHONWARNINGS="ignore")
        _run_child([sys.executable, "-m", "workbench.report", json.dumps(job)], env, total_timeout_s)
        # 3. Convert, then rename both files into place (the HTML last: it is what readers open).
        page = to_html(executed, title=params.title)
        tmp_html = work / f"{out.stem}.html"
        tmp_html.write_text(page, encoding="utf-8")
        os.replace(executed, out.with_suffix(".ipynb"))
        os.replace(tmp_html, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"html": out, "notebook": out.with_suffix(".ipynb"), "html_bytes": out.stat().st_size,
            "seconds": time.perf_counter() - started}


def _run_child(command: list[str], env: dict[str, str], timeout_s: float) -> None:
    """Run the executing child in its own process group; its stderr's last line becomes the error."""
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child and its kernel
        child.communicate()
        raise WorkbenchError(f"the report took longer than {timeout_s:.0f}s and was stopped: raise --timeout "
                             "or narrow --since / the filters") from None
    if child.returncode != 0:
        lines = [line for line in (err or "").strip().splitlines() if line.strip()]
        raise WorkbenchError(lines[-1].removeprefix("error: ") if lines else
                             f"executing the report notebook failed (exit {child.returncode})")


def to_html(executed: str | Path, title: str) -> str:
    """nbconvert an executed notebook: no input cells, no prompts, no stderr, nothing from the network."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    for cell in nb.cells:
        if cell.get("cell_type") == "code":
            cell.outputs = [o for o in cell.outputs
                            if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    nb.metadata["title"] = title
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, extra_loaders=[jinja2.DictLoader({"wb.j2": _OFFLINE_TEMPLATE})],
                            template_file="wb.j2")
    body, _ = exporter.from_notebook_node(nb)
    return body


def _execute(job: dict[str, Any]) -> int:
    """Child side of :func:`render_report`: papermill on a fresh kernel; one line on stderr on failure."""
    import logging

    import papermill

    logging.getLogger("papermill").setLevel(logging.ERROR)
    try:
        papermill.execute_notebook(job["notebook"], job["executed"], parameters=job["parameters"],
                                   kernel_name=KERNEL_NAME, execution_timeout=job["cell_timeout_s"],
                                   progress_bar=False, log_output=False, cwd=job["cwd"])
    except papermill.PapermillExecutionError as err:
        value = str(err.evalue).strip().splitlines()[0] if str(err.evalue).strip() else ""
        print(f"error: report cell {err.exec_count} failed: {err.ename}: {value}", file=sys.stderr)
        return 1
    except Exception as err:  # a kernel that dies, a cell timeout: still one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"error: executing the report failed: {type(err).__name__}: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_execute(json.loads(sys.argv[1])))
