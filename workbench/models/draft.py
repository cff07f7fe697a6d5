"""A draft model the workbench builds for a user's target: ``workbench draft build --target M``.

Speculative decoding needs a drafter that predicts what the *target* will say, on the user's text,
and costs a small share of a target step. This module builds one here, in minutes on a CPU:

1. Start sensible: the target's first K layers, its final norm and its embeddings / LM head (copies),
   so the draft is a K-layer model of the target's own class and tokenizer.
2. Learn what speculative decoding must predict: the target writes greedy continuations of the
   workload's prompts; the draft is distilled (KL to the target's next-token distribution, its top
   ``TEACHER_TOP_K`` tokens, at every position of prompt and continuation). Only the layers and the
   final norm train; the embeddings and the LM head stay the target's.
3. Propose cheaply (FR-Spec, Zhao et al. 2025): with ``draft_vocab=N`` the draft scores only the N
   tokens the target is most likely to emit on this domain (its summed next-token probability over the
   training text) instead of the whole vocabulary, so a small draft no longer pays for a full LM head.
   Its proposals are full-vocabulary ids; the full target verifies them, so decoding stays lossless.
   The list is saved beside the weights (``workbench_draft.json``) and the speculative loop reads it
   (:func:`draft_vocabulary`).

The workload's first ``TIMED_ITEMS`` inputs, the ones ``workbench run --max-items <= 16`` times, are
never trained on; a further share of the training prompts is held out for the held-out loss and the
held-out greedy agreement (how often the draft's first proposal is the target's token: an estimate of
the acceptance rate at draft position 1).

Example:
    >>> from workbench.models.draft import DraftRecipe, build_draft
    >>> record = build_draft("zoo:smollm2-135m", DraftRecipe(layers=2, steps=100))  # doctest: +SKIP
    >>> record.path  # doctest: +SKIP
    '.../cache/drafts/smollm2-135m-2l-v4096-100s'
    >>> # then: workbench run --model zoo:smollm2-135m --technique speculative --draft <record.path> ...
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError

DRAFT_FILE = "workbench_draft.json"  # the model card beside the weights
TIMED_ITEMS = 16  # the workload's first inputs are never trained on (what `workbench run` times)
TEACHER_TOP_K = 128  # the target's most likely next tokens kept per position as the distillation target
GENERATE_BATCH = 8  # prompts the target continues per generate() call
DEFAULT_DRAFT_VOCAB = 4096  # FR-Spec's order of magnitude: a quarter to a tenth of a 32k-128k vocabulary
DRAFT_TOKENS = 4  # draft length the build's cost figures assume (the speculative technique's default)
FORMAT_VERSION = 1


class DraftError(WorkbenchError):
    """A draft cannot be built from this input; the message names the bad value and the fix."""


@dataclass(frozen=True)
class DraftRecipe:
    """How a draft is built. Every field is checked on creation.

    Example:
        >>> DraftRecipe(layers=2, draft_vocab=2048).draft_vocab
        2048
        >>> DraftRecipe(steps=0)
        Traceback (most recent call last):
        ...
        workbench.models.draft.DraftError: steps=0 is invalid: use an integer >= 1
    """

    layers: int = 4  # the target's first K layers: more layers accept more proposals and cost more per proposal
    steps: int = 120  # optimizer steps; 2 quiet CPU cores take 1-2 s each for a 2-layer draft of a 135M target
    prompts: int = 48  # training prompts taken from the workload (never its first TIMED_ITEMS)
    new_tokens: int = 48  # greedy tokens the target writes after each training prompt (what the draft must predict)
    draft_vocab: int | None = None  # FR-Spec head: propose among the domain's N likeliest tokens; 0: the full
    #                                 vocabulary; None: DEFAULT_DRAFT_VOCAB, or the full one when it is not larger
    batch_size: int = 8  # sequences per optimizer step
    learning_rate: float = 1e-3  # AdamW peak, linear warm-up over a tenth of the steps then cosine decay
    heldout_fraction: float = 0.25  # share of the training prompts kept out for the held-out figures
    seed: int = 0  # prompt split and batch order

    def __post_init__(self) -> None:
        for name in ("layers", "steps", "prompts", "new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DraftError(f"{name}={value!r} is invalid: use an integer >= 1")
        if self.draft_vocab is not None and (not isinstance(self.draft_vocab, int) or self.draft_vocab < 0):
            raise DraftError(f"draft_vocab={self.draft_vocab!r} is invalid: use 0 (full vocabulary) or a token count")
        if not self.learning_rate > 0:
            raise DraftError(f"learning_rate={self.learning_rate!r} is invalid: use a positive number, e.g. 3e-4")
        if not 0 < self.heldout_fraction < 1:
            raise DraftError(f"heldout_fraction={self.heldout_fraction!r} is invalid: use a share between 0 and 1")
        if self.prompts < 2:
            raise DraftError(f"prompts={self.prompts} is too few: use at least 2 (one trains, one is held out)")


@dataclass(frozen=True)
class DraftRecord:
    """What ``workbench_draft.json`` says about one built draft (its model card)."""

    path: str  # the draft's folder (absolute); pass it as ``--draft``
    target: str  # the target's canonical name (zoo:NAME, a folder or a hub id)
    target_digest: str  # the target's content digest when the draft was built
    architecture: str  # the draft's class, the target's own
    layers: int  # transformer blocks kept from the target
    target_layers: int
    parameter_count: int
    draft_vocab_size: int  # tokens the draft proposes among (the full vocabulary when not restricted)
    vocab_size: int  # the shared tokenizer's vocabulary
    workload: str
    data: str  # what it was trained on, in words
    steps: int
    recipe: dict[str, Any]
    metrics: dict[str, float | None]  # losses, agreement, coverage, costs, seconds per phase (None: n/a)
    train_seconds: float
    built_at: str
    versions: dict[str, str]
    draft_vocab: list[int] = field(default_factory=list, repr=False)  # the proposable ids, likeliest first
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DraftRecord:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def read_record(folder: str | Path) -> DraftRecord | None:
    """The record of a draft folder, or None when the folder was not built by :func:`build_draft`."""
    path = Path(folder) / DRAFT_FILE
    if not path.is_file():
        return None
    try:
        return DraftRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DraftError(f"{path} is unreadable ({exc}): rebuild the draft with `workbench draft build`") from None


def draft_vocabulary(folder: str | Path) -> torch.Tensor | None:
    """The ids a restricted-vocabulary draft proposes among (1-D long tensor), or None for a full head."""
    record = read_record(folder)
    if record is None or not record.draft_vocab or len(record.draft_vocab) >= record.vocab_size:
        return None
    return torch.tensor(record.draft_vocab, dtype=torch.long)


def default_out(target_name: str, recipe: DraftRecipe) -> Path:
    """``<data>/cache/drafts/<target>-<K>l-v<N>-<steps>s`` (ignored by git, beside the other caches)."""
    from workbench import paths

    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", target_name.removeprefix("zoo:").strip("/")).strip("-")[-60:]
    vocab = f"v{recipe.draft_vocab}" if recipe.draft_vocab else "vfull"
    return paths.cache_dir() / "drafts" / f"{slug}-{recipe.layers}l-{vocab}-{recipe.steps}s"


# --------------------------------------------------------------------------- the build


def build_draft(target: str, recipe: DraftRecipe = DraftRecipe(), workload: str = "code-prompts",
                out: str | Path | None = None, progress: bool = False, threads: int | None = None) -> DraftRecord:
    """Build a draft for ``target`` on ``workload``'s domain and save it to ``out``; returns its record.

    Raises:
        DraftError, ModelLoadError, WorkloadError: bad input, one line, before any long work.
    """
    from workbench.models.facts import read_facts
    from workbench.specs import ModelSpec

    start = time.perf_counter()
    seconds: dict[str, float] = {}
    # 1. Everything checked before anything heavy: the target's facts, the recipe against them, the prompts.
    facts = read_facts(ModelSpec(target))
    _check_target(target, facts, recipe)
    if recipe.draft_vocab is None:  # the documented default: a restricted head only where it is smaller
        vocab_default = DEFAULT_DRAFT_VOCAB if (facts.vocab_size or 0) > DEFAULT_DRAFT_VOCAB else 0
        recipe = dataclasses.replace(recipe, draft_vocab=vocab_default)
    train_prompts, heldout_prompts = _split_prompts(workload, recipe)
    out = Path(out).expanduser() if out is not None else default_out(facts.name, recipe)
    if out.exists() and not (out / DRAFT_FILE).is_file():
        raise DraftError(f"--out {str(out)!r} exists and is not a draft folder: give a new folder (or a draft's)")
    # 2. The target, and its greedy continuations of every prompt (torch threads: the cores others leave free).
    saved_threads = torch.get_num_threads()
    seconds["torch_threads"] = _set_threads(threads)
    try:
        return _build(target, recipe, workload, out, progress, facts, train_prompts, heldout_prompts, seconds, start)
    finally:
        torch.set_num_threads(saved_threads)


def _build(target: str, recipe: DraftRecipe, workload: str, out: Path, progress: bool, facts: Any,
           train_prompts: list[str], heldout_prompts: list[str], seconds: dict[str, float],
           start: float) -> DraftRecord:
    """Steps 2-6 of :func:`build_draft`, on checked input."""
    from workbench.models.loading import load_model
    from workbench.specs import ModelSpec

    loaded = load_model(ModelSpec(target))
    model, tokenizer = loaded.model, loaded.tokenizer
    _check_plain_head(model)
    clock = time.perf_counter()
    train = _continue(model, tokenizer, train_prompts, recipe.new_tokens, progress)
    heldout = _continue(model, tokenizer, heldout_prompts, recipe.new_tokens, progress)
    seconds["generate_s"] = time.perf_counter() - clock
    # 3. The teacher: the target's next-token distribution (top-k) at every position; the draft vocabulary.
    clock = time.perf_counter()
    mass = torch.zeros(model.get_output_embeddings().weight.shape[0])
    for seq in _bar(train + heldout, progress, "target's next-token distributions"):
        _teach(model, seq, mass if seq in train else None)
    vocab = _choose_vocab(mass, recipe.draft_vocab, tokenizer)
    seconds["teacher_s"] = time.perf_counter() - clock
    # 4. The draft: the target's first K layers, distilled on the training sequences.
    draft = _initial_draft(model, recipe.layers)
    head = _Head(draft, vocab)
    before = _evaluate(draft, head, heldout)
    clock = time.perf_counter()
    losses = _distill(draft, head, train, recipe, progress)
    seconds["train_s"] = time.perf_counter() - clock
    after, after_train = _evaluate(draft, head, heldout), _evaluate(draft, head, train)
    # 5. What a draft step costs against a target step, here and now.
    cost = _step_cost_ratio(model, draft, head, heldout[0].ids)
    # 6. Save: weights, the shared tokenizer, the model card; atomically into place.
    metrics = {
        "train_loss_final": statistics.fmean(losses[-max(1, len(losses) // 10):]),
        "train_kl": after_train["kl"], "heldout_kl": after["kl"], "heldout_kl_at_init": before["kl"],
        "heldout_agreement": after["agreement"], "heldout_agreement_at_init": before["agreement"],
        "train_agreement": after_train["agreement"], "heldout_vocab_coverage": after["coverage"],
        "teacher_top_k_mass": statistics.fmean(s.top_mass for s in train + heldout),
        **cost, **{k: round(v, 2) for k, v in seconds.items()},
    }
    return _save(out, draft, tokenizer, vocab, facts, recipe, workload, metrics, len(train), len(heldout),
                 sum(len(s.ids) for s in train), time.perf_counter() - start)


def _set_threads(threads: int | None) -> int:
    """Set torch's CPU threads: ``threads``, or as the runner does, the cores other processes leave free."""
    from workbench import noise

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise DraftError(f"threads={threads!r} is invalid: use a positive integer, or leave it unset")
    if threads is None:
        threads = noise.free_threads(noise.probe(0.5))[0]
    torch.set_num_threads(threads)
    return threads


