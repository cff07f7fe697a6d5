"""Speculative decoding through Hugging Face assisted generation (the reference users know).

A cheap draft model proposes ``num_assistant_tokens`` tokens; the target checks them all in one
forward pass and keeps the longest agreeing prefix plus one token of its own. With greedy decoding the
output must equal the target's own greedy output token for token (the run fails otherwise), so the
speed figure always comes with proof that quality is unchanged. Without a draft, ``prompt_lookup``
proposes tokens by matching n-grams of the prompt (no second model).

Example:
    >>> from workbench.techniques.speculative import Speculative
    >>> Speculative(num_assistant_tokens=4).lossless
    True
"""

from __future__ import annotations

import copy
from typing import Any

from workbench.measure import CallOutput
from workbench.techniques._execute import generate
from workbench.techniques.base import Param, Technique, register


@register
class Speculative(Technique):
    """Assisted generation with a draft model (``--draft``) or prompt lookup (no draft)."""

    name = "speculative"
    applies_to = ("causal_lm",)
    needs_draft = True
    description = "a draft model (or prompt n-grams) proposes tokens, the target verifies them in one pass"
    examples = (
        {"model": "zoo:code-target", "draft": "zoo:code-draft", "workload": "code-prompts",
         "params": {"num_assistant_tokens": 4}},
        {"model": "zoo:code-target", "workload": "code-prompts", "params": {"prompt_lookup_num_tokens": 5}},
    )
    params = {
        "num_assistant_tokens": Param(int, 5, "tokens drafted per target pass; more pays off only when most are accepted",
                                      minimum=1),
        "schedule": Param(str, "constant", "draft length policy: constant, or heuristic_transient (grow on full "
                          "acceptance, shrink on a miss, reset per call)", choices=("constant", "heuristic_transient")),
        "confidence_threshold": Param(float, 0.0, "the draft stops early below this confidence; 0 drafts the full length",
                                      minimum=0.0),
        "prompt_lookup_num_tokens": Param(int, None, "draft by prompt n-gram lookup instead of a draft model: tokens per "
                                          "proposal (repetitive prompts benefit most)", minimum=1),
        "do_sample": Param(bool, False, "sample instead of greedy; sampled outputs are not compared token for token"),
    }

    @property
    def lossless(self) -> bool:
        return not self.config["do_sample"]

    def why_not(self, kind: str, spec: Any) -> str | None:
        reason = super().why_not(kind, spec)
        if reason:
            return reason
        if spec.workload.batch_size != 1:
            return (f"speculative decoding (HF assisted generation) runs batch size 1 only, not "
                    f"batch_size={spec.workload.batch_size}: set batch_size=1")
        has_draft = spec.technique.draft is not None
        lookup = self.config["prompt_lookup_num_tokens"] is not None
        if not has_draft and not lookup:
            return ("speculative decoding needs a draft model or prompt lookup: pass --draft MODEL "
                    "(e.g. zoo:code-draft) or --param prompt_lookup_num_tokens=10")
        if has_draft and lookup:
            return "give either --draft or prompt_lookup_num_tokens, not both"
        return None

    def why_not_loaded(self, model: Any, draft: Any) -> str | None:
        if draft is None:
            return None
        if draft.kind != "causal_lm":
            return f"draft {draft.spec.name!r} is a {draft.kind} model: the draft must be a causal LM"
        if draft.tokenizer.get_vocab() != model.tokenizer.get_vocab():
            return (f"draft {draft.spec.name!r} uses a different tokenizer from target {model.spec.name!r}: "
                    "pick a draft of the same model family (same vocabulary)")
        if draft.info["parameters"] >= model.info["parameters"]:
            return (f"draft {draft.spec.name!r} ({draft.info['parameters']:,} parameters) is not smaller than "
                    f"the target ({model.info['parameters']:,}): a draft must be much cheaper to pay off")
        return None

    def prepare(self, model: Any, spec: Any, draft: Any = None) -> None:
        # 1. Keep what we change so release() can put it back, whatever happens in between.
        self._model, self._spec, self._draft = model, spec, draft
        self._extra: dict[str, Any] = {"do_sample": self.config["do_sample"]}
        if draft is None:
            self._extra["prompt_lookup_num_tokens"] = self.config["prompt_lookup_num_tokens"]
            self._saved_config = None
            return
        # 2. HF reads the draft length and schedule from the draft's own generation config.
        self._saved_config = copy.deepcopy(draft.model.generation_config)
        gen = draft.model.generation_config
        gen.num_assistant_tokens = self.config["num_assistant_tokens"]
        gen.num_assistant_tokens_schedule = self.config["schedule"]
        gen.assistant_confidence_threshold = self.config["confidence_threshold"]
        self._extra["assistant_model"] = draft.model

    def run(self, batch: Any) -> CallOutput:
        counts = {"target": 0, "draft": 0}

        def counter(name: str):
            def hook(module: Any, args: Any, output: Any) -> None:
                counts[name] += 1
            return hook

        handles = [self._model.model.register_forward_hook(counter("target"))]
        if self._draft is not None:
            handles.append(self._draft.model.register_forward_hook(counter("draft")))
        try:
            out = generate(self._model.model, self._model.tokenizer, batch,
                           self._spec.workload.max_new_tokens, **self._extra)
        finally:
            for handle in handles:
                handle.remove()
        out.internals = {"target_forward_passes": counts["target"], "draft_forward_passes": counts["draft"],
                         "new_tokens": out.new_tokens}
        return out

    def internals(self, per_call: list[dict[str, Any]]) -> dict[str, Any]:
        target = sum(c["target_forward_passes"] for c in per_call)
        draft = sum(c["draft_forward_passes"] for c in per_call)
        tokens = sum(c["new_tokens"] or 0 for c in per_call)
        accepted = tokens - target  # each target pass emits its accepted draft tokens plus one of its own
        target_bytes = self._model.info["model_bytes"]
        draft_bytes = self._draft.info["model_bytes"] if self._draft is not None else 0
        return {
            "implementation": "transformers assisted generation",
            "draft_source": "prompt lookup" if self._draft is None else self._draft.spec.name,
            "target_forward_passes": target,
            "draft_forward_passes": draft,
            "tokens_per_target_pass": tokens / target if target else None,
            "accepted_per_draft_pass": (accepted / draft) if draft else None,
            "bytes_read_per_token": (target * target_bytes + draft * draft_bytes) / tokens if tokens else None,
        }

    def release(self) -> None:
        if getattr(self, "_saved_config", None) is not None:
            self._draft.model.generation_config = self._saved_config
            self._saved_config = None
