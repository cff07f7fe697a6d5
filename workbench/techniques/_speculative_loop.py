"""The workbench's own speculative decoding loop (Leviathan et al. 2023), batch size 1.

What Hugging Face's assisted generation hides, this loop counts: how often the draft's token at each
position is accepted, how many tokens each target pass yields, and how long the draft and the target
take, so the speedup theory predicts can be set beside the one measured.

One round: the drafter proposes up to ``k`` tokens; the target scores the last emitted token and all
proposals in one forward pass; the longest acceptable prefix is kept plus one token of the target's own
(the correction at the first rejection, or a bonus token when all were accepted). Both KV caches are
then cut back to the tokens actually kept, so a rejected proposal leaves no trace.

Acceptance rule: greedy keeps a proposal when it equals the target's argmax, so the output equals
the target's own greedy output token for token. Sampling keeps proposal ``x`` with probability
``min(1, p(x) / q(x))`` and on rejection draws from ``norm(max(0, p - q))``, which makes every emitted
token distributed exactly as the target alone would sample it (Leviathan et al., Theorem 1).

Example:
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> target = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=16, n_layer=2, n_head=2)).eval()
    >>> tokens, stats = speculative_generate(target, SelfDrafter(target, layers=1), torch.tensor([[1, 2, 3]]),
    ...                                      max_new_tokens=6, draft_tokens=3)
    >>> len(tokens), stats.target_passes <= 6
    (6, True)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

SCHEDULES = ("constant", "heuristic_transient")  # draft length policies (HF's names)


@dataclass
class LoopStats:
    """Counts and clocks of one generation call."""

    target_passes: int = 0  # target forward passes, the prefill included
    draft_passes: int = 0  # draft forward passes (0 for prompt lookup)
    rounds: int = 0  # draft-then-verify rounds
    proposed_by_position: list[int] = field(default_factory=list)  # [j]: rounds that proposed a (j+1)-th token
    accepted_by_position: list[int] = field(default_factory=list)  # [j]: rounds that accepted it
    rejections: int = 0  # rounds that ended on a rejected proposal
    draft_s: float = 0.0  # seconds spent proposing
    prefill_s: float = 0.0  # seconds of the target's prefill pass (prompt in, first token out)
    target_s: float = 0.0  # seconds of the target's verification passes (prefill excluded)
    new_tokens: int = 0
    first_output_at: float | None = None  # clock when the first new token existed

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------------------------
# Drafters: each proposes tokens after ``seq`` and keeps its own state in step with the kept tokens


class ModelDrafter:
    """A smaller causal LM of the same vocabulary, with its own KV cache."""

    source = "draft model"

    def __init__(self, model: Any, confidence_threshold: float = 0.0) -> None:
        self.model = model
        self.confidence_threshold = confidence_threshold  # stop drafting below this probability
        self.passes = 0
        self.cache: DynamicCache | None = None

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.passes = 0

    def propose(self, seq: torch.Tensor, k: int, sample: bool, temperature: float
                ) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` tokens and, when sampling, their draft distributions q (k, V)."""
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        feed = seq[:, _cached(self.cache):]  # everything the cache has not seen yet
        for _ in range(k):
            logits = self.model(input_ids=feed, cache=self.cache, use_cache=True).logits[0, -1]
            self.passes += 1
            probs = torch.softmax(logits.float() / temperature, dim=-1) if sample else None
            token = int(torch.multinomial(probs, 1)) if sample else int(logits.argmax())
            tokens.append(token)
            if sample:
                dists.append(probs)
            if self.confidence_threshold > 0:
                confidence = probs[token] if sample else torch.softmax(logits.float(), dim=-1)[token]
                if float(confidence) < self.confidence_threshold:
                    break
            feed = torch.tensor([[token]], device=seq.device)
        return tokens, (torch.stack(dists) if sample else None)

    def rollback(self, length: int) -> None:
        _crop(self.cache, length)


