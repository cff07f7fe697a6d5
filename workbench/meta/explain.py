"""Why the meta-learner says what it says: data first (DataFrames), figures after (``meta.plots``).

- global: permutation importance of every feature (scikit-learn ``permutation_importance``) and the
  partial dependence of the predicted speedup on the main numeric features (``partial_dependence``);
- per recommendation: feature contributions — the decision path for the glass-box tree (each split's
  change of the predicted log speedup), or replace-with-reference attribution for boosting (how the
  prediction moves when one feature is set to its typical training value);
- counterfactual: the smallest change of one actionable feature (threads, draft cost ratio, batch
  size, output length, diffusion steps) that changes the recommendation.

Example:
    >>> from workbench.meta.learner import Budget
    >>> ACTIONABLE_CHANGES["draft_cost_ratio"][:3]
    (0.5, 0.333, 0.2)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from workbench.meta.features import FEATURE_NAMES, NUMERIC_FEATURES
from workbench.meta.learner import Budget, Decision, MetaLearner, decide

#: Multipliers tried per actionable feature, smallest change first within each feature.
ACTIONABLE_CHANGES: dict[str, tuple[float, ...]] = {
    "draft_cost_ratio": (0.5, 0.333, 0.2, 0.1, 0.01),  # a draft 2x, 3x, 5x, 10x, 100x cheaper
    "threads": (2.0, 0.5, 4.0),
    "batch_size": (2.0, 4.0, 8.0),
    "output_tokens": (2.0, 0.5, 4.0, 0.25, 8.0),
    "diffusion_steps": (2.0, 0.5),
}
#: Numeric features shown in partial-dependence plots when they vary in the training data.
MAIN_FEATURES: tuple[str, ...] = ("model_parameters_log10", "model_hidden_size", "draft_cost_ratio",
                                  "prompt_repeated_3gram_fraction", "output_tokens", "threads", "batch_size")


# ----------------------------------------------------------------------------------------------------
# global
# ----------------------------------------------------------------------------------------------------


def permutation_importances(learner: MetaLearner, table: pd.DataFrame, n_repeats: int = 5,
                            random_state: int = 0) -> pd.DataFrame:
    """Mean and spread of the rise in mean absolute error of the log speedup when one feature is shuffled.

    Returns:
        ``feature``, ``importance_mean``, ``importance_std`` (log-speedup MAE units), largest first.
    """
    from sklearn.inspection import permutation_importance

    result = permutation_importance(learner, table[list(FEATURE_NAMES)], table["log_speedup"],
                                    scoring="neg_mean_absolute_error", n_repeats=n_repeats,
                                    random_state=random_state)
    frame = pd.DataFrame({"feature": list(FEATURE_NAMES), "importance_mean": result.importances_mean,
                          "importance_std": result.importances_std})
    return frame.sort_values("importance_mean", ascending=False, ignore_index=True)


def partial_dependences(learner: MetaLearner, table: pd.DataFrame, features: tuple[str, ...] = MAIN_FEATURES,
                        grid_points: int = 8) -> pd.DataFrame:
    """Average predicted speedup as one feature sweeps its observed range (others as observed).

    Returns:
        Long form: ``feature``, ``value``, ``predicted_speedup`` (ratio, not log).
    """
    from sklearn.inspection import partial_dependence

    X = table[list(FEATURE_NAMES)].reset_index(drop=True)
    frames = []
    for name in features:
        values = pd.to_numeric(X[name], errors="coerce").dropna().unique()
        if len(values) < 2:
            continue
        grid = np.unique(np.quantile(values, np.linspace(0, 1, grid_points)))
        result = partial_dependence(learner, X, [name], kind="average", custom_values={name: grid})
        frames.append(pd.DataFrame({"feature": name, "value": result["grid_values"][0],
                                    "predicted_speedup": np.exp(result["average"][0])}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["feature", "value", "predicted_speedup"])


def global_explanation(learner: MetaLearner, table: pd.DataFrame, random_state: int = 0) -> dict[str, Any]:
    """Importances, partial dependences and (for the glass box) the rules, as data."""
    return {"importance": permutation_importances(learner, table, random_state=random_state),
            "partial_dependence": partial_dependences(learner, table),
            "rules": learner.rules()}


# ----------------------------------------------------------------------------------------------------
# per recommendation
# ----------------------------------------------------------------------------------------------------


def contributions(learner: MetaLearner, row: pd.DataFrame) -> pd.DataFrame:
    """How each feature moved one row's predicted log speedup.

    Glass box: the splits on the tree's decision path, each with the change of the node prediction it
    caused (they add up to prediction - root). Boosting: prediction minus the prediction with that one
    feature set to the training reference (median or most common value).

    Returns:
        ``feature``, ``value``, ``reference`` (or the split condition), ``contribution_log_speedup``,
        largest absolute contribution first.
    """
    row = row[list(FEATURE_NAMES)].iloc[[0]]
    if learner.learner == "tree":
        return _tree_path(learner, row)
    base = float(learner.predict(row)[0])
    records = []
    for name in FEATURE_NAMES:
        reference = learner.reference_.get(name)
        changed = row.copy()
        changed[name] = np.nan if reference is None else reference
        delta = base - float(learner.predict(changed)[0])
        records.append({"feature": name, "value": row[name].iloc[0], "reference": reference,
                        "contribution_log_speedup": delta})
    frame = pd.DataFrame(records)
    return frame.reindex(frame["contribution_log_speedup"].abs().sort_values(ascending=False).index).reset_index(
        drop=True)


def _tree_path(learner: MetaLearner, row: pd.DataFrame) -> pd.DataFrame:
    model = learner.models_for(str(row["technique"].iloc[0]))["point"]
    tree = model.tree_
    matrix = learner.encode(row)
    nodes = model.decision_path(matrix).indices
    prior = learner.speed_prior_
    records = [{"feature": "configuration", "value": row["configuration"].iloc[0],
                "reference": "prior: this configuration's training mean vs the overall mean",
                "contribution_log_speedup": float(learner.prior_of(row, "speed")[0] - prior["overall"])}]
    for parent, child in zip(nodes[:-1], nodes[1:]):
        column = learner.encoded_columns_[tree.feature[parent]]
        went_left = child == tree.children_left[parent]
        condition = f"{column} {'<=' if went_left else '>'} {tree.threshold[parent]:.3g}"
        name = column.split("=")[0]
        records.append({"feature": name, "value": row[name].iloc[0], "reference": condition,
                        "contribution_log_speedup": float(tree.value[child][0][0] - tree.value[parent][0][0])})
    return pd.DataFrame(records, columns=["feature", "value", "reference", "contribution_log_speedup"])


#: How each feature reads in a sentence: value -> words (``None``: the feature is not shown).
_PHRASES: dict[str, Any] = {
    "prompt_repeated_3gram_fraction": lambda v: f"the prompts repeat {v:.0%} of their word 3-grams",
    "model_parameters_log10": lambda v: f"the model has {10 ** v / 1e6:.3g}M parameters",
    "model_layers": lambda v: f"the model has {v:g} layers",
    "model_hidden_size": lambda v: f"the model is {v:g} wide",
    "model_vocab_size": lambda v: f"its vocabulary has {v:,.0f} tokens",
    "model_bytes_log10": lambda v: f"its weights take {10 ** v / 2 ** 20:.3g} MiB",
    "batch_size": lambda v: f"batches of {v:g}",
    "prompt_chars_mean": lambda v: f"prompts of {v:.0f} characters on average",
    "output_tokens": lambda v: f"{v:g} new tokens per prompt",
    "diffusion_steps": lambda v: f"{v:g} diffusion steps",
    "threads": lambda v: f"{v:g} torch thread{'s' if v != 1 else ''}",
    "cpu_cores_logical": lambda v: f"{v:g} CPU cores",
    "ram_gib": lambda v: f"{v:.0f} GiB of RAM",
    "memory_bandwidth_gb_per_s": lambda v: f"{v:.3g} GB/s of memory bandwidth",
    "gpu_compute_capability": lambda v: f"GPU compute capability {v:g}",
    "draft_tokens": lambda v: f"it drafts {v:g} tokens per target pass",
    "prompt_lookup_tokens": lambda v: f"it looks up {v:g} tokens at a time",
    "weight_bits": lambda v: f"{v:g}-bit weights",
    "exit_threshold": lambda v: f"an exit threshold of {v:g}",
    "draft_cost_ratio": lambda v: f"the drafter costs {v:.0%} of the target per token",
}
_REFERENCE = {"prompt_repeated_3gram_fraction": lambda v: f"{v:.0%}",
              "model_parameters_log10": lambda v: f"{10 ** v / 1e6:.3g}M",
              "model_bytes_log10": lambda v: f"{10 ** v / 2 ** 20:.3g} MiB",
              "draft_cost_ratio": lambda v: f"{v:.0%}"}


def reasons(frame: pd.DataFrame, learner: MetaLearner | None = None, row: pd.Series | None = None,
            predicted: pd.Series | None = None, top: int = 3) -> list[str]:
    """Why one candidate is predicted what it is, as sentences a person reads.

    The first sentence (with ``learner``, ``row`` and ``predicted``) says the prediction, its largest
    drivers and what similar measured contexts gained ("prompt lookup is predicted 1.40x here because the
    prompts repeat 31% of their word 3-grams (typical 9%), and the same configuration measured 1.30-1.60x
    on 4 similar contexts"); then one line per large contribution ("the prompts repeat 31% of their word
    3-grams (typical 9%): 1.25x faster predicted"). Features that do not apply (n/a) are left out.

    Example:
        >>> parts = pd.DataFrame({"feature": ["batch_size"], "value": [16.0], "reference": [1.0],
        ...                       "contribution_log_speedup": [-0.2]})
        >>> reasons(parts)
        ['batches of 16 (typical 1): 1.22x slower predicted']
    """
    drivers, lines = [], []
    for _, item in frame.iterrows():
        if len(lines) >= top:
            break
        delta = float(item["contribution_log_speedup"])
        phrase = _phrase(item["feature"], item["value"], item["reference"])
        if abs(delta) < 1e-3 or phrase is None:
            continue
        factor = math.exp(delta)
        effect = f"{factor:.2f}x faster predicted" if factor >= 1 else f"{1 / factor:.2f}x slower predicted"
        lines.append(f"{phrase}: {effect}")
        drivers.append(phrase)
    if learner is None or row is None or predicted is None:
        return lines
    name = str(row["configuration"])
    summary = (f"{name} is predicted {predicted['predicted_speedup']:.2f}x here ({predicted['speedup_low']:.2f}-"
               f"{predicted['speedup_high']:.2f}x)")
    if drivers:
        summary += " because " + " and ".join(drivers[:2])
    similar = similar_measurements(learner, row)
    if similar is not None:
        summary += (f"{',' if drivers else ''} and {similar['what']} measured {similar['low']:.2f}-{similar['high']:.2f}x "
                    f"on {similar['contexts']} similar context{'s' if similar['contexts'] != 1 else ''} "
                    f"({similar['examples']})")
    return [summary, *lines]


def similar_measurements(learner: MetaLearner, row: pd.Series, k: int = 4) -> dict[str, Any] | None:
    """The measured speedups of the same configuration (else the same technique) in the ``k`` training
    contexts of the same modality nearest to ``row`` (standardised distance over the numeric context
    features), as a range; None when there is none."""
    table = getattr(learner, "training_table_", None)
    if table is None or table.empty:
        return None
    same_modality = table[table["modality"].astype(str) == str(row.get("modality"))]
    pool, what = same_modality[same_modality["configuration"] == row["configuration"]], "the same configuration"
    if pool.empty:
        pool, what = same_modality[same_modality["technique"] == row.get("technique")], f"{row.get('technique')}"
    if pool.empty:
        return None
    numeric = [n for n in ("model_parameters_log10", "model_layers", "batch_size", "output_tokens",
                           "prompt_repeated_3gram_fraction", "prompt_chars_mean", "threads", "diffusion_steps")
               if n in pool.columns]
    values = pool[numeric].apply(pd.to_numeric, errors="coerce")
    here = pd.to_numeric(pd.Series({n: row.get(n) for n in numeric}), errors="coerce")
    scale = same_modality[numeric].apply(pd.to_numeric, errors="coerce").std().replace(0, 1).fillna(1)
    distance = (((values - here) / scale) ** 2).fillna(1.0).sum(axis=1)
    nearest = pool.loc[distance.sort_values(kind="stable").index[:k]]
    speedups = np.exp(nearest["log_speedup"].astype(float))
    examples = ", ".join(f"{m} on {w}" for m, w in list(dict.fromkeys(zip(nearest["model"], nearest["workload"])))[:2])
    return {"what": what, "low": float(speedups.min()), "high": float(speedups.max()), "contexts": len(nearest),
            "examples": examples}


def _phrase(feature: str, value: Any, reference: Any) -> str | None:
    """'<feature in words> (typical <reference>)' or, for a tree split, '<words> (<condition>)'; None when
    the value does not apply (n/a)."""
    if feature == "configuration":
        return "this configuration's measured average"
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "none":
        return None
    if feature in _PHRASES:
        try:
            words = _PHRASES[feature](float(value))
        except (TypeError, ValueError):
            return None
    else:
        words = f"{feature.replace('_', ' ')} {value}"
    if isinstance(reference, str) and any(op in reference for op in "<>"):
        return f"{words} ({reference})"
    if reference is None or (isinstance(reference, float) and math.isnan(reference)) or reference == value:
        return words
    shown = _REFERENCE.get(feature, lambda v: f"{v:g}" if isinstance(v, (int, float)) else str(v))
    try:
        return f"{words} (typical {shown(float(reference) if feature in _PHRASES else reference)})"
    except (TypeError, ValueError):
        return words


def _show(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# ----------------------------------------------------------------------------------------------------
# counterfactual
# ----------------------------------------------------------------------------------------------------


def counterfactual(learner: MetaLearner, rows: pd.DataFrame, budget: Budget, current: Decision,
                   check: Any = None, min_speedup: float | None = None, min_low: float | None = None) -> dict[str, Any]:
    """The smallest single change of an actionable feature, within the range the training runs observed,
    that changes the decision.

    Values tried: for each actionable feature (threads, batch size, output length, diffusion steps, and a
    drafting candidate's draft cost ratio), the values the training runs of this modality took, nearest
    first (by ``|log(new / old)|``), then the multipliers of ``ACTIONABLE_CHANGES`` beyond them. A change
    is kept only when the new choice still passes ``check`` (the technique's plan-time applicability, e.g.
    a drafting technique may refuse a batch of 4): otherwise the next-best candidate is chosen. When no change
    flips the decision, the change that brings the best allowed candidate's lower bound closest to the
    baseline is returned instead, with ``flips`` False and how far it still falls short.

    Returns:
        ``feature``, ``configuration`` (whose row changed, or "all"), ``from``, ``to``, ``multiplier``,
        ``new_recommendation``, ``flips``, ``within_observed_range``, ``text``.
    """
    trials = []
    nearest: dict[str, Any] | None = None
    start = _best_allowed(pd.concat([rows[["configuration", "lossless"]], learner.predict_frame(rows)], axis=1), budget)
    start_low = float(start["speedup_low"]) if start is not None else -math.inf
    observed = _observed_values(learner, str(rows["modality"].iloc[0])) if not rows.empty else {}
    for name, multipliers in ACTIONABLE_CHANGES.items():
        if name not in NUMERIC_FEATURES:
            continue
        targets = ([(index, float(rows.loc[index, name])) for index in
                    rows.index[pd.to_numeric(rows[name], errors="coerce") > 0]] if name == "draft_cost_ratio"
                   else [(None, float(pd.to_numeric(rows[name], errors="coerce").dropna().iloc[0]))]
                   if pd.to_numeric(rows[name], errors="coerce").notna().any() else [])
        for index, old in targets:
            if not old > 0:
                continue
            seen = [v for v in observed.get(name, []) if v > 0 and v != old]
            values = [(v, True) for v in seen] + [(old * m, False) for m in multipliers
                                                  if not any(abs(math.log(old * m / v)) < 1e-9 for v in seen)]
            for value, inside in values:
                if name in ("threads", "batch_size", "output_tokens", "diffusion_steps"):
                    value = max(1.0, float(round(value)))
                if value != old:
                    trials.append((0 if inside else 1, abs(math.log(value / old)), name, value, index, old, inside))
    for _, _, name, new, index, old, inside in sorted(trials, key=lambda t: (t[0], t[1])):
        changed = rows.copy()
        target = changed.index if index is None else [index]
        changed.loc[target, name] = new
        predicted = pd.concat([changed[["configuration", "lossless"]], learner.predict_frame(changed)], axis=1)
        overrides = {} if index is not None else {name: new}
        decision = _decide_applicable(predicted, changed, budget, check, overrides, min_speedup, min_low)
        who = "all" if index is None else str(rows.loc[index, "configuration"])
        multiplier = new / old
        if decision.configuration != current.configuration:
            return {"feature": name, "configuration": who, "from": old, "to": new, "multiplier": multiplier,
                    "new_recommendation": decision.configuration, "flips": True, "within_observed_range": inside,
                    "text": _counterfactual_text(name, who, old, new, multiplier, decision.configuration,
                                                 current.configuration, inside)}
        best = _best_allowed(predicted, budget)
        if current.fallback and best is not None and best["speedup_low"] > start_low + 1e-9:
            if nearest is None or best["speedup_low"] > nearest["speedup_low"]:
                nearest = {"feature": name, "configuration": who, "from": old, "to": new, "multiplier": multiplier,
                           "new_recommendation": current.configuration, "flips": False,
                           "within_observed_range": inside,
                           "speedup_low": float(best["speedup_low"]), "candidate": str(best["configuration"])}
    if nearest is None:
        return {"flips": False, "text": "no single actionable change tried (threads, draft cost, batch size, "
                                        "output length, steps; every value the training runs observed) changes "
                                        "this recommendation or brings a candidate closer to it"}
    change = _counterfactual_text(nearest["feature"], nearest["configuration"], nearest["from"], nearest["to"],
                                  nearest["multiplier"], nearest["candidate"], current.configuration,
                                  nearest["within_observed_range"])
    nearest["text"] = (f"no single actionable change tried flips it; the closest: {change.split(' if ', 1)[1]} "
                       f"would lift {nearest['candidate']}'s lower bound to {nearest['speedup_low']:.2f}x, still "
                       f"{1 / nearest['speedup_low']:.2f}x short of beating the baseline")
    return nearest


def _observed_values(learner: MetaLearner, modality: str) -> dict[str, list[float]]:
    """Every value an actionable feature took in the training runs of ``modality``."""
    table = getattr(learner, "training_table_", None)
    if table is None or table.empty:
        return {}
    rows = table[table["modality"].astype(str) == modality]
    return {name: sorted(set(pd.to_numeric(rows[name], errors="coerce").dropna().astype(float)))
            for name in ACTIONABLE_CHANGES if name in rows.columns}


def _decide_applicable(predicted: pd.DataFrame, rows: pd.DataFrame, budget: Budget, check: Any,
                       overrides: dict[str, Any], min_speedup: float | None = None,
                       min_low: float | None = None) -> Decision:
    """:func:`decide` (at the recommendation's ``min_speedup``), skipping choices ``check`` refuses under
    the changed context."""
    settings: dict[str, Any] = {"min_low": min_low}
    if min_speedup is not None:
        settings["min_speedup"] = min_speedup
    while True:
        decision = decide(predicted, budget, **settings)
        if check is None or not overrides or decision.fallback:
            return decision
        index = predicted.index[predicted["configuration"] == decision.configuration][0]
        if check(rows.loc[index].to_dict(), overrides) is None:
            return decision
        predicted = predicted.drop(index)


def _best_allowed(predicted: pd.DataFrame, budget: Budget) -> pd.Series | None:
    """The allowed candidate with the highest lower bound, or None."""
    allowed = predicted[budget.allowed(predicted, "predicted_quality_loss")]
    return None if allowed.empty else allowed.sort_values("speedup_low", ascending=False).iloc[0]


def _counterfactual_text(name: str, who: str, old: float, new: float, multiplier: float, new_choice: str,
                         old_choice: str, inside: bool = True) -> str:
    if name == "draft_cost_ratio":
        change = f"the draft of {who} were {1 / multiplier:.3g}x cheaper (cost ratio {old:.3g} -> {new:.3g})"
    else:
        words = {"threads": "torch threads", "batch_size": "the batch size", "output_tokens": "the output length",
                 "diffusion_steps": "the number of diffusion steps"}.get(name, name)
        change = f"{words} were {_show(new)} instead of {_show(old)}"
    where = "" if inside else " (beyond the values measured in training: an extrapolation)"
    return f"{new_choice} would be recommended instead of {old_choice} if {change}{where}"
