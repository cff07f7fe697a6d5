"""The offline tiny model zoo: six small real models trained locally, no network needed.

| name               | kind        | what it is                                                        |
|--------------------|-------------|-------------------------------------------------------------------|
| ``code-target``    | causal_lm   | deep GPT-2 on stdlib code; the slow model speculative decoding speeds up |
| ``code-draft``     | causal_lm   | 1-layer GPT-2, same tokenizer, distilled from the target          |
| ``code-wide``      | causal_lm   | 2-layer x 512 GPT-2, same tokenizer: matmul-bound, int8 pays here |
| ``code-classifier``| classifier  | BERT: code snippet -> stdlib package area (early exit has layers) |
| ``digits-diffusion``| diffusion  | class-conditional UNet2DModel + DDIM, 8x8 digits                   |
| ``digits-judge``   | judge       | CNN that says which digit an 8x8 image shows                      |

Three more are built only when named (``workbench zoo build --extra``, or ``build(names=[...])``): siblings
that give the meta-learner's seed data more than one model of each shape, so that leaving one model out
still leaves a similar one to learn from:

| name                    | kind       | what it is                                                    |
|-------------------------|------------|---------------------------------------------------------------|
| ``code-tall``           | causal_lm  | 12-layer x 96 GPT-2 (deep and narrow, like ``code-target``)    |
| ``code-mid``            | causal_lm  | 4-layer x 320 GPT-2 (between ``code-target`` and ``code-wide``) |
| ``code-classifier-deep``| classifier | 8-layer x 48 BERT snippet classifier                            |

Each model lives in ``<root>/<name>/`` with the files its library expects (``save_pretrained``,
safetensors only) and ``workbench_zoo.json`` (a :class:`ZooRecord`). Language models and the
classifier load with ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` and
``AutoTokenizer``; the diffusion folder with :meth:`DigitsPipeline.from_pretrained`; the judge with
:meth:`DigitJudge.from_pretrained`.

Example:
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from workbench.models import zoo
    >>> records = zoo.build(quick=True)  # doctest: +SKIP
    >>> path = zoo.model_dir("code-target")  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    >>> tokenizer = AutoTokenizer.from_pretrained(path)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench import datasets, paths

METADATA_FILE = "workbench_zoo.json"
FORMAT_VERSION = 1  # bump when a recipe changes so old builds count as missing
DEFAULT_SEED = 0


class ZooError(RuntimeError):
    """A zoo model is unknown or not built; the message is one line naming the fix."""


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: what can be built."""

    name: str
    kind: str  # "causal_lm" | "classifier" | "diffusion" | "judge"
    description: str
    depends_on: tuple[str, ...] = ()  # built first; a rebuilt dependency makes this stale
    default: bool = True  # built by ``build()`` without names; False: only when named (seed siblings)


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("code-target", "causal_lm",
                 "Deep narrow GPT-2 on Python stdlib code; the slow target for speculative decoding"),
        ZooModel("code-draft", "causal_lm",
                 "1-layer GPT-2 sharing code-target's tokenizer, distilled from it; the fast draft",
                 depends_on=("code-target",)),
        ZooModel("code-wide", "causal_lm",
                 "Wide shallow GPT-2 (2 layers x 512) on stdlib code; matmul-bound, where int8 quantization pays"),
        ZooModel("code-classifier", "classifier",
                 "BERT classifier: a few lines of stdlib code -> which package area they come from"),
        ZooModel("digits-judge", "judge", "CNN classifier for 8x8 digits; judges generated digits"),
        ZooModel("digits-diffusion", "diffusion",
                 "Class-conditional UNet2DModel + DDIM scheduler generating 8x8 digits",
                 depends_on=("digits-judge",)),
        ZooModel("code-tall", "causal_lm", "Deep narrow GPT-2 (12 layers x 96) on stdlib code; a sibling of "
                 "code-target for the meta-learner's seed data", default=False),
        ZooModel("code-mid", "causal_lm", "GPT-2 of 4 layers x 320 on stdlib code; between code-target and "
                 "code-wide, for the meta-learner's seed data", default=False),
        ZooModel("code-classifier-deep", "classifier", "Deeper narrower BERT snippet classifier (8 x 48); a sibling "
                 "of code-classifier for the meta-learner's seed data", default=False),
    )
}
ZOO_NAMES: tuple[str, ...] = tuple(MODELS)
DEFAULT_NAMES: tuple[str, ...] = tuple(name for name, m in MODELS.items() if m.default)
EXTRA_NAMES: tuple[str, ...] = tuple(name for name, m in MODELS.items() if not m.default)


