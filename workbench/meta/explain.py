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
    tree = learner.speed_model_.tree_
    matrix = learner.encode(row)
    nodes = learner.speed_model_.decision_path(matrix).indices
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


def reasons(frame: pd.DataFrame, top: int = 3) -> list[str]:
    """The largest contributions as sentences ("model_hidden_size = 512 (typical 64): 1.40x faster")."""
    lines = []
    for _, item in frame.head(top).iterrows():
        factor = math.exp(item["contribution_log_speedup"])
        if abs(item["contribution_log_speedup"]) < 1e-6:
            continue
        effect = f"{factor:.2f}x {'faster' if factor >= 1 else 'slower'} predicted"
        reference = item["reference"]
        context = (f"(path: {reference})" if isinstance(reference, str) and any(op in reference for op in "<>")
                   else f"(typical {_show(reference)})")
        lines.append(f"{item['feature']} = {_show(item['value'])} {context}: {effect}")
    return lines


def _show(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# ----------------------------------------------------------------------------------------------------
# counterfactual
# ----------------------------------------------------------------------------------------------------


def counterfactual(learner: MetaLearner, rows: pd.DataFrame, budget: Budget, current: Decision) -> dict[str, Any]:
    """The smallest single change of an actionable feature that changes the decision.

    When no change tried flips it, the change that brings the best allowed candidate's lower bound
    closest to the baseline is returned instead, with ``flips`` False and how far it still falls short.

    ``draft_cost_ratio`` is changed for one drafting candidate at a time ("if the draft were 3x
    cheaper"); the other features for the whole context. Changes are tried smallest first (by
    ``|log(multiplier)|``).

    Returns:
        ``feature``, ``configuration`` (whose row changed, or "all"), ``from``, ``to``, ``multiplier``,
        ``new_recommendation``, ``flips``, ``text``.
    """
    trials = []
    nearest: dict[str, Any] | None = None
    start = _best_allowed(pd.concat([rows[["configuration", "lossless"]], learner.predict_frame(rows)], axis=1), budget)
    start_low = float(start["speedup_low"]) if start is not None else -math.inf
    for name, multipliers in ACTIONABLE_CHANGES.items():
        if name not in NUMERIC_FEATURES:
            continue
        for multiplier in multipliers:
            if name == "draft_cost_ratio":
                for index in rows.index[pd.to_numeric(rows[name], errors="coerce") > 0]:
                    trials.append((abs(math.log(multiplier)), name, multiplier, index))
            elif pd.to_numeric(rows[name], errors="coerce").notna().any():
                trials.append((abs(math.log(multiplier)), name, multiplier, None))
    for _, name, multiplier, index in sorted(trials, key=lambda t: t[0]):
        changed = rows.copy()
        target = changed.index if index is None else [index]
        old = float(changed.loc[target[0], name])
        new = old * multiplier
        if name in ("threads", "batch_size", "output_tokens", "diffusion_steps"):
            new = max(1.0, round(new))
        if new == old:
            continue
        changed.loc[target, name] = new
        predicted = pd.concat([changed[["configuration", "lossless"]], learner.predict_frame(changed)], axis=1)
        decision = decide(predicted, budget)
        who = "all" if index is None else str(rows.loc[index, "configuration"])
        if decision.configuration != current.configuration:
            return {"feature": name, "configuration": who, "from": old, "to": new, "multiplier": multiplier,
                    "new_recommendation": decision.configuration, "flips": True, "text": _counterfactual_text(
                        name, who, old, new, multiplier, decision.configuration, current.configuration)}
        best = _best_allowed(predicted, budget)
        if current.fallback and best is not None and best["speedup_low"] > start_low + 1e-9:
            if nearest is None or best["speedup_low"] > nearest["speedup_low"]:
                nearest = {"feature": name, "configuration": who, "from": old, "to": new, "multiplier": multiplier,
                           "new_recommendation": current.configuration, "flips": False,
                           "speedup_low": float(best["speedup_low"]), "candidate": str(best["configuration"])}
    if nearest is None:
        return {"flips": False, "text": "no single actionable change tried (threads, draft cost, batch size, "
                                        "output length, steps) changes this recommendation or brings a "
                                        "candidate closer to it"}
    change = _counterfactual_text(nearest["feature"], nearest["configuration"], nearest["from"], nearest["to"],
                                  nearest["multiplier"], nearest["candidate"], current.configuration)
    nearest["text"] = (f"no single actionable change tried flips it; the closest: {change.split(' if ', 1)[1]} "
                       f"would lift {nearest['candidate']}'s lower bound to {nearest['speedup_low']:.2f}x, still "
                       f"{1 / nearest['speedup_low']:.1f}x short of beating the baseline")
    return nearest


def _best_allowed(predicted: pd.DataFrame, budget: Budget) -> pd.Series | None:
    """The allowed candidate with the highest lower bound, or None."""
    allowed = predicted[budget.allowed(predicted, "predicted_quality_loss")]
    return None if allowed.empty else allowed.sort_values("speedup_low", ascending=False).iloc[0]


def _counterfactual_text(name: str, who: str, old: float, new: float, multiplier: float, new_choice: str,
                         old_choice: str) -> str:
    if name == "draft_cost_ratio":
        change = f"the draft of {who} were {1 / multiplier:.0f}x cheaper (cost ratio {old:.3g} -> {new:.3g})"
    else:
        change = f"{name} were {_show(new)} instead of {_show(old)}"
    return f"{new_choice} would be recommended instead of {old_choice} if {change}"
