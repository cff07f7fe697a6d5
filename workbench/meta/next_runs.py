"""What to measure next: the few runs that would decide between candidates the learner cannot tell apart.

When the best candidate's interval overlaps the next ones' (or its lower bound does not clear the +-2%
band, so the baseline is kept on doubt), a prediction cannot settle the choice; a measurement can.
:func:`runs_to_decide` names those runs (the leader and every allowed candidate whose upper bound
reaches the leader's lower bound, at most ``MAX_RUNS``), each with why and its estimated minutes;
:func:`sweep_yaml` writes them as a sweep file that ``workbench sweep`` runs as it is
(``workbench recommend ... --plan sweep.yaml``).

Minutes are estimated from the training runs' own measured cost: seconds of baseline compute per unit of
work (a generated token, a classified input, an image step) per parameter, the median over the runs of
the same modality, times this model's parameters and this workload's work, for the baseline and the
technique at the predicted speedup, over warm-up and repeats, plus a fixed allowance for loading and
preparing (``OVERHEAD_S``). It is an estimate, said to be one.

Example:
    >>> runs = [{"technique": "my_technique", "params": {"tokens": 3}, "draft": None}]
    >>> print(sweep_yaml(runs, {"model": "zoo:code-wide", "workload": {"name": "code-prompts", "max_items": 4},
    ...                         "device": "cpu", "dtype": "float32", "threads": 2}).splitlines()[3])
    models: [zoo:code-wide]
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import yaml

MAX_RUNS = 3  # runs proposed at most
REPEATS, WARMUP = 3, 1  # of the proposed runs (the sweep file says so)
OVERHEAD_S = 30.0  # loading, planning and preparing one run, beyond its timed calls


def runs_to_decide(learner: Any, rows: pd.DataFrame, predicted: pd.DataFrame, decision: Any,
                   min_speedup: float) -> list[dict[str, Any]]:
    """The runs that would settle the choice, or [] when the prediction already does.

    Args:
        rows: the candidates' feature rows (``features.candidate_rows``), index-aligned with ``predicted``.
        predicted: their predictions with ``allowed`` (the budget), best first.
        decision: the :class:`~workbench.meta.learner.Decision` made from them.
    """
    allowed = predicted[predicted["allowed"]].sort_values("predicted_speedup", ascending=False)
    if allowed.empty:
        return []
    leader = allowed.iloc[0]
    contenders = allowed.iloc[1:][allowed.iloc[1:]["speedup_high"] >= leader["speedup_low"]]
    doubtful = not leader["speedup_low"] > min_speedup
    if contenders.empty and not doubtful:
        return []
    chosen = pd.concat([allowed.iloc[[0]], contenders]).head(MAX_RUNS)
    out = []
    for index, item in chosen.iterrows():
        row = rows.loc[index]
        if index == allowed.index[0]:
            why = (f"the leader ({item['predicted_speedup']:.2f}x, {item['speedup_low']:.2f}-{item['speedup_high']:.2f}x)"
                   + (f" is not sure to beat the baseline (lower bound <= {min_speedup:.2f}x)" if doubtful else
                      f"; {len(contenders)} other candidate(s) overlap its interval"))
        else:
            why = (f"{item['predicted_speedup']:.2f}x ({item['speedup_low']:.2f}-{item['speedup_high']:.2f}x) overlaps "
                   f"the leader's {leader['speedup_low']:.2f}-{leader['speedup_high']:.2f}x")
        draft = row.get("draft")
        out.append({"configuration": str(item["configuration"]), "technique": str(row["technique"]),
                    "params": json.loads(row["params"]) if isinstance(row.get("params"), str) else {},
                    "draft": draft if isinstance(draft, str) and draft else None,
                    "why": why, "minutes": estimate_minutes(learner, row, float(item["predicted_speedup"]))})
    return out


def estimate_minutes(learner: Any, row: Mapping[str, Any], speedup: float) -> float:
    """Estimated wall minutes of one run of ``row``'s configuration in its context (see the module doc)."""
    table = getattr(learner, "training_table_", None)
    parameters = 10 ** float(row.get("model_parameters_log10") or 0.0)
    units = _work_units(row)
    rate = math.nan
    if table is not None and not table.empty and {"baseline_seconds", "work_units"} <= set(table.columns):
        same = table[table["modality"].astype(str) == str(row.get("modality"))]
        per = (pd.to_numeric(same["baseline_seconds"], errors="coerce")
               / pd.to_numeric(same["work_units"], errors="coerce")
               / np.power(10.0, pd.to_numeric(same["model_parameters_log10"], errors="coerce")))
        per = per[np.isfinite(per) & (per > 0)]
        rate = float(per.median()) if not per.empty else math.nan
    if not math.isfinite(rate) or not math.isfinite(units) or not parameters > 1:
        return OVERHEAD_S / 60.0 * 4  # no measured cost to scale: a nominal two minutes
    baseline_s = rate * parameters * units
    timed = baseline_s * (1.0 + 1.0 / max(speedup, 0.05)) * (REPEATS + WARMUP) / REPEATS
    return (timed + OVERHEAD_S) / 60.0


def _work_units(row: Mapping[str, Any]) -> float:
    """Units of work of ``REPEATS`` timed passes over the workload (``workload_items`` inputs)."""
    items = float(row.get("workload_items") or math.nan)
    modality = str(row.get("modality"))
    if modality == "text-generation":
        per = float(row.get("output_tokens") or math.nan)
    elif modality == "image-generation":
        per = float(row.get("diffusion_steps") or math.nan)
    else:
        per = 1.0
    return items * per * REPEATS


def sweep_yaml(runs: list[Mapping[str, Any]], where: Mapping[str, Any], name: str | None = None) -> str:
    """A sweep file (``workbench sweep`` format) of exactly ``runs`` in one context.

    Args:
        runs: from :func:`runs_to_decide` (``technique``, ``params``, ``draft``).
        where: ``model``, ``workload`` (WorkloadSpec fields), ``device``, ``dtype``, ``threads``.
    """
    techniques = []
    for run in runs:
        entry: dict[str, Any] = {"name": run["technique"]}
        if run.get("params"):
            entry["params"] = dict(run["params"])
        if run.get("draft"):
            entry["draft"] = run["draft"]
        techniques.append(entry)
    workload = {k: v for k, v in dict(where["workload"]).items() if v is not None}
    document: dict[str, Any] = {
        "name": name or f"decide {where['model']} on {workload.get('name')}",
        "models": [where["model"]], "workloads": [workload], "techniques": techniques,
        "devices": [where.get("device") or "cpu"], "dtypes": [where.get("dtype") or "float32"],
        "repeats": REPEATS, "warmup": WARMUP,
    }
    if where.get("threads"):
        document["threads"] = int(where["threads"])
    header = ("# written by `workbench recommend --plan`: the runs that would decide between candidates whose\n"
              "# predicted intervals overlap. Run it with `workbench sweep THIS_FILE`, then `workbench learn`.\n")
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=120)
