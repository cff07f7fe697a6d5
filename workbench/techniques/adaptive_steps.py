"""Adaptive diffusion steps: fewer denoising steps per prompt (or class), chosen by a policy.

Works on any diffusers pipeline through its public call only: ``num_inference_steps``, one seeded
``generator`` per input, ``callback_on_step_end`` (with ``callback_on_step_end_tensor_inputs``) and
``pipe._interrupt``; class labels or prompts come from the :class:`~workbench.workloads.Batch`.

Policies:

* ``predictor`` (StepSaver-style): in :meth:`AdaptiveSteps.prepare` (untimed) the workbench sweeps
  the candidate step counts on *training* seeds disjoint from the workload's, labels every
  (features, seed) with the fewest candidate steps whose image reaches ``ssim_target`` against the
  ``reference_steps`` image of the same seed, and fits a shallow tree whose leaves predict a high
  quantile of their labels (conservative: too few steps loses quality). Features: the class one-hot
  (class-conditional), a pooled text embedding from the pipeline's own text encoder (text-to-image),
  and the pipeline's default guidance scale where it has one. Its cross-validated error is reported.
  At run time each input gets its predicted step count; a batch runs as one pipeline call per distinct
  step count, outputs in input order.
* ``convergence``: a planned schedule of ``max_steps`` (default: the baseline's steps) that stops once
  every image's predicted clean sample (``pred_original_sample``) changes by less than ``tolerance``
  (mean absolute change, in the pipeline's sample units) between successive steps. At the stop the
  callback hands the predicted clean sample back as the latents and sets ``pipe._interrupt``, so the
  image returned is the clean prediction, not the noisy latents. A batch stops when its slowest image
  has converged. Needs a pipeline whose callback exposes ``pred_original_sample`` (the zoo's
  ``DigitsPipeline`` does; Stable Diffusion pipelines do not, and say so before loading).

In prepare the technique also draws the ``reference_steps`` image of every timed input's seed;
:meth:`AdaptiveSteps.report` compares both the baseline's and the technique's images with it (SSIM,
PSNR) and, for class-conditional digits, has a judge classifier check the drawn class.

Example:
    >>> from workbench.techniques.adaptive_steps import AdaptiveSteps
    >>> AdaptiveSteps(policy="convergence", tolerance=0.01).config["max_steps"] is None
    True
    >>> AdaptiveSteps().applies_to
    ('diffusion',)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.tree import DecisionTreeRegressor

from workbench import quality
from workbench.errors import NotApplicableError
from workbench.measure import CallOutput
from workbench.techniques._execute import draw
from workbench.techniques.base import (ExpertRule, Facts, Metric, Outcome, Param, Technique, TechniqueParamError,
                                       TechniqueReport, Trial, register)
from workbench.workloads import Batch

TRAIN_SEED_BASE = 1_000_000_007  # training seeds start here, far from the workload's (spec.seed * 100_003 + i)
ZOO_DIGITS = "zoo:digits-diffusion"  # the zoo pipeline whose judge is zoo:digits-judge
ZOO_JUDGE = "zoo:digits-judge"
_METRIC_LABELS = {  # human-readable names of the quality figures shown in one line
    "ssim_technique_vs_reference": "SSIM vs reference", "ssim_baseline_vs_reference": "SSIM vs reference (baseline)",
    "steps_technique_mean": "mean steps", "judge_accuracy_technique": "judge accuracy",
    "judge_accuracy_baseline": "judge accuracy (baseline)",
}
POLICY_PARAMS = {  # parameters that only one policy reads
    "predictor": ("candidate_steps", "train_seeds", "quantile", "max_depth", "cv_folds", "sweep_batch_size"),
    "convergence": ("tolerance", "max_steps"),
}


def parse_steps(text: str) -> list[int]:
    """Comma-separated positive step counts, sorted and deduplicated; one clear line when malformed.

    Example:
        >>> parse_steps("8, 4,8,20")
        [4, 8, 20]
    """
    try:
        values = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise TechniqueParamError(f"adaptive_steps parameter candidate_steps={text!r} is not a comma-separated "
                                  "list of integers: use e.g. candidate_steps=4,8,15,30") from None
    if not values or values[0] < 1:
        raise TechniqueParamError(f"adaptive_steps parameter candidate_steps={text!r} needs one or more step "
                                  "counts >= 1: use e.g. candidate_steps=4,8,15,30")
    return values


# --------------------------------------------------------------------------- the step predictor


class LeafQuantileTree(RegressorMixin, BaseEstimator):
    """A shallow regression tree whose leaves predict a high quantile of their training labels.

    Conservative by design: with ``quantile=0.9`` about nine in ten training inputs of a leaf reach
    the target at the predicted step count. The ``"higher"`` quantile is always one of the labels,
    so predictions are step counts that were really swept.

    Example:
        >>> X = np.eye(2)[[0, 0, 0, 1, 1, 1]]
        >>> tree = LeafQuantileTree(quantile=1.0, min_samples_leaf=1).fit(X, [4, 6, 8, 20, 30, 30])
        >>> tree.predict(np.eye(2)).tolist()
        [8.0, 30.0]
    """

    def __init__(self, max_depth: int = 4, min_samples_leaf: int = 2, quantile: float = 0.9,
                 random_state: int = 0) -> None:
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.quantile = quantile
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> "LeafQuantileTree":
        X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
        self.tree_ = DecisionTreeRegressor(max_depth=self.max_depth, min_samples_leaf=self.min_samples_leaf,
                                           random_state=self.random_state).fit(X, y)
        leaves = self.tree_.apply(X)
        self.leaf_value_ = {int(leaf): float(np.quantile(y[leaves == leaf], self.quantile, method="higher"))
                            for leaf in np.unique(leaves)}
        return self

    def predict(self, X: Any) -> np.ndarray:
        leaves = self.tree_.apply(np.asarray(X, dtype=float))
        return np.array([self.leaf_value_[int(leaf)] for leaf in leaves])


def fewest_steps(ssim_by_steps: dict[int, float], target: float, fallback_steps: int) -> int:
    """The smallest step count whose SSIM reaches ``target``; ``fallback_steps`` when none does.

    Example:
        >>> fewest_steps({4: 0.8, 8: 0.93, 15: 0.97}, 0.9, 100)
        8
    """
    reached = [steps for steps, value in sorted(ssim_by_steps.items()) if value >= target]
    return reached[0] if reached else fallback_steps


# --------------------------------------------------------------------------- pipeline helpers


class StepCallback:
    """``callback_on_step_end`` that counts and times steps, and optionally stops at convergence.

    ``step_seconds`` holds the wall time of each step (the first one includes the call's setup:
    noise, text encoding). With a ``tolerance`` it reads ``pred_original_sample`` (B, C, H, W); an
    image counts as converged once its mean absolute change since the previous step falls below the
    tolerance, and when all have, before the planned last step, it returns the clean prediction as the
    latents and sets ``pipe._interrupt = True``.
    """

    def __init__(self, size: int, planned_steps: int, tolerance: float | None = None) -> None:
        self.planned_steps = planned_steps
        self.tolerance = tolerance
        self.steps = 0  # steps run (UNet evaluations per image)
        self.step_seconds: list[float] = []
        self.converged_at: list[int | None] = [None] * size  # first step (1-based) each image converged
        self._previous: torch.Tensor | None = None
        self._last_s = time.perf_counter()

    def __call__(self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        now_s = time.perf_counter()
        self.step_seconds.append(now_s - self._last_s)
        self._last_s = now_s
        self.steps = step_index + 1
        if self.tolerance is None:
            return {}
        clean = callback_kwargs["pred_original_sample"]  # (B, C, H, W)
        if self._previous is not None:
            change = (clean - self._previous).abs().flatten(1).mean(1).tolist()  # (B,)
            for index, value in enumerate(change):
                if self.converged_at[index] is None and value < self.tolerance:
                    self.converged_at[index] = self.steps
        self._previous = clean.clone()
        if all(c is not None for c in self.converged_at) and self.steps < self.planned_steps:
            pipe._interrupt = True
            return {"latents": clean}
        return {}


def sub_batch(batch: Batch, rows: list[int]) -> Batch:
    """The inputs ``rows`` of ``batch``, in that order."""
    pick = (lambda values: None if values is None else [values[r] for r in rows])
    return Batch(len(rows), texts=pick(batch.texts) or [], class_labels=pick(batch.class_labels),
                 prompts=pick(batch.prompts), seeds=[batch.seeds[r] for r in rows])


def callback_tensor_inputs(pipe_class: Any) -> list[str]:
    """The tensors a pipeline class hands to ``callback_on_step_end`` (its ``_callback_tensor_inputs``)."""
    return list(getattr(pipe_class, "_callback_tensor_inputs", None) or [])


def takes_step_callback(pipe: Any) -> bool:
    """True when the pipeline's call takes ``callback_on_step_end`` (per-step timing and counting)."""
    return "callback_on_step_end" in inspect.signature(pipe.__call__).parameters


