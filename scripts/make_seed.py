"""Measure the seed dataset: real runs of every technique over the zoo, the real pretrained models and
the hardware configurations this machine can honestly provide (1 and 2 torch threads, float32 and bfloat16,
batch sizes).

Every row comes from :func:`workbench.sweep.run_sweep`, the isolated path `workbench sweep` takes (one
worker process per run, planned in full first); its machine fingerprint and contention record are
stored in each row, and nothing is simulated or edited. Runs that cannot apply (speculative decoding at
batch 4, early exit on a 1-layer model) are stored as *skipped* with their reason: they are facts too.

Models: the offline zoo's LMs (``code-target``, ``code-wide``, ``code-draft``) and classifier, their
seed siblings (``code-tall``, ``code-mid``, ``code-classifier-deep``: ``zoo.EXTRA_NAMES``, built first
if missing, so that leaving one model out still leaves a similar one), ``digits-diffusion``, and the
real pretrained SmolLM2-135M and MiniLM-L6 (``make zoo-real``) with a 2-layer SmolLM2 draft built here
(``DRAFT_COMMAND``). Two extra workloads are written first (JSONL, from held-out stdlib files):
``repetitive-code`` (long prompts whose continuation repeats earlier text: prompt lookup's best case)
and ``short-prompts`` (function signatures only).

Run, in two sittings (``--threads 1`` can share the machine with one-core work pinned elsewhere;
``--threads 2`` needs it alone)::

    taskset -c 0 python scripts/make_seed.py --store sqlite:///data/seed/seed.sqlite --threads 1
    python scripts/make_seed.py --store sqlite:///data/seed/seed.sqlite --threads 2
    workbench export --store sqlite:///data/seed/seed.sqlite --out data/seed/runs.parquet

It resumes (skips specs already stored ok or skipped) when rerun; ``--list`` prints what is left.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from workbench import datasets, paths
from workbench.models import zoo
from workbench.sweep import describe, run_sweep, sweep_of
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.store import Store

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD_DIR = ROOT / "data" / "seed" / "workloads"
SEED_LABEL = "seed-2026-12"  # stored as the label "sweep" on every row
REAL_LM, REAL_ENCODER = "zoo:smollm2-135m", "zoo:minilm-l6"  # `make zoo-real`
REAL_DRAFT = str(paths.data_dir() / "drafts" / "smollm2-2l")  # a 2-layer SmolLM2 draft built here (DRAFT_COMMAND)
DRAFT_COMMAND = ("workbench draft build --target zoo:smollm2-135m --layers 2 --steps 80 --prompts 32 "
                 f"--new-tokens 32 --learning-rate 3e-4 --out {REAL_DRAFT}")


def write_workloads() -> dict[str, str]:
    """The extra JSONL workloads (deterministic); returns name -> path."""
    WORKLOAD_DIR.mkdir(parents=True, exist_ok=True)
    rng = random.Random("seed-workloads")
    files = datasets.code_files("test")
    # 1. Repetitive: 600-900 characters of a held-out file that ends just before text seen earlier in it.
    repetitive = []
    for f in files:
        text = f.text
        if len(text) < 2000:
            continue
        for _ in range(3):
            end = rng.randrange(900, len(text) - 200)
            chunk = text[max(0, end - 800):end]
            nxt = text[end:end + 40]
            if nxt.strip() and nxt[:20] in chunk:  # the next words already occurred in the prompt
                repetitive.append({"prompt": chunk})
                break
        if len(repetitive) >= 12:
            break
    # 2. Short prompts: the first line (signature) of held-out functions.
    short = [{"prompt": p.splitlines()[0]} for p in datasets.code_prompts(12, seed=1)]
    paths = {}
    for name, items in (("repetitive-code", repetitive), ("short-prompts", short)):
        path = WORKLOAD_DIR / f"{name}.jsonl"
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
        paths[name] = str(path.relative_to(ROOT))
    return paths


def lm_specs(extra: dict[str, str]) -> list[RunSpec]:
    """Causal-LM runs: the five zoo LMs and SmolLM2-135M, three workloads, 1 and 2 threads, a bfloat16
    context, a batch of 4 (where speculative decoding and early exit refuse: stored as skipped facts)."""
    specs = []

    def workload(name: str, tokens: int = 32, items: int = 6, batch: int = 1) -> WorkloadSpec:
        return WorkloadSpec(name, max_items=items, max_new_tokens=tokens, batch_size=batch)

    prompts, repetitive, short = "code-prompts", extra["repetitive-code"], extra["short-prompts"]
    layers = {"zoo:code-target": 24, "zoo:code-wide": 2, "zoo:code-draft": 1, "zoo:code-tall": 12, "zoo:code-mid": 4}

    def core(model: str) -> list[TechniqueSpec]:
        """Prompt lookup, int8 and bf16 everywhere; a draft model and self-speculation for the zoo targets."""
        techniques = [TechniqueSpec("speculative", {"prompt_lookup_num_tokens": 3}),
                      TechniqueSpec("speculative", {"prompt_lookup_num_tokens": 6}),
                      TechniqueSpec("quantization", {"scheme": "int8-dynamic"}),
                      TechniqueSpec("quantization", {"scheme": "bf16"})]
        if model == REAL_LM:
            techniques.append(TechniqueSpec("speculative", {"num_assistant_tokens": 4}, ModelSpec(REAL_DRAFT)))
        elif model != "zoo:code-draft":
            techniques += [TechniqueSpec("speculative", {"num_assistant_tokens": 4}, ModelSpec("zoo:code-draft")),
                           TechniqueSpec("speculative", {"draft_layers": max(1, layers[model] // 4)})]
        return techniques

    # 1. The zoo LMs: three workloads at one thread, code-prompts at two; early exit once per model.
    for model in layers:
        for w in (prompts, repetitive, short):
            specs += [RunSpec(ModelSpec(model), workload(w), t, repeats=3, threads=1) for t in core(model)]
        specs += [RunSpec(ModelSpec(model), workload(prompts), t, repeats=3, threads=2) for t in core(model)]
        specs.append(RunSpec(ModelSpec(model), workload(prompts), TechniqueSpec("early_exit", {}), repeats=3,
                             threads=1))
    # 2. SmolLM2-135M (real pretrained weights, Llama architecture): 4 prompts per run (about 1-3 minutes each).
    #    bf16 only at two threads, prompt lookup alone on the short prompts (nothing in them repeats).
    for w, threads in ((prompts, 1), (prompts, 2), (repetitive, 2)):
        techniques = [t for t in core(REAL_LM) if threads == 2 or t.param_dict.get("scheme") != "bf16"]
        if (w, threads) == (repetitive, 2):  # prompt lookup and the draft: what the repetition changes
            techniques = [t for t in techniques if t.name == "speculative"]
        specs += [RunSpec(ModelSpec(REAL_LM), workload(w, items=4), t, repeats=3, threads=threads) for t in techniques]
    # 3. Another number format as a hardware configuration: the models run in bfloat16 (lossless techniques).
    for model, draft in (("zoo:code-target", "zoo:code-draft"), ("zoo:code-wide", "zoo:code-draft")):
        items = 4 if model == REAL_LM else 6
        for t in (TechniqueSpec("speculative", {"prompt_lookup_num_tokens": 3}),
                  TechniqueSpec("speculative", {"num_assistant_tokens": 4}, ModelSpec(draft))):
            specs.append(RunSpec(ModelSpec(model), workload(prompts, items=items), t, dtype="bfloat16", repeats=3,
                                 threads=2))
    # 4. A batch of 4 prompts: quantization applies, speculative decoding refuses (a skipped fact).
    for model in ("zoo:code-target", "zoo:code-tall"):
        for t in (TechniqueSpec("quantization", {"scheme": "int8-dynamic"}),
                  TechniqueSpec("quantization", {"scheme": "bf16"}),
                  TechniqueSpec("speculative", {"prompt_lookup_num_tokens": 3})):
            specs.append(RunSpec(ModelSpec(model), workload(prompts, items=8, batch=4), t, repeats=3, threads=2))
    return specs


def classifier_specs() -> list[RunSpec]:
    """The zoo classifiers and MiniLM-L6 (real pretrained encoder), at batch 1 and 16, with 1 and 2 threads."""
    specs = []
    for batch in (1, 16):
        workload = WorkloadSpec("code-snippets", max_items=64 if batch == 16 else 24, batch_size=batch)
        for threads in (1, 2):
            for model in ("zoo:code-classifier", "zoo:code-classifier-deep", REAL_ENCODER):
                techniques = [TechniqueSpec("early_exit", {}),
                              TechniqueSpec("early_exit", {"policy": "patience", "patience": 2}),
                              TechniqueSpec("quantization", {"scheme": "int8-dynamic"}),
                              TechniqueSpec("early_exit", {"quantization": "int8-dynamic"})]
                if model != REAL_ENCODER or (threads == 2 and batch == 16):  # bf16 MiniLM: minutes per run
                    techniques.append(TechniqueSpec("quantization", {"scheme": "bf16"}))
                specs += [RunSpec(ModelSpec(model), workload, t, repeats=3, threads=threads) for t in techniques]
    return specs


def diffusion_specs() -> list[RunSpec]:
    specs = []
    for steps in (20, 50):
        workload = WorkloadSpec("digits", max_items=8, num_inference_steps=steps)
        for technique in (TechniqueSpec("adaptive_steps", {"policy": "predictor"}),
                          TechniqueSpec("adaptive_steps", {"policy": "convergence"}),
                          TechniqueSpec("quantization", {"scheme": "int8-dynamic"}))[:3 if steps == 20 else 1]:
            specs.append(RunSpec(ModelSpec("zoo:digits-diffusion"), workload, technique, repeats=2, threads=2))
    return specs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--only", default="lm,classifier,diffusion")
    parser.add_argument("--threads", type=int, default=None,
                        help="only the runs with this many torch threads (to measure in sittings)")
    parser.add_argument("--models", choices=("all", "zoo", "real"), default="all",
                        help="only the zoo's models or only the real pretrained ones (two sittings side by side, "
                             "each pinned to its own core with taskset, at --threads 1)")
    parser.add_argument("--list", action="store_true", help="print the runs still to do, and stop")
    args = parser.parse_args()
    store = Store(args.store)
    missing = [name for name in (REAL_LM, REAL_ENCODER, REAL_DRAFT) if not _built(name)]
    if missing and not args.list:
        print(f"missing {', '.join(missing)}: run `make zoo-real` and `{DRAFT_COMMAND}` first", file=sys.stderr)
        return 2
    if not args.list:
        zoo.build(names=list(zoo.EXTRA_NAMES))  # the seed siblings (the default zoo is built by `make demo`)
    extra = write_workloads()
    groups = {"lm": lambda: lm_specs(extra), "classifier": classifier_specs, "diffusion": diffusion_specs}
    specs = [s for g in args.only.split(",") for s in groups[g.strip()]()]
    if args.threads is not None:
        specs = [s for s in specs if s.threads == args.threads]
    if args.models != "all":
        real = {REAL_LM, REAL_ENCODER}
        specs = [s for s in specs if (s.model.name in real) == (args.models == "real")]
    # Cheap and varied first, so a partial run still covers every model and technique; the real models last.
    specs.sort(key=lambda s: (s.model.name in (REAL_LM, REAL_ENCODER), s.model.name.startswith("zoo:code-")
                              and s.model.name != "zoo:code-classifier", s.workload.name != "code-prompts"))
    skipped = set(store.runs(status="skipped").get("spec_key", []))  # facts already; rerunning repeats them
    todo = [s for s in specs if not store.has_ok_run(s.key()) and s.key() not in skipped]
    print(f"{len(specs)} specs, {len(specs) - len(todo)} already stored ok or skipped, running {len(todo)}", flush=True)
    if args.list:
        for spec in todo:
            print(f"  {describe(spec)}")
        return 0
    outcome = run_sweep(sweep_of(todo, name=SEED_LABEL, timeout_per_run_s=1800), store, progress=True)
    print({"ok": outcome.ok, "failed": outcome.failed, "skipped": outcome.skipped})
    return 130 if outcome.interrupted else 0


def _built(name: str) -> bool:
    folder = paths.zoo_dir() / name.removeprefix("zoo:") if name.startswith("zoo:") else Path(name)
    return (folder / "config.json").is_file()


if __name__ == "__main__":
    sys.exit(main())
