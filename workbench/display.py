"""Display: turn a run's data into a table, text or HTML. Nothing here computes a statistic.

Example:
    >>> from workbench.display import format_speedup
    >>> format_speedup({"speedup": 1.5, "ci_low": 1.4, "ci_high": 1.6, "verdict": "faster"})
    '1.50x [1.40, 1.60] faster'
"""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd

from workbench.measure import BASELINE, MARGIN_PERCENT, verdict_of
from workbench.noise import summary_text as noise_text
from workbench.terminal import TERMINAL_WIDTH, Column, fit_table, wrap_line


def _ms(stats: dict[str, Any] | None, key: str = "median") -> float | None:
    if not stats or stats.get(key) is None:
        return None
    return round(1000.0 * stats[key], 3)


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 1e6, 2)


def format_speedup(comp: dict[str, Any]) -> str:
    """'1.50x [1.40, 1.60] faster' — the point estimate, its 95% interval and the verdict against the
    equivalence band (:func:`workbench.measure.verdict`: "no practical difference" inside +-2%)."""
    if not comp or comp.get("speedup") is None:
        return "n/a"
    if comp.get("ci_low") is None:
        return f"{comp['speedup']:.2f}x (one pair: no interval)"
    return f"{comp['speedup']:.2f}x [{comp['ci_low']:.2f}, {comp['ci_high']:.2f}] {verdict_of(comp)}"


def speedup_lines(comp: dict[str, Any]) -> list[str]:
    """The headline speedup with what it is per (output token or call), the total-time figure beside a
    per-token one, and the median call."""
    if not comp or comp.get("speedup") is None:
        return []
    basis = comp.get("basis") or "total time"
    margin = comp.get("margin_percent", MARGIN_PERCENT)
    lines = [f"speedup {format_speedup(comp)} ({basis}; 95% paired bootstrap CI over {comp.get('pairs')} calls; "
             f"'faster'/'slower' only beyond +-{margin:g}%)"]
    if basis == "time per output token" and comp.get("total_time_speedup") is not None:
        low, high = comp.get("total_time_ci_low"), comp.get("total_time_ci_high")
        interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
        tokens = (f"; tokens {comp['tokens_baseline']} baseline vs {comp['tokens_technique']} technique"
                  if comp.get("tokens_baseline") is not None else "")
        lines.append(f"total time {comp['total_time_speedup']:.2f}x{interval}{tokens}")
    if comp.get("median_pair_ci_low") is not None:
        lines.append(f"median call {comp['median_pair_speedup']:.2f}x [{comp['median_pair_ci_low']:.2f}, "
                     f"{comp['median_pair_ci_high']:.2f}] (median of the per-pair ratios: little moved by "
                     "calls that stall; far from the figure above means a noisy machine)")
    return lines


#: Labels and units of quality figures stored before techniques reported typed metrics (schema < 3),
#: so older runs read the same as new ones: key -> (label, unit).
LEGACY_METRICS: dict[str, tuple[str, str]] = {
    "perplexity_baseline": ("perplexity (baseline)", ""), "perplexity_technique": ("perplexity", ""),
    "perplexity_change_percent": ("perplexity change", "%"), "next_token_kl_mean": ("next-token KL", "nats"),
    "label_kl_mean": ("label KL", "nats"), "ssim_technique_vs_reference": ("SSIM vs reference", "SSIM"),
    "ssim_baseline_vs_reference": ("SSIM vs reference (baseline)", "SSIM"),
    "steps_technique_mean": ("mean steps", "steps"), "judge_accuracy_technique": ("judge accuracy", ""),
    "judge_accuracy_baseline": ("judge accuracy (baseline)", ""),
}