def _check_target(target: str, facts: Any, recipe: DraftRecipe) -> None:
    if facts.kind != "causal_lm":
        raise DraftError(f"target {target!r} is a {facts.kind} model: a draft is built for a causal LM "
                         "(e.g. zoo:smollm2-135m)")
    if facts.layers is None:
        raise DraftError(f"target {target!r} does not say how many layers it has (no num_hidden_layers in its "
                         "config): a draft is cut from the target's first layers")
    if recipe.layers >= facts.layers:
        raise DraftError(f"--layers {recipe.layers} but target {target!r} has {facts.layers} layers: "
                         f"use 1 to {facts.layers - 1} (a draft must be smaller than its target)")
    if facts.vocab_size and recipe.draft_vocab is not None and recipe.draft_vocab >= facts.vocab_size:
        raise DraftError(f"draft_vocab={recipe.draft_vocab} is not below the target's vocabulary of "
                         f"{facts.vocab_size}: use a smaller count, or 0 for the full vocabulary")


def _check_plain_head(model: Any) -> None:
    """The restricted head computes ``hidden @ W[vocab].T``: only right for a bias-free linear LM head."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None or not hasattr(head, "weight"):
        raise DraftError(f"{type(model).__name__}'s LM head is not a bias-free linear layer: "
                         "build_draft supports such heads only (Llama, GPT-2 and most decoder LMs)")


def _split_prompts(workload: str, recipe: DraftRecipe) -> tuple[list[str], list[str]]:
    """Training and held-out prompts: the workload's inputs after its first TIMED_ITEMS, seeded split."""
    from workbench.specs import WorkloadSpec
    from workbench.workloads import load_workload

    timed = load_workload(WorkloadSpec(workload, max_items=TIMED_ITEMS))
    if timed.modality != "text-generation":
        raise DraftError(f"workload {workload!r} holds {timed.modality} inputs: a draft learns from prompts "
                         "(e.g. code-prompts, or a .jsonl file of {\"prompt\": ...} lines)")
    taken = {item["prompt"] for item in timed.items}
    wanted = TIMED_ITEMS + recipe.prompts
    try:
        pool = load_workload(WorkloadSpec(workload, max_items=wanted)).items
    except ValueError:  # a built-in workload offers fewer inputs
        pool = load_workload(WorkloadSpec(workload, max_items=None)).items
    prompts = [item["prompt"] for item in pool if item["prompt"] not in taken][: recipe.prompts]
    if len(prompts) < 2:
        raise DraftError(f"workload {workload!r} has {len(prompts)} prompts after its first {TIMED_ITEMS} "
                         f"(kept for timing): give a workload with at least {TIMED_ITEMS + 2} prompts")
    random.Random(f"draft:{recipe.seed}").shuffle(prompts)
    held = max(1, round(recipe.heldout_fraction * len(prompts)))
    return prompts[held:], prompts[:held]


