"""One run's data -> plotly figures, nothing else (the compare panel shows them).

Every function takes a :class:`workbench.runner.RunResult` (rebuilt from a store row with
:func:`result_from_row`) and returns a ``go.Figure``, or None when the run holds nothing to draw.

Example:
    >>> from workbench.widgets.figures import run_figures
    >>> figures = run_figures(result)  # doctest: +SKIP
    >>> sorted(figures)  # doctest: +SKIP
    ['latency', 'memory', 'quality', 'speedup', 'internals']
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from workbench.widgets.tables import variant_name

#: Quality figures drawn as "baseline vs technique" pairs, when the run holds both:
#: (label, baseline key, technique key, y-axis title with its unit).
QUALITY_PAIRS: tuple[tuple[str, str, str, str], ...] = (
    ("accuracy", "accuracy_baseline", "accuracy_technique", "accuracy (fraction correct, 0-1)"),
    ("perplexity", "perplexity_baseline", "perplexity_technique", "perplexity (lower is better)"),
    ("SSIM vs reference", "ssim_baseline_vs_reference", "ssim_technique_vs_reference",
     "SSIM vs 100-step reference (0-1)"),
    ("judge accuracy", "judge_accuracy_baseline", "judge_accuracy_technique", "judge accuracy (fraction, 0-1)"),
)
#: Agreement figures (technique vs baseline, 1.0 = identical), drawn as single bars on their own axis.
AGREEMENT_KEYS: tuple[str, ...] = ("exact_match_rate", "token_agreement", "agreement", "identical_rate")
AGREEMENT_AXIS = "agreement with the baseline (fraction, 1 = identical)"


def result_from_row(row: dict[str, Any]) -> Any:
    """A :class:`~workbench.runner.RunResult` from a store row (as the worker sends it or ``Store.get`` returns)."""
    from workbench.runner import RunResult

    return RunResult.from_row(row)


def latency_figure(result: Any) -> go.Figure | None:
    """Box plot of every timed call's latency (ms), one box per variant."""
    if not result.samples:
        return None
    fig = go.Figure([go.Box(y=[1000.0 * v for v in cols.get("latency_s", [])], name=variant_name(result, name),
                            boxpoints="all") for name, cols in result.samples.items()])
    fig.update_layout(title="Latency per call (ms)", yaxis_title="latency (ms)", showlegend=False)
    return fig


def speedup_figure(result: Any) -> go.Figure | None:
    """Speedup over the baseline with its 95% bootstrap interval; the dashed line at 1.0 is 'no change'."""
    comparisons = result.summary.get("comparisons") or {}
    shown = {k: v for k, v in comparisons.items() if v.get("speedup") is not None}
    if not shown:
        return None
    names = list(shown)
    speedups = [shown[n]["speedup"] for n in names]
    high = [(shown[n].get("ci_high") or s) - s for n, s in zip(names, speedups)]
    low = [s - (shown[n].get("ci_low") or s) for n, s in zip(names, speedups)]
    fig = go.Figure(go.Bar(x=[variant_name(result, n) for n in names], y=speedups, error_y={"type": "data", "array": high, "arrayminus": low},
                           text=[f"{s:.2f}x" for s in speedups], textposition="outside"))
    fig.add_hline(y=1.0, line_dash="dash")
    fig.update_layout(title="Speedup over the baseline (95% CI)", yaxis_title="speedup (x)")
    return fig


def quality_figure(result: Any) -> go.Figure | None:
    """Quality of the technique beside the baseline's, one panel per metric (each on its own axis, in its
    own unit: a perplexity of 91 never shares an axis with an agreement of 0.98), then agreement."""
    from plotly.subplots import make_subplots

    q = result.quality
    # 1. The panels the run has data for: (title, y-axis title, x labels, values).
    panels = [(label, axis, ["baseline", "technique"], [q[base_key], q[tech_key]])
              for label, base_key, tech_key, axis in QUALITY_PAIRS
              if isinstance(q.get(base_key), (int, float)) and isinstance(q.get(tech_key), (int, float))]
    agreement = [k for k in AGREEMENT_KEYS if isinstance(q.get(k), (int, float))]
    if agreement:
        panels.append(("agreement", AGREEMENT_AXIS, [k.replace("_", " ") for k in agreement],
                       [q[k] for k in agreement]))
    if not panels:
        return None
    # 2. One subplot each, its axis titled with the unit.
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[title for title, *_ in panels],
                        horizontal_spacing=0.12)
    for column, (title, axis, labels, values) in enumerate(panels, start=1):
        fig.add_trace(go.Bar(x=labels, y=values, name=title, text=[f"{v:.3g}" for v in values],
                             textposition="auto"), row=1, col=column)
        fig.update_yaxes(title_text=axis, row=1, col=column)
    fig.update_layout(title="Quality change (technique vs baseline)", showlegend=False)
    return fig


def memory_figure(result: Any) -> go.Figure | None:
    """Peak memory and model size (MB) per variant."""
    variants = result.summary.get("variants") or {}
    if not variants:
        return None
    names = list(variants)
    fig = go.Figure()
    for key, label in (("peak_memory_bytes", "peak memory (MB)"), ("model_bytes", "model size (MB)")):
        values = [(variants[n] if key == "peak_memory_bytes" else result.resources.get(n) or {}).get(key)
                  for n in names]
        if any(v is not None for v in values):
            fig.add_trace(go.Bar(x=[variant_name(result, n) for n in names],
                                 y=[None if v is None else v / 1e6 for v in values], name=label))
    if not fig.data:
        return None
    fig.update_layout(title="Memory per variant (MB)", yaxis_title="MB", barmode="group")
    return fig


def internals_figure(result: Any) -> go.Figure | None:
    """What the technique did: acceptance per draft position, exit-layer histogram or diffusion steps used."""
    internals = result.internals.get("technique") or {}
    positions = internals.get("acceptance_by_position")
    if positions:
        fig = go.Figure(go.Bar(x=[p["position"] for p in positions], y=[p.get("rate") for p in positions],
                               text=[f"{p['accepted']}/{p['proposed']}" for p in positions]))
        fig.update_layout(title="Acceptance rate per draft position", xaxis_title="draft position",
                          yaxis_title="acceptance rate")
        return fig
    histogram = internals.get("exit_layer_histogram")
    if histogram:
        fig = go.Figure(go.Bar(x=[int(k) for k in histogram], y=list(histogram.values())))
        fig.update_layout(title=f"Exit layers (mean {internals.get('mean_layers_executed') or 0:.2f} of "
                                f"{internals.get('num_layers')})", xaxis_title="exit layer", yaxis_title="inputs")
        return fig
    steps = [s["steps"] for s in internals.get("steps_per_input") or [] if s.get("steps") is not None]
    if steps:
        fig = go.Figure(go.Histogram(x=steps, name="steps used"))
        if internals.get("baseline_steps"):
            fig.add_vline(x=internals["baseline_steps"], line_dash="dash", annotation_text="baseline steps")
        fig.update_layout(title="Diffusion steps used per input", xaxis_title="steps", yaxis_title="inputs")
        return fig
    return None


def run_figures(result: Any) -> dict[str, go.Figure]:
    """Every figure the run has data for, by name: latency, speedup, quality, memory, internals."""
    builders = {"latency": latency_figure, "speedup": speedup_figure, "quality": quality_figure,
                "memory": memory_figure, "internals": internals_figure}
    figures = {name: build(result) for name, build in builders.items()}
    return {name: fig for name, fig in figures.items() if fig is not None}
