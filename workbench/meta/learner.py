"""The meta-learner: predict each candidate's speedup (with an interval) and quality loss, then pick.

:class:`MetaLearner` is a scikit-learn-style regressor over the feature table of
:mod:`workbench.meta.features`: ``predict`` gives the log speedup, ``predict_interval`` a lower/upper
bound, ``predict_quality_loss`` the quality loss in the modality's unit. Two learners:

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
    >>> learner = MetaLearner(random_state=0).fit(table, table["log_speedup"], table["quality_loss"])  # doctest: +SKIP
    >>> Budget.parse("accuracy<=1").bound("text-classification")
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
from workbench.measure import MARGIN_PERCENT
from workbench.quality import LOSS_SCALES
from workbench.meta.trust import CATEGORICAL_CHECKS, NUMERIC_CHECKS, TrainingRange, widen
from workbench.meta.features import (
    BASELINE_CONFIGURATION,
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    NUMERIC_FEATURES,
)

LEARNERS = ("boosting", "tree")
PRIORS = ("configuration", "none")
MIN_ROWS_PER_TECHNIQUE = 6  # a technique measured in fewer (context, configuration) rows uses the global models
MISSING_NUMBER = -1.0  # stands for "not applicable / unknown" in numeric features (trees split it off)
_BUDGET = re.compile(r"^(perplexity|accuracy|ssim)\s*(<=|>=)\s*(\d+(?:\.\d+)?|\.\d+)\s*(%|points?)?$")


class MetaLearnerError(WorkbenchError):
    """A meta-learner problem explained in one line that names the bad value and the fix."""


# ----------------------------------------------------------------------------------------------------
# the quality budget
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How much quality a recommendation may give up, per modality, in that modality's unit.

    Clauses (comma-separated): ``lossless`` (identical outputs only), ``any``, ``perplexity<=X%``
    (language models: perplexity increase in percent), ``accuracy<=X`` (classifiers: accuracy drop in
    points), ``ssim>=X`` (images: SSIM to the many-step reference). A modality the budget does not name
    keeps its default bound (``perplexity<=2%``, ``accuracy<=1``, ``ssim>=0.9``), and :meth:`describe` says
    so. An unknown loss (NaN: the run has no figure in that unit) never fits a budget that is not ``any``.

    Example:
        >>> Budget.parse("lossless").allows(lossless=False, loss=0.0, modality="text-generation")
        False
        >>> Budget.parse("accuracy<=1").allows(lossless=False, loss=0.4, modality="text-classification")
        True
        >>> Budget.parse("perplexity<=2%, ssim>=0.95").bound("image-generation")
        0.05
    """

    text: str  # as the user wrote it: lossless, any, accuracy<=1, perplexity<=2%, ssim>=0.9
    bounds: tuple[tuple[str, float], ...] = ()  # (modality, largest loss allowed in its unit), named ones
    lossless: bool = False  # only techniques that promise identical outputs (Technique.lossless)
    unbounded: bool = False  # ``any``: every loss allowed, even an unknown one

    def __post_init__(self) -> None:
        for modality, bound in self.bounds:
            if not bound >= 0:
                raise MetaLearnerError(f"budget {self.text!r} allows a negative loss for {modality}: use e.g. "
                                       f"{LOSS_SCALES[modality].example}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``lossless``, ``any``, or clauses ``perplexity<=X%``, ``accuracy<=X``, ``ssim>=X`` (comma-separated)."""
        cleaned = str(text).strip().lower()
        if cleaned == "lossless":
            return cls("lossless", lossless=True)
        if cleaned == "any":
            return cls("any", unbounded=True)
        bounds: dict[str, float] = {}
        for clause in [c.strip() for c in re.split(r"[,;]|\band\b", cleaned) if c.strip()]:
            match = _BUDGET.match(clause)
            if not match:
                legacy = " The 0-100 'points' scale for every modality is retired." if re.match(
                    r"^(quality|loss)\s*<=", clause) else ""
                raise MetaLearnerError(
                    f"budget {text!r} is not understood ({clause!r}).{legacy} Use lossless, any, or clauses in each "
                    "modality's unit: perplexity<=2% (language models), accuracy<=1 (classifiers, points), "
                    "ssim>=0.9 (images), e.g. --budget 'perplexity<=2%,accuracy<=1'")
            metric, operator, number = match.group(1), match.group(2), float(match.group(3))
            modality = next(m for m, scale in LOSS_SCALES.items() if scale.metric == metric)
            if metric == "ssim":
                if operator != ">=" or not 0.0 <= number <= 1.0:
                    raise MetaLearnerError(f"budget clause {clause!r} is invalid: SSIM is a floor between 0 and 1, "
                                           "e.g. ssim>=0.9")
                bounds[modality] = round(1.0 - number, 12)
            else:
                if operator != "<=":
                    raise MetaLearnerError(f"budget clause {clause!r} is invalid: {metric} is a ceiling on the "
                                           f"loss, e.g. {LOSS_SCALES[modality].example}")
                bounds[modality] = number
        written = ",".join(c.replace(" ", "") for c in re.split(r"[,;]|\band\b", cleaned) if c.strip())
        return cls(written, tuple(sorted(bounds.items())))

    def bound(self, modality: str) -> float:
        """The largest loss allowed for ``modality``, in its unit (0 for lossless, inf for any)."""
        if self.lossless:
            return 0.0
        if self.unbounded:
            return math.inf
        named = dict(self.bounds)
        if modality in named:
            return named[modality]
        scale = LOSS_SCALES.get(modality)
        return scale.default_bound if scale else 0.0

    def describe(self) -> str:
        """The whole budget in words, defaults included: 'accuracy<=1 (perplexity<=2%, ssim>=0.9 by default)'."""
        if self.lossless or self.unbounded:
            return self.text
        named = dict(self.bounds)
        defaults = [scale.example for modality, scale in LOSS_SCALES.items() if modality not in named]
        return self.text + (f" ({', '.join(defaults)} by default)" if defaults else "")

    def allows(self, lossless: bool, loss: float | None, modality: str) -> bool:
        """Whether a configuration with this lossless promise and quality loss (in ``modality``'s unit)
        fits the budget; an unknown loss fits only ``any``."""
        if self.lossless:
            return bool(lossless)
        if lossless or self.unbounded:
            return True
        if loss is None or not math.isfinite(loss):
            return False
        return loss <= self.bound(modality) + 1e-12

    def allowed(self, frame: pd.DataFrame, loss: str) -> list[bool]:
        """:meth:`allows` for every row of ``frame`` (columns ``lossless``, ``modality`` and ``loss``)."""
        if "modality" not in frame.columns:  # a loss without its unit cannot be judged
            raise ValueError("Budget.allowed needs a modality column beside the loss (its unit)")
        return [self.allows(bool(lossless), None if q is None else float(q), str(modality))
                for lossless, q, modality in zip(frame["lossless"], frame[loss], frame["modality"])]


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
        per_technique: fit the context's effect separately for each technique measured in at least
            ``MIN_ROWS_PER_TECHNIQUE`` rows (default); False: one set of models for every technique (what
            plain gradient boosting does), which cannot split interactions such as "int8 gains with width
            while prompt lookup does not" when they cancel on average.
        random_state: seeds boosting's row subsampling (and tree tie-breaking).

    Example:
        >>> learner = MetaLearner(learner="tree", random_state=0)
        >>> learner.get_params()["learner"]
        'tree'
    """

    def __init__(self, learner: str = "boosting", n_estimators: int = 150, max_depth: int | None = None,
                 learning_rate: float = 0.05, quantile: float = 0.1, min_samples_leaf: int | None = None,
                 prior: str = "configuration", prior_strength: float = 2.0, per_technique: bool = True,
                 random_state: int | None = 0) -> None:
        self.learner = learner
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.quantile = quantile
        self.min_samples_leaf = min_samples_leaf
        self.prior = prior
        self.prior_strength = prior_strength
        self.per_technique = per_technique
        self.random_state = random_state

    # -- fitting -----------------------------------------------------------------------------------

    def fit(self, X: pd.DataFrame, y: Any, quality_loss: Any = None, sample_weight: Any = None) -> MetaLearner:
        """Learn from a feature table ``X`` (columns ``FEATURE_NAMES``), log speedups ``y`` and,
        optionally, quality losses in each row's modality unit (default: zero; NaN rows, whose loss is
        unknown, do not train the quality model) and sample weights (default: the table's ``weight``
        column when there is one, which is lower for runs measured on a noisy machine)."""
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
        quality = np.zeros(len(target)) if quality_loss is None else np.asarray(quality_loss, dtype=float)
        known = np.isfinite(quality)  # rows whose loss was measured in their modality's unit
        if sample_weight is None and "weight" in X.columns:
            sample_weight = X["weight"]
        weight = np.ones(len(target)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
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
        self.quality_prior_ = self._fit_prior(X[known], quality[known], within_modality=True) if known.any() \
            else {"overall": math.nan, "spread": math.nan, "levels": {}}
        target = target - self.prior_of(X, "speed")
        quality = quality[known] - self.prior_of(X[known], "quality")
        # 4. Models: one set per technique with enough rows (how a context moves a configuration depends on
        # the technique: int8 gains with width, prompt lookup with repetition, a draft with its cost ratio;
        # one tree over all techniques cannot split such interactions greedily), and a global set for the rest.
        self._depth = self.max_depth or 3
        self._leaf = self.min_samples_leaf or (2 if self.learner == "boosting" else 5)
        self._set_models(self._fit_speed(matrix, target, weight))
        techniques = X["technique"].astype(str).to_numpy()
        self.technique_models_ = {
            name: self._fit_speed(matrix[techniques == name], target[techniques == name],
                                  weight[techniques == name])
            for name in sorted(set(techniques))
            if self.per_technique and int((techniques == name).sum()) >= MIN_ROWS_PER_TECHNIQUE}
        if self.learner == "boosting":
            self.quality_model_ = self._booster(int(known.sum())).fit(*self._quality_rows(matrix, known, quality,
                                                                                          weight))
        else:
            self.quality_model_ = self._tree(max(self._depth - 1, 1)).fit(
                *self._quality_rows(matrix, known, quality, weight))
        # 5. What explanations compare against: the typical training row.
        self.reference_ = {name: (float(np.nanmedian(X[name].astype(float))) if X[name].notna().any() else None)
                           if name in NUMERIC_FEATURES else str(X[name].mode().iloc[0]) for name in FEATURE_NAMES}
        self.residual_std_ = float(np.std(target - self._speed_parts(X, matrix)[0]))
        self.range_ = TrainingRange.of(X)
        return self

    def _booster(self, rows: int, **loss: Any) -> GradientBoostingRegressor:
        """A booster for ``rows`` training rows (row subsampling from 20 rows on)."""
        return GradientBoostingRegressor(
            n_estimators=self.n_estimators, max_depth=self._depth, learning_rate=self.learning_rate,
            min_samples_leaf=self._leaf, subsample=0.8 if rows >= 20 else 1.0,
            random_state=self.random_state, **loss)

    def _tree(self, depth: int) -> DecisionTreeRegressor:
        return DecisionTreeRegressor(max_depth=depth, min_samples_leaf=self._leaf, random_state=self.random_state)

    def _fit_speed(self, matrix: np.ndarray, target: np.ndarray, weight: np.ndarray) -> dict[str, Any]:
        """The speed models on these rows: point, low and high (boosting: quantile boosters; tree: the spread
        of the targets in each leaf)."""
        rows = len(target)
        if self.learner == "boosting":
            return {"point": self._booster(rows).fit(matrix, target, sample_weight=weight),
                    "low": self._booster(rows, loss="quantile", alpha=self.quantile).fit(matrix, target,
                                                                                         sample_weight=weight),
                    "high": self._booster(rows, loss="quantile", alpha=1 - self.quantile).fit(matrix, target,
                                                                                              sample_weight=weight)}
        tree = self._tree(self._depth).fit(matrix, target, sample_weight=weight)
        leaves = tree.apply(matrix)
        ids = np.unique(leaves)
        return {"point": tree, "leaf_ids": ids,
                "leaf_low": np.array([np.quantile(target[leaves == leaf], self.quantile) for leaf in ids]),
                "leaf_high": np.array([np.quantile(target[leaves == leaf], 1 - self.quantile) for leaf in ids])}

    def _set_models(self, models: dict[str, Any]) -> None:
        """The global models under their historical names (what persist saves and explain reads)."""
        self.speed_model_ = models["point"]
        if self.learner == "boosting":
            self.speed_low_model_, self.speed_high_model_ = models["low"], models["high"]
        else:
            self.leaf_ids_, self.leaf_low_, self.leaf_high_ = models["leaf_ids"], models["leaf_low"], models["leaf_high"]

    def _global_models(self) -> dict[str, Any]:
        if self.learner == "boosting":
            return {"point": self.speed_model_, "low": self.speed_low_model_, "high": self.speed_high_model_}
        return {"point": self.speed_model_, "leaf_ids": np.asarray(self.leaf_ids_),
                "leaf_low": np.asarray(self.leaf_low_), "leaf_high": np.asarray(self.leaf_high_)}

    def models_for(self, technique: str) -> dict[str, Any]:
        """The speed models that predict ``technique``'s rows: its own, or the global ones."""
        return (getattr(self, "technique_models_", None) or {}).get(str(technique)) or self._global_models()

    def _speed_parts(self, X: pd.DataFrame, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row, the predicted change of log speedup from the prior, and its low and high quantiles."""
        point, low, high = (np.zeros(len(X)) for _ in range(3))
        techniques = X["technique"].astype(str).to_numpy()
        for name in np.unique(techniques) if len(X) else []:
            rows = techniques == name
            models = self.models_for(name)
            part = matrix[rows]
            point[rows] = models["point"].predict(part)
            if self.learner == "boosting":
                low[rows], high[rows] = models["low"].predict(part), models["high"].predict(part)
            else:
                index = np.searchsorted(models["leaf_ids"], models["point"].apply(part))
                low[rows], high[rows] = models["leaf_low"][index], models["leaf_high"][index]
        return point, low, high

    @staticmethod
    def _quality_rows(matrix: np.ndarray, known: np.ndarray, quality: np.ndarray,
                      weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The quality model's training rows: those with a known loss, or one zero row when none is
        known (its predictions then rest on the prior alone, which is NaN: unknown)."""
        if known.any():
            return matrix[known], quality, weight[known]
        return matrix[:1], np.zeros(1), np.ones(1)

    def _fit_prior(self, X: pd.DataFrame, target: np.ndarray, within_modality: bool = False) -> dict[str, Any]:
        """Means at four levels, each shrunk toward the next coarser one: (modality, configuration) ->
        (modality, technique) -> technique -> overall; and the spread (standard deviation) of the
        targets at each level, which widens the interval of a row whose prior had to back off.

        ``within_modality`` (quality losses, whose unit is the modality's): (modality, configuration) ->
        (modality, technique) -> modality; predictions back off no further than (modality, technique): a
        technique whose quality was never measured on a modality has an unknown (NaN) loss there."""
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
        # Quality losses are in each modality's own unit: their prior never borrows across modalities.
        top = "modality" if within_modality else "technique"
        parents = {"technique": lambda key: overall, "modality": lambda key: overall,
                   "modality_technique": (lambda key: levels["modality"]["mean"][key.split("|", 1)[0]])
                   if within_modality else (lambda key: levels["technique"]["mean"][key.split("|", 1)[1]]),
                   "modality_configuration": lambda key: levels["modality_technique"]["mean"][
                       f"{key.split('|', 1)[0]}|{frame_tech[key]}"]}
        for level in (top, "modality_technique", "modality_configuration"):
            stats = frame.groupby(level)["y"].agg(["sum", "size", "std"])
            shrink = 0.0 if level == "modality" else k  # a modality's own mean is not shrunk across units
            levels[level] = {
                "mean": {str(key): float((row["sum"] + shrink * parents[level](str(key))) / (row["size"] + shrink))
                         for key, row in stats.iterrows()},
                "spread": {str(key): float(row["std"]) if row["size"] >= 2 else spread
                           for key, row in stats.iterrows()},
            }
        return {"overall": overall, "spread": spread, "levels": levels}

    def _prior_lookup(self, X: pd.DataFrame, which: str) -> tuple[np.ndarray, np.ndarray]:
        prior = self.speed_prior_ if which == "speed" else self.quality_prior_
        levels = prior["levels"]
        if not levels:
            return np.full(len(X), prior["overall"], dtype=float), np.zeros(len(X))
        within_modality = "modality" in levels  # a quality prior: nothing above the modality
        values, novelty = [], []
        for modality, technique, configuration in zip(X["modality"].astype(str), X["technique"].astype(str),
                                                      X["configuration"].astype(str)):
            # A quality prior backs off no further than the technique on this modality: a technique whose
            # quality was never measured on a modality has an unknown loss there (NaN), not the average of
            # other techniques'.
            keys = (("modality_configuration", f"{modality}|{configuration}"),
                    ("modality_technique", f"{modality}|{technique}"),
                    *(() if within_modality else (("technique", technique),)))
            found = next(((level, key) for level, key in keys if key in levels[level]["mean"]), None)
            if found is None:
                values.append(math.nan if within_modality else prior["overall"])
                novelty.append(prior["spread"])
            else:
                level, key = found
                values.append(levels[level]["mean"][key])
                novelty.append(0.0 if level == "modality_configuration" else levels[level]["spread"][key])
        return np.asarray(values, dtype=float), np.asarray(novelty, dtype=float)

    def prior_of(self, X: pd.DataFrame, which: str = "speed") -> np.ndarray:
        """The prior per row (``which``: ``"speed"``, log speedup, or ``"quality"``, the modality's unit): the shrunk
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
        return self.prior_of(X, "speed") + self._speed_parts(X, self.encode(X))[0]

    def predict_interval(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bound of the log speedup (quantile and 1 - quantile), never crossing ``predict``."""
        matrix, (prior, novelty) = self.encode(X), self._prior_lookup(X, "speed")
        change, low, high = self._speed_parts(X, matrix)
        point = prior + change
        # A prior that backed off (a configuration never measured on this modality) knows less: the
        # interval is at least as wide as the spread at the level it backed off to.
        z = NormalDist().inv_cdf(1 - self.quantile)
        return (np.minimum.reduce([prior + low, point, point - z * novelty]),
                np.maximum.reduce([prior + high, point, point + z * novelty]))

    def predict_quality_loss(self, X: pd.DataFrame) -> np.ndarray:
        """Predicted quality loss in each row's modality unit (perplexity %, accuracy points, 1 - SSIM);
        NaN where no training run had a figure in that unit."""
        return self.prior_of(X, "quality") + self.quality_model_.predict(self.encode(X))

    def out_of_range(self, X: pd.DataFrame) -> list[list[str]]:
        """Per row, each way its context falls outside the training range (:mod:`workbench.meta.trust`)."""
        training = getattr(self, "range_", None)
        if training is None:
            return [[] for _ in range(len(X))]
        cache: dict[tuple, list[str]] = {}
        out = []
        for record in X.to_dict(orient="records"):
            key = tuple(str(record.get(name)) for name in ("modality", *NUMERIC_CHECKS, *CATEGORICAL_CHECKS))
            if key not in cache:
                cache[key] = training.flags(record)
            out.append(cache[key])
        return out

    def predict_frame(self, X: pd.DataFrame) -> pd.DataFrame:
        """Predictions as a DataFrame: ``predicted_speedup``, ``speedup_low``, ``speedup_high``,
        ``predicted_quality_loss`` (speedups as ratios, not logs; the loss in the row's modality unit, 0 for
        a row whose ``lossless`` column is true), the ``modality`` the loss is measured in, and
        ``out_of_range`` (the flags of :meth:`out_of_range`, joined by "; "; "" inside the range), whose
        interval is widened (:func:`workbench.meta.trust.widen`)."""
        point = self.predict(X)
        low, high = self.predict_interval(X)
        flags = self.out_of_range(X)
        counts = np.array([len(f) for f in flags], dtype=float)
        low, high = widen(point, low, high, counts) if len(X) else (low, high)
        loss = self.predict_quality_loss(X)
        if "lossless" in X.columns:  # identical outputs lose nothing, whatever the trees' residuals say
            loss = np.where(X["lossless"].astype(bool).to_numpy(), 0.0, loss)
        return pd.DataFrame({
            "predicted_speedup": np.exp(point), "speedup_low": np.exp(low), "speedup_high": np.exp(high),
            "predicted_quality_loss": loss, "modality": X["modality"].astype(str).to_numpy(),
            "out_of_range": ["; ".join(f) for f in flags],
        }, index=X.index)

    def rules(self) -> str:
        """The glass box's rules as text (``export_text``), one tree per technique with its own models and
        one for the rest; for boosting, each ensemble's first tree. Leaves hold the change of log speedup
        from the configuration's prior (``prior_of``)."""
        parts = [(f"technique {name}", models) for name, models in (getattr(self, "technique_models_", None) or {}).items()]
        parts.append(("every other technique" if parts else "every technique", self._global_models()))
        texts = []
        for title, models in parts:
            tree = models["point"] if self.learner == "tree" else models["point"].estimators_[0, 0]
            text = export_text(tree, feature_names=self.encoded_columns_, decimals=3)
            if self.learner == "tree":
                text = text.replace("value: [", "log speedup vs prior: [")
            texts.append(f"{title}:\n{text}")
        return (f"(a number of {MISSING_NUMBER:g} means 'not applicable', e.g. weight_bits of an "
                f"unquantized configuration; name=value columns are 1 when true)\n" + "\n".join(texts))


# ----------------------------------------------------------------------------------------------------
# choosing
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One choice among candidates, with why."""

    configuration: str  # the chosen configuration, or "baseline"
    fallback: bool  # True when the baseline was kept because no candidate was good and sure enough
    reason: str  # one sentence


#: The decision rule's floor on the interval's lower bound: a candidate whose 80% interval reaches below
#: this (a plausible 2x slowdown) is not recommended, however good its point prediction. On the seed,
#: leaving one model out, floors of 0.9 / 0.5 / 0 closed 12% / 11% / 14% of the gap and leaving one
#: hardware configuration out -18% / 8% / 8%: a floor near 1 keeps the baseline too often.
#: ``min_speedup`` applies to the point prediction (the +-2% band of no practical difference).
MIN_LOW_SPEEDUP = 0.5


def decide(table: pd.DataFrame, budget: Budget, min_speedup: float = 1.0 + MARGIN_PERCENT / 100.0,
           speed: str = "predicted_speedup", low: str = "speedup_low",
           quality: str = "predicted_quality_loss", min_low: float | None = None) -> Decision:
    """The allowed candidate with the best ``speed`` that beats ``min_speedup`` (by default the edge of
    the equivalence band: a predicted gain under 2% is "no practical difference") and whose ``low`` bound
    stays above ``min_low`` (default ``MIN_LOW_SPEEDUP``: not a likely slowdown); else the baseline.

    Args:
        table: one row per candidate with ``configuration``, ``lossless`` and the named columns.
        budget: which candidates are allowed (by ``lossless`` and ``quality``).

    Example:
        >>> t = pd.DataFrame({"configuration": ["a", "b"], "lossless": [True, False],
        ...                   "predicted_speedup": [1.5, 2.0], "speedup_low": [1.1, 1.4],
        ...                   "predicted_quality_loss": [0.0, 3.0]})
        >>> decide(t, Budget.parse("lossless")).configuration
        'a'
    """
    floor = MIN_LOW_SPEEDUP if min_low is None else min_low
    if table.empty:
        return Decision(BASELINE_CONFIGURATION, True, "no candidate configuration applies to this context")
    allowed = table[budget.allowed(table, quality)]
    if allowed.empty:
        return Decision(BASELINE_CONFIGURATION, True,
                        f"no candidate fits the quality budget {budget.text!r}: keep the baseline")
    ranked = allowed.sort_values([speed, low], ascending=False)
    sure = ranked[(ranked[speed] > min_speedup) & (ranked[low] > floor)]
    if sure.empty:
        best = ranked.iloc[0]
        why = (f"its predicted {best[speed]:.2f}x does not clear the {min_speedup:.2f}x band of no practical "
               "difference" if not best[speed] > min_speedup else
               f"its interval reaches down to {best[low]:.2f}x, a likely slowdown (floor {floor:.2f}x)")
        return Decision(BASELINE_CONFIGURATION, True,
                        f"no candidate is predicted to beat the baseline with confidence (best: "
                        f"{best['configuration']}: {why}): keep the baseline")
    best = sure.iloc[0]
    return Decision(str(best["configuration"]), False,
                    f"{best['configuration']} has the best predicted speedup within budget {budget.text!r} "
                    f"({best[speed]:.2f}x, interval down to {best[low]:.2f}x)")
