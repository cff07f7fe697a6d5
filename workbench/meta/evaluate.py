"""Leave-one-group-out evaluation of the meta-learner against simple baselines, in one table.

For each grouping (model, workload, machine) every group is held out in turn: the learners train on the
other groups' runs and choose, for each held-out context, among the configurations measured there (and
the baseline). A choice is scored by the *measured* outcome:

- ``top1_accuracy``: share of contexts where the choice equals the oracle's (the best measured speedup
  within the budget, or the baseline when nothing measured beats 1.0);
- ``top1_within_noise``: share where the choice is the oracle's or measured indistinguishable from it
  (within 1.96 combined standard errors; prompt lookup with 3 or 6 tokens often differ by 1%);
- ``speedup_fraction_of_oracle``: mean of achieved speedup / oracle speedup;
- ``mean_regret``: mean of oracle speedup - achieved speedup (0 is perfect);
- ``budget_violations``: choices whose measured quality broke the budget; they score as the baseline
  (1.0x), since the user has to roll them back.

Baselines: ``random`` (the expectation of a uniform pick among the allowed candidates and the baseline,
computed exactly, not sampled), ``best_on_average`` (the configuration with the best mean training
speedup, if that mean beats 1.0), ``expert_rules`` (hand-written rules of thumb, :func:`expert_choice`)
and ``plain_boosting`` (the same gradient boosting on the raw targets, without the learner's prior: the
"plain gradient boosting" the MetaInf paper compares against).

Example:
    >>> from workbench.meta.learner import Budget
    >>> evaluate(pd.DataFrame(), Budget.parse("any")).empty
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from workbench.meta.features import BASELINE_CONFIGURATION, FEATURE_NAMES
from workbench.meta.learner import Budget, MetaLearner, decide

GROUPINGS: tuple[str, ...] = ("model", "workload", "machine_id")
#: Published anchor, printed beside our table and never claimed as ours: MetaInf (Yang et al., 2024,
#: arXiv 2410.21340) reports ~0.90 selection accuracy against 0.82 for plain gradient boosting.
ANCHOR = ("anchor (not measured here): MetaInf, Yang et al. arXiv 2410.21340, reports ~0.90 top-1 selection "
          "accuracy vs 0.82 for plain gradient boosting, on their own data and hardware")
TABLE_COLUMNS = ["grouping", "groups", "contexts", "policy", "top1_accuracy", "top1_within_noise",
                 "speedup_fraction_of_oracle",
                 "mean_regret", "budget_violations", "note"]


def evaluate(table: pd.DataFrame, budget: Budget, learners: Sequence[str] = ("boosting", "tree"),
             groupings: Sequence[str] = GROUPINGS, random_state: int = 0) -> pd.DataFrame:
    """The leave-one-group-out table: one row per grouping and policy (learners and baselines).

    Args:
        table: ``features.training_table(...)`` (one row per context and configuration).
        budget: the quality budget every policy and the oracle must respect.
        learners: meta-learner kinds evaluated beside the baselines.
        groupings: columns of ``table`` to leave out one value at a time.
    """
    if table.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    rows = []
    for grouping in groupings:
        groups = sorted(table[grouping].astype(str).unique())
        contexts = table["context"].nunique()
        if len(groups) < 2:
            note = f"only one {grouping.replace('_id', '')} ({groups[0]}): leave-one-out is impossible"
            rows += [dict(grouping=grouping, groups=len(groups), contexts=contexts, policy=p, note=note)
                     for p in _policy_names(learners)]
            continue
        scores = _leave_one_group_out(table, grouping, groups, budget, learners, random_state)
        for policy, frame in scores.groupby("policy", sort=False):
            rows.append(dict(
                grouping=grouping, groups=len(groups), contexts=len(frame), policy=policy,
                top1_accuracy=frame["correct"].mean(), top1_within_noise=frame["tied"].mean(),
                speedup_fraction_of_oracle=(frame["achieved"] / frame["oracle"]).mean(),
                mean_regret=(frame["oracle"] - frame["achieved"]).mean(),
                budget_violations=frame["violation"].sum(), note="",
            ))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _policy_names(learners: Sequence[str]) -> list[str]:
    return [f"meta-learner ({kind})" for kind in learners] + ["random", "best_on_average", "expert_rules",
                                                               "plain_boosting"]


def _leave_one_group_out(table: pd.DataFrame, grouping: str, groups: list[str], budget: Budget,
                         learners: Sequence[str], random_state: int) -> pd.DataFrame:
    scores = []
    for group in groups:
        # 1. Split; train every learner on the other groups.
        held_out = table[grouping].astype(str) == group
        train, test = table[~held_out], table[held_out]
        fitted = {kind: MetaLearner(learner=kind, random_state=random_state).fit(
            train[list(FEATURE_NAMES)], train["log_speedup"], train["quality_loss"], train["weight"])
            for kind in learners} if len(train) >= 2 else {}
        plain = MetaLearner(prior="none", random_state=random_state).fit(
            train[list(FEATURE_NAMES)], train["log_speedup"], train["quality_loss"], train["weight"]) if len(train) >= 2 else None
        # 2. Score every policy on every held-out context.
        for _, rows in test.groupby("context"):
            oracle_choice, oracle_speedup = oracle(rows, budget)
            choices: dict[str, Any] = {f"meta-learner ({k})": learner_choice(m, rows, budget)
                                       for k, m in fitted.items()}
            choices["best_on_average"] = best_on_average_choice(train, rows, budget)
            choices["expert_rules"] = expert_choice(rows, budget)
            if plain is not None:
                choices["plain_boosting"] = learner_choice(plain, rows, budget)
            for policy, choice in choices.items():
                achieved, violation = achieved_speedup(rows, choice, budget)
                scores.append(dict(policy=policy, correct=float(choice == oracle_choice), achieved=achieved,
                                   tied=float(tied_with_oracle(rows, choice, oracle_choice, budget)),
                                   oracle=oracle_speedup, violation=violation))
            scores.append(_random_expectation(rows, budget, oracle_choice, oracle_speedup))
    return pd.DataFrame(scores)


# ----------------------------------------------------------------------------------------------------
# oracle, scoring and the baselines
# ----------------------------------------------------------------------------------------------------


def _measured(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.assign(measured_speedup=np.exp(rows["log_speedup"]))


def oracle(rows: pd.DataFrame, budget: Budget) -> tuple[str, float]:
    """The best measured configuration within the budget in one context (baseline at 1.0 if none beats it)."""
    measured = _measured(rows)
    allowed = measured[budget.allowed(measured, "quality_loss")]
    if allowed.empty or allowed["measured_speedup"].max() <= 1.0:
        return BASELINE_CONFIGURATION, 1.0
    best = allowed.loc[allowed["measured_speedup"].idxmax()]
    return str(best["configuration"]), float(best["measured_speedup"])


def _measured_log_speedup(rows: pd.DataFrame, configuration: str, budget: Budget) -> tuple[float, float] | None:
    """Measured log speedup of ``configuration`` in this context and its standard error (the baseline:
    0 and 0); None when its measured quality broke the budget."""
    if configuration == BASELINE_CONFIGURATION:
        return 0.0, 0.0
    row = rows[rows["configuration"] == configuration].iloc[0]
    if not budget.allows(bool(row["lossless"]), float(row["quality_loss"]), str(row.get("modality"))):
        return None
    se = float(row["log_speedup_se"]) if "log_speedup_se" in row and np.isfinite(row["log_speedup_se"]) else 0.0
    return float(row["log_speedup"]), se


def achieved_speedup(rows: pd.DataFrame, choice: str, budget: Budget) -> tuple[float, bool]:
    """Measured speedup of ``choice`` in this context, and whether its measured quality broke the budget."""
    measured = _measured_log_speedup(rows, choice, budget)
    return (1.0, True) if measured is None else (float(math.exp(measured[0])), False)


def tied_with_oracle(rows: pd.DataFrame, choice: str, oracle_choice: str, budget: Budget) -> bool:
    """Whether ``choice`` is the oracle's or statistically indistinguishable from it: its measured log
    speedup within 1.96 combined standard errors of the oracle's (the baseline: log 0, no error). A
    choice that broke the budget is never tied."""
    if choice == oracle_choice:
        return True
    chosen, best = _measured_log_speedup(rows, choice, budget), _measured_log_speedup(rows, oracle_choice, budget)
    if chosen is None or best is None:
        return False
    return abs(best[0] - chosen[0]) <= 1.96 * math.hypot(best[1], chosen[1])


def learner_choice(learner: MetaLearner, rows: pd.DataFrame, budget: Budget) -> str:
    """The meta-learner's pick among the configurations measured in one context."""
    predicted = pd.concat([rows[["configuration", "lossless"]],
                           learner.predict_frame(rows[[*FEATURE_NAMES, "lossless"]])], axis=1)
    return decide(predicted, budget).configuration


