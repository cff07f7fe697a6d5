"""Quantization: run a quantized copy of the model beside the original, with what it costs in quality.

The copy is made in :meth:`Quantization.prepare` by :func:`workbench.techniques._quantize.quantize_copy`
(the shared model is never changed); the report says which library did it and how many linear-like
layers and bytes were really quantized, so a silently skipped layer is visible. Quality beside speed:
for language models, perplexity of both models on the workload's own text and the mean KL divergence
of their next-token distributions; for classifiers, accuracy change (from the standard comparison) and
the KL divergence of the label distributions.

Mixed precision (``keep_float``): a comma list of layer-name patterns left in float, or ``auto``: on
causal LMs, a per-layer sensitivity scan on the calibration split (never timed) keeps the most sensitive
layers float until the calibration perplexity change is within ``max_perplexity_change_percent``, and a
curve (layers kept float -> perplexity change -> decode speed against float, timed side by side) picks
the fastest configuration inside the budget (:mod:`workbench.techniques._sensitivity`). The quality
reported is still that on the timed inputs' text.

Example:
    >>> from workbench.techniques.quantization import Quantization
    >>> Quantization(scheme="int8-dynamic").config["scheme"]
    'int8-dynamic'
    >>> Quantization(keep_float="lm_head, down_proj").keep_float_patterns_
    ['lm_head', 'down_proj']
"""

from __future__ import annotations

from typing import Any

from workbench import quality
from workbench.measure import CallOutput
from workbench.techniques._execute import classify, generate
from workbench.errors import NotApplicableError
from workbench.techniques import _sensitivity
from workbench.techniques._quantize import (SCHEMES, WHOLE_MODEL_CASTS, linear_layer_names, match_layers,
                                            quantize_copy, why_not_scheme)
from workbench.techniques.base import (ExpertRule, Facts, Outcome, Param, Technique, TechniqueParamError,
                                       TechniqueReport, Trial, register)

WIDE_HIDDEN_SIZE = 256  # expert rule: a model this wide is matmul-bound on CPU, where int8 pays


