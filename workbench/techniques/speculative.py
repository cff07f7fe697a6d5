"""Speculative decoding, two ways: the workbench's own loop and Hugging Face assisted generation.

A cheap drafter proposes tokens; the target checks them all in one forward pass and keeps the longest
acceptable prefix plus one token of its own. Drafters: a separate draft model (``--draft``), n-gram
prompt lookup (``prompt_lookup_num_tokens``, no second model), or self-speculation with the target's
own first layers (``draft_layers``). With greedy decoding the output must equal the target's own
greedy output token for token (the run fails otherwise), so every speed figure comes with proof that
quality is unchanged.

``implementation=workbench`` (default) runs :mod:`workbench.techniques._speculative_loop`, which
reports acceptance per draft position, tokens per target pass and the speedup theory predicts:
expected tokens per round over ``g c + v`` one-token target steps, with the draft's cost per token c
and the (g+1)-token verification pass v both measured relative to a one-token step (v is timed once,
untimed, in :meth:`Speculative.prepare`; c is the loop's draft clock over its verification clock,
times v), beside what the theory leaves out (prefill, the loop's book-keeping). ``implementation=hf`` runs
``generate(assistant_model=...)``, the reference users already know; it exposes only forward-pass counts.

With ``do_sample=true`` both variants sample with the same settings and seeds
(:meth:`Speculative.sampling`), and quality is judged by distribution
(:mod:`workbench.sampled_quality`), never by token identity.

Example:
    >>> from workbench.techniques.speculative import Speculative
    >>> Speculative(num_assistant_tokens=4).lossless
    True
    >>> Speculative(implementation="hf", do_sample=True).lossless
    False
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from workbench.measure import CallOutput, synchronize
from workbench.sampled_quality import metrics as sampled_metrics
from workbench.techniques._execute import generate
from workbench.techniques._quantize import SCHEMES, quantize_copy, why_not_scheme
from workbench.techniques._speculative_loop import (SCHEDULES, LookupDrafter, ModelDrafter, SelfDrafter,
                                                    StepCosts, expected_tokens_per_round, measure_step_costs,
                                                    speculative_generate, theoretical_speedup)
from workbench.techniques.base import (ExpertRule, Facts, Outcome, Param, Technique, TechniqueReport, Trial,
                                       register)

if TYPE_CHECKING:
    from workbench.models.facts import ModelFacts

REPETITIVE_PROMPTS = 0.2  # expert rule: prompt lookup when this share of a prompt's 3-grams repeats
CHEAP_DRAFT_RATIO = 0.1  # expert rule: speculate when the draft has <= 1/10 of the target's parameters
#: Families whose forward runs only ``layers[: config.num_hidden_layers]``, which transformers'
#: ``assistant_early_exit`` (implementation=hf with draft_layers) relies on; the others (GPT-2, GPT-NeoX,
#: OPT) keep running every layer and fail on the shorter cache. Checked in tests/test_architectures.py.
HF_EARLY_EXIT_FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma")


@register
class Speculative(Technique):
    """Draft-then-verify decoding with a draft model, prompt lookup or the target's own first layers."""

    name = "speculative"
    applies_to = ("causal_lm",)
    takes_draft = True
    description = "a draft model, prompt n-grams or the target's first layers propose tokens; the target verifies them in one pass"
    title = "speculative decoding"

    @classmethod
    def display_name(cls, params: dict[str, Any], draft: str | None = None) -> str:
        """``prompt lookup (6 tokens)``, ``self-speculation (first 2 layers)``, ``speculative decoding (draft
        zoo:code-draft)``; other non-default settings follow in words."""
        rest = dict(params)
        lookup, layers = rest.pop("prompt_lookup_num_tokens", None), rest.pop("draft_layers", None)
        if lookup is not None:
            name, first = "prompt lookup", [f"{lookup} tokens"]
        elif layers is not None:
            name, first = "self-speculation", [f"first {layers} layer{'' if str(layers) == '1' else 's'}"]
        else:
            name, first = "speculative decoding", [f"draft {draft}"] if draft else []
        parts = first + cls.settings_words(rest)
        return f"{name} ({', '.join(parts)})" if parts else name
    examples = (
        {"model": "zoo:code-target", "draft": "zoo:code-draft", "workload": "code-prompts",
         "params": {"num_assistant_tokens": 4}},
        {"model": "zoo:code-target", "draft": "zoo:code-draft", "workload": "code-prompts",
         "params": {"implementation": "hf", "num_assistant_tokens": 4}},
        {"model": "zoo:code-target", "workload": "code-prompts", "params": {"prompt_lookup_num_tokens": 5}},
        {"model": "zoo:code-target", "workload": "code-prompts",
         "params": {"draft_layers": 1, "schedule": "heuristic_transient"}},
        {"model": "zoo:code-target", "draft": "zoo:code-draft", "workload": "code-prompts",
         "params": {"do_sample": True, "temperature": 0.8}},
    )
    params = {
        "implementation": Param(str, "workbench", "workbench: own loop with acceptance per position and the "
                                "theoretical speedup; hf: transformers assisted generation",
                                choices=("workbench", "hf")),
        "num_assistant_tokens": Param(int, 4, "tokens drafted per target pass; more pays off only when most "
                                      "are accepted", minimum=1),
        "schedule": Param(str, "constant", "draft length policy: constant, or heuristic_transient (grow by 2 on "
                          "full acceptance, shrink by 1 on a miss, reset per call)", choices=SCHEDULES),
        "confidence_threshold": Param(float, 0.0, "the draft stops early below this confidence; 0 drafts the full "
                                      "length", minimum=0.0),
        "prompt_lookup_num_tokens": Param(int, None, "draft by prompt n-gram lookup instead of a draft model: "
                                          "tokens per proposal (repetitive prompts benefit most)", minimum=1),
        "draft_layers": Param(int, None, "self-speculation: draft with the target's own first k layers and its LM "
                              "head (no second model)", minimum=1),
        "draft_quantization": Param(str, None, "combined variant: quantize a copy of the draft model first (a "
                                    "quantization scheme, e.g. int8-dynamic); cheaper drafts, maybe fewer acceptances",
                                    choices=tuple(SCHEMES)),
        "do_sample": Param(bool, False, "sample instead of greedy; sampled outputs are not compared token for token"),
        "temperature": Param(float, 1.0, "sampling temperature (only with do_sample=true)", minimum=1e-3),
    }

    @property
    def lossless(self) -> bool:
        return not self.config["do_sample"]

    def sampling(self) -> dict[str, Any] | None:
        """With ``do_sample``: plain softmax sampling at ``temperature`` (no top-k, no top-p), what the
        loop's acceptance rule preserves and what the baseline must then do too; None when greedy.

        Example:
            >>> Speculative(do_sample=True, temperature=0.8).sampling()
            {'do_sample': True, 'temperature': 0.8, 'top_k': 0, 'top_p': 1.0}
            >>> Speculative().sampling() is None
            True
        """
        if not self.config["do_sample"]:
            return None
        return {"do_sample": True, "temperature": self.config["temperature"], "top_k": 0, "top_p": 1.0}

    # -- applicability (plan time: model facts, nothing loaded) ------------------------------------
    def check(self, facts: Facts, spec: Any) -> str | None:
        reason = self.check_kind(facts)
        if reason:
            return reason
        impl, target, draft = self.config["implementation"], facts.model, facts.draft
        if spec.workload.batch_size != 1:
            what = "HF assisted generation" if impl == "hf" else "the workbench loop"
            return (f"speculative decoding ({what}) runs batch size 1 only, not "
                    f"batch_size={spec.workload.batch_size}: set batch_size=1")
        sources = [name for name, given in (("--draft", draft is not None),
                                            ("prompt_lookup_num_tokens", self.config["prompt_lookup_num_tokens"]),
                                            ("draft_layers", self.config["draft_layers"])) if given]
        if not sources:
            return ("speculative decoding needs a drafter: pass --draft MODEL (e.g. zoo:code-draft), "
                    "--param prompt_lookup_num_tokens=10, or --param draft_layers=2")
        if len(sources) > 1:
            return f"give one drafter, not {' and '.join(sources)}"
        layers = self.config["draft_layers"]
        if layers is not None and target.layers is not None and layers >= target.layers:
            if target.layers < 2:  # no first layers to draft with that are fewer than all of them
                return (f"draft_layers={layers} but the target has only {target.layers} layer: self-speculation needs "
                        "2 or more; use a draft model (--draft) or prompt_lookup_num_tokens instead")
            return f"draft_layers={layers} but the target has {target.layers} layers: use 1 to {target.layers - 1}"
        if layers is not None and impl == "hf" and target.family not in HF_EARLY_EXIT_FAMILIES:
            return (f"implementation=hf with draft_layers runs transformers' assistant_early_exit, which cannot run "
                    f"{target.architecture or target.family} (model_type {target.family}; it works for "
                    f"{', '.join(HF_EARLY_EXIT_FAMILIES)}): use implementation=workbench for self-speculation")
        if self.config["draft_quantization"]:
            if draft is None:
                return "draft_quantization needs a draft model: pass --draft MODEL"
            reason = why_not_scheme(self.config["draft_quantization"], spec.device)
            if reason:
                return reason
        return None if draft is None else _check_draft(target, draft)

    # -- execution ---------------------------------------------------------------------------------
    def prepare(self, trial: Trial) -> None:
        # 1. Keep everything we may change, so release() can put it back whatever happens in between.
        model, spec, draft = trial.model, trial.spec, trial.draft
        self._model, self._spec, self._draft = model, spec, draft
        self._saved = [(model.model, copy.deepcopy(model.model.config), copy.deepcopy(model.model.generation_config))]
        if draft is not None:
            self._saved.append((draft.model, copy.deepcopy(draft.model.config),
                                copy.deepcopy(draft.model.generation_config)))
        cfg = self.config
        self._draft_bytes = draft.info["model_bytes"] if draft is not None else 0
        self._draft_quantization, self._draft_vocab_size = None, None
        if cfg["draft_quantization"]:  # combined variant: the draft is a quantized copy (the original untouched)
            copy_, self._draft_quantization = quantize_copy(draft.model, cfg["draft_quantization"])
            draft = self._draft = dataclasses.replace(draft, model=copy_)
            self._draft_bytes = self._draft_quantization["bytes_after"]
        if cfg["implementation"] == "workbench":
            # 2a. Our loop: build the drafter once; its caches are reset per call.
            if draft is not None:  # a draft built by `workbench draft build` may propose among fewer tokens
                from workbench.models.draft import draft_vocabulary

                vocab = draft_vocabulary(draft.location)
                head = None if vocab is None else trial.draft.model.get_output_embeddings().weight
                self._drafter = ModelDrafter(draft.model, cfg["confidence_threshold"], vocab=vocab, head_weight=head)
                self._draft_vocab_size = None if vocab is None else len(vocab)
            elif cfg["draft_layers"] is not None:
                self._drafter = SelfDrafter(model.model, cfg["draft_layers"], cfg["confidence_threshold"])
                self._draft_bytes = sum(p.numel() * p.element_size() for name, p in
                                        self._drafter.model.named_parameters())
            else:
                self._drafter = LookupDrafter()
            #     And what a one-token step and a (k+1)-token verification pass cost here, for the theory.
            self._step_costs, self._step_costs_input = self._measure_step_costs(trial)
            return
        # 2b. HF: draft length and schedule live in the draft's generation config.
        self._extra: dict[str, Any] = dict(self.sampling() or {"do_sample": False})
        if cfg["prompt_lookup_num_tokens"] is not None:
            self._extra["prompt_lookup_num_tokens"] = cfg["prompt_lookup_num_tokens"]
            return
        assistant = draft.model if draft is not None else model.model
        gen = assistant.generation_config
        gen.num_assistant_tokens = cfg["num_assistant_tokens"]
        gen.num_assistant_tokens_schedule = cfg["schedule"]
        gen.assistant_confidence_threshold = cfg["confidence_threshold"]
        if draft is not None:
            self._extra["assistant_model"] = draft.model
        else:  # HF's own self-speculation (check() admits only HF_EARLY_EXIT_FAMILIES)
            self._extra["assistant_early_exit"] = cfg["draft_layers"]

    def _measure_step_costs(self, trial: Trial) -> tuple[StepCosts, str]:
        """Untimed microbenchmark on a calibration input (the first timed input when there is none:
        only its length matters, nothing about its output is kept)."""
        source = "calibration input" if trial.calibration else "first timed input (no calibration split)"
        batch = trial.calibration[0] if trial.calibration else trial.batches[0]
        ids = batch.inputs["input_ids"][:1]
        if "attention_mask" in batch.inputs:  # drop left padding
            ids = ids[:, batch.inputs["attention_mask"][0].bool()]
        draft_tokens = self.config["prompt_lookup_num_tokens"] or self.config["num_assistant_tokens"]
        costs = measure_step_costs(self._model.model, ids, draft_tokens + 1,
                                   sync=lambda: synchronize(self._spec.device))
        return costs, source

    def run(self, batch: Any) -> CallOutput:
        if self.config["implementation"] == "workbench":
            return self._run_loop(batch)
        return self._run_hf(batch)

    def _run_loop(self, batch: Any) -> CallOutput:
        cfg, tokenizer = self.config, self._model.tokenizer
        draft_tokens = cfg["prompt_lookup_num_tokens"] or cfg["num_assistant_tokens"]
        with torch.inference_mode():
            tokens, stats = speculative_generate(
                self._model.model, self._drafter, batch.inputs["input_ids"], self._spec.workload.max_new_tokens,
                draft_tokens=draft_tokens, schedule=cfg["schedule"], do_sample=cfg["do_sample"],
                temperature=cfg["temperature"], eos_token_id=tokenizer.eos_token_id,
                sync=lambda: synchronize(self._spec.device))
        internals = stats.to_dict()
        first = internals.pop("first_output_at")
        return CallOutput(output=[tokens], new_tokens=len(tokens), first_output_at=first, internals=internals)

    def _run_hf(self, batch: Any) -> CallOutput:
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
        out.internals = {"target_passes": counts["target"], "draft_passes": counts["draft"],
                         "new_tokens": out.new_tokens}
        return out

    # -- what it did -------------------------------------------------------------------------------
    def report(self, outcome: Outcome) -> TechniqueReport:
        internals = self._internals(outcome.per_call)
        # A sampled run is judged by distribution (the runner's comparison, see workbench.sampled_quality).
        quality = sampled_metrics(outcome.standard_quality)
        rate, predicted = internals.get("acceptance_rate"), internals.get("predicted_speedup")
        headline = (f"{internals['draft_source']}: {internals['tokens_per_target_pass'] or 0:.2f} tokens per target pass"
                    + (f", acceptance {rate:.0%}" if rate is not None else "")
                    + (f", theory predicts {predicted:.2f}x" if predicted is not None else ""))
        # weights held: the target, plus a separate draft model (self-speculation shares the target's layers)
        held = self._model.info["model_bytes"] + (self._draft_bytes if self._draft is not None else 0)
        return TechniqueReport(
            lossless=self.lossless, model_bytes=held, quality=quality,
            bytes_read_per_token=internals["bytes_read_per_token"], internals=internals, headline=headline,
            features=self.features(self.config, self._model.info, None if self._draft is None else self._draft.info))

    def _internals(self, per_call: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.config
        source = (self._draft.spec.name if self._draft is not None
                  else f"target's first {cfg['draft_layers']} layers" if cfg["draft_layers"] is not None
                  else "prompt lookup")
        target = sum(c["target_passes"] for c in per_call)
        draft = sum(c["draft_passes"] for c in per_call)
        tokens = sum(c["new_tokens"] or 0 for c in per_call)
        common = {
            "draft_source": source,
            "target_forward_passes": target,
            "draft_forward_passes": draft,
            "tokens_per_target_pass": tokens / target if target else None,
            "bytes_read_per_token": ((target * self._model.info["model_bytes"] + draft * self._draft_bytes) / tokens
                                     if tokens else None),
        }
        if self._draft_quantization:
            common["draft_quantization"] = self._draft_quantization
        if self._draft_vocab_size:
            common["draft_vocab_size"] = self._draft_vocab_size  # the draft proposes among these many tokens
        if cfg["implementation"] == "hf":
            accepted = tokens - target  # each target pass emits its accepted draft tokens plus one of its own
            return {"implementation": "transformers assisted generation", **common,
                    "accepted_per_draft_pass": (accepted / draft) if draft else None}
        return {"implementation": "workbench loop", **common,
                **_loop_figures(per_call, self._step_costs, self._step_costs_input)}

    # -- for the meta-learner ---------------------------------------------------------------------
    @classmethod
    def features(cls, params: dict[str, Any], model: dict[str, Any], draft: dict[str, Any] | None) -> dict[str, Any]:
        lookup = params.get("prompt_lookup_num_tokens")
        ratio = float("nan")
        if draft is not None and draft.get("parameters") and model.get("parameters"):
            ratio = float(draft["parameters"]) / float(model["parameters"])
        elif params.get("draft_layers") and model.get("layers"):
            ratio = float(params["draft_layers"]) / float(model["layers"])
        elif lookup:
            ratio = 0.0  # n-gram lookup costs (almost) nothing
        scheme = params.get("draft_quantization")
        return {
            "draft_tokens": float("nan") if lookup else float(params.get("num_assistant_tokens")
                                                              or cls.params["num_assistant_tokens"].default),
            "prompt_lookup_tokens": float(lookup) if lookup else float("nan"),
            "weight_bits": float(SCHEMES[scheme]["bits"]) if scheme else float("nan"),
            "draft_cost_ratio": ratio,
        }

    @classmethod
    def expert_rules(cls) -> list[ExpertRule]:
        return [
            ExpertRule(10, f"prompt lookup when the prompts are repetitive (>= {REPETITIVE_PROMPTS:.0%} of 3-grams repeat)",
                       lambda rows: (rows["prompt_lookup_tokens"] > 0)
                       & (rows["prompt_repeated_3gram_fraction"] >= REPETITIVE_PROMPTS)),
            ExpertRule(20, f"speculate with a draft model when it costs <= {CHEAP_DRAFT_RATIO:g} of the target",
                       lambda rows: rows["draft"].notna() & (rows["draft_cost_ratio"] <= CHEAP_DRAFT_RATIO)),
        ]

    def release(self) -> None:
        for module, config, generation_config in getattr(self, "_saved", []):
            _restore(module.config, config)  # in place: sub-modules hold the same config object
            _restore(module.generation_config, generation_config)
        self._saved = []
        self._drafter = None


def _loop_figures(per_call: list[dict[str, Any]], costs: StepCosts, costs_input: str = "") -> dict[str, Any]:
    """Acceptance per position and rate, the measured cost ratios c and v, and the speedup theory predicts.

    Theory: ``(1 - a^(g+1)) / ((1 - a)(g c + v))`` (:func:`theoretical_speedup`), every cost over one
    one-token target step: v from ``costs`` (timed in prepare), c from the loop's clocks (see step 3).
    What it leaves out is reported beside it:
    the prefill (the same for both variants, so it pulls the measured speedup toward 1), the loop's
    book-keeping between its clocks, and acceptances that are not independent from position to position
    (expected against measured tokens per round).
    """
    # 1. Counts over every timed call.
    width = max((len(c["proposed_by_position"]) for c in per_call), default=0)
    proposed = [sum(c["proposed_by_position"][j] for c in per_call if j < len(c["proposed_by_position"]))
                for j in range(width)]
    accepted = [sum(c["accepted_by_position"][j] for c in per_call if j < len(c["accepted_by_position"]))
                for j in range(width)]
    rounds = sum(c["rounds"] for c in per_call)
    rejections = sum(c["rejections"] for c in per_call)
    draft_s, target_s = sum(c["draft_s"] for c in per_call), sum(c["target_s"] for c in per_call)
    prefill_s, loop_s = sum(c["prefill_s"] for c in per_call), sum(c.get("loop_s", 0.0) for c in per_call)
    # 2. Acceptance rate a: the maximum-likelihood rate of a geometric run of acceptances (each round
    #    stops at its first rejection or at its length limit).
    attempts = sum(accepted) + rejections
    alpha = sum(accepted) / attempts if attempts else None
    mean_draft = sum(proposed) / rounds if rounds else None
    # 3. Costs over one one-token target step, each from clocks read side by side, so a change of load
    #    between prepare() and the timed calls cancels: v from the interleaved microbenchmark; the draft
    #    per token over the verification pass from the loop's two clocks, times v.
    v = costs.verify_cost_ratio
    verify_round_s = target_s / rounds if rounds else None
    cost = (draft_s / sum(proposed)) / verify_round_s * v if sum(proposed) and verify_round_s else None
    step_in_loop = verify_round_s / v if verify_round_s else None  # the one-token step the timed calls imply
    predicted = (theoretical_speedup(alpha, mean_draft, cost, v)
                 if None not in (alpha, mean_draft, cost) and mean_draft > 0 else None)
    # 4. What the theory leaves out, as shares of the loop's own time.
    clocked = prefill_s + draft_s + target_s
    return {
        "rounds": rounds,
        "acceptance_by_position": [
            {"position": j + 1, "proposed": proposed[j], "accepted": accepted[j],
             "rate": accepted[j] / proposed[j] if proposed[j] else None,
             # P(accept j | j proposed and 1..j-1 accepted): the per-position alpha of the theory
             "rate_given_previous_accepted": _given_previous(accepted, proposed, j)} for j in range(width)],
        "acceptance_rate": alpha,
        "mean_draft_tokens": mean_draft,
        "mean_accepted_per_round": sum(accepted) / rounds if rounds else None,
        "tokens_per_round": (sum(accepted) + rounds) / rounds if rounds else None,
        "expected_tokens_per_round": (expected_tokens_per_round(alpha, mean_draft)
                                      if None not in (alpha, mean_draft) else None),
        "draft_seconds": draft_s,
        "target_verify_seconds": target_s,
        "prefill_seconds": prefill_s,
        "one_token_step_s": costs.one_token_step_s,
        "verify_pass_s": costs.verify_pass_s,
        "verify_pass_tokens": costs.verify_tokens,
        "step_costs_measured_on": f"{costs_input}, {costs.context_tokens} tokens of context, "
                                  f"median of {costs.repeats} interleaved passes",
        "verify_cost_ratio": v,
        "one_token_step_in_loop_s": step_in_loop,
        # 1.0: the timed calls' verification ran as fast as the microbenchmark's; far from 1, the machine's
        # load (or the context length) changed between them
        "step_time_drift": step_in_loop / costs.one_token_step_s if step_in_loop else None,
        "cost_ratio_c": cost,
        "predicted_speedup": predicted,
        "predicted_speedup_formula": "(1 - a^(g+1)) / ((1 - a)(g c + v)); v = (g+1)-token verification pass over a "
                                     "one-token step (microbenchmark), c = draft seconds per proposed token over "
                                     "verification seconds per round (loop clocks) times v",
        "prefill_share": prefill_s / loop_s if loop_s else None,
        "loop_overhead_share": (loop_s - clocked) / loop_s if loop_s else None,
        "theory_leaves_out": "prefill (paid by both variants; pulls the measured speedup toward 1), the loop's "
                             "book-keeping outside its draft and verify clocks, the baseline's own per-token "
                             "overhead beyond a bare forward pass, and acceptances that depend on position "
                             "(compare expected_tokens_per_round with tokens_per_round)",
    }


def _given_previous(accepted: list[int], proposed: list[int], j: int) -> float | None:
    """Acceptance at position j among rounds that proposed it and accepted every earlier position.

    A round that reached position j with 1..j-1 all accepted is counted in ``accepted[j-1]`` unless it
    stopped drafting there (length limit or confidence), so the denominator is the smaller of the two.
    """
    reached = proposed[j] if j == 0 else min(accepted[j - 1], proposed[j])
    return accepted[j] / reached if reached else None


def _restore(current: Any, saved: Any) -> None:
    """Make ``current`` equal to ``saved`` again, keeping the object (and every reference to it)."""
    current.__dict__.clear()
    current.__dict__.update(copy.deepcopy(saved).__dict__)


def _check_draft(target: ModelFacts, draft: ModelFacts) -> str | None:
    """A draft must be a causal LM with the target's tokenizer, and smaller than the target."""
    if draft.kind != "causal_lm":
        return f"draft {draft.name!r} is a {draft.kind} model: the draft must be a causal LM"
    if draft.tokenizer_digest != target.tokenizer_digest:
        return (f"draft {draft.name!r} uses a different tokenizer from target {target.name!r}: "
                "pick a draft of the same model family (same vocabulary)")
    if draft.parameters and target.parameters and draft.parameters >= target.parameters:
        return (f"draft {draft.name!r} ({draft.parameters:,} parameters) is not smaller than the target "
                f"({target.parameters:,}): a draft must be much cheaper to pay off")
    return None
