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
    """A DataFrame as an HTML table with every cell escaped; floats to ``float_digits`` significant figures."""
    from workbench.names import sig

    if frame is None or frame.empty:
        return "<p class='note'>(none)</p>"
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: sig(v, float_digits))
    return f"<div class='scroll'>{shown.to_html(index=False, escape=True, na_rep='-', border=0)}</div>"


def _sentences_html(lines: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>"


def section(title: str, body: str, opened: bool = False) -> str:
    """A collapsible section (``<details>``): closed by default, its title always visible."""
    return (f"<div class='wb-report'><details class='wb-section'{' open' if opened else ''}><summary>{title}"
            f"</summary>{body}</details></div>")


def header_html(data: dict[str, Any]) -> str:
    """Title, window, store and parameters."""
    p: ReportParams = data["params"]
    filters = ", ".join(f"{name}: {', '.join(getattr(p, name))}" for name in ("models", "machines", "techniques")
                        if getattr(p, name)) or "none"
    return (f"{_CSS}<div class='wb-report'><h1>{esc(p.title)}</h1><p class='note'>{esc(data['window_text'])} "
            f"({esc(data['window']['start'].strftime('%Y-%m-%d %H:%M'))} to "
            f"{esc(data['window']['end'].strftime('%Y-%m-%d %H:%M'))} UTC) &middot; store {esc(data['store_url'])} "
            f"&middot; filters: {esc(filters)} &middot; quality budget {esc(p.budget)}</p></div>")


def decision_html(data: dict[str, Any]) -> str:
    """The one-screen decision: the top measured actions in plain words, then what the rest amounts to."""
    from workbench.names import sig

    d = data["decision"]
    if d["runs"] == 0:
        return f"<div class='wb-report wb-decision'><h2>Decision</h2><p>{esc(data['summary'][0])}</p></div>"
    head = (f"{d['runs']} runs over {d['contexts']} model / workload / machine combinations"
            + (f", {d['failed']} failed or skipped" if d["failed"] else "")
            + (f", {d['noisy']} on a noisy machine (their speed counts less)" if d["noisy"] else "") + ".")
    parts = [f"<div class='wb-report wb-decision'><h2>Decision</h2><p class='note'>{esc(head)}</p>"]
    actions = d["actions"]
    if actions.empty:
        parts.append("<p><b>Keep the baseline everywhere.</b> No technique was faster with confidence (beyond the "
                     "&plusmn;2% band) within the quality budget in this window.</p>")
    else:
        rows = "".join(
            f"<tr><td><b title='{esc(a['configuration'])}'>{esc(a['use'])}</b></td><td>{esc(a['model'])}</td>"
            f"<td>{esc(a['context'])}</td><td>{esc(a['machine'])}</td>"
            f"<td class='num'><b>{a['time_saved_percent']:.0f}%</b></td>"
            f"<td class='num'>{esc(sig(a['speedup']))}x ({esc(sig(a['speedup_ci_low']))}-"
            f"{esc(sig(a['speedup_ci_high']))}), {a['n_runs']} run{'s' if a['n_runs'] != 1 else ''}</td>"
            f"<td>{esc(a['quality'])}</td></tr>" for a in actions.to_dict(orient="records"))
        parts.append("<table class='wb-actions'><thead><tr><th>Use</th><th>Model</th><th>Workload</th>"
                     "<th>Machine</th><th>Time saved (%)</th><th>Speedup (x, 95% CI)</th><th>Quality cost</th>"
                     f"</tr></thead><tbody>{rows}</tbody></table>")
    rest = []
    if d["more_actions"]:
        rest.append(f"{d['more_actions']} more combination(s) have a faster technique: see <i>Findings</i>.")
    if d["keep_baseline"] and not actions.empty:
        rest.append(f"Keep the baseline for the other {d['keep_baseline']} combination(s): nothing was faster with "
                    "confidence within the budget.")
    if d["slower"]:
        rest.append(f"{d['slower']} measured configuration(s) were <b>slower</b> than the baseline: listed in "
                    "<i>Findings</i> and <i>Evidence</i>.")
    learned = data["learner"]
    if learned["evaluated"]:
        gap = learned["gap_closed"]
        weak = " treat its predictions as weak" if gap == gap and gap < 0.7 else ""
        rest.append("What drives the speedup, as the meta-learner trained on these runs sees it, is in its section "
                    "below" + (f" (on held-out models it closed {gap:.0%} of the gap to the best choice, target "
                               f"70%:{weak or ' it meets the target'})." if gap == gap else "."))
    parts.append(f"<p>{' '.join(rest)}</p>" if rest else "")
    return "".join(parts) + "</div>"


def glossary_html() -> str:
    """What the terms mean, in one short box."""
    from workbench.quality import LOSS_SCALES

    units = "; ".join(f"{scale.label} for {modality}" for modality, scale in LOSS_SCALES.items())
    return ("<div class='wb-report wb-glossary'><b>What the terms mean.</b> <b>Speedup</b>: baseline time / technique "
            "time on the same inputs (per output token for text generation); 2x halves the time. <b>95% CI</b>: the "
            "range the true speedup lies in with 95% confidence (paired bootstrap). <b>Faster with confidence</b>: the "
            "whole interval is above +2%; inside &plusmn;2% counts as no practical difference. <b>Quality cost</b>: "
            f"{esc(units)}. <b>Lossless</b>: outputs identical to the baseline's, token for token. <b>Noisy</b>: other "
            "processes used the cores during the run.</div>")


def summary_html(data: dict[str, Any]) -> str:
    """Findings per combination and the change since the previous window (collapsed)."""
    body = _sentences_html(data["summary"])
    if data["changes"]:
        body += "<h3>What changed since the previous window</h3>" + _sentences_html(data["changes"])
    return section(f"Findings per model, workload and machine ({data['decision']['contexts']})", body)


def tradeoff_figure(results: pd.DataFrame) -> Any:
    """Speedup (with 95% CI error bars) against quality loss, one panel per modality (each loss in its own
    unit), one colour per technique, one symbol per machine; the dashed line at 1.0x is the baseline."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from workbench.names import configuration_name
    from workbench.quality import LOSS_SCALES

    modalities = sorted(results["modality"].astype(str).unique())
    fig = make_subplots(rows=1, cols=len(modalities), subplot_titles=[esc(m) for m in modalities], shared_yaxes=True)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    symbols = ["circle", "square", "diamond", "triangle-up", "x", "star"]
    machines = {machine: symbols[i % len(symbols)] for i, machine in enumerate(sorted(results["machine"].unique()))}
    for t, technique in enumerate(sorted(results["technique"].unique())):
        title = configuration_name(technique)  # a bare technique: its title
        for m, modality in enumerate(modalities, start=1):
            part = results[(results["technique"] == technique) & (results["modality"] == modality)]
            if part.empty:
                continue
            scale = LOSS_SCALES.get(modality)
            custom = [[esc(r.name), esc(r.model), esc(r.context), esc(r.machine), esc(r.configuration),
                       f"{r.speedup_ci_low:.3g}-{r.speedup_ci_high:.3g}", r.n_runs] for r in part.itertuples()]
            fig.add_trace(go.Scatter(
                x=part["quality_loss"], y=part["speedup"], mode="markers", name=esc(title),
                legendgroup=technique, showlegend=m == 1 or technique not in set(
                    results[results["modality"].isin(modalities[:m - 1])]["technique"]),
                marker={"size": 11, "color": palette[t % len(palette)],
                        "symbol": [machines[machine] for machine in part["machine"]]},
                error_y={"type": "data", "symmetric": False,
                         "array": (part["speedup_ci_high"] - part["speedup"]).clip(lower=0),
                         "arrayminus": (part["speedup"] - part["speedup_ci_low"]).clip(lower=0)},
                customdata=custom,
                hovertemplate=("<b>%{customdata[0]}</b> <i>%{customdata[4]}</i><br>%{customdata[1]} on %{customdata[2]}"
                               "<br>%{customdata[3]}"
                               "<br>speedup %{y:.3g}x (95% CI %{customdata[5]}), %{customdata[6]} run(s)<br>"
                               f"{esc(scale.label if scale else 'quality loss')}: %{{x:.3g}}"
                               "<extra></extra>")), row=1, col=m)
    for m, modality in enumerate(modalities, start=1):
        scale = LOSS_SCALES.get(modality)
        fig.update_xaxes(title_text=scale.label if scale else "quality loss (unit of the metric)", row=1, col=m)
    fig.add_hline(y=1.0, line_dash="dash", line_color="grey")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="speedup over baseline (x, log scale; bars: 95% CI)", row=1, col=1)
    fig.update_layout(title="Speed against quality cost: up is faster, right loses more quality (symbol: machine)",
                      height=460, legend_title_text="technique", margin={"t": 70})
    return fig


#: The evidence table's columns for people (header with unit <- results column).
_EVIDENCE_COLUMNS = {"Configuration": "name", "Model": "model", "Workload": "context", "Machine": "machine",
                     "Runs": "n_runs", "Speedup (x)": "speedup", "95% CI (x)": "ci", "Time saved (%)": "saved",
                     "Verdict": "verdict", "Quality cost": "quality_loss_text", "Quality measured": "quality"}


def evidence_html(data: dict[str, Any]) -> str:
    """Every configuration's speed beside its quality and uncertainty, and runs per technique (collapsed)."""
    from workbench.names import sig

    results = data["results"]
    if results.empty:
        table = table_html(results)
    else:
        view = results.assign(ci=[f"{sig(lo)}-{sig(hi)}" for lo, hi in zip(results["speedup_ci_low"],
                                                                          results["speedup_ci_high"])],
                              saved=results["latency_saving_percent"].map(lambda v: f"{v:.0f}"),
                              n_runs=results["n_runs"].astype(str) + results["noisy_runs"].map(
                                  lambda n: f" ({n} noisy)" if n else ""))
        view = view.sort_values(["model", "context", "machine", "speedup"], ascending=[True, True, True, False])
        table = table_html(view[list(_EVIDENCE_COLUMNS.values())].set_axis(list(_EVIDENCE_COLUMNS), axis=1))
    counts = run_counts(data["runs"]).rename(columns={"technique": "Technique", "status": "Status", "runs": "Runs"})
    body = ("<p class='note'>Median over runs; the interval is the median of the runs' own 95% bootstrap intervals. "
            "Hover a configuration in the decision table for its stored key.</p>" + table
            + "<h3>Runs per technique and status</h3>" + table_html(counts))
    parts = [section(f"Evidence: speed beside quality for every configuration ({len(results)})", body)]
    if data["params"].audience == "engineer" and not data["runs"].empty:
        from workbench.names import configuration_name

        runs = data["runs"]
        every = pd.DataFrame({
            "When (UTC)": runs["created_at"].dt.strftime("%Y-%m-%d %H:%M"), "Run": runs["run_id"].str[:8],
            "Status": runs["status"], "Model": runs["model"], "Workload": runs["workload"],
            "Technique": [configuration_name(t) for t in runs["technique"]], "Machine": runs["machine_id"].str[:8],
            "Speedup (x)": runs["speedup"].map(sig),
            "95% CI (x)": [f"{sig(lo)}-{sig(hi)}" for lo, hi in zip(runs["speedup_ci_low"], runs["speedup_ci_high"])]})
        parts.append(section(f"Every run in the window ({len(runs)})", table_html(every)))
    return "".join(parts)


def failed_html(data: dict[str, Any]) -> str:
    """Failed and skipped runs with their one-line reason (collapsed)."""
    failed = data["failed"]
    view = failed
    if not failed.empty:
        view = pd.DataFrame({"When (UTC)": failed["created_at"].dt.strftime("%Y-%m-%d %H:%M"),
                             "Run": failed["run_id"].str[:8], "Status": failed["status"], "Model": failed["model"],
                             "Technique": failed["technique"], "Reason": failed["failure_reason"]})
    return section(f"Failed and skipped runs ({len(failed)})", table_html(view))


def learner_html(data: dict[str, Any], embed: Any) -> str:
    """The meta-learner, only when the window could evaluate it: its held-out figure in the title, the
    held-out evaluation in words, what drives its predictions (figures) and, for the glass box, its rules."""
    learned = data["learner"]
    if not learned["evaluated"] or data["explanation"] is None:
        return f"<div class='wb-report'><p class='note'>{esc(learned['note'])}</p></div>"
    gap = learned["gap_closed"]
    title = ("Meta-learner: what drives the speedup" + (f" (closed {gap:.0%} of the gap on held-out models)"
                                                       if gap == gap else ""))
    figures = "".join(embed.html(f) for f in explanation_figures(data))
    rules = data["explanation"]["rules"]
    body = (f"<p>{esc(learned['note'])}</p><p class='note'>Permutation importance: how much the error in predicted "
            "log speedup rises when a feature is shuffled. Partial dependence: the average predicted speedup as one "
            f"feature varies.</p>{figures}" + (f"<h3>Rules (first tree)</h3><pre>{esc(rules)}</pre>" if rules else ""))
    return section(esc(title), body)


def recommendations_html(data: dict[str, Any]) -> str:
    """Kept for callers of the earlier report: the learner's note (the learner section is :func:`learner_html`)."""
    return f"<div class='wb-report'><p class='note'>{esc(data['learner_note'])}</p></div>"


def explanation_figures(data: dict[str, Any]) -> list[Any]:
    """Importance and partial-dependence figures, or none without an evaluated learner."""
    from workbench.meta import plots

    if data["explanation"] is None:
        return []
    figures = [plots.importance_figure(data["explanation"]["importance"])]
    if not data["explanation"]["partial_dependence"].empty:
        figures.append(plots.partial_dependence_figure(data["explanation"]["partial_dependence"]))
    return figures


def environment_html(data: dict[str, Any]) -> str:
    """Appendix: the environment of each machine (collapsed)."""
    env = data["environments"]
    return section(f"Appendix: environment of each machine ({max(0, len(env.columns) - 1)})", table_html(env))


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
    external: bool = False  # True: never inline plotly.js (the report's converter adds one partial bundle)
    config: dict[str, Any] = field(default_factory=lambda: {"displaylogo": False, "responsive": True})

    def html(self, fig: Any) -> str:
        fragment = fig.to_html(full_html=False, include_plotlyjs=False if self.external else not self.inlined,
                               config=self.config)
        self.inlined = True
        return fragment