@dataclass(eq=False)
class _Sequence:
    """One training text: prompt then the target's greedy continuation, with the teacher's targets."""

    ids: torch.Tensor  # (T,) token ids
    prompt_len: int  # positions 0..prompt_len-1 are the prompt
    top_ids: torch.Tensor | None = None  # (T, k) the target's likeliest next tokens after each position
    top_p: torch.Tensor | None = None  # (T, k) their probabilities
    argmax: torch.Tensor | None = None  # (T,) the target's greedy next token
    top_mass: float = 0.0  # mean probability the top k hold


def _bar(items: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="it")


def _continue(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, progress: bool = False
              ) -> list[_Sequence]:
    """The target's greedy continuation of each prompt (batched, left-padded), cut after end of text."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    sequences = []
    for start in _bar(range(0, len(prompts), GENERATE_BATCH), progress, "target continues the prompts"):
        enc = tokenizer(prompts[start:start + GENERATE_BATCH], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row, mask in zip(out, enc["attention_mask"]):
            prompt = row[: mask.shape[0]][mask.bool()]
            new = row[mask.shape[0]:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id) + 1]
            sequences.append(_Sequence(torch.cat([prompt, torch.tensor(new, dtype=prompt.dtype)]), len(prompt)))
    return sequences


def _teach(model: Any, seq: _Sequence, mass: torch.Tensor | None) -> None:
    """Fill ``seq``'s teacher targets from one target pass; add its probabilities to ``mass`` (V,)."""
    with torch.inference_mode():
        probs = torch.softmax(model(input_ids=seq.ids[None]).logits[0].float(), dim=-1)  # (T, V)
    k = min(TEACHER_TOP_K, probs.shape[-1])
    top_p, top_ids = probs.topk(k, dim=-1)
    seq.top_ids, seq.top_p, seq.argmax = top_ids, top_p, top_ids[:, 0]
    seq.top_mass = float(top_p.sum(-1).mean())
    if mass is not None:
        mass += probs.sum(0)