def standard_quality_text(quality: dict[str, Any], lossless: bool | None = None) -> str:
    """The comparison every run gets (outputs against the baseline's), in words. Token agreement is shown
    for lossless language-model techniques only: for a lossy one it is not a quality figure (one early
    divergence changes every later token), so its perplexity and KL speak instead."""
    if quality.get("comparison") == "distributional (sampled)":
        return ""  # a sampled run's figures are the technique's distributional metrics, shown after this
    if quality.get("exact_match_rate") is not None:
        if lossless is False:
            return ""
        n = quality["inputs"]
        same = round(quality["exact_match_rate"] * n)
        return f"identical output on {same}/{n} inputs, token agreement {quality['token_agreement']:.1%}"
    if "accuracy_technique" in quality:
        return (f"accuracy {quality['accuracy_technique']:.1%} vs {quality['accuracy_baseline']:.1%} "
                f"({quality['accuracy_change_points']:+.1f} points), agreement {quality['agreement']:.1%}")
    if quality.get("identical_rate") == 1.0:
        return f"identical images on {quality['inputs']}/{quality['inputs']} inputs"
    if "psnr_db_mean" in quality:
        return f"PSNR {quality['psnr_db_mean']:.1f} dB vs baseline, identical on {quality['identical_rate']:.0%}"
    return ""


def metric_text(metric: dict[str, Any]) -> str:
    """'label value unit' of one stored :class:`~workbench.techniques.base.Metric`, signed for changes.

    Example:
        >>> metric_text({"name": "perplexity_change_percent", "value": 0.4, "unit": "%"})
        'perplexity change +0.4 %'
    """
    label = metric.get("label") or _label_of(metric["name"])
    value = metric.get("value")
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{label} n/a"
    signed = "change" in metric["name"] or "drop" in metric["name"]
    number = f"{value:+.3g}" if signed else f"{value:.4g}"
    return f"{label} {number} {metric.get('unit', '')}".rstrip()


def _label_of(name: str) -> str:
    """A metric's name without its unit suffix, as words."""
    words = name.split("_")
    while words and words[-1] in ("percent", "points", "db", "nats", "steps", "bytes", "s", "mean"):
        words.pop()
    return " ".join(words or name.split("_"))


def metric_texts(metrics: list[dict[str, Any]] | None, quality: dict[str, Any] | None = None) -> list[str]:
    """'label value unit' for each headline metric a technique reported (or, for a run stored before
    typed metrics, for each known figure in its quality)."""
    if metrics:
        return [metric_text(m) for m in metrics if m.get("headline", True)]
    return [metric_text({"name": key, "value": quality[key], "unit": unit, "label": label})
            for key, (label, unit) in LEGACY_METRICS.items() if isinstance((quality or {}).get(key), (int, float))]


def quality_text(quality: dict[str, Any], metrics: list[dict[str, Any]] | None = None,
                 lossless: bool | None = None) -> str:
    """The headline quality figures in words: the standard comparison, then the technique's own metrics."""
    parts = [standard_quality_text(quality or {}, lossless), *metric_texts(metrics, quality)]
    return ", ".join(p for p in parts if p) or "no quality figure"


def quality_brief(quality: dict[str, Any] | None, metrics: list[dict[str, Any]] | None = None,
                  lossless: bool | None = None) -> str:
    """The one quality figure a list of runs shows, short and in its unit: '6/6 identical' (outputs equal to
    the baseline's), 'ppl +0.036%' (perplexity change), 'acc -20.8 pts' (accuracy change in points),
    'SSIM 0.927' (to the reference images); else the technique's first headline metric.

    Example:
        >>> quality_brief({"perplexity_change_percent": 0.036, "exact_match_rate": 0.5, "inputs": 6})
        'ppl +0.036%'
    """
    q = quality or {}

    def number(key: str) -> float | None:
        value = q.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    matched, inputs, perplexity = number("exact_match_rate"), number("inputs"), number("perplexity_change_percent")
    if matched is not None and inputs and (lossless is True or (lossless is None and perplexity is None)):
        return f"{round(matched * inputs)}/{int(inputs)} identical"
    if perplexity is not None:
        return f"ppl {perplexity:+.3g}%"
    if number("accuracy_change_points") is not None:
        return f"acc {number('accuracy_change_points'):+.3g} pts"
    if number("ssim_technique_vs_reference") is not None:
        return f"SSIM {number('ssim_technique_vs_reference'):.3g}"
    texts = metric_texts(metrics, q)
    return texts[0] if texts else ""


NOISY_MARK = " *"  # after the speedup of a run measured on a noisy machine (workbench.noise)
#: The default ``workbench runs`` table (every line within :data:`~workbench.terminal.TERMINAL_WIDTH`). A run
#: that did not finish shows its status (skipped, failed) in place of the speedup and its reason as quality;
#: one measured while other work crossed the noise threshold has NOISY_MARK after its speedup.
RUN_LIST_COLUMNS = (
    Column("run", "run", 8),
    Column("created", "created", 11),  # UTC, month-day hour:minute
    Column("model", "model", middle=True),
    Column("configuration", "technique"),
    Column("params", "params"),
    Column("speedup", "speedup (95% CI)", 22),  # "0.917x (0.876-0.962) *" at most
    Column("quality", "quality"),
)


