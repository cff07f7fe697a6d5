"""Report sections: HTML strings and plotly figures built from the report data (every stored string escaped)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from workbench.report.data import run_counts
from workbench.report.params import _CSS, ReportParams


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
    """Speedup (with 95% CI error bars) against quality loss, one panel per modality (each loss in its own
    unit), one colour per technique, one symbol per machine; the dashed line at 1.0x is the baseline."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from workbench.quality import LOSS_SCALES

    modalities = sorted(results["modality"].astype(str).unique())
    fig = make_subplots(rows=1, cols=len(modalities), subplot_titles=[esc(m) for m in modalities], shared_yaxes=True)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    symbols = ["circle", "square", "diamond", "triangle-up", "x", "star"]
    machines = {machine: symbols[i % len(symbols)] for i, machine in enumerate(sorted(results["machine"].unique()))}
    for t, technique in enumerate(sorted(results["technique"].unique())):
        for m, modality in enumerate(modalities, start=1):
            part = results[(results["technique"] == technique) & (results["modality"] == modality)]
            if part.empty:
                continue
            hover = [esc(f"{r.configuration} | {r.model} | {r.workload} | {r.machine} | {r.quality_loss_text} | "
                         f"{r.quality}") for r in part.itertuples()]
            fig.add_trace(go.Scatter(
                x=part["quality_loss"], y=part["speedup"], mode="markers", name=esc(technique),
                legendgroup=technique, showlegend=m == 1 or technique not in set(
                    results[results["modality"].isin(modalities[:m - 1])]["technique"]),
                marker={"size": 11, "color": palette[t % len(palette)],
                        "symbol": [machines[machine] for machine in part["machine"]]},
                error_y={"type": "data", "symmetric": False,
                         "array": (part["speedup_ci_high"] - part["speedup"]).clip(lower=0),
                         "arrayminus": (part["speedup"] - part["speedup_ci_low"]).clip(lower=0)},
                hovertext=hover, hoverinfo="text+x+y"), row=1, col=m)
    for m, modality in enumerate(modalities, start=1):
        scale = LOSS_SCALES.get(modality)
        fig.update_xaxes(title_text=scale.label if scale else "quality loss", row=1, col=m)
    fig.add_hline(y=1.0, line_dash="dash", line_color="grey")
    fig.update_yaxes(title_text="speedup over baseline (x, 95% CI)", type="log", row=1, col=1)
    fig.update_layout(title="Trade-off: speed against quality, per technique (symbol: machine)", height=460,
                      legend_title_text="technique")
    return fig


def evidence_html(data: dict[str, Any]) -> str:
    """Run counts, every configuration's speed beside its quality and uncertainty, failed runs and why."""
    results = data["results"].copy()
    shown = ["model", "workload", "machine", "configuration", "n_runs", "noisy_runs", "speedup", "speedup_ci_low",
             "speedup_ci_high", "latency_saving_percent", "verdict", "quality_loss_text", "quality"]
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