def _choose_vocab(mass: torch.Tensor, size: int, tokenizer: Any) -> torch.Tensor:
    """The ``size`` ids the target most expects on the training text (end of text always in); all when 0."""
    if size == 0:
        return torch.arange(mass.shape[0])
    order = mass.argsort(descending=True)
    keep = order[:size]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in keep.tolist():
        keep = torch.cat([keep[:-1], torch.tensor([eos])])
    return keep


def _initial_draft(target: Any, layers: int) -> Any:
    """The target's first ``layers`` layers, its final norm and embeddings: an own copy, in train mode."""
    from workbench.techniques._speculative_loop import truncated_model

    draft = copy.deepcopy(truncated_model(target, layers))  # deep copy: the target's tensors stay untouched
    draft.train()
    for module in (draft.get_input_embeddings(), draft.get_output_embeddings()):
        for p in module.parameters():
            p.requires_grad_(False)
    return draft


class _Head:
    """The draft's LM head restricted to ``vocab``: logits (..., N) from hidden states (..., H)."""

    def __init__(self, draft: Any, vocab: torch.Tensor) -> None:
        self.vocab = vocab  # (N,) full-vocabulary ids
        full = draft.get_output_embeddings().weight.shape[0]
        self.weight = draft.get_output_embeddings().weight.detach()[vocab].clone()  # (N, H), frozen
        self.index = torch.full((full,), -1, dtype=torch.long)  # full id -> row of the head, -1 outside
        self.index[vocab] = torch.arange(len(vocab))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.T

    def targets(self, seq: _Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k restricted to the head's tokens and renormalised: rows (T, k), probs (T, k)."""
        rows = self.index[seq.top_ids]
        p = torch.where(rows >= 0, seq.top_p, torch.zeros_like(seq.top_p))
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        return rows.clamp_min(0), p


def _kl_and_logits(draft: Any, head: _Head, batch: list[_Sequence]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean KL(teacher || draft) over every position of ``batch``, and each sequence's logits (T, N)."""
    length = max(len(s.ids) for s in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, s in enumerate(batch):  # right padding: positions past a sequence's end are masked out
        ids[i, : len(s.ids)], mask[i, : len(s.ids)] = s.ids, 1
    hidden = draft.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    total, count, logits = hidden.new_zeros(()), 0, []
    for i, s in enumerate(batch):
        logq = torch.log_softmax(head.logits(hidden[i, : len(s.ids)]).float(), dim=-1)  # (T, N)
        rows, p = head.targets(s)
        total = total + (p * (torch.log(p.clamp_min(1e-12)) - logq.gather(1, rows))).sum()
        count += len(s.ids)
        logits.append(logq)
    return total / count, logits


def _distill(draft: Any, head: _Head, train: list[_Sequence], recipe: DraftRecipe, progress: bool) -> list[float]:
    """AdamW on the trainable layers, warm-up then cosine; returns the loss of every step."""
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(f"draft-batches:{recipe.seed}")
    warmup = max(1, recipe.steps // 10)
    losses: list[float] = []
    steps = _bar(range(recipe.steps), progress, "distilling the draft")
    for step in steps:
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup)
                                                                              / max(1, recipe.steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = recipe.learning_rate * scale
        batch = rng.sample(train, min(recipe.batch_size, len(train)))
        loss, _ = _kl_and_logits(draft, head, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            steps.set_postfix(kl=f"{losses[-1]:.3f}")
    draft.eval()
    return losses


def _evaluate(draft: Any, head: _Head, sequences: list[_Sequence]) -> dict[str, float]:
    """KL over every position; greedy agreement and vocabulary coverage over the continuation's positions.

    Agreement: the draft's argmax (a full-vocabulary id) equals the target's greedy token, at each
    position whose next token the target wrote itself: what the first draft position is accepted on.
    Coverage: the share of those target tokens the draft can propose at all (1.0 for a full head).
    """
    was_training = draft.training
    draft.eval()
    kl_sum = positions = agree = covered = judged = 0.0
    with torch.no_grad():
        for start in range(0, len(sequences), 8):
            batch = sequences[start:start + 8]
            kl, logits = _kl_and_logits(draft, head, batch)
            n = sum(len(s.ids) for s in batch)
            kl_sum, positions = kl_sum + float(kl) * n, positions + n
            for s, logq in zip(batch, logits):
                span = slice(s.prompt_len - 1, len(s.ids) - 1)  # the positions after which the target wrote
                truth = s.argmax[span]
                agree += float((head.vocab[logq[span].argmax(-1)] == truth).sum())
                covered += float((head.index[truth] >= 0).sum())
                judged += len(truth)
    draft.train(was_training)
    return {"kl": kl_sum / positions, "agreement": agree / judged if judged else float("nan"),
            "coverage": covered / judged if judged else float("nan")}


def _step_cost_ratio(target: Any, draft: Any, head: _Head, ids: torch.Tensor, repeats: int = 15) -> dict[str, float]:
    """Median one-token step of the draft (restricted head) and of the target, interleaved, after ``ids``."""
    from transformers import DynamicCache

    from workbench.techniques._speculative_loop import measure_step_costs, required_acceptance

    def one(model: Any, cache: Any, restricted: bool) -> float:
        begin = time.perf_counter()
        if restricted:
            hidden = model.base_model(input_ids=ids[None, -1:], cache=cache, use_cache=True).last_hidden_state
            int(head.logits(hidden[0, -1]).argmax())
        else:
            int(model(input_ids=ids[None, -1:], cache=cache, use_cache=True).logits[0, -1].argmax())
        elapsed = time.perf_counter() - begin
        cache.crop(-1)
        return elapsed

    times: dict[str, list[float]] = {"draft": [], "target": []}
    with torch.inference_mode():
        caches = {name: DynamicCache() for name in times}
        draft(input_ids=ids[None, :-1], cache=caches["draft"], use_cache=True)
        target(input_ids=ids[None, :-1], cache=caches["target"], use_cache=True)
        for rep in range(repeats + 3):
            d, t = one(draft, caches["draft"], True), one(target, caches["target"], False)
            if rep >= 3:
                times["draft"].append(d)
                times["target"].append(t)
    draft_s, target_s = statistics.median(times["draft"]), statistics.median(times["target"])
    # and the verification pass of DRAFT_TOKENS + 1 tokens, for the acceptance the theory says 1.3x needs
    v = measure_step_costs(target, ids[None], DRAFT_TOKENS + 1, repeats=repeats).verify_cost_ratio
    needed = required_acceptance(1.3, DRAFT_TOKENS, draft_s / target_s, v)
    return {"draft_step_ms": 1e3 * draft_s, "target_step_ms": 1e3 * target_s, "draft_cost_ratio": draft_s / target_s,
            "verify_cost_ratio": v, "acceptance_needed_for_1.3x": needed}


def _save(out: Path, draft: Any, tokenizer: Any, vocab: torch.Tensor, facts: Any, recipe: DraftRecipe,
          workload: str, metrics: dict[str, float], n_train: int, n_heldout: int, train_tokens: int,
          elapsed_s: float) -> DraftRecord:
    """Write weights, tokenizer and record into a temporary folder beside ``out``, then move it in place."""
    from workbench.models.zoo.builder import _versions

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        draft.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        full = len(vocab) >= draft.get_output_embeddings().weight.shape[0]
        record = DraftRecord(
            path=str(out.resolve()), target=facts.name, target_digest=facts.digest,
            architecture=type(draft).__name__, layers=recipe.layers, target_layers=facts.layers,
            parameter_count=sum(p.numel() for p in draft.parameters()), draft_vocab_size=len(vocab),
            vocab_size=draft.get_output_embeddings().weight.shape[0], workload=workload,
            data=(f"{n_train} prompts of {workload} (after its first {TIMED_ITEMS}, which `workbench run` times) with "
                  f"the target's greedy continuations of up to {recipe.new_tokens} tokens ({train_tokens:,} tokens); "
                  f"{n_heldout} further prompts held out; teacher: the target's top {TEACHER_TOP_K} next tokens"),
            steps=recipe.steps, recipe=asdict(recipe), metrics={k: None if v is None or v != v else round(float(v), 5) for k, v in metrics.items()},
            train_seconds=round(elapsed_s, 2), built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions=_versions(), draft_vocab=[] if full else vocab.tolist())
        (tmp / DRAFT_FILE).write_text(json.dumps(record.to_dict()) + "\n", encoding="utf-8")
        if out.exists():  # a draft folder (checked in step 1): replaced by the new build
            shutil.rmtree(out)
        os.replace(tmp, out)
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