def best_on_average_choice(train: pd.DataFrame, rows: pd.DataFrame, budget: Budget) -> str:
    """The available configuration with the best mean training speedup on this context's modality (quality
    losses are in the modality's unit), if that mean beats 1.0."""
    same = train[train["modality"].isin(set(rows["modality"]))]
    stats = same.groupby("configuration").agg(log_speedup=("log_speedup", "mean"), quality=("quality_loss", "mean"),
                                              lossless=("lossless", "first"), modality=("modality", "first"))
    stats = stats[budget.allowed(stats, "quality")]
    stats = stats[stats.index.isin(rows["configuration"])]
    if stats.empty or stats["log_speedup"].max() <= 0:
        return BASELINE_CONFIGURATION
    return str(stats["log_speedup"].idxmax())


def expert_choice(rows: pd.DataFrame, budget: Budget) -> str:
    """Hand-written rules of thumb, each technique's own (``Technique.expert_rules``), tried in priority
    order; first match wins (lossy rules skipped under a lossless budget); otherwise keep the baseline.
    """
    from workbench import techniques

    rules = sorted(((rule, cls.name) for cls in techniques.registered() for rule in cls.expert_rules()),
                   key=lambda pair: pair[0].priority)
    allowed = rows["lossless"] | (not budget.lossless)
    for rule, name in rules:
        own = rows["technique"] == name
        if not bool(own.any()):
            continue
        mask = pd.Series(False, index=rows.index)
        mask[own] = pd.Series(rule.applies(rows[own]), index=rows[own].index).fillna(False).astype(bool)
        hits = rows[mask & allowed]
        if not hits.empty:
            return str(hits.iloc[0]["configuration"])
    return BASELINE_CONFIGURATION


