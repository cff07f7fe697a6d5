"""ODE steps on the parameter-shared zoo models: fewer, larger steps timed side by side, and the trick's effect.

Models (full recipes, built into the data folder when missing, ~2 minutes each on 2 cores): ``code-shared``
(GPT-2 whose 8 blocks of 128 are one set of weights, trained with a random number of iterations per batch and
the residual branches scaled to match), ``code-shared-plain`` (the same, always 8 iterations), and the ALBERT
snippet classifiers ``code-classifier-shared`` / ``-plain`` (one layer of 64 applied 8 times), each pair on the
same data, seed and steps.

For each model and steps M in {N, 3N/4, N/2, N/4} (N: the iterations it was trained with), the copy that takes
M steps of size h = N / M (:func:`workbench.techniques.ode_steps.ode_copy`) is timed against the full N steps in
one process, calls interleaved (variant order rotating each round): LMs greedy-decode ``--new-tokens`` from code
prompts (speedup per output token), classifiers classify batches of snippets. Beside each speedup (95% paired
bootstrap interval) is its quality, untimed: LMs the perplexity on the code prompts' text (teacher forced, the
N-step model's as reference), its change and the next-token agreement (share of positions whose argmax equals
the N-step model's); classifiers the accuracy on held-out snippets' gold labels. Then the trick's effect: the
same step counts for the trick model and its plain sibling side by side.

Check (exit code 1 when it fails): every model's N/2 steps are measurably faster (95% interval above 1). The
trick's effect is printed whatever it is, with a plain verdict; it is no pass/fail.

Found (2-core CPU, contended by other jobs, 2026-12-02): 4 of 8 steps 1.56x [1.47, 1.67] faster per token on
code-shared, 2 of 8 2.44x; the trick model's perplexity stays within 1.2% of its own 8-step figure down to 2
steps (the plain sibling's rises 7.8% there), but the trick costs 5% perplexity at the full 8 steps (158 vs
150), so it beats the plain sibling only at 2 steps; the ALBERT pair shows the same shape in accuracy points.
Both pairs are small and undertrained (the recipes fit 2 minutes each): held-out perplexity ~190, accuracy ~50%.

Run: ``WORKBENCH_DATA=/tmp/fresh26/data python bench/ode_steps.py [--repeats 5] [--prompts 4] [--new-tokens 24]
[--models code-shared,code-shared-plain,code-classifier-shared,code-classifier-shared-plain] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from workbench import datasets, paths, quality
from workbench.measure import CallOutput, run_interleaved, summarize_samples
from workbench.models import zoo
from workbench.models.loading import load_model
from workbench.specs import ModelSpec
from workbench.techniques.ode_steps import PRETRAINING_MARKER, ode_copy, trained_iterations

MODELS = ("code-shared", "code-shared-plain", "code-classifier-shared", "code-classifier-shared-plain")
PAIRS = (("code-shared", "code-shared-plain"), ("code-classifier-shared", "code-classifier-shared-plain"))


def step_counts(trained: int) -> list[int]:
    """N, 3N/4, N/2, N/4 (at least 1), largest first."""
    return sorted({trained, max(1, 3 * trained // 4), max(1, trained // 2), max(1, trained // 4)}, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the items")
    parser.add_argument("--prompts", type=int, default=4, help="LMs: prompts timed (one call each)")
    parser.add_argument("--new-tokens", type=int, default=24, help="LMs: greedy tokens per call")
    parser.add_argument("--quality-prompts", type=int, default=48, help="LMs: prompts whose text scores perplexity")
    parser.add_argument("--batches", type=int, default=4, help="classifiers: snippet batches timed")
    parser.add_argument("--batch-size", type=int, default=16, help="classifiers: snippets per call")
    parser.add_argument("--snippets", type=int, default=600, help="classifiers: held-out snippets scored for accuracy")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="use (and build) the quick recipes: shows the bench runs, its figures mean nothing")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    # 1. The full models, built here when missing (a quick build is replaced).
    built = {r.name: r for r in zoo.list_models()}
    missing = [n for n in names if n not in built or (built[n].quick and not args.quick)]
    if missing:
        recipe = "quick recipe" if args.quick else "full recipe, ~2 minutes each"
        print(f"building {', '.join(missing)} ({recipe}) into {paths.zoo_dir()} ...", flush=True)
        zoo.build(names=missing, quick=args.quick, progress=False)
    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.repeats} repeats, interleaved")
    # 2. Each model: every step count against the full N steps, quality beside.
    results = {name: bench_model(name, args) for name in names}
    # 3. The trick against its plain sibling, then the check and the machine's load.
    for trick, plain in PAIRS:
        if trick in results and plain in results:
            print_trick_effect(results[trick], results[plain])
    failed = [name for name, res in results.items() if not _half_faster(res)]
    load_after = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    contended = load_before > 0.5 or load_after > 1.5  # this bench itself keeps about one core busy
    print(f"\nmachine: load average {load_before:.2f} before, {load_after:.2f} after on {cores} cores"
          + (" (contended: other processes shared the cores; ratios are noisier than on a quiet machine)"
             if contended else " (quiet)"))
    if failed:
        print(f"FAIL: N/2 steps not measurably faster (95% interval not above 1) on {', '.join(failed)}")
        return 1
    print("PASS: N/2 steps measurably faster (95% interval above 1) on every model")
    return 0


def _half_faster(res: dict[str, Any]) -> bool:
    half = max(1, res["trained"] // 2)
    row = next(r for r in res["rows"] if r["steps"] == half)
    return row["ci_low"] is not None and row["ci_low"] > 1.0


# ----------------------------------------------------------------------------------------------------
# one model
# ----------------------------------------------------------------------------------------------------


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    # 1. The model, one copy per step count (the N-step reference is the model itself).
    loaded = load_model(ModelSpec(f"zoo:{name}"))
    model, tokenizer = loaded.model, loaded.tokenizer
    trained = trained_iterations(model)
    counts = step_counts(trained)
    copies = {m: (model if m == trained else ode_copy(model, m)[0].eval()) for m in counts}
    reference = f"{trained} steps"
    # 2. The calls, timed interleaved, and the quality of each copy (untimed).
    if loaded.kind == "causal_lm":
        calls, n_items, unit = _lm_calls(copies, tokenizer, args)
        scores = _lm_scores(copies, tokenizer, trained, args)
    else:
        calls, n_items, unit = _classifier_calls(copies, tokenizer, args)
        scores = _classifier_scores(copies, tokenizer, args)
    measured = run_interleaved(calls, n_items=n_items, repeats=args.repeats, warmup=1, track_memory=False)
    comparisons = summarize_samples(measured.samples, baseline=reference)["comparisons"]
    rows = []
    for m in counts:
        comp = comparisons.get(f"{m} steps", {"speedup": 1.0, "ci_low": None, "ci_high": None})
        rows.append({"steps": m, "h": trained / m, "compute_fraction": m / trained, "speedup": comp["speedup"],
                     "ci_low": comp["ci_low"], "ci_high": comp["ci_high"], **scores[m]})
    result = {"name": name, "kind": loaded.kind, "trained": trained, "rows": rows,
              "pretraining": getattr(model.config, PRETRAINING_MARKER, "unknown")}
    # 3. Print.
    width = getattr(model.config, "n_embd", None) or model.config.hidden_size
    print(f"\nzoo:{name} ({type(model).__name__}, one layer of {width} applied {trained} times, "
          f"{loaded.info['parameters']:,} parameters, ODE pre-training: {result['pretraining']}); {unit}")
    if loaded.kind == "causal_lm":
        print(f"{'steps':>5} {'h':>5} {'compute':>7}  {'speedup [95% CI]':<22}{'perplexity':>10} {'change':>9} "
              f"{'KL nats':>8} {'next-token agreement':>21}")
        for r in rows:
            print(f"{r['steps']:>5} {r['h']:>5.2f} {r['compute_fraction']:>7.2f}  {_ratio(r):<22}"
                  f"{r['perplexity']:>10.2f} {r['perplexity_change_percent']:>+8.1f}% {r['kl']:>8.4f} "
                  f"{100 * r['agreement']:>20.1f}%")
    else:
        print(f"{'steps':>5} {'h':>5} {'compute':>7}  {'speedup [95% CI]':<22}{'accuracy':>9} {'change':>13}")
        for r in rows:
            change = 100 * (r["accuracy"] - rows[0]["accuracy"])
            print(f"{r['steps']:>5} {r['h']:>5.2f} {r['compute_fraction']:>7.2f}  {_ratio(r):<22}"
                  f"{100 * r['accuracy']:>8.1f}% {change:>+7.1f} points")
    return result


def _ratio(row: dict[str, Any]) -> str:
    if row["ci_low"] is None:
        return "1.00 (reference)"
    return f"{row['speedup']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"


def _lm_calls(copies: dict[int, Any], tokenizer: Any, args: argparse.Namespace):
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in datasets.code_prompts(args.prompts, seed=0)]
    pad = tokenizer.pad_token_id

    def make(module):
        def call(i: int) -> CallOutput:
            with torch.inference_mode():
                out = module.generate(prompts[i], attention_mask=torch.ones_like(prompts[i]), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      pad_token_id=pad)
            return CallOutput(None, new_tokens=out.shape[1] - prompts[i].shape[1])
        return call

    unit = f"greedy decoding of {args.new_tokens} tokens from {len(prompts)} code prompts, speedup per token"
    return {f"{m} steps": make(module) for m, module in copies.items()}, len(prompts), unit


def _lm_scores(copies: dict[int, Any], tokenizer: Any, trained: int, args: argparse.Namespace) -> dict[int, Any]:
    """Perplexity (change and KL against the N-step model) and teacher-forced next-token agreement."""
    texts = datasets.code_prompts(args.quality_prompts, seed=1)
    reference = copies[trained]
    window = min(reference.config.n_positions, 512)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0][:2048]
    scores = {}
    for m, module in copies.items():
        q = quality.lm_text_quality(tokenizer, texts, lambda x: reference(input_ids=x).logits,
                                    lambda x, module=module: module(input_ids=x).logits, 2048, window)
        same = total = 0
        with torch.inference_mode():
            for start in range(0, len(ids), window):
                chunk = ids[start:start + window][None]
                same += int((reference(input_ids=chunk).logits.argmax(-1) == module(input_ids=chunk).logits.argmax(-1)).sum())
                total += chunk.shape[1]
        scores[m] = {"perplexity": q["perplexity_technique"], "perplexity_change_percent": q["perplexity_change_percent"],
                     "kl": q["next_token_kl_mean"], "agreement": same / max(1, total)}
    return scores


def _classifier_calls(copies: dict[int, Any], tokenizer: Any, args: argparse.Namespace):
    snippets = [t for t, _ in datasets.code_snippets("test", n=args.batches * args.batch_size, seed=1)]
    batches = [tokenizer(snippets[i:i + args.batch_size], return_tensors="pt", padding=True, truncation=True)
               for i in range(0, len(snippets), args.batch_size)]

    def make(module):
        def call(i: int) -> CallOutput:
            with torch.inference_mode():
                return CallOutput(module(**batches[i]).logits.argmax(-1).tolist())
        return call

    unit = f"{len(batches)} batches of {args.batch_size} snippets, speedup per call"
    return {f"{m} steps": make(module) for m, module in copies.items()}, len(batches), unit


def _classifier_scores(copies: dict[int, Any], tokenizer: Any, args: argparse.Namespace) -> dict[int, Any]:
    """Accuracy on held-out snippets' gold labels."""
    items = datasets.code_snippets("test", n=args.snippets, seed=0)
    labels = torch.tensor([y for _, y in items])
    scores = {}
    for m, module in copies.items():
        predicted = []
        with torch.inference_mode():
            for i in range(0, len(items), 64):
                enc = tokenizer([t for t, _ in items[i:i + 64]], return_tensors="pt", padding=True, truncation=True)
                predicted.append(module(**enc).logits.argmax(-1))
        scores[m] = {"accuracy": float((torch.cat(predicted) == labels).float().mean())}
    return scores