def run_list_rows(frame: pd.DataFrame) -> list[dict[str, str]]:
    """One row of words per stored run (``Store.runs()``): short id, time to the minute (UTC), the
    configuration and its non-default settings (``params``) by name, the speedup with its interval and one
    quality figure; a run that did not finish: its status and its reason instead."""
    from workbench.meta.features import configuration_id
    from workbench.names import configuration_parts

    rows = []
    for run in frame.to_dict(orient="records"):
        draft = run.get("draft") if isinstance(run.get("draft"), str) else None
        name, settings = configuration_parts(configuration_id(run["technique"], run.get("params") or {}, draft))
        lossless = run.get("lossless") if isinstance(run.get("lossless"), bool) else None
        rows.append({
            "run": str(run["run_id"])[:8], "created": run["created_at"].strftime("%m-%d %H:%M"),
            "model": run["model"], "configuration": name, "params": settings, "speedup": _speedup_cell(run),
            "quality": quality_brief(run.get("quality"), run.get("quality_metrics"), lossless)
            if run["status"] == "ok" else run.get("failure_reason"),
        })
    return rows


def _speedup_cell(run: dict[str, Any]) -> str:
    """'1.23x (1.1-1.4)', then NOISY_MARK when other work disturbed the run; a run that did not finish: its status."""
    from workbench.names import speedup_text

    if run["status"] != "ok":
        return str(run["status"])
    speedup = run.get("speedup")
    measured = isinstance(speedup, (int, float)) and math.isfinite(speedup)
    text = speedup_text(speedup, run.get("speedup_ci_low"), run.get("speedup_ci_high")) if measured else "-"
    noise = run.get("noise") if isinstance(run.get("noise"), dict) else None
    return text + (NOISY_MARK if noise_text(noise) else "")


def run_list_text(frame: pd.DataFrame, width: int = TERMINAL_WIDTH) -> str:
    """Stored runs as a table whose every line is at most ``width`` characters (cells cut with '…'), and
    what a mark means when a run has one."""
    rows = run_list_rows(frame)
    text = fit_table(rows, RUN_LIST_COLUMNS, width)
    if any(row["speedup"].endswith(NOISY_MARK) for row in rows):
        text += "\n" + "\n".join(wrap_line(f"{NOISY_MARK.strip()} measured on a noisy machine (other work crossed the "
                                           "threshold): the speed figures are suspect", width))
    return text


def run_table(result: Any) -> pd.DataFrame:
    """One row per variant: latency distribution, throughput, memory, speedup and quality."""
    rows = []
    variants = result.summary.get("variants", {})
    for name, stats in variants.items():
        comp = {} if name == BASELINE else result.summary.get("comparisons", {}).get(name, {})
        row = {
            "variant": name,
            "latency_median_ms": _ms(stats["latency_s"]),
            "latency_p90_ms": _ms(stats["latency_s"], "p90"),
            "latency_cv_percent": None if stats["latency_s"]["cv_percent"] is None
            else round(stats["latency_s"]["cv_percent"], 1),
        }
        if "tokens_per_s" in stats:
            row.update(
                tokens_per_s=round(stats["tokens_per_s"], 1),
                ttft_median_ms=_ms(stats.get("ttft_s")),
                tpot_median_ms=_ms(stats.get("tpot_s")),
                roofline_percent=None if (result.resources.get(name) or {}).get("roofline_fraction") is None
                else round(100.0 * result.resources[name]["roofline_fraction"], 2),
            )
        resources = result.resources.get(name) or {}
        row.update(
            peak_memory_mb=_mb(stats.get("peak_memory_bytes")),
            model_mb=_mb(resources.get("model_bytes")),
            speedup_95ci="1.00x (reference)" if name == BASELINE else format_speedup(comp),
            quality="reference" if name == BASELINE else quality_text(result.quality, result.quality_metrics, result.report.get('lossless')),
        )
        rows.append(row)
    return pd.DataFrame(rows)


