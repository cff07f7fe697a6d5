"""Quantization: run a quantized copy of the model beside the original, with what it costs in quality.

The copy is made in :meth:`Quantization.prepare` by :func:`workbench.techniques._quantize.quantize_copy`
(the shared model is never changed); the report says which library did it and how many linear-like
layers and bytes were really quantized, so a silently skipped layer is visible. Quality beside speed:
for language models, perplexity of both models on the workload's own text and the mean KL divergence
of their next-token distributions; for classifiers, accuracy change (from the standard comparison) and
the KL divergence of the label distributions.

Example:
    >>> from workbench.techniques.quantization import Quantization
    >>> Quantization(scheme="int8-dynamic").config["scheme"]
    'int8-dynamic'
"""

from __future__ import annotations

from typing import Any

import torch

from workbench import quality
from workbench.measure import CallOutput
from workbench.techniques._execute import classify, generate
from workbench.techniques._quantize import SCHEMES, quantize_copy, why_not_scheme
from workbench.techniques.base import (ExpertRule, Facts, Metric, Outcome, Param, Technique, TechniqueReport, Trial,
                                       register)

WIDE_HIDDEN_SIZE = 256  # expert rule: a model this wide is matmul-bound on CPU, where int8 pays


@register
class Quantization(Technique):
    """A quantized copy of the model (int8 dynamic, int8/int4 weight-only, fp16, bf16, bitsandbytes)."""

    name = "quantization"
    applies_to = ("causal_lm", "classifier")
    description = "int8/int4/fp16 copy of the model with a well-kept library; quality measured beside speed"
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
    }

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
        return why_not_scheme(scheme, spec.device)

    def prepare(self, trial: Trial) -> None:
        # 1. The quantized copy and what really changed.
        model = trial.model
        self._model, self._spec = model, trial.spec
        self._quantized, self._report = quantize_copy(model.model, self.config["scheme"])
        # 2. Quality that needs both models side by side (untimed): perplexity and KL on the timed inputs' text.
        self._quality = _distribution_quality(model, self._quantized, trial.texts, trial.spec.device,
                                              self.config["quality_tokens"])

    def run(self, batch: Any) -> CallOutput:
        if self._model.kind == "causal_lm":
            return generate(self._quantized, self._model.tokenizer, batch, self._spec.workload.max_new_tokens)
        return classify(self._quantized, batch)

    def report(self, outcome: Outcome) -> TechniqueReport:
        done = self._report
        after = done["bytes_after"]
        compression = done["bytes_before"] / after if after else None
        internals = {**done, "compression": compression}
        q = self._quality
        if "perplexity_change_percent" in q:
            metrics = quality.lm_quality_metrics(q)
        else:
            metrics = [Metric("label_kl_mean", q["label_kl_mean"], "nats", False, "label KL"),
                       Metric("kl_inputs", q["kl_inputs"], "inputs", None, "inputs scored", headline=False)]
        return TechniqueReport(
            lossless=False, model_bytes=after, bytes_read_per_token=after, quality=metrics, internals=internals,
            features=self.features(self.config, self._model.info, None),
            headline=f"{self.config['scheme']} by {done.get('library', 'torch')}: "
                     + (f"{compression:.2f}x smaller weights" if compression else "weights unchanged in size"))

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


def _distribution_quality(model: Any, quantized: Any, texts: list[str], device: str,
                          max_tokens: int) -> dict[str, Any]:
    """Perplexity of both models (LMs) and mean KL(original || quantized) of their output distributions."""
    tokenizer = model.tokenizer
    with torch.inference_mode():
        if model.kind == "classifier":
            enc = tokenizer([t for t in texts if t], return_tensors="pt", padding=True, truncation=True).to(device)
            p = torch.log_softmax(model.model(**enc).logits.float(), dim=-1)
            q = torch.log_softmax(quantized(**enc).logits.float(), dim=-1)
            return {"label_kl_mean": float(torch.sum(p.exp() * (p - q), dim=-1).clamp_min(0).mean()), "kl_inputs": len(texts)}
        # Language models: the workload's texts as one stream, in windows the model can take.
        window = min(getattr(model.model.config, "n_positions", None) or getattr(
            model.model.config, "max_position_embeddings", 512), 512)
        return quality.lm_text_quality(tokenizer, texts, lambda ids: model.model(input_ids=ids).logits,
                                       lambda ids: quantized(input_ids=ids).logits, max_tokens, window, device)