@dataclass(frozen=True)
class ZooRecord:
    """What ``workbench_zoo.json`` says about one built model.

    Attributes:
        name, kind, description: see :data:`MODELS`.
        path: the model folder (absolute).
        quick: built with the quick (tiny, few-step) recipe.
        seed: seed of weights init, data split and data order.
        data: what it was trained on.
        steps: optimizer steps.
        final_loss: training loss, mean of the last steps.
        train_seconds: wall time of the build, including evaluation.
        parameter_count: number of parameters.
        bytes: size of the folder on disk.
        metrics: held-out figures (accuracy, loss, agreement, ms per token ...).
        config: architecture and recipe.
        versions: library versions used.
        built_at: ISO-8601 UTC time the build finished; identifies the build.
        depends_on: ``{dependency name: its built_at}`` at the time of this build.
    """

    name: str
    kind: str
    path: str
    quick: bool
    seed: int
    description: str
    data: str
    steps: int
    final_loss: float
    train_seconds: float
    parameter_count: int
    bytes: int
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    built_at: str = ""
    depends_on: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ZooRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class TokenizerRecipe:
    """The byte-level BPE tokenizer shared by the code models."""

    vocab_size: int = 1024  # larger = fewer tokens per text, bigger embedding / LM head
    corpus_chars: int = 2_000_000  # training-split characters (tokenizer and LM training data)


@dataclass(frozen=True)
class LMRecipe:
    """A GPT-2 causal LM and how it is trained.

    Depth growth: when ``grow_from`` is set, a ``grow_from``-layer model is trained for
    ``steps`` steps, then each layer is followed by ``n_layer / grow_from - 1`` copies whose output
    projections are zero (so the grown model computes exactly the same function), and the whole
    deep model is trained ``grown_steps`` more steps. Deep models learn slowly from scratch; this
    gives a genuinely deep (slow per token) target at the training cost of a shallow one.
    """

    n_layer: int  # depth; per-token decode time on CPU grows ~linearly with it
    n_embd: int  # width
    n_head: int
    steps: int  # optimizer steps (before growth when grow_from is set)
    batch_size: int = 16  # windows per step
    seq_len: int = 64  # training window; short windows = cheap steps, and steps matter most here
    n_positions: int = 512  # longest prompt + output; windows sit at random offsets so all are trained
    eval_len: int = 256  # held-out blocks (contiguous from position 0, like a real prompt)
    lr: float = 2e-3  # AdamW peak, cosine decay
    warmup: int = 50
    grow_from: int | None = None  # train this many layers first, then grow to n_layer
    grown_steps: int = 0  # steps after growth
    grown_lr: float = 2e-4  # AdamW peak after growth (low: the grown model starts where the shallow one ended)
    distill_steps: int = 0  # last steps trained on the target's distribution (draft only)
    distill_weight: float = 0.8  # weight of KL(target || draft) vs cross-entropy when distilling


@dataclass(frozen=True)
class ClassifierRecipe:
    """The BERT snippet classifier."""

    num_layers: int = 4  # early-exit candidates; each costs about the same
    hidden: int = 64  # narrow: trained from scratch on ~24k snippets, wider models overfit
    heads: int = 2
    intermediate: int = 256
    max_length: int = 64  # tokens per snippet; ~10% of snippets are truncated
    epochs: int = 1  # one pass over many distinct snippets beats several over fewer
    batch_size: int = 32
    lr: float = 1e-3  # AdamW peak; 2e-3 is faster but swings several points between seeds
    train_snippets: int = 24000  # distinct windows of the train files; a few thousand overfit
    test_snippets: int = 1200
    vocab_size: int | None = 4096  # its own BPE on the same corpus (None: the LMs' tokenizer)