def why_not_convergence(pipe_class: Any) -> str | None:
    """Why a pipeline class cannot run the convergence policy, or None when it can."""
    name = getattr(pipe_class, "__name__", str(pipe_class))
    inputs = callback_tensor_inputs(pipe_class)
    if not takes_step_callback(pipe_class):
        return (f"adaptive_steps policy=convergence needs callback_on_step_end, which {name} does not take: "
                "use policy=predictor")
    missing = [k for k in ("latents", "pred_original_sample") if k not in inputs]
    if missing:
        return (f"adaptive_steps policy=convergence reads pred_original_sample in callback_on_step_end, but {name} "
                f"exposes only {inputs or 'no tensors'} there: use policy=predictor")
    return None


def guidance_scale_of(pipe: Any) -> float | None:
    """The pipeline's default ``guidance_scale`` (used as a feature), or None when it has none."""
    param = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    return None if param is None or param.default is inspect.Parameter.empty else float(param.default)


def prompt_features(pipe: Any, class_labels: list[int] | None, prompts: list[str] | None) -> np.ndarray:
    """Features (N, F) per input: class one-hot, or a pooled text embedding; plus the guidance scale.

    The text embedding is the text encoder's pooled output (mean of the last hidden state when it has
    no pooler) for the prompt tokenised as the pipeline tokenises it.
    """
    if class_labels is not None:
        num_classes = getattr(getattr(pipe, "unet", None), "config", {}).get("num_class_embeds") or \
            (max(class_labels) + 1)
        features = np.eye(int(num_classes), dtype=np.float32)[list(class_labels)]  # (N, classes)
    else:
        tokenizer, encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
        if tokenizer is None or encoder is None:
            raise NotApplicableError(f"adaptive_steps policy=predictor needs class labels or a pipeline with a "
                                     f"tokenizer and text_encoder; {type(pipe).__name__} has neither: "
                                     "use policy=convergence")
        ids = tokenizer(list(prompts or []), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(encoder.device)
        with torch.inference_mode():
            out = encoder(ids)
        pooled = getattr(out, "pooler_output", None)
        pooled = out.last_hidden_state.mean(1) if pooled is None or pooled.ndim != 2 else pooled  # (N, D)
        features = pooled.float().cpu().numpy()
    guidance = guidance_scale_of(pipe)
    if guidance is not None:
        features = np.concatenate([features, np.full((len(features), 1), guidance, np.float32)], axis=1)
    return features


def load_judge(name: str) -> Any:
    """A :class:`~workbench.models.digits.DigitJudge` from ``zoo:NAME`` or a folder it was saved to."""
    from workbench.errors import ModelLoadError
    from workbench.models.digits import DigitJudge
    from workbench.models.loading import resolve_location
    from workbench.specs import ModelSpec

    try:
        location = resolve_location(ModelSpec(name))
    except ModelLoadError as exc:
        raise NotApplicableError(f"adaptive_steps judge={name!r} not found ({exc})") from None
    if not (Path(location) / "model.safetensors").is_file() or not (Path(location) / "config.json").is_file():
        raise NotApplicableError(f"adaptive_steps judge={name!r} is not a DigitJudge folder (config.json + "
                                 f"model.safetensors): use judge={ZOO_JUDGE} or a folder saved by DigitJudge")
    with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints "Loading weights ..." to stdout
        return DigitJudge.from_pretrained(str(location)).eval()


# --------------------------------------------------------------------------- the technique


@register
class AdaptiveSteps(Technique):
    """Per-prompt diffusion step counts: a StepSaver-style predictor, or convergence-based stopping."""

    name = "adaptive_steps"
    title = "adaptive diffusion steps"
    applies_to = ("diffusion",)
    description = ("fewer diffusion steps per prompt: a predictor trained on your own step sweep, or stop "
                   "when the predicted clean image converges; SSIM vs a 100-step reference")
    examples = (
        {"model": ZOO_DIGITS, "workload": "digits", "steps": 10,
         "params": {"policy": "predictor", "reference_steps": 10, "candidate_steps": "4,6,8", "train_seeds": 2}},
        {"model": ZOO_DIGITS, "workload": "digits", "steps": 10,
         "params": {"policy": "convergence", "reference_steps": 10, "tolerance": 0.05}},
    )
    params = {
        "policy": Param(str, "predictor", "predictor: steps per prompt from a model trained on a sweep in prepare; "
                        "convergence: stop when the predicted clean image stops changing",
                        choices=("predictor", "convergence")),
        "reference_steps": Param(int, 100, "steps of the reference image every image is compared with (same "
                                 "seed and scheduler); more, a truer reference and a longer prepare", minimum=2),
        "ssim_target": Param(float, 0.9, "predictor: the fewest steps whose image reaches this SSIM against the "
                             "reference is a training label; higher keeps quality, saves fewer steps",
                             minimum=-1.0),
        "candidate_steps": Param(str, "2,3,4,6,8,10,15,20,30,50", "predictor: comma-separated step counts swept "
                                 "in prepare; more, finer choices and a longer prepare"),
        "train_seeds": Param(int, 8, "predictor: training seeds per class (or per prompt), disjoint from the "
                             "workload's; more, a steadier predictor and a longer prepare", minimum=2),
        "quantile": Param(float, 0.9, "predictor: each tree leaf predicts this quantile of its training labels; "
                          "higher is more conservative (more steps, fewer images below the target)", minimum=0.0),
        "max_depth": Param(int, 4, "predictor: depth of the regression tree on the features", minimum=1),
        "cv_folds": Param(int, 5, "predictor: folds of the cross-validated error reported", minimum=2),
        "sweep_batch_size": Param(int, 16, "predictor: images per pipeline call in the prepare sweep; larger is "
                                  "faster and needs more memory", minimum=1),
        "tolerance": Param(float, 0.01, "convergence: stop once every image's predicted clean sample changes "
                           "less than this (mean absolute change) between steps; larger stops earlier, "
                           "0 never stops early", minimum=0.0),
        "max_steps": Param(int, None, "convergence: the planned schedule's steps; unset: the baseline's steps",
                           minimum=1),
        "judge": Param(str, None, "classifier judging class-conditional digits (zoo:digits-judge or a DigitJudge "
                       "folder); unset: zoo:digits-judge for zoo:digits-diffusion, else no judge accuracy"),
        "seed": Param(int, 0, "predictor: seeds the tree and the cross-validation folds"),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        config = self.config
        if config["ssim_target"] > 1.0:
            raise TechniqueParamError(f"adaptive_steps parameter ssim_target={config['ssim_target']!r} is above 1: "
                                      "SSIM is at most 1.0 (identical images); use e.g. ssim_target=0.9")
        if config["quantile"] > 1.0:
            raise TechniqueParamError(f"adaptive_steps parameter quantile={config['quantile']!r} is above 1: "
                                      "use a quantile in [0, 1], e.g. quantile=0.9")
        other = "convergence" if config["policy"] == "predictor" else "predictor"
        stray = [key for key in POLICY_PARAMS[other] if key in params]
        if stray:
            raise TechniqueParamError(f"adaptive_steps parameter {stray[0]} applies to policy={other} only: "
                                      f"drop {stray[0]} or set policy={other}")
        self.candidate_steps_ = parse_steps(config["candidate_steps"])
        if config["policy"] == "predictor" and self.candidate_steps_[-1] > config["reference_steps"]:
            raise TechniqueParamError(f"adaptive_steps parameter candidate_steps={config['candidate_steps']!r} "
                                      f"goes above reference_steps={config['reference_steps']}: keep candidates "
                                      "at or below the reference")
        self._pipe: Any = None
        self._saved: dict[str, Any] | None = None

    # -- checks before loading ------------------------------------------------------------------
    def check(self, facts: Facts, spec: Any) -> str | None:
        reason = super().check(facts, spec)
        if reason:
            return reason
        if self.config["judge"] is not None:
            try:
                load_judge(self.config["judge"])
            except NotApplicableError as exc:
                return str(exc)
        if self.config["policy"] != "convergence" or facts.model.family in ("diffusion", "DigitsPipeline"):
            return None
        import diffusers

        pipe_class = getattr(diffusers, facts.model.family, None)
        return None if pipe_class is None else why_not_convergence(pipe_class)

    # -- prepare (untimed) ----------------------------------------------------------------------
    def prepare(self, trial: Trial) -> None:
        # 1. Keep what release() must put back: the scheduler's state and the interrupt flag.
        model, spec = trial.model, trial.spec
        pipe = model.model
        self._pipe, self._model, self._spec = pipe, model, spec
        self._saved = {"scheduler": copy.deepcopy(vars(pipe.scheduler)),
                       "interrupt": vars(pipe).get("_interrupt", AttributeError)}
        if self.config["policy"] == "convergence":
            reason = why_not_convergence(type(pipe))
            if reason:
                raise NotApplicableError(reason)
        self.baseline_steps_ = spec.workload.num_inference_steps
        self.max_steps_ = self.config["max_steps"] or self.baseline_steps_
        self.steps_by_seed_: dict[int, int] = {}
        # 2. The inputs the runner will time, and the reference image of every one of their seeds.
        self.batches_ = trial.batches
        self.evaluation_seeds_ = [s for b in self.batches_ for s in b.seeds]
        reference = [image for b in self.batches_ for image in draw(pipe, b, self.config["reference_steps"]).output]
        self.reference_by_seed_ = dict(zip(self.evaluation_seeds_, reference))
        # 3. The judge, for class-conditional inputs.
        self.judge_, self.judge_name_ = None, self.config["judge"]
        if self.judge_name_ is None and model.spec.name == ZOO_DIGITS:
            self.judge_name_ = ZOO_JUDGE
        if self.judge_name_ is not None and self.batches_[0].class_labels is not None:
            shape = np.shape(reference[0])
            if shape != (8, 8, 1):
                raise NotApplicableError(f"adaptive_steps judge={self.judge_name_!r} classifies 8x8 one-channel "
                                         f"digits, but this pipeline draws {shape} images: drop judge")
            self.judge_ = load_judge(self.judge_name_)
        # 4. The predictor: sweep training seeds, label, fit, cross-validate; then choose steps per input.
        self.predictor_: dict[str, Any] = {}
        if self.config["policy"] == "predictor":
            self._fit_predictor(pipe)
            for batch in self.batches_:
                self.steps_by_seed_.update(zip(batch.seeds, self._predict_steps(batch)))
            self.chosen_steps_by_seed_ = dict(self.steps_by_seed_)

    def _training_inputs(self, pipe: Any) -> Batch:
        """Every class (or every workload prompt) times ``train_seeds`` seeds none of the workload uses."""
        first = self.batches_[0]
        if first.class_labels is not None:
            num_classes = pipe.unet.config.get("num_class_embeds") or \
                (max(c for b in self.batches_ for c in b.class_labels) + 1)
            keys: list[Any] = list(range(int(num_classes)))
        else:
            keys = list(dict.fromkeys(p for b in self.batches_ for p in b.prompts))
        taken = set(self.evaluation_seeds_)
        seeds = (s for s in range(TRAIN_SEED_BASE + 1_000 * self._spec.seed, 2**63) if s not in taken)
        rows = [(key, next(seeds)) for key in keys for _ in range(self.config["train_seeds"])]
        is_class = first.class_labels is not None
        return Batch(len(rows), texts=[f"class {k}" if is_class else k for k, _ in rows],
                     class_labels=[k for k, _ in rows] if is_class else None,
                     prompts=None if is_class else [k for k, _ in rows], seeds=[s for _, s in rows])

    def _fit_predictor(self, pipe: Any) -> None:
        config = self.config
        start_s = time.perf_counter()
        # 1. Training inputs and their features.
        train = self._training_inputs(pipe)
        features = prompt_features(pipe, train.class_labels, train.prompts)  # (N, F)
        # 2. The sweep: every candidate step count and the reference, in chunks of sweep_batch_size.
        chunk = config["sweep_batch_size"]
        parts = [sub_batch(train, list(range(i, min(i + chunk, train.size)))) for i in range(0, train.size, chunk)]
        reference = [im for part in parts for im in draw(pipe, part, config["reference_steps"]).output]
        ssim_table = np.zeros((train.size, len(self.candidate_steps_)))  # (N, candidates)
        for column, steps in enumerate(self.candidate_steps_):
            images = [im for part in parts for im in draw(pipe, part, steps).output]
            ssim_table[:, column] = [quality.ssim(r, i) for r, i in zip(reference, images)]
        # 3. Labels: the fewest steps reaching the target (the reference's steps when none does).
        labels = np.array([fewest_steps(dict(zip(self.candidate_steps_, row)), config["ssim_target"],
                                        config["reference_steps"]) for row in ssim_table])
        # 4. Fit, and the cross-validated error (held-out predictions, looked up in the sweep table).
        model = self._new_tree(train.size)
        folds = KFold(n_splits=min(config["cv_folds"], train.size), shuffle=True, random_state=config["seed"])
        held_out = cross_val_predict(model, features, labels, cv=folds).astype(int)
        steps_index = {steps: column for column, steps in enumerate(self.candidate_steps_)}
        held_out_ssim = [1.0 if s not in steps_index else ssim_table[row, steps_index[s]]
                         for row, s in enumerate(held_out)]
        self.tree_ = model.fit(features, labels)
        self.predictor_ = {
            "model": f"shallow regression tree (max_depth {config['max_depth']}, min_samples_leaf "
                     f"{model.min_samples_leaf}); each leaf predicts the {config['quantile']} quantile of its labels",
            "features": self._feature_description(pipe, train),
            "label": f"fewest of candidate_steps whose image reaches SSIM >= {config['ssim_target']} against the "
                     f"{config['reference_steps']}-step reference of the same seed ({config['reference_steps']} "
                     "when none does)",
            "candidate_steps": self.candidate_steps_,
            "training_images": int(train.size),
            "training_seeds": train.seeds,
            "evaluation_seeds": self.evaluation_seeds_,
            "seeds_disjoint": not set(train.seeds) & set(self.evaluation_seeds_),
            "training_label_steps_mean": float(labels.mean()),
            "cv_folds": folds.get_n_splits(),
            "cv_mae_steps": float(np.abs(held_out - labels).mean()),
            "cv_under_prediction_rate": float((held_out < labels).mean()),  # held out below their label
            "cv_mean_predicted_steps": float(held_out.mean()),
            "cv_ssim_mean": float(np.mean(held_out_ssim)),
            "cv_ssim_target_met_rate": float(np.mean(np.asarray(held_out_ssim) >= config["ssim_target"])),
            "training_data": {  # compact: one row per training image
                "columns": ["input", "seed", "label_steps", *[f"ssim_{s}" for s in self.candidate_steps_]],
                "rows": [[text, seed, int(label), *[round(float(v), 4) for v in row]]
                         for text, seed, label, row in zip(train.texts, train.seeds, labels, ssim_table)],
            },
            "seconds": time.perf_counter() - start_s,
        }

    def _new_tree(self, n_samples: int) -> LeafQuantileTree:
        per_leaf = max(1, min(self.config["train_seeds"] // 2, n_samples // 4))
        return LeafQuantileTree(max_depth=self.config["max_depth"], min_samples_leaf=per_leaf,
                                quantile=self.config["quantile"], random_state=self.config["seed"])

    def _feature_description(self, pipe: Any, train: Batch) -> str:
        base = "class one-hot" if train.class_labels is not None else \
            f"pooled {type(pipe.text_encoder).__name__} embedding of the prompt"
        guidance = guidance_scale_of(pipe)
        return base if guidance is None else f"{base} + guidance scale ({guidance})"

    def _predict_steps(self, batch: Batch) -> list[int]:
        features = prompt_features(self._pipe, batch.class_labels, batch.prompts)
        return [int(s) for s in self.tree_.predict(features)]

    # -- run (timed) ----------------------------------------------------------------------------
    def run(self, batch: Batch) -> CallOutput:
        if self.config["policy"] == "predictor":
            return self._run_groups(batch, self._predict_steps(batch))
        return self._run_convergence(batch)

    def _run_groups(self, batch: Batch, steps: list[int]) -> CallOutput:
        """One pipeline call per distinct step count; images back in input order."""
        images: list[Any] = [None] * batch.size
        used = [0] * batch.size
        step_seconds: list[float] = []
        timed = takes_step_callback(self._pipe)
        for count in sorted(set(steps)):
            rows = [r for r, s in enumerate(steps) if s == count]
            callback = StepCallback(len(rows), count)
            hooks = {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]} \
                if timed else {}
            out = draw(self._pipe, sub_batch(batch, rows), count, **hooks)
            for row, image in zip(rows, out.output):
                images[row], used[row] = image, callback.steps if timed else count
            step_seconds += callback.step_seconds
        return self._output(batch, images, used, steps, step_seconds)

    def _run_convergence(self, batch: Batch) -> CallOutput:
        callback = StepCallback(batch.size, self.max_steps_, self.config["tolerance"])
        out = draw(self._pipe, batch, self.max_steps_, callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"])
        used = [callback.steps] * batch.size
        return self._output(batch, out.output, used, [self.max_steps_] * batch.size, callback.step_seconds,
                            converged_at=callback.converged_at)

    def _output(self, batch: Batch, images: list[Any], used: list[int], planned: list[int],
                step_seconds: list[float], **extra: Any) -> CallOutput:
        self.steps_by_seed_.update(zip(batch.seeds, used))
        internals = {"seeds": list(batch.seeds), "steps": used, "planned_steps": planned,
                     "step_seconds": step_seconds, **extra}
        return CallOutput(output=images, internals=internals)

    # -- report ---------------------------------------------------------------------------------
    def _inputs(self) -> list[tuple[int, Any]]:
        """(seed, class label or prompt) of every workload input, in order."""
        return [(seed, (b.class_labels or b.prompts)[i]) for b in self.batches_ for i, seed in enumerate(b.seeds)]

    def report(self, outcome: Outcome) -> TechniqueReport:
        figures = self._quality(outcome.baseline_outputs, outcome.technique_outputs)
        internals = self.internals(outcome.per_call)
        units = {"ssim": ("SSIM", True), "psnr_db": ("dB", True), "judge_accuracy_change_points": ("points", True),
                 "judge_accuracy": ("", True), "identical": ("", True), "steps_technique_mean": ("steps", False)}
        metrics = []
        for key, value in figures.items():
            numeric = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            if not numeric or key in ("reference_steps", "ssim_target"):
                continue  # settings, names and per-input lists stay in internals["quality_details"]
            unit, higher = next((u for prefix, u in units.items() if key.startswith(prefix)), ("", None))
            shown = key in ("ssim_technique_vs_reference", "ssim_baseline_vs_reference", "steps_technique_mean",
                            "judge_accuracy_technique", "judge_accuracy_baseline")
            metrics.append(Metric(key, None if value is None else float(value), unit, higher,
                                  _METRIC_LABELS.get(key, ""), headline=shown))
        mean_steps = internals["mean_steps"]
        return TechniqueReport(
            lossless=False, quality=metrics, internals={**internals, "quality_details": figures},
            features=self.features(self.config, {}, None),
            headline=f"{self.config['policy']}: {mean_steps or 0:.1f} of {self.baseline_steps_} steps on average")

    @classmethod
    def features(cls, params: dict[str, Any], model: dict[str, Any], draft: dict[str, Any] | None) -> dict[str, Any]:
        return {"step_policy": str(params.get("policy") or cls.params["policy"].default)}

    @classmethod
    def expert_rules(cls) -> list[ExpertRule]:
        return [ExpertRule(40, "adaptive steps for diffusion", lambda rows: rows["modality"] == "image-generation")]

    def _quality(self, baseline: list[Any], technique: list[Any]) -> dict[str, Any]:
        # 1. Both variants against the reference of the same seed.
        base_images = [im for out in baseline for im in out]
        tech_images = [im for out in technique for im in out]
        references = [self.reference_by_seed_[s] for s in self.evaluation_seeds_]
        base = quality.reference_similarity(references, base_images)
        tech = quality.reference_similarity(references, tech_images)
        steps = [self.steps_by_seed_.get(s) for s in self.evaluation_seeds_]
        report: dict[str, Any] = {
            "reference_steps": self.config["reference_steps"],
            "steps_baseline": self.baseline_steps_,
            "steps_technique_mean": float(np.mean(steps)) if None not in steps else None,
            "steps_technique_per_input": steps,
            "ssim_baseline_vs_reference": base["ssim_mean"],
            "ssim_technique_vs_reference": tech["ssim_mean"],
            "ssim_technique_vs_reference_min": tech["ssim_min"],
            "ssim_target": self.config["ssim_target"],
            "ssim_target_met_rate_technique": float(np.mean(np.asarray(tech["ssim_per_image"])
                                                            >= self.config["ssim_target"])),
            "psnr_db_baseline_vs_reference": base["psnr_db_mean"],
            "psnr_db_technique_vs_reference": tech["psnr_db_mean"],
            "identical_to_reference_rate_baseline": base["identical_rate"],
            "identical_to_reference_rate_technique": tech["identical_rate"],
        }
        # 2. The judge: does each image show the class that was asked for?
        if self.judge_ is None:
            report["judge"] = None
            return report
        intended = np.array([c for b in self.batches_ for c in b.class_labels])
        accuracy = {name: float((self.judge_.predict(np.stack(images)) == intended).mean())
                    for name, images in (("baseline", base_images), ("technique", tech_images),
                                         ("reference", references))}
        report.update({
            "judge": self.judge_name_,
            "judge_accuracy_baseline": accuracy["baseline"],
            "judge_accuracy_technique": accuracy["technique"],
            "judge_accuracy_reference": accuracy["reference"],
            "judge_accuracy_change_points": 100.0 * (accuracy["technique"] - accuracy["baseline"]),
        })
        return report

    def internals(self, per_call: list[dict[str, Any]]) -> dict[str, Any]:
        steps = [s for call in per_call for s in call.get("steps", [])]
        step_seconds = np.asarray([t for call in per_call for t in call.get("step_seconds", [])], dtype=float)
        by_seed = self.steps_by_seed_
        mean_steps = float(np.mean(steps)) if steps else None
        report: dict[str, Any] = {
            "policy": self.config["policy"],
            "reference_steps": self.config["reference_steps"],
            "baseline_steps": self.baseline_steps_,
            "steps_per_input": [{"seed": seed, "input": key, "steps": by_seed.get(seed)}
                                for seed, key in self._inputs()],
            "mean_steps": mean_steps,
            "steps_saved_fraction": None if mean_steps is None else 1.0 - mean_steps / self.baseline_steps_,
            "seconds_per_step": {
                "median": float(np.median(step_seconds)) if step_seconds.size else None,
                "mean": float(step_seconds.mean()) if step_seconds.size else None,
                "p90": float(np.percentile(step_seconds, 90)) if step_seconds.size else None,
                "steps_timed": int(step_seconds.size),
                "how": "wall time between successive callback_on_step_end calls; the first step of a call "
                       "also holds its setup (noise, text encoding)",
            },
            "pipeline_calls": sum(len(set(call.get("steps", []))) for call in per_call) if
            self.config["policy"] == "predictor" else len(per_call),
        }
        if self.config["policy"] == "predictor":
            report.update({
                "implementation": "steps per input predicted from prompt features by a tree fitted on a step "
                                  "sweep of training seeds in prepare; one pipeline call per distinct step "
                                  "count in a batch",
                "chosen_steps_by_seed": {str(k): v for k, v in self.chosen_steps_by_seed_.items()},
                "predictor": self.predictor_,
            })
        else:
            converged = [c for call in per_call for c in call.get("converged_at", [])]
            report.update({
                "implementation": "planned schedule of max_steps; stops when every image's pred_original_sample "
                                  "changes less than tolerance between steps (callback sets pipe._interrupt and "
                                  "returns the clean prediction as the latents); a batch waits for its slowest image",
                "tolerance": self.config["tolerance"],
                "max_steps": self.max_steps_,
                "stopped_early_rate": float(np.mean([s < self.max_steps_ for s in steps])) if steps else None,
                "converged_at_step_per_image": converged,
            })
        return report

    def release(self) -> None:
        # Put the scheduler's state (timesteps set by our calls) and the interrupt flag back as prepare found them.
        pipe, saved = self._pipe, self._saved
        if pipe is not None and saved is not None:
            state = vars(pipe.scheduler)
            state.clear()
            state.update(saved["scheduler"])
            if saved["interrupt"] is AttributeError:
                vars(pipe).pop("_interrupt", None)
            else:
                pipe._interrupt = saved["interrupt"]
        self._saved = None
        self.judge_ = None
        self.reference_by_seed_ = {}