# ----------------------------------------------------------------------------------------------------
# the trick against its plain sibling
# ----------------------------------------------------------------------------------------------------


def print_trick_effect(trick: dict[str, Any], plain: dict[str, Any]) -> None:
    print(f"\nthe trick's effect: zoo:{trick['name']} ({trick['pretraining']}) vs zoo:{plain['name']} "
          f"({plain['pretraining']}), same data, seed and steps")
    lm = trick["kind"] == "causal_lm"
    key, label = ("perplexity", "perplexity") if lm else ("accuracy", "accuracy %")
    change = "change vs own N (%)" if lm else "change vs own N (pts)"
    print(f"{'steps':>5}  {'trick ' + label:>18} {'plain ' + label:>18}  {'trick ' + change:>26} "
          f"{'plain ' + change:>26}  {'trick speedup':<22}{'plain speedup':<22}")
    better_at = []
    for t, p in zip(trick["rows"], plain["rows"]):
        scale = 1.0 if lm else 100.0
        print(f"{t['steps']:>5}  {scale * t[key]:>18.2f} {scale * p[key]:>18.2f}  {_change(t, trick, lm):>+26.2f} "
              f"{_change(p, plain, lm):>+26.2f}  {_ratio(t):<22}{_ratio(p):<22}")
        if t["steps"] < trick["trained"]:
            better = t[key] < p[key] if lm else t[key] > p[key]
            better_at.append((t["steps"], better))
    helped = [m for m, ok in better_at if ok]
    full_t, full_p = trick["rows"][0][key], plain["rows"][0][key]
    unit = "%" if lm else " points"
    fewest = (trick["rows"][-1], plain["rows"][-1])
    full_note = (f"at the full {trick['trained']} steps the trick model's {key} is {_fmt(full_t, lm)} against "
                 f"{_fmt(full_p, lm)}; from N to {fewest[0]['steps']} steps it changes "
                 f"{_change(fewest[0], trick, lm):+.2f}{unit} against the plain sibling's "
                 f"{_change(fewest[1], plain, lm):+.2f}{unit}")
    if len(helped) == len(better_at):
        print(f"verdict: the trick helps at every reduced step count here ({full_note})")
    elif helped:
        print(f"verdict: the trick helps at {', '.join(map(str, helped))} steps only, not at the others ({full_note})")
    else:
        print(f"verdict: the trick does not help here: the plain sibling is as good or better at every reduced step "
              f"count ({full_note})")


def _change(row: dict[str, Any], result: dict[str, Any], lm: bool) -> float:
    """Quality at this step count against the same model's own N steps: perplexity change in %, accuracy in points."""
    if lm:
        return row["perplexity_change_percent"]
    return 100.0 * (row["accuracy"] - result["rows"][0]["accuracy"])


def _fmt(value: float, lm: bool) -> str:
    return f"{value:.2f}" if lm else f"{100 * value:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