def _recipes(quick: bool) -> dict[str, Any]:
    """Every recipe for one build flavour. Quick recipes only exercise the code paths."""
    from workbench.models.digits import DiffusionRecipe, JudgeRecipe

    if quick:
        return {
            "tokenizer": TokenizerRecipe(vocab_size=384, corpus_chars=150_000),
            "code-target": LMRecipe(n_layer=4, n_embd=32, n_head=2, steps=12, batch_size=8, grow_from=2,
                                    grown_steps=4, warmup=3, eval_len=64),
            "code-draft": LMRecipe(n_layer=1, n_embd=16, n_head=2, steps=12, batch_size=8, distill_steps=4,
                                   warmup=3, eval_len=64),
            "code-wide": LMRecipe(n_layer=1, n_embd=32, n_head=2, steps=6, batch_size=8, warmup=2, eval_len=64),
            "code-classifier": ClassifierRecipe(num_layers=4, hidden=32, heads=2, intermediate=64, max_length=32,
                                                epochs=1, train_snippets=240, test_snippets=60, vocab_size=512),
            "digits-judge": JudgeRecipe(channels=(8, 16), hidden=32, epochs=2),
            "digits-diffusion": DiffusionRecipe(block_out_channels=(16, 32), steps=15, batch_size=32),
            "code-tall": LMRecipe(n_layer=4, n_embd=16, n_head=2, steps=8, batch_size=8, grow_from=2,
                                  grown_steps=2, warmup=2, eval_len=64),
            "code-mid": LMRecipe(n_layer=2, n_embd=32, n_head=2, steps=6, batch_size=8, warmup=2, eval_len=64),
            "code-classifier-deep": ClassifierRecipe(num_layers=4, hidden=16, heads=2, intermediate=32,
                                                     max_length=32, epochs=1, train_snippets=240,
                                                     test_snippets=60, vocab_size=512),
        }
    return {
        "tokenizer": TokenizerRecipe(),
        "code-target": LMRecipe(n_layer=24, n_embd=128, n_head=4, steps=1300, grow_from=4, grown_steps=40),
        "code-draft": LMRecipe(n_layer=1, n_embd=64, n_head=2, steps=1200, lr=3e-3, distill_steps=500,
                               distill_weight=0.9),
        "code-wide": LMRecipe(n_layer=2, n_embd=512, n_head=8, steps=240, batch_size=8, lr=1e-3, warmup=20),
        "code-classifier": ClassifierRecipe(),
        "digits-judge": JudgeRecipe(),
        "digits-diffusion": DiffusionRecipe(steps=600, batch_size=96),
        "code-tall": LMRecipe(n_layer=12, n_embd=96, n_head=4, steps=800, grow_from=3, grown_steps=40),
        "code-mid": LMRecipe(n_layer=4, n_embd=320, n_head=5, steps=200, batch_size=8, lr=1e-3, warmup=20),
        "code-classifier-deep": ClassifierRecipe(num_layers=8, hidden=48, heads=2, intermediate=192,
                                                 train_snippets=16000),
    }


# --------------------------------------------------------------------------- public API


def list_models(root: Path | str | None = None) -> list[ZooRecord]:
    """Records of the built zoo models under ``root`` (default :func:`paths.zoo_dir`), in zoo order."""
    root = _root(root)
    return [rec for name in ZOO_NAMES if (rec := _read_record(root / name)) is not None]


def record(name: str, root: Path | str | None = None) -> ZooRecord:
    """The :class:`ZooRecord` of a built model; :class:`ZooError` if unknown or not built."""
    return _read_record(model_dir(name, root))  # type: ignore[return-value]