class SelfDrafter(ModelDrafter):
    """Self-speculation: the target's own first ``layers`` layers (weights shared) with its LM head."""

    source = "target's first layers"

    def __init__(self, target: Any, layers: int, confidence_threshold: float = 0.0) -> None:
        super().__init__(truncated_model(target, layers), confidence_threshold)


class LookupDrafter:
    """Prompt lookup: propose the tokens that followed the latest earlier match of the last n-gram."""

    source = "prompt lookup"

    def __init__(self, max_ngram: int = 2) -> None:
        self.max_ngram = max_ngram
        self.passes = 0

    def reset(self) -> None:
        self.passes = 0

    def propose(self, seq: torch.Tensor, k: int, sample: bool, temperature: float
                ) -> tuple[list[int], torch.Tensor | None]:
        row = seq[0].tolist()
        for n in range(min(self.max_ngram, len(row) - 1), 0, -1):
            tail = row[-n:]
            for start in range(len(row) - n - 1, -1, -1):  # latest earlier occurrence first
                if row[start:start + n] == tail:
                    follow = row[start + n:start + n + k]
                    if follow:
                        return follow, None  # deterministic proposal: q is one-hot
        return [], None

    def rollback(self, length: int) -> None:
        pass


def truncated_model(model: Any, layers: int) -> Any:
    """A model of the same class with only the first ``layers`` layers, sharing the target's tensors.

    Built from the model's own config with ``num_hidden_layers`` lowered, then given the target's
    tensors (no copy) for every parameter it has; the target itself is not touched.
    """
    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    if not 1 <= layers < total:
        raise ValueError(f"draft_layers={layers} must be between 1 and {total - 1} for a {total}-layer target")
    config.num_hidden_layers = layers
    small = type(model)(config)
    shared = {name: tensor for name, tensor in model.state_dict().items()}
    own = small.state_dict()
    small.load_state_dict({name: shared[name] for name in own if name in shared}, strict=True, assign=True)
    small.tie_weights()
    return small.to(model.device).eval()


# ----------------------------------------------------------------------------------------------
# The loop


def speculative_generate(target: Any, drafter: Any, input_ids: torch.Tensor, max_new_tokens: int,
                         draft_tokens: int = 4, schedule: str = "constant", do_sample: bool = False,
                         temperature: float = 1.0, eos_token_id: int | None = None,
                         sync: Callable[[], None] = lambda: None) -> tuple[list[int], LoopStats]:
    """Generate up to ``max_new_tokens`` after ``input_ids`` (1, T); returns the new tokens and stats.

    The first token comes from a plain target prefill, so time to first token is the target's own;
    speculation starts from the second token. ``sync`` waits for the device before each clock read.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"the speculative loop runs batch size 1, got {input_ids.shape[0]} rows")
    stats = LoopStats()
    clock = time.perf_counter

    def pick(logits: torch.Tensor) -> int:
        if not do_sample:
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1))

    # 1. Prefill: the target alone gives the first token.
    cache = DynamicCache()
    drafter.reset()
    start = clock()
    logits = target(input_ids=input_ids, cache=cache, use_cache=True).logits[0, -1]
    out = [pick(logits)]
    sync()
    stats.first_output_at = clock()
    stats.target_passes, stats.prefill_s = 1, stats.first_output_at - start
    seq = torch.cat([input_ids, torch.tensor([out], device=input_ids.device)], dim=1)
    k = draft_tokens
    # 2. Rounds: propose, verify in one target pass, keep the accepted prefix plus one target token.
    while len(out) < max_new_tokens and out[-1] != eos_token_id:
        budget = min(k, max_new_tokens - len(out) - 1)  # never draft past the length limit
        t0 = clock()
        proposal, q = drafter.propose(seq, budget, do_sample, temperature) if budget > 0 else ([], None)
        sync()
        t1 = clock()
        feed = torch.cat([seq[:, _cached(cache):], torch.tensor([proposal], dtype=seq.dtype, device=seq.device)],
                         dim=1)
        logits = target(input_ids=feed, cache=cache, use_cache=True).logits[0, -(len(proposal) + 1):]
        kept = _accept_greedy(logits, proposal) if not do_sample else _accept_sampled(logits, proposal, q, temperature)
        sync()
        t2 = clock()
        # 3. Book-keeping: per-position acceptance, clocks, draft length schedule.
        accepted = len(kept) - 1
        stats.rounds += 1
        stats.target_passes += 1
        stats.draft_s += t1 - t0
        stats.target_s += t2 - t1
        _grow(stats.proposed_by_position, len(proposal))
        _grow(stats.accepted_by_position, accepted)
        if accepted < len(proposal):
            stats.rejections += 1
        if schedule == "heuristic_transient" and proposal:
            k = k + 2 if accepted == len(proposal) else max(1, k - 1)
        # 4. Emit, stop at end-of-sequence, and roll both caches back to the kept tokens.
        if eos_token_id is not None and eos_token_id in kept:
            kept = kept[: kept.index(eos_token_id) + 1]
        out.extend(kept)
        seq = torch.cat([seq, torch.tensor([kept], dtype=seq.dtype, device=seq.device)], dim=1)
        _crop(cache, seq.shape[1] - 1)
        drafter.rollback(seq.shape[1] - 1)
    stats.draft_passes = drafter.passes
    out = out[:max_new_tokens]
    stats.new_tokens = len(out)
    return out, stats


def _accept_greedy(logits: torch.Tensor, proposal: list[int]) -> list[int]:
    """The agreeing prefix of the proposal, then the target's own next token."""
    best = logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(proposal) and best[n] == proposal[n]:
        n += 1
    return proposal[:n] + [best[n]]


