"""Stored data -> the tables the panels show: key columns first, human names, 3 significant figures.

Nothing here computes a statistic; the figures come from the run's summary as stored. Each function
returns DataFrames, which the panels turn into HTML (:func:`workbench.widgets._common.table_html`).

Example:
    >>> from workbench.widgets.tables import run_tables
    >>> key, more = run_tables(result)  # doctest: +SKIP
    >>> key.columns.tolist()  # doctest: +SKIP
    ['variant', 'speedup (95% CI)', 'quality', 'latency median (ms)']
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from workbench.names import sig, speedup_text

#: The compare table's columns, in order; the first four fit a 900 px panel, the rest fold under them.
KEY_COLUMNS = ["variant", "speedup (95% CI)", "quality", "latency median (ms)"]
MORE_COLUMNS = ["variant", "latency p90 (ms)", "latency CV (%)", "tokens/s", "first token (ms)",
                "per token (ms)", "roofline (%)", "peak memory (MB)", "model size (MB)"]


def variant_name(result: Any, variant: str) -> str:
    """``baseline``, or the technique's configuration in words (``speculative decoding (draft zoo:code-draft)``)."""
    from workbench import techniques
    from workbench.measure import BASELINE

    if variant == BASELINE:
        return "baseline"
    if variant == "baseline_again":
        return "baseline (again: an A/A check)"
    technique = result.spec.technique
    draft = technique.draft.name if technique.draft is not None else None
    try:
        return techniques.get(technique.name).display_name(technique.param_dict, draft)
    except Exception:  # a plug-in not installed here: its stored name
        return variant


def _ms(stats: dict[str, Any] | None, key: str = "median") -> str:
    return "-" if not stats or stats.get(key) is None else sig(1000.0 * stats[key])


def _mb(nbytes: Any) -> str:
    return "-" if nbytes is None else sig(nbytes / 1e6)


def run_tables(result: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per variant, as two tables: ``KEY_COLUMNS`` (what decides) and ``MORE_COLUMNS`` (the rest)."""
    from workbench.display import quality_text
    from workbench.measure import BASELINE, verdict_of

    key, more = [], []
    comparisons = result.summary.get("comparisons") or {}
    for variant, stats in (result.summary.get("variants") or {}).items():
        name = variant_name(result, variant)
        if variant == BASELINE:
            speed, quality = "1x (reference)", "reference"
        else:
            comp = comparisons.get(variant) or {}
            speed = (f"{speedup_text(comp.get('speedup'), comp.get('ci_low'), comp.get('ci_high'))} "
                     f"{verdict_of(comp)}" if comp.get("speedup") is not None else "-")
            quality = quality_text(result.quality, result.quality_metrics, result.report.get("lossless"))
        key.append([name, speed, quality, _ms(stats.get("latency_s"))])
        resources = result.resources.get(variant) or {}
        roofline = resources.get("roofline_fraction")
        more.append([name, _ms(stats.get("latency_s"), "p90"), sig((stats.get("latency_s") or {}).get("cv_percent")),
                     sig(stats.get("tokens_per_s")), _ms(stats.get("ttft_s")), _ms(stats.get("tpot_s")),
                     "-" if roofline is None else sig(100.0 * roofline), _mb(stats.get("peak_memory_bytes")),
                     _mb(resources.get("model_bytes"))])
    more_table = pd.DataFrame(more, columns=MORE_COLUMNS)
    empty = [c for c in MORE_COLUMNS[1:] if (more_table[c] == "-").all()]
    return pd.DataFrame(key, columns=KEY_COLUMNS), more_table.drop(columns=empty)