def model_dir(name: str, root: Path | str | None = None) -> Path:
    """The folder of a built zoo model, ready for ``from_pretrained``.

    Raises:
        ZooError: the name is not a zoo model, or the model is not built yet.
    """
    if name not in MODELS:
        raise ZooError(f"unknown zoo model {name!r}; valid names: {', '.join(ZOO_NAMES)}")
    path = _root(root) / name
    if _read_record(path) is None:
        raise ZooError(
            f"zoo model {name!r} is not built in {path.parent}; run `workbench zoo build` "
            f"(or `workbench zoo build --quick` for tiny test models)"
        )
    return path


def build(
    quick: bool = False,
    root: Path | str | None = None,
    names: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
    seed: int = DEFAULT_SEED,
) -> list[ZooRecord]:
    """Train the zoo models that are missing or stale; keep the others.

    A model is kept when it was built with the same seed and recipe version, its dependencies are
    unchanged, and it is of the requested flavour or full-size: a full model also serves a quick
    request (and a model whose dependency is a kept full model is then built full-size, as it must
    share its tokenizer or judge); a quick model is replaced by a full request. Each model is
    trained into a hidden temporary folder and renamed into place when complete, so an
    interrupted build never leaves a half model that looks finished.

    Args:
        quick: tiny configs and few steps (seconds; only exercises the code paths).
        root: zoo folder; default :func:`workbench.paths.zoo_dir` (respects ``WORKBENCH_DATA``).
        names: models to build (their dependencies come along); default :data:`DEFAULT_NAMES` (the
            seed siblings in :data:`EXTRA_NAMES` only when named).
        force: rebuild the named models even when up to date.
        progress: show tqdm progress bars.
        seed: weight init, data split and data order.

    Returns:
        The records of the requested models (and dependencies), in build order.
    """
    # 1. Check inputs before any long work
    wanted = list(DEFAULT_NAMES) if names is None else list(names)
    unknown = [n for n in wanted if n not in MODELS]
    if unknown:
        raise ZooError(f"unknown zoo model(s) {unknown}; valid names: {', '.join(ZOO_NAMES)}")
    root = _root(root)
    root.mkdir(parents=True, exist_ok=True)
    order = _with_dependencies(wanted)
    _remove_abandoned_folders(root)

    # 2. Build in dependency order; a model built on a kept full-size dependency is built full-size
    contexts = {q: _BuildContext(quick=q, seed=seed, root=root, progress=progress, recipes=_recipes(q))
                for q in (True, False)}
    records: dict[str, ZooRecord] = {}
    with _library_progress_bars(enabled=False):  # our own bars only; no "Loading weights" noise
        for name in order:
            current = _read_record(root / name)
            deps = {d: records[d].built_at for d in MODELS[name].depends_on}
            if current is not None and not (force and name in wanted) and _up_to_date(current, quick, seed, deps):
                records[name] = current
                continue
            flavour = quick and all(records[d].quick for d in deps)
            records[name] = _build_one(name, contexts[flavour], deps)
    return [records[n] for n in order]


# --------------------------------------------------------------------------- build machinery


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


def _root(root: Path | str | None) -> Path:
    return Path(root).expanduser() if root is not None else paths.zoo_dir()


def _read_record(path: Path) -> ZooRecord | None:
    meta = path / METADATA_FILE
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
        return ZooRecord.from_dict({**data, "path": str(path.resolve())})
    except (json.JSONDecodeError, TypeError) as exc:
        raise ZooError(f"{meta} is unreadable ({exc}); rebuild with `workbench zoo build --force`") from exc


def _with_dependencies(names: list[str]) -> list[str]:
    needed: set[str] = set()

    def add(name: str) -> None:
        if name not in needed:
            needed.add(name)
            for dep in MODELS[name].depends_on:
                add(dep)

    for n in names:
        add(n)
    return [n for n in ZOO_NAMES if n in needed]  # ZOO_NAMES lists dependencies first


def _up_to_date(rec: ZooRecord, quick: bool, seed: int, deps: dict[str, str]) -> bool:
    flavour_ok = rec.quick == quick or (quick and not rec.quick)
    return flavour_ok and rec.seed == seed and rec.format_version == FORMAT_VERSION and rec.depends_on == deps