def _accept_sampled(logits: torch.Tensor, proposal: list[int], q: torch.Tensor | None,
                    temperature: float) -> list[int]:
    """Leviathan et al.'s rule; ``q`` None means a deterministic (one-hot) proposal."""
    p = torch.softmax(logits.float() / temperature, dim=-1)  # (len(proposal) + 1, V)
    kept: list[int] = []
    for j, token in enumerate(proposal):
        q_j = q[j] if q is not None else torch.nn.functional.one_hot(torch.tensor(token), p.shape[-1]).to(p)
        if float(torch.rand(())) < min(1.0, float(p[j, token] / q_j[token])):
            kept.append(token)
            continue
        residual = torch.clamp(p[j] - q_j, min=0.0)
        total = float(residual.sum())
        kept.append(int(torch.multinomial(residual / total if total > 0 else p[j], 1)))
        return kept
    kept.append(int(torch.multinomial(p[len(proposal)], 1)))  # all accepted: a bonus token
    return kept


def _cached(cache: DynamicCache | None) -> int:
    return 0 if cache is None else cache.get_seq_length()


def _crop(cache: DynamicCache | None, length: int) -> None:
    """Cut the cache back to its first ``length`` positions (no-op when it is not longer)."""
    extra = _cached(cache) - length
    if extra > 0:
        cache.crop(-extra)


def _grow(counts: list[int], upto: int) -> None:
    """Add one to counts[0:upto], extending the list as needed."""
    while len(counts) < upto:
        counts.append(0)
    for j in range(upto):
        counts[j] += 1


def theoretical_speedup(acceptance_rate: float, draft_tokens: float, cost_ratio: float) -> float:
    """Leviathan et al. eq. 1: expected walltime improvement, (1 - a^(g+1)) / ((1 - a)(g c + 1)).

    Example:
        >>> round(theoretical_speedup(0.8, 4, 0.1), 3)
        2.401
    """
    a, g, c = acceptance_rate, draft_tokens, cost_ratio
    expected_tokens = g + 1 if a >= 1.0 else (1 - a ** (g + 1)) / (1 - a)
    return expected_tokens / (g * c + 1)