@register
class Quantization(Technique):
    """A quantized copy of the model (int8 dynamic, int8/int4 weight-only, fp16, bf16, bitsandbytes)."""

    name = "quantization"
    applies_to = ("causal_lm", "classifier")
    description = "int8/int4/fp16 copy of the model with a well-kept library; quality measured beside speed"
    title = "quantization"

    @classmethod
    def display_name(cls, params: dict[str, Any], draft: str | None = None) -> str:
        """``int8 dynamic quantization``, ``bf16 weights``, ``int8 dynamic quantization (keep float auto)``."""
        scheme = str(params.get("scheme") or cls.params["scheme"].default)
        name = (f"{scheme} weights" if scheme in WHOLE_MODEL_CASTS
                else f"{scheme.replace('bnb-', 'bitsandbytes ').replace('-', ' ')} quantization")
        rest = cls.settings_words({k: v for k, v in params.items() if k != "scheme"})
        return f"{name} ({', '.join(rest)})" if rest else name
    examples = (
        {"model": "zoo:code-target", "workload": "code-prompts", "params": {"scheme": "int8-dynamic"}},
        {"model": "zoo:code-classifier", "workload": "code-snippets", "params": {"scheme": "int8-dynamic"}},
        {"model": "zoo:code-target", "workload": "code-prompts", "params": {"scheme": "bf16"}},
    )
    params = {
        "scheme": Param(str, "int8-dynamic", "int8-dynamic (CPU, weights and activations), int8-weight-only, "
                        "int4-weight-only (GPU), fp16, bf16, bnb-int8 / bnb-nf4 (GPU, bitsandbytes)",
                        choices=tuple(SCHEMES)),
        "quality_tokens": Param(int, 2048, "tokens of the workload's text scored for perplexity and KL; more is "
                                "steadier and slower (untimed)", minimum=16),
        "keep_float": Param(str, "", "layers left in float: '' none; 'auto' scans per-layer sensitivity on the "
                            "calibration split and keeps the most sensitive float until within the budget (causal "
                            "LMs; minutes of prepare on a real model); or a comma list of layer names / globs "
                            "(lm_head, down_proj, model.layers.2*.mlp.down_proj). More float: closer, slower"),
        "max_perplexity_change_percent": Param(float, 2.0, "keep_float=auto: the budget, calibration perplexity "
                                               "change the whole quantized model may cost", minimum=0.0),
        "curve_points": Param(int, 5, "keep_float=auto: greedy steps timed against float in prepare (none kept "
                              "float, the chosen one, doublings between); more, longer prepare", minimum=1),
        "curve_repeats": Param(int, 1, "keep_float=auto: timed passes per curve point in prepare; more, steadier "
                               "speedups", minimum=1),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.keep_float_patterns_ = parse_keep_float(self.config["keep_float"])

    @property
    def lossless(self) -> bool:
        return False

    def check(self, facts: Facts, spec: Any) -> str | None:
        reason = super().check(facts, spec)
        if reason:
            return reason
        scheme = self.config["scheme"]
        if scheme in ("fp16", "bf16") and spec.dtype != "float32":
            return f"the model already runs in {spec.dtype}: scheme {scheme!r} compares against float32, use --dtype float32"
        reason = why_not_scheme(scheme, spec.device)
        if reason or not self.keep_float_patterns_:
            return reason
        if scheme in WHOLE_MODEL_CASTS:
            return (f"scheme {scheme!r} casts the whole model, so no layer can stay float32: drop keep_float or use "
                    "a per-layer scheme (int8-dynamic, int8-weight-only)")
        if self.keep_float_patterns_ == ["auto"]:
            if facts.model.kind != "causal_lm":
                return (f"keep_float=auto scans perplexity on causal LMs, not a {facts.model.kind}: give the layers "
                        "to keep float as a comma list instead")
            if facts.calibration_items < 1:
                return (f"keep_float=auto scans layers on calibration inputs that are never timed, and the workload "
                        f"{spec.workload.name!r} has none to spare: lower max_items or add lines to the file")
        return None

    def prepare(self, trial: Trial) -> None:
        # 1. Which layers stay float: none, the named ones, or the sensitivity search's choice.
        model = trial.model
        self._model, self._spec = model, trial.spec
        self._search = None
        keep = self._keep_float(trial)
        # 2. The quantized copy and what really changed.
        self._quantized, self._report = quantize_copy(model.model, self.config["scheme"], keep_float=keep)
        # 3. Quality that needs both models side by side (untimed): perplexity and KL on the timed inputs' text.
        self._quality = quality.copy_quality(model, self._quantized, trial.texts, trial.spec.device,
                                              self.config["quality_tokens"])

    def _keep_float(self, trial: Trial) -> set[str]:
        patterns = self.keep_float_patterns_
        if not patterns:
            return set()
        if patterns != ["auto"]:
            try:
                return match_layers(linear_layer_names(trial.model.model), patterns)
            except ValueError as exc:
                raise TechniqueParamError(f"quantization parameter keep_float={self.config['keep_float']!r}: {exc}") \
                    from None
        if not trial.calibration:
            raise NotApplicableError("keep_float=auto needs calibration inputs that are never timed, and there are "
                                     "none: lower max_items")
        self._search = self._auto(trial)
        return set(self._search["keep_float"])

    def _auto(self, trial: Trial) -> dict[str, Any]:
        """The sensitivity search on the calibration text, then its curve timed against float."""
        # 1. Scan and greedy search on the calibration split's text (untimed, never the timed inputs).
        model, spec, cfg = trial.model, trial.spec, self.config
        budget = cfg["max_perplexity_change_percent"]
        texts = [t for batch in trial.calibration for t in batch.texts if t]
        ids = model.tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0][:cfg["quality_tokens"]]
        mixed = _sensitivity.MixedPrecision(model.model, cfg["scheme"])
        window = quality.text_window(model.model.config)
        found = _sensitivity.search_keep_float(model.model, cfg["scheme"], ids.to(spec.device), window,
                                               budget, mixed=mixed)
        # 2. A few greedy steps timed side by side with float on the calibration prompts; the fastest
        # within the budget is the operating point (the chosen step unless a timed one beats it).
        steps = _sensitivity.curve_steps(len(found["keep_float"]), cfg["curve_points"])
        max_new = spec.workload.max_new_tokens
        curve = _sensitivity.time_curve(
            mixed, model.model, found, steps,
            lambda module, i: generate(module, model.tokenizer, trial.calibration[i], max_new),
            len(trial.calibration), cfg["curve_repeats"], spec.device, spec.seed)
        point = _sensitivity.operating_point(curve, budget, found["groups"])
        found["keep_float"] = found["keep_float"][:point["kept_float"]]
        return {**found, "curve": curve, "operating_point": point}

    def run(self, batch: Any) -> CallOutput:
        if self._model.kind == "causal_lm":
            return generate(self._quantized, self._model.tokenizer, batch, self._spec.workload.max_new_tokens)
        return classify(self._quantized, batch)

    def report(self, outcome: Outcome) -> TechniqueReport:
        done = self._report
        after = done["bytes_after"]
        compression = done["bytes_before"] / after if after else None
        internals = {**done, "compression": compression}
        if self._search is not None:
            internals["sensitivity_search"] = self._search
        metrics = quality.copy_quality_metrics(self._quality)
        return TechniqueReport(
            lossless=False, model_bytes=after, bytes_read_per_token=after, quality=metrics, internals=internals,
            features=self.features(self.config, self._model.info, None),
            headline=f"{self.config['scheme']} by {done.get('library', 'torch')}: "
                     + (f"{compression:.2f}x smaller weights" if compression else "weights unchanged in size")
                     + self._float_text())

    def _float_text(self) -> str:
        kept = self._report["kept_float"]
        if not self.keep_float_patterns_:
            return ""
        text = f"; {len(kept)} of {self._report['linear_layers']} linear layers kept float"
        if self._search is None:
            return text
        point = self._search["operating_point"]
        text += (f" (auto: calibration perplexity {point['perplexity_change_percent']:+.2f}% within "
                 f"{self._search['max_perplexity_change_percent']}%, {point['speedup_vs_float']:.2f}x decode there"
                 + ("" if point["faster_than_float"] else ", not faster than float") + ")")
        return text + (f"; {point['fallback']}" if "fallback" in point else "")

    @classmethod
    def features(cls, params: dict[str, Any], model: dict[str, Any], draft: dict[str, Any] | None) -> dict[str, Any]:
        return {"weight_bits": SCHEMES[params.get("scheme") or cls.params["scheme"].default]["bits"]}

    @classmethod
    def expert_rules(cls) -> list[ExpertRule]:
        return [ExpertRule(30, f"quantize to int8 on CPU when the model is wide (hidden size >= {WIDE_HIDDEN_SIZE})",
                           lambda rows: (rows["device"] == "cpu") & (rows["weight_bits"] == 8)
                           & (rows["model_hidden_size"] >= WIDE_HIDDEN_SIZE))]

    def release(self) -> None:
        self._quantized = None


def parse_keep_float(text: str | None) -> list[str]:
    """The keep_float parameter as patterns: [] for '' (or None, an empty field), ['auto'], or the comma list;
    bad lists raise one line."""
    if text is None or not text.strip():
        return []
    patterns = [p.strip() for p in text.split(",")]
    if any(not p for p in patterns):
        raise TechniqueParamError(f"quantization parameter keep_float={text!r} has an empty item: use '' for none, "
                                  "'auto', or layer names separated by single commas, e.g. lm_head,down_proj")
    if "auto" in patterns and len(patterns) > 1:
        raise TechniqueParamError(f"quantization parameter keep_float={text!r} mixes 'auto' with layer names: use "
                                  "keep_float=auto alone, or the layer names alone")
    return patterns