def _build_one(name: str, ctx: _BuildContext, deps: dict[str, str]) -> ZooRecord:
    """Train ``name`` into a temporary folder, write its record, then move it into place."""
    start = time.perf_counter()
    final = ctx.root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{name}-{os.getpid()}-", dir=ctx.root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished model is as readable as its files
    try:
        torch.manual_seed(ctx.seed)
        trained = _TRAINERS[name](ctx, tmp)
        rec = ZooRecord(
            name=name, kind=MODELS[name].kind, path=str(final.resolve()), quick=ctx.quick, seed=ctx.seed,
            description=MODELS[name].description, data=trained.data, steps=trained.steps,
            final_loss=round(float(trained.final_loss), 5), train_seconds=round(time.perf_counter() - start, 2),
            parameter_count=int(trained.parameter_count), bytes=_folder_bytes(tmp),
            metrics={k: round(float(v), 5) for k, v in trained.metrics.items()}, config=trained.config,
            versions=_versions(), built_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            depends_on=deps,
        )
        (tmp / METADATA_FILE).write_text(json.dumps(rec.to_dict(), indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, final)
        return rec
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned_folders(root: Path) -> None:
    """Delete temporary folders left by builds that were killed (their process no longer exists)."""
    for path in [*root.glob(".building-*"), *root.glob(".old-*")]:
        parts = path.name.split("-")  # .building-<name>-<pid>-<random>; mkdtemp's random has no "-"
        pid = int(parts[-2]) if len(parts) >= 4 and parts[-2].isdigit() else None
        if pid is not None and pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _move_into_place(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-{os.getpid()}-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _library_progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' and diffusers' own progress bars on or off, restoring them after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(m, m.is_progress_bar_enabled()) for m in (transformers_logging, diffusers_logging)]
    for module, _ in saved:
        module.enable_progress_bar() if enabled else module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was in saved:
            module.enable_progress_bar() if was else module.disable_progress_bar()


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _versions() -> dict[str, str]:
    import diffusers
    import safetensors
    import sklearn
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "diffusers": diffusers.__version__, "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__, "scikit-learn": sklearn.__version__,
    }


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
              progress: bool, teacher=None, distill_from: int | None = None) -> list[float]:
    """AdamW + cosine schedule on random crops; from step ``distill_from`` on, add KL to ``teacher``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=not progress):
        _set_lr(opt, _cosine_lr(step, steps, lr, warmup))
        x, pos = _random_windows(ids, recipe, gen)                           # (B, T), (B, T)
        out = model(input_ids=x, position_ids=pos, labels=x)
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


def _train_classifier(ctx: _BuildContext, out: Path, name: str = "code-classifier") -> _Trained:
    from transformers import BertConfig, BertForSequenceClassification

    # 1. Data: tokenized snippets (train and held-out files)
    recipe: ClassifierRecipe = ctx.recipes[name]
    tokenizer = _classifier_tokenizer(_code_tokenizer(ctx, recipe.vocab_size), recipe.max_length)
    train = datasets.code_snippets("train", n=recipe.train_snippets, seed=ctx.seed)
    test = datasets.code_snippets("test", n=recipe.test_snippets, seed=ctx.seed)

    def encode(items):
        enc = tokenizer([t for t, _ in items], padding="max_length", truncation=True,
                        max_length=recipe.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in items])

    x_train, m_train, y_train = encode(train)
    x_test, m_test, y_test = encode(test)

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
    losses = []
    bar = tqdm(total=steps, desc=name, disable=not ctx.progress)
    for epoch in range(recipe.epochs):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            _set_lr(opt, _cosine_lr(step, steps, recipe.lr, warmup=steps // 10))
            idx = perm[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            loss = model(input_ids=x_train[idx], attention_mask=m_train[idx], labels=y_train[idx]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update()
    bar.close()
    model.eval()

    # 4. Evaluate and save
    with torch.no_grad():
        logits = torch.cat([model(input_ids=x_test[i:i + 128], attention_mask=m_test[i:i + 128]).logits
                            for i in range(0, len(test), 128)])
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
}