def run_text(result: Any) -> str:
    """A plain-text report of one run for the terminal."""
    spec = result.spec
    head = (f"{spec.technique.name} vs baseline | model {spec.model.name}"
            + (f" (draft {spec.technique.draft.name})" if spec.technique.draft else "")
            + f" | workload {spec.workload.name} | {spec.device} {spec.dtype} | "
            f"{spec.repeats} repeats, {spec.warmup} warm-up")
    lines = [head]
    if result.summary.get("variants"):
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            lines.append(run_table(result).to_string(index=False))
        lines.extend(speedup_lines(result.comparison))
        lines.append(f"quality: {quality_text(result.quality, result.quality_metrics, result.report.get('lossless'))}")
        lines.extend(technique_lines(result))
    noisy = noise_text(getattr(result, "noise", None))
    if noisy:
        lines.append(f"WARNING {noisy}: the speed figures are suspect; rerun when the machine is quiet "
                     "(workbench run ... --wait-quiet 300)")
    chosen = (result.environment or {}).get("threads_chosen")
    if chosen:
        lines.append(f"threads: {chosen['threads']} ({chosen['why']})")
    lines.append(f"status: {result.status}" + (f" ({result.failure_reason})" if result.failure_reason else "")
                 + f" | run {result.run_id}")
    return "\n".join(lines)


_SHOWN_APART = ("acceptance_by_position", "threshold_curve", "operating_point", "exit_layer_histogram",
                "quality_details")


def technique_lines(result: Any) -> list[str]:
    """What the technique did, in words: acceptance and predicted speedup, exit curves, the rest as key=value."""
    internals = result.internals.get("technique") or {}
    lines = [f"{result.spec.technique.name}: {result.report['headline']}"] if result.report.get("headline") else []
    positions = internals.get("acceptance_by_position")
    if positions:
        rates = "  ".join(f"{p['position']}: {p['accepted']}/{p['proposed']}" + (f" ({p['rate']:.0%})" if p["rate"]
                          is not None else "") for p in positions)
        lines.append(f"acceptance by draft position  {rates}")
    if internals.get("predicted_speedup") is not None:
        lines.append(f"speedup measured {format_speedup(result.comparison)}, predicted by theory "
                     f"{internals['predicted_speedup']:.2f}x from acceptance rate a={internals['acceptance_rate']:.2f}, "
                     f"draft length g={internals['mean_draft_tokens']:.2f}, cost ratio c={internals['cost_ratio_c']:.3f}"
                     + (f", verification cost v={internals['verify_cost_ratio']:.2f} of a one-token step"
                        if internals.get("verify_cost_ratio") is not None else ""))
    curve = internals.get("threshold_curve")
    if curve:
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            lines.append("threshold curve (measured side by side before the timed run):")
            lines.append(pd.DataFrame(curve).round(4).to_string(index=False))
        point = internals.get("operating_point")
        if point:
            lines.append("operating point: " + ", ".join(f"{k}={_short(v)}" for k, v in point.items()))
    rest = {k: v for k, v in internals.items() if k not in _SHOWN_APART}
    if rest:
        lines.append("internals: " + ", ".join(f"{k}={_short(v)}" for k, v in rest.items()))
    return lines


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_html(result: Any) -> str:
    """HTML for notebooks: the table plus the speedup and quality lines, all strings escaped."""
    parts = [f"<p><b>{html.escape(result.spec.technique.name)}</b> vs baseline on "
             f"<code>{html.escape(result.spec.model.name)}</code> — status {html.escape(result.status)}"]
    if result.failure_reason:
        parts.append(f": {html.escape(result.failure_reason)}")
    parts.append("</p>")
    if result.summary.get("variants"):
        parts.append(run_table(result).to_html(index=False, escape=True))
        noisy = noise_text(getattr(result, "noise", None))
        if noisy:
            parts.append(f"<p class='workbench-noisy'><b>{html.escape(noisy)}</b>: speed figures suspect</p>")
        parts.append(f"<p>{html.escape('; '.join(speedup_lines(result.comparison)))}; "
                     f"{html.escape(quality_text(result.quality, result.quality_metrics, result.report.get('lossless')))}</p>")
        extra = technique_lines(result)
        if extra:
            parts.append(f"<pre>{html.escape(chr(10).join(extra))}</pre>")
    return "".join(parts)