def _random_expectation(rows: pd.DataFrame, budget: Budget, oracle_choice: str, oracle_speedup: float) -> dict:
    """A uniform pick among the lossless-compatible candidates and the baseline, as an exact expectation."""
    options = [BASELINE_CONFIGURATION] + [c for c, l in zip(rows["configuration"], rows["lossless"])
                                          if l or not budget.lossless]
    outcomes = [achieved_speedup(rows, c, budget) for c in options]
    return dict(policy="random", correct=float(np.mean([c == oracle_choice for c in options])),
                tied=float(np.mean([tied_with_oracle(rows, c, oracle_choice, budget) for c in options])),
                achieved=float(np.mean([a for a, _ in outcomes])), oracle=oracle_speedup,
                violation=float(np.mean([v for _, v in outcomes])))


def shortfalls(results: pd.DataFrame) -> list[str]:
    """Sentences naming each grouping where a meta-learner does not beat a baseline (regret, top-1 or
    speedup fraction; ties count as not beating).

    Example:
        >>> shortfalls(pd.DataFrame(columns=TABLE_COLUMNS))
        []
    """
    lines = []
    for grouping, frame in results.dropna(subset=["top1_accuracy"]).groupby("grouping", sort=False):
        learners = frame[frame["policy"].str.startswith("meta-learner")]
        baselines = frame[~frame["policy"].str.startswith("meta-learner")]
        for _, learner in learners.iterrows():
            misses = []
            for metric, lower_is_better in (("mean_regret", True), ("top1_accuracy", False),
                                            ("speedup_fraction_of_oracle", False)):
                sign = -1.0 if lower_is_better else 1.0
                better = baselines[sign * baselines[metric] >= sign * learner[metric] - 1e-12]
                if not better.empty:
                    best = better.sort_values(metric, ascending=lower_is_better).iloc[0]
                    misses.append(f"{metric} {learner[metric]:.3f} vs {best['policy']} {best[metric]:.3f}")
            if misses:
                lines.append(f"by {grouping}: {learner['policy']} does not beat every baseline: {'; '.join(misses)}")
    return lines


def regret_verdicts(results: pd.DataFrame) -> list[str]:
    """One sentence per grouping and learner: its mean regret against the best baseline's.

    Example:
        >>> regret_verdicts(pd.DataFrame(columns=TABLE_COLUMNS))
        []
    """
    lines = []
    for grouping, frame in results.dropna(subset=["mean_regret"]).groupby("grouping", sort=False):
        baselines = frame[~frame["policy"].str.startswith("meta-learner")]
        best = baselines.sort_values("mean_regret").iloc[0]
        for _, learner in frame[frame["policy"].str.startswith("meta-learner")].iterrows():
            verdict = "beats every baseline" if learner["mean_regret"] < best["mean_regret"] - 1e-12 else \
                "does NOT beat every baseline"
            lines.append(f"by {grouping}: {learner['policy']} regret {learner['mean_regret']:.3f} {verdict} "
                         f"(best baseline: {best['policy']} {best['mean_regret']:.3f})")
    return lines
