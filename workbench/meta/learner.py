"""The meta-learner: predict each candidate's speedup (with an interval) and quality loss, then pick.

:class:`MetaLearner` is a scikit-learn-style regressor over the feature table of
:mod:`workbench.meta.features`: ``predict`` gives the log speedup, ``predict_interval`` a lower/upper
bound, ``predict_quality_loss`` the quality loss in points. Two learners:

- ``"boosting"`` (default): gradient boosting for the point estimate plus two quantile-loss boosters for
  the interval (``quantile`` and ``1 - quantile``) and one for quality;
- ``"tree"``: a shallow decision tree (the glass box; ``rules()`` prints it with ``export_text``); its
  interval is the spread of the training targets in the leaf a row falls into.

Both start from a *prior* and learn only how the context moves a configuration away from it: the prior
of a row is its configuration's mean training target on its modality, shrunk toward its technique's on
that modality, toward its technique's overall, toward the overall mean (empirical-Bayes pseudo-counts,
``prior_strength``). A configuration never measured on a modality (early exit on a classifier, when only
language models were measured) backs off to the next level, and its interval widens by that level's
spread: the learner says it knows less, and the fallback to the baseline takes over. With few contexts
the trees then change little and the learner behaves like "best on average"; where contexts differ (a
classifier at batch 1 vs 16, a wide vs a deep model) the trees learn by how much. ``prior="none"`` is
plain gradient boosting (or a plain tree) on the raw targets.

:func:`decide` turns predictions into one choice under a :class:`Budget`, with the baseline as explicit
fallback when no allowed candidate's lower bound beats 1.0.

Example:
    >>> from workbench.store import Store
    >>> from workbench.meta import features
    >>> table = features.training_table(features.run_features(Store("sqlite:///data/seed/seed.sqlite").runs()))  # doctest: +SKIP
    >>> learner = MetaLearner(random_state=0).fit(table, table["log_speedup"], table["quality_loss_points"])  # doctest: +SKIP
    >>> Budget.parse("accuracy<=1").max_quality_loss_points
    1.0
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.tree import DecisionTreeRegressor, export_text

from workbench.errors import WorkbenchError
from workbench.meta.features import (
    BASELINE_CONFIGURATION,
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    NUMERIC_FEATURES,
)

LEARNERS = ("boosting", "tree")
PRIORS = ("configuration", "none")
MISSING_NUMBER = -1.0  # stands for "not applicable / unknown" in numeric features (trees split it off)
_BUDGET = re.compile(r"^\s*(accuracy|quality|loss)\s*<=\s*(\d+(?:\.\d+)?)\s*$", re.IGNORECASE)


class MetaLearnerError(WorkbenchError):
    """A meta-learner problem explained in one line that names the bad value and the fix."""


# ----------------------------------------------------------------------------------------------------
# the quality budget
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How much quality a recommendation may give up.

    Example:
        >>> Budget.parse("lossless").allows(lossless=False, quality_loss_points=0.0)
        False
        >>> Budget.parse("accuracy<=1").allows(lossless=False, quality_loss_points=0.4)
        True
    """

    text: str  # as the user wrote it: lossless, any, accuracy<=1, loss<=2.5
    max_quality_loss_points: float  # the largest quality loss allowed (0-100 points scale); inf: any
    lossless: bool = False  # only techniques that promise identical outputs (Technique.lossless)

    def __post_init__(self) -> None:
        if not self.max_quality_loss_points >= 0:
            raise MetaLearnerError(f"budget {self.text!r} allows a negative loss: use e.g. accuracy<=1")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``lossless``, ``any``, or ``accuracy<=X`` / ``quality<=X`` / ``loss<=X`` (X in points)."""
        cleaned = str(text).strip().lower()
        if cleaned == "lossless":
            return cls("lossless", 0.0, lossless=True)
        if cleaned == "any":
            return cls("any", math.inf)
        match = _BUDGET.match(cleaned)
        if not match:
            raise MetaLearnerError(
                f"budget {text!r} is not understood: use lossless, any, or accuracy<=X (X quality points "
                "lost, e.g. accuracy<=1)"
            )
        return cls(cleaned.replace(" ", ""), float(match.group(2)))

    def allows(self, lossless: bool, quality_loss_points: float) -> bool:
        """Whether a configuration with this lossless promise and quality loss fits the budget."""
        if self.lossless:
            return bool(lossless)
        loss = 0.0 if quality_loss_points is None or math.isnan(quality_loss_points) else quality_loss_points
        return bool(lossless) or loss <= self.max_quality_loss_points


# ----------------------------------------------------------------------------------------------------
# the estimator
# ----------------------------------------------------------------------------------------------------


class MetaLearner(RegressorMixin, BaseEstimator):
    """Predict log speedup (with an interval) and quality loss of a configuration in a context.

    Args:
        learner: ``"boosting"`` (gradient boosting, default) or ``"tree"`` (a shallow decision tree).
        n_estimators: boosting rounds; more fit the training contexts closer, and overfit small stores.
        max_depth: tree depth; None: 3 (for the glass box at most 8 leaves, readable on one screen).
        learning_rate: boosting shrinkage; smaller needs more rounds and generalises more smoothly.
        quantile: the interval is [quantile, 1 - quantile]; 0.1 gives an 80% interval.
        min_samples_leaf: rows per leaf; larger, smoother and more conservative predictions. None: 2 for
            boosting, 5 for the tree (each rule a manager reads rests on at least 5 measurements; with 2
            the seed's leave-one-group-out regret was worse, 0.16-0.17 vs 0.06-0.07).
        prior: ``"configuration"`` (default): learn the context's effect on top of each configuration's
            shrunk training mean; ``"none"``: learn the raw targets.
        prior_strength: pseudo-count of the shrinkage: a configuration measured n times gets weight
            n / (n + prior_strength) on its own mean, the rest on its technique's.
        random_state: seeds boosting's row subsampling (and tree tie-breaking).

    Example:
        >>> learner = MetaLearner(learner="tree", random_state=0)
        >>> learner.get_params()["learner"]
        'tree'
    """

    def __init__(self, learner: str = "boosting", n_estimators: int = 150, max_depth: int | None = None,
                 learning_rate: float = 0.05, quantile: float = 0.1, min_samples_leaf: int | None = None,
                 prior: str = "configuration", prior_strength: float = 2.0, random_state: int | None = 0) -> None:
        self.learner = learner
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.quantile = quantile
        self.min_samples_leaf = min_samples_leaf
        self.prior = prior
        self.prior_strength = prior_strength
        self.random_state = random_state

    # -- fitting -----------------------------------------------------------------------------------

    def fit(self, X: pd.DataFrame, y: Any, quality_loss_points: Any = None) -> MetaLearner:
        """Learn from a feature table ``X`` (columns ``FEATURE_NAMES``), log speedups ``y`` and,
        optionally, quality losses in points (default: zero)."""
        # 1. Check the settings and the data.
        if self.learner not in LEARNERS:
            raise MetaLearnerError(f"learner={self.learner!r} is unknown: use one of {', '.join(LEARNERS)}")
        if not 0 < self.quantile < 0.5:
            raise MetaLearnerError(f"quantile={self.quantile!r} is invalid: use a value in (0, 0.5), e.g. 0.1")
        if self.prior not in PRIORS:
            raise MetaLearnerError(f"prior={self.prior!r} is unknown: use one of {', '.join(PRIORS)}")
        if not self.prior_strength >= 0:
            raise MetaLearnerError(f"prior_strength={self.prior_strength!r} is invalid: use a pseudo-count >= 0, e.g. 2")
        target = np.asarray(y, dtype=float)
        if len(X) != len(target) or len(target) < 2:
            raise MetaLearnerError(
                f"need at least 2 training rows with one target each (got {len(X)} rows, {len(target)} targets): "
                "run `workbench sweep` for more runs"
            )
        quality = np.zeros(len(target)) if quality_loss_points is None else np.nan_to_num(
            np.asarray(quality_loss_points, dtype=float), nan=0.0)
        # 2. Encoding: categories seen in training; numbers as they are, missing as -1.
        self.categories_ = {name: sorted({str(v) for v in X[name]}) for name in CATEGORICAL_FEATURES}
        self.encoded_columns_ = list(NUMERIC_FEATURES) + [
            f"{name}={value}" for name in CATEGORICAL_FEATURES for value in self.categories_[name]
        ]
        self.feature_names_ = list(FEATURE_NAMES)
        self.n_features_in_ = len(FEATURE_NAMES)
        matrix = self.encode(X)
        # 3. The priors (each configuration's shrunk mean); the trees learn what is left.
        self.speed_prior_ = self._fit_prior(X, target)
        self.quality_prior_ = self._fit_prior(X, quality)
        target = target - self.prior_of(X, "speed")
        quality = quality - self.prior_of(X, "quality")
        # 4. Models.
        depth = self.max_depth or 3
        leaf = self.min_samples_leaf or (2 if self.learner == "boosting" else 5)
        if self.learner == "boosting":
            def booster(**loss: Any) -> GradientBoostingRegressor:
                return GradientBoostingRegressor(
                    n_estimators=self.n_estimators, max_depth=depth, learning_rate=self.learning_rate,
                    min_samples_leaf=leaf, subsample=0.8 if len(target) >= 20 else 1.0,
                    random_state=self.random_state, **loss)

            self.speed_model_ = booster().fit(matrix, target)
            self.speed_low_model_ = booster(loss="quantile", alpha=self.quantile).fit(matrix, target)
            self.speed_high_model_ = booster(loss="quantile", alpha=1 - self.quantile).fit(matrix, target)
            self.quality_model_ = booster().fit(matrix, quality)
        else:
            def tree(d: int) -> DecisionTreeRegressor:
                return DecisionTreeRegressor(max_depth=d, min_samples_leaf=leaf,
                                             random_state=self.random_state)

            self.speed_model_ = tree(depth).fit(matrix, target)
            self.quality_model_ = tree(max(depth - 1, 1)).fit(matrix, quality)
            leaves = self.speed_model_.apply(matrix)
            self.leaf_ids_ = np.unique(leaves)
            self.leaf_low_ = np.array([np.quantile(target[leaves == leaf], self.quantile) for leaf in self.leaf_ids_])
            self.leaf_high_ = np.array([np.quantile(target[leaves == leaf], 1 - self.quantile)
                                        for leaf in self.leaf_ids_])
        # 5. What explanations compare against: the typical training row.
        self.reference_ = {name: (float(np.nanmedian(X[name].astype(float))) if X[name].notna().any() else None)
                           if name in NUMERIC_FEATURES else str(X[name].mode().iloc[0]) for name in FEATURE_NAMES}
        self.residual_std_ = float(np.std(target - self.speed_model_.predict(matrix)))
        return self

    def _fit_prior(self, X: pd.DataFrame, target: np.ndarray) -> dict[str, Any]:
        """Means at four levels, each shrunk toward the next coarser one: (modality, configuration) ->
        (modality, technique) -> technique -> overall; and the spread (standard deviation) of the
        targets at each level, which widens the interval of a row whose prior had to back off."""
        frame = pd.DataFrame({"technique": X["technique"].astype(str).to_numpy(), "y": target,
                              "configuration": X["configuration"].astype(str).to_numpy(),
                              "modality": X["modality"].astype(str).to_numpy()})
        overall, spread = float(frame["y"].mean()), float(frame["y"].std(ddof=0))
        if self.prior == "none":
            return {"overall": 0.0, "spread": spread, "levels": {}}
        frame["modality_technique"] = frame["modality"] + "|" + frame["technique"]
        frame["modality_configuration"] = frame["modality"] + "|" + frame["configuration"]
        k = float(self.prior_strength)
        levels: dict[str, dict[str, Any]] = {}
        frame_tech = dict(zip(frame["modality_configuration"], frame["technique"]))
        parents = {"technique": lambda key: overall,
                   "modality_technique": lambda key: levels["technique"]["mean"][key.split("|", 1)[1]],
                   "modality_configuration": lambda key: levels["modality_technique"]["mean"][
                       f"{key.split('|', 1)[0]}|{frame_tech[key]}"]}
        for level in ("technique", "modality_technique", "modality_configuration"):
            stats = frame.groupby(level)["y"].agg(["sum", "size", "std"])
            levels[level] = {
                "mean": {str(key): float((row["sum"] + k * parents[level](str(key))) / (row["size"] + k))
                         for key, row in stats.iterrows()},
                "spread": {str(key): float(row["std"]) if row["size"] >= 2 else spread
                           for key, row in stats.iterrows()},
            }
        return {"overall": overall, "spread": spread, "levels": levels}

    def _prior_lookup(self, X: pd.DataFrame, which: str) -> tuple[np.ndarray, np.ndarray]:
        prior = self.speed_prior_ if which == "speed" else self.quality_prior_
        levels = prior["levels"]
        if not levels:
            return np.zeros(len(X)), np.zeros(len(X))
        values, novelty = [], []
        for modality, technique, configuration in zip(X["modality"].astype(str), X["technique"].astype(str),
                                                      X["configuration"].astype(str)):
            keys = (("modality_configuration", f"{modality}|{configuration}"),
                    ("modality_technique", f"{modality}|{technique}"), ("technique", technique))
            found = next(((level, key) for level, key in keys if key in levels[level]["mean"]), None)
            if found is None:
                values.append(prior["overall"])
                novelty.append(prior["spread"])
            else:
                level, key = found
                values.append(levels[level]["mean"][key])
                novelty.append(0.0 if level == "modality_configuration" else levels[level]["spread"][key])
        return np.asarray(values, dtype=float), np.asarray(novelty, dtype=float)

    def prior_of(self, X: pd.DataFrame, which: str = "speed") -> np.ndarray:
        """The prior per row (``which``: ``"speed"``, log speedup, or ``"quality"``, points): the shrunk
        training mean of the row's configuration on its modality, else of its technique on its modality,
        else of its technique, else the overall mean."""
        return self._prior_lookup(X, which)[0]

    def novelty_of(self, X: pd.DataFrame) -> np.ndarray:
        """Per row, the spread of log speedups at the level its prior backed off to (0 when the
        configuration was measured on this modality): how much less is known about it."""
        return self._prior_lookup(X, "speed")[1]

    # -- predicting --------------------------------------------------------------------------------

    def encode(self, X: pd.DataFrame) -> np.ndarray:
        """The model matrix (rows, ``len(encoded_columns_)``): numbers, then one-hot categories."""
        missing = [name for name in FEATURE_NAMES if name not in X.columns]
        if missing:
            raise MetaLearnerError(
                f"feature table lacks {', '.join(missing)}: build it with workbench.meta.features.run_features"
            )
        numbers = X[list(NUMERIC_FEATURES)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        numbers = np.where(np.isfinite(numbers), numbers, MISSING_NUMBER)
        blocks = [numbers]
        for name in CATEGORICAL_FEATURES:
            values = X[name].astype(str).to_numpy()
            blocks.append(np.stack([values == v for v in self.categories_[name]], axis=1).astype(float)
                          if self.categories_[name] else np.zeros((len(X), 0)))
        return np.hstack(blocks)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Predicted log speedup per row (natural log; exp() is the speedup over the baseline)."""
        return self.prior_of(X, "speed") + self.speed_model_.predict(self.encode(X))

    def predict_interval(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bound of the log speedup (quantile and 1 - quantile), never crossing ``predict``."""
        matrix, (prior, novelty) = self.encode(X), self._prior_lookup(X, "speed")
        point = prior + self.speed_model_.predict(matrix)
        if self.learner == "boosting":
            low, high = self.speed_low_model_.predict(matrix), self.speed_high_model_.predict(matrix)
        else:
            index = np.searchsorted(self.leaf_ids_, self.speed_model_.apply(matrix))
            low, high = self.leaf_low_[index], self.leaf_high_[index]
        # A prior that backed off (a configuration never measured on this modality) knows less: the
        # interval is at least as wide as the spread at the level it backed off to.
        z = NormalDist().inv_cdf(1 - self.quantile)
        return (np.minimum.reduce([prior + low, point, point - z * novelty]),
                np.maximum.reduce([prior + high, point, point + z * novelty]))

    def predict_quality_loss(self, X: pd.DataFrame) -> np.ndarray:
        """Predicted quality loss in points (>= 0)."""
        return np.clip(self.prior_of(X, "quality") + self.quality_model_.predict(self.encode(X)), 0.0, None)

    def predict_frame(self, X: pd.DataFrame) -> pd.DataFrame:
        """Predictions as a DataFrame: ``predicted_speedup``, ``speedup_low``, ``speedup_high``,
        ``predicted_quality_loss_points`` (speedups as ratios, not logs)."""
        low, high = self.predict_interval(X)
        return pd.DataFrame({
            "predicted_speedup": np.exp(self.predict(X)), "speedup_low": np.exp(low), "speedup_high": np.exp(high),
            "predicted_quality_loss_points": self.predict_quality_loss(X),
        }, index=X.index)

    def rules(self) -> str:
        """The glass box's rules as text (``export_text``); for boosting, its first tree's. Leaves hold
        the change of log speedup from the configuration's prior (``prior_of``)."""
        tree = self.speed_model_ if self.learner == "tree" else self.speed_model_.estimators_[0, 0]
        text = export_text(tree, feature_names=self.encoded_columns_, decimals=3)
        if self.learner == "tree":
            text = text.replace("value: [", "log speedup vs prior: [")
        return (f"(a number of {MISSING_NUMBER:g} means 'not applicable', e.g. weight_bits of an "
                f"unquantized configuration; name=value columns are 1 when true)\n{text}")


# ----------------------------------------------------------------------------------------------------
# choosing
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One choice among candidates, with why."""

    configuration: str  # the chosen configuration, or "baseline"
    fallback: bool  # True when the baseline was kept because no candidate was good and sure enough
    reason: str  # one sentence


def decide(table: pd.DataFrame, budget: Budget, min_speedup: float = 1.0,
           speed: str = "predicted_speedup", low: str = "speedup_low",
           quality: str = "predicted_quality_loss_points") -> Decision:
    """The allowed candidate with the best ``speed`` whose ``low`` bound beats ``min_speedup``.

    Args:
        table: one row per candidate with ``configuration``, ``lossless`` and the named columns.
        budget: which candidates are allowed (by ``lossless`` and ``quality``).

    Example:
        >>> t = pd.DataFrame({"configuration": ["a", "b"], "lossless": [True, False],
        ...                   "predicted_speedup": [1.5, 2.0], "speedup_low": [1.1, 1.4],
        ...                   "predicted_quality_loss_points": [0.0, 3.0]})
        >>> decide(t, Budget.parse("lossless")).configuration
        'a'
    """
    if table.empty:
        return Decision(BASELINE_CONFIGURATION, True, "no candidate configuration applies to this context")
    allowed = table[[budget.allows(bool(lossless), float(q))
                     for lossless, q in zip(table["lossless"], table[quality])]]
    if allowed.empty:
        return Decision(BASELINE_CONFIGURATION, True,
                        f"no candidate fits the quality budget {budget.text!r}: keep the baseline")
    best = allowed.sort_values([speed, low], ascending=False).iloc[0]
    if not best[low] > min_speedup:
        return Decision(BASELINE_CONFIGURATION, True,
                        f"no candidate is predicted to beat the baseline with confidence (best: "
                        f"{best['configuration']} at {best[speed]:.2f}x, lower bound {best[low]:.2f}x <= "
                        f"{min_speedup:.2f}x): keep the baseline")
    return Decision(str(best["configuration"]), False,
                    f"{best['configuration']} has the best predicted speedup within budget {budget.text!r} "
                    f"({best[speed]:.2f}x, lower bound {best[low]:.2f}x)")
