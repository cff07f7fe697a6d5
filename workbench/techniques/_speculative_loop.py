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

Theory (:func:`theoretical_speedup`): a round yields ``(1 - a^(g+1)) / (1 - a)`` tokens on average
(acceptance rate a, g tokens drafted) and costs ``g c + v`` one-token target steps, where c is the
draft's time per proposed token and v the time of the target's (g+1)-token verification pass, both
over one plain one-token step. The paper takes v = 1; on a CPU a 5-token pass costs clearly more than
a 1-token one, so :func:`measure_step_costs` times both (untimed, before the run) and the prediction
uses the measured ratio.

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
import statistics
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
    loop_s: float = 0.0  # seconds of the whole call: prefill, rounds and the book-keeping between clocks
    new_tokens: int = 0
    first_output_at: float | None = None  # clock when the first new token existed

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------------------------
# Drafters: each proposes tokens after ``seq`` and keeps its own state in step with the kept tokens


class ModelDrafter:
    """A smaller causal LM of the same vocabulary, with its own KV cache.

    With ``vocab`` (1-D ids, FR-Spec style) the draft scores only those tokens: its hidden state times
    the matching rows of its LM head, a fraction of a full head's cost; proposals stay full-vocabulary
    ids (and, when sampling, q is zero outside ``vocab``), so verification by the target is unchanged.
    Only right for a bias-free linear LM head (what :mod:`workbench.models.draft` builds).
    """

    source = "draft model"

    def __init__(self, model: Any, confidence_threshold: float = 0.0, vocab: torch.Tensor | None = None,
                 head_weight: torch.Tensor | None = None) -> None:
        self.model = model
        self.confidence_threshold = confidence_threshold  # stop drafting below this probability
        self.passes = 0
        self.cache: DynamicCache | None = None
        self.vocab = None if vocab is None else vocab.to(model.device)  # (N,) proposable ids, None: all
        # (V, H) full LM head to take rows from: the model's own unless given (a quantized copy's is packed)
        full = head_weight if head_weight is not None or vocab is None else model.get_output_embeddings().weight
        self.vocab_size = None if full is None else full.shape[0]
        self.head = None if vocab is None else full.detach()[self.vocab].contiguous()  # (N, H)

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.passes = 0

    def _logits(self, feed: torch.Tensor) -> torch.Tensor:
        """Next-token logits after ``feed`` (1, T): over the full vocabulary, or over ``vocab`` (N,)."""
        if self.head is None:
            return self.model(input_ids=feed, cache=self.cache, use_cache=True).logits[0, -1]
        hidden = self.model.base_model(input_ids=feed, cache=self.cache, use_cache=True).last_hidden_state
        return self.head @ hidden[0, -1]

    def propose(self, seq: torch.Tensor, k: int, sample: bool, temperature: float
                ) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` tokens and, when sampling, their draft distributions q (k, V)."""
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        feed = seq[:, _cached(self.cache):]  # everything the cache has not seen yet
        for _ in range(k):
            logits = self._logits(feed)
            self.passes += 1
            probs = torch.softmax(logits.float() / temperature, dim=-1) if sample else None
            pick = int(torch.multinomial(probs, 1)) if sample else int(logits.argmax())
            token = pick if self.vocab is None else int(self.vocab[pick])
            tokens.append(token)
            if sample:
                dists.append(probs if self.vocab is None else
                             torch.zeros(self.vocab_size, device=probs.device).index_copy_(0, self.vocab, probs))
            if self.confidence_threshold > 0:
                confidence = probs[pick] if sample else torch.softmax(logits.float(), dim=-1)[pick]
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
    sync()
    stats.loop_s = clock() - start
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


def theoretical_speedup(acceptance_rate: float, draft_tokens: float, cost_ratio: float,
                        verify_cost_ratio: float = 1.0) -> float:
    """Expected speedup of decoding: tokens per round over the round's cost in one-token target steps.

    ``(1 - a^(g+1)) / ((1 - a)(g c + v))``: acceptance rate a, g tokens drafted per round, c the
    draft's time per proposed token and v the time of the target's (g+1)-token verification pass, both
    relative to one plain one-token target step. With v = 1 this is Leviathan et al.'s eq. 1; prefill
    and the loop's book-keeping are left out.

    Example:
        >>> round(theoretical_speedup(0.8, 4, 0.1), 3)  # the paper's v = 1
        2.401
        >>> # a 5-token verification pass costs 70 ms where a one-token step costs 52 ms
        >>> round(theoretical_speedup(0.8, 4, 0.1, verify_cost_ratio=70 / 52), 3)
        1.925
    """
    a, g, c, v = acceptance_rate, draft_tokens, cost_ratio, verify_cost_ratio
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance_rate={a!r} must be between 0 and 1")
    if g < 0 or c < 0 or v <= 0:
        raise ValueError(f"draft_tokens={g!r} and cost_ratio={c!r} must be >= 0 and verify_cost_ratio={v!r} > 0")
    return expected_tokens_per_round(a, g) / (g * c + v)


def required_acceptance(speedup: float, draft_tokens: float, cost_ratio: float,
                        verify_cost_ratio: float = 1.0) -> float | None:
    """The acceptance rate a at which :func:`theoretical_speedup` reaches ``speedup``; None if even a = 1
    falls short (the draft or the verification pass costs too much for that speedup at this length).

    Example:
        >>> round(required_acceptance(1.3, 4, 0.05, verify_cost_ratio=1.71), 3)
        0.641
        >>> required_acceptance(3.0, 1, 0.5) is None  # at most 2 tokens per round for 1.5 steps
        True
    """
    if theoretical_speedup(1.0, draft_tokens, cost_ratio, verify_cost_ratio) < speedup:
        return None
    low, high = 0.0, 1.0  # the speedup grows with a: bisect
    for _ in range(60):
        mid = (low + high) / 2
        if theoretical_speedup(mid, draft_tokens, cost_ratio, verify_cost_ratio) < speedup:
            low = mid
        else:
            high = mid
    return high


def expected_tokens_per_round(acceptance_rate: float, draft_tokens: float) -> float:
    """Tokens one round yields when each proposal is accepted independently with probability a:
    ``(1 - a^(g+1)) / (1 - a)`` (accepted prefix plus the target's own token), g + 1 when a = 1.

    Example:
        >>> expected_tokens_per_round(0.5, 2)
        1.75
    """
    a, g = acceptance_rate, draft_tokens
    return g + 1 if a >= 1.0 else (1 - a ** (g + 1)) / (1 - a)


@dataclass(frozen=True)
class StepCosts:
    """What one target step costs here, measured by :func:`measure_step_costs` (medians, seconds)."""

    one_token_step_s: float  # a one-token decode step with a KV cache (what plain decoding pays per token)
    verify_pass_s: float  # one pass over ``verify_tokens`` tokens with the same cache (a verification)
    verify_tokens: int  # tokens in the verification pass: draft length + 1
    context_tokens: int  # tokens already in the cache when both were timed
    repeats: int  # timed passes of each kind (interleaved, after warm-up)

    @property
    def verify_cost_ratio(self) -> float:
        """v: the verification pass over a one-token step (1.0 is the paper's assumption)."""
        return self.verify_pass_s / self.one_token_step_s

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "verify_cost_ratio": self.verify_cost_ratio}


def measure_step_costs(model: Any, input_ids: torch.Tensor, verify_tokens: int, repeats: int = 21,
                       warmup: int = 5, sync: Callable[[], None] = lambda: None) -> StepCosts:
    """Time a one-token step and a ``verify_tokens``-token pass of ``model`` after ``input_ids`` (1, T).

    The prompt is prefilled once into a KV cache; then one-token and verification passes alternate
    (so drift hits both alike), each followed by the argmax over its positions as the loop does and by
    a cache rollback, so every pass sees the same context. Returns the medians.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=16, n_layer=2, n_head=2)).eval()
        >>> costs = measure_step_costs(model, torch.tensor([[1, 2, 3]]), verify_tokens=5, repeats=3)
        >>> costs.verify_tokens, costs.context_tokens, costs.one_token_step_s > 0
        (5, 3, True)
    """
    if input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"measure_step_costs needs one non-empty prompt (1, T), got {tuple(input_ids.shape)}")
    if verify_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"verify_tokens={verify_tokens}, repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    clock = time.perf_counter
    times: dict[int, list[float]] = {1: [], verify_tokens: []}
    with torch.inference_mode():
        # 1. Prefill once; every timed pass starts from this cache.
        cache = DynamicCache()
        model(input_ids=input_ids, cache=cache, use_cache=True)
        context = cache.get_seq_length()
        feeds = {n: input_ids[:, -1:].repeat(1, n) for n in times}
        # 2. Alternate the two kinds of pass; the first ``warmup`` rounds are not kept.
        for rep in range(warmup + repeats):
            for n, feed in feeds.items():
                sync()
                start = clock()
                model(input_ids=feed, cache=cache, use_cache=True).logits[0, -n:].argmax(dim=-1).tolist()
                sync()
                if rep >= warmup:
                    times[n].append(clock() - start)
                _crop(cache, context)
    return StepCosts(one_token_step_s=statistics.median(times[1]),
                     verify_pass_s=statistics.median(times[verify_tokens]), verify_tokens=verify_tokens,
                     context_tokens=context, repeats=repeats)
