"""Every architecture, or a clear refusal before loading.

Tiny random-weight models of eight causal-LM families and five encoder families are saved with
``save_pretrained`` (safetensors) into folders with the quick zoo's tokenizer, exactly as a user's
folder would be, and every registered technique that applies to their kind runs its contract on them:
either ``check()`` refuses the pair at plan time (from the files' facts, nothing loaded) with a line that
names the architecture, or the run works: prepare, run and report on the shared loaded model, lossless
techniques token for token equal to the baseline, and the shared model (weights, config, generation
config) unchanged after ``release()``. Expectations come from ``check()`` itself, so a technique that
learns a new family is picked up here without editing this file.

Also: the facts read from each folder, KV-cache rollback where the speculative loop rolls back, and one
end-to-end run per family through the runner (``plan`` -> ``execute``, its own lossless check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as hf
from transformers import AutoTokenizer, DynamicCache

from workbench import quality, runner, techniques
from workbench.errors import NotApplicableError
from workbench.models.facts import read_facts
from workbench.models.loading import LoadedModel, load_model
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques.base import Outcome, TechniqueReport
from workbench.techniques.baseline import Baseline
from workbench.techniques._speculative_loop import LookupDrafter, ModelDrafter, _crop, speculative_generate

HIDDEN, TARGET_LAYERS, DRAFT_LAYERS, ENCODER_LAYERS, LABELS = 32, 3, 1, 3, 6
SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}  # the zoo tokenizer's <|endoftext|>, <pad>
MAX_NEW_TOKENS = 6


def _decoder(**extra: Any) -> dict[str, Any]:
    """The settings rotary decoders share: 4 heads (2 key/value heads where grouped), 256 positions."""
    return {"hidden_size": HIDDEN, "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 256,
            **SPECIAL, **extra}


# family -> (model class, config for (vocab_size, layers)); every config is tiny and built offline
LM_FAMILIES = {
    "gpt2": (hf.GPT2LMHeadModel, lambda v, n: hf.GPT2Config(vocab_size=v, n_layer=n, n_embd=HIDDEN, n_head=4,
                                                             n_positions=256, **SPECIAL)),
    "llama": (hf.LlamaForCausalLM, lambda v, n: hf.LlamaConfig(vocab_size=v, num_hidden_layers=n,
                                                                **_decoder(num_key_value_heads=2))),
    "qwen2": (hf.Qwen2ForCausalLM, lambda v, n: hf.Qwen2Config(vocab_size=v, num_hidden_layers=n,
                                                                **_decoder(num_key_value_heads=2))),
    "mistral": (hf.MistralForCausalLM, lambda v, n: hf.MistralConfig(vocab_size=v, num_hidden_layers=n,
                                                                      **_decoder(num_key_value_heads=2))),
    "gpt_neox": (hf.GPTNeoXForCausalLM, lambda v, n: hf.GPTNeoXConfig(vocab_size=v, num_hidden_layers=n,
                                                                       **_decoder())),
    "opt": (hf.OPTForCausalLM, lambda v, n: hf.OPTConfig(vocab_size=v, num_hidden_layers=n, hidden_size=HIDDEN,
                                                          num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=HIDDEN,
                                                          max_position_embeddings=256, **SPECIAL)),
    "phi3": (hf.Phi3ForCausalLM, lambda v, n: hf.Phi3Config(vocab_size=v, num_hidden_layers=n,
                                                             **_decoder(num_key_value_heads=2))),
    "gemma": (hf.GemmaForCausalLM, lambda v, n: hf.GemmaConfig(vocab_size=v, num_hidden_layers=n,
                                                                **_decoder(num_key_value_heads=2, head_dim=8))),
}

_ENCODER = {"hidden_size": HIDDEN, "num_hidden_layers": ENCODER_LAYERS, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 66, "pad_token_id": 1, "num_labels": LABELS}
ENCODER_FAMILIES = {
    "bert": (hf.BertForSequenceClassification, lambda v: hf.BertConfig(vocab_size=v, **_ENCODER)),
    "distilbert": (hf.DistilBertForSequenceClassification,
                   lambda v: hf.DistilBertConfig(vocab_size=v, dim=HIDDEN, n_layers=ENCODER_LAYERS, n_heads=4,
                                                 hidden_dim=64, max_position_embeddings=66, pad_token_id=1,
                                                 num_labels=LABELS)),
    # 66 rows hold 64 positions: RoBERTa counts them from padding_idx + 1
    "roberta": (hf.RobertaForSequenceClassification, lambda v: hf.RobertaConfig(vocab_size=v, type_vocab_size=1,
                                                                                 **_ENCODER)),
    "albert": (hf.AlbertForSequenceClassification, lambda v: hf.AlbertConfig(vocab_size=v, embedding_size=16,
                                                                              **_ENCODER)),
    "electra": (hf.ElectraForSequenceClassification, lambda v: hf.ElectraConfig(vocab_size=v, embedding_size=16,
                                                                                 **_ENCODER)),
}

# What each kind is run with: case id -> (technique, params, needs the family's draft model). Cheap settings.
_EARLY_EXIT = {"thresholds": "0.5,0.9", "curve_repeats": 1, "train_steps": 20, "quality_tokens": 64}
_QUANT = {"quality_tokens": 64}
LM_CASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "baseline": ("baseline", {}, False),
    "speculative-lookup": ("speculative", {"prompt_lookup_num_tokens": 3}, False),
    "speculative-self": ("speculative", {"draft_layers": 1, "num_assistant_tokens": 3}, False),
    "speculative-draft": ("speculative", {"num_assistant_tokens": 3}, True),
    "speculative-hf-lookup": ("speculative", {"implementation": "hf", "prompt_lookup_num_tokens": 3}, False),
    "speculative-hf-self": ("speculative", {"implementation": "hf", "draft_layers": 1}, False),
    "speculative-hf-draft": ("speculative", {"implementation": "hf", "num_assistant_tokens": 3}, True),
    "early_exit": ("early_exit", _EARLY_EXIT, False),
    "int8-dynamic": ("quantization", {"scheme": "int8-dynamic", **_QUANT}, False),
    "bf16": ("quantization", {"scheme": "bf16", **_QUANT}, False),
    "structured_sparsity": ("structured_sparsity", {"groups": 4, "router_steps": 10, "quality_tokens": 64}, False),
    "ode_steps": ("ode_steps", {"quality_tokens": 64}, False),  # shared layers only: every family refused
    "pruning": ("pruning", {"heads_fraction": 0.5, "neurons_fraction": 0.25, "recovery_steps": 1, **_QUANT}, False),
}
ENCODER_CASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "baseline": ("baseline", {}, False),
    "early_exit": ("early_exit", _EARLY_EXIT, False),
    "int8-dynamic": ("quantization", {"scheme": "int8-dynamic", **_QUANT}, False),
    "bf16": ("quantization", {"scheme": "bf16", **_QUANT}, False),
    "structured_sparsity": ("structured_sparsity", {"groups": 4, "router_steps": 10}, False),
    "ode_steps": ("ode_steps", {"quality_tokens": 64}, False),  # ALBERT runs (3 -> 1 step); others refused
    "pruning": ("pruning", {"heads_fraction": 0.5, "neurons_fraction": 0.25, "recovery_steps": 1}, False),
}

def _params(families: dict[str, Any], cases: dict[str, Any]) -> list[Any]:
    out = []
    for family in families:
        for case in cases:
            out.append(pytest.param(family, case, id=f"{family}-{case}"))
    return out


# ----------------------------------------------------------------------------------------------
# Fixtures: every folder built once per module, every model loaded once and shared


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and on a shared machine OpenMP spinning against other
    processes makes each of their many small ops slow; the runner chooses its own threads per run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(quick_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(family, role) -> a save_pretrained folder; roles: target and draft (LMs), encoder."""
    root = tmp_path_factory.mktemp("architectures")
    lm_tokenizer = AutoTokenizer.from_pretrained(quick_zoo / "code-target")
    encoder_tokenizer = AutoTokenizer.from_pretrained(quick_zoo / "code-classifier")
    out = {}
    for family, (cls, config) in LM_FAMILIES.items():
        for role, layers in (("target", TARGET_LAYERS), ("draft", DRAFT_LAYERS)):
            torch.manual_seed(0)
            out[family, role] = _save(cls(config(len(lm_tokenizer), layers)), lm_tokenizer, root / f"{family}-{role}")
    for family, (cls, config) in ENCODER_FAMILIES.items():
        torch.manual_seed(0)
        out[family, "encoder"] = _save(cls(config(len(encoder_tokenizer))), encoder_tokenizer, root / family)
    return out


def _save(model: Any, tokenizer: Any, folder: Path) -> Path:
    model.eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(folders):
    """(family, role) -> the model loaded once through the workbench's own loader, shared by every case."""
    cache: dict[tuple[str, str], LoadedModel] = {}

    def get(family: str, role: str) -> LoadedModel:
        if (family, role) not in cache:
            cache[family, role] = load_model(ModelSpec(str(folders[family, role])))
        return cache[family, role]
    return get


@pytest.fixture(scope="module")
def baseline_outputs():
    """(family, role) -> the baseline's outputs per timed batch (the same batches every case builds)."""
    return {}


def _spec(folders, family: str, case: str) -> RunSpec:
    kind_cases, role = (LM_CASES, "target") if family in LM_FAMILIES else (ENCODER_CASES, "encoder")
    name, params, with_draft = kind_cases[case]
    workload = WorkloadSpec("code-prompts" if role == "target" else "code-snippets", max_items=2,
                            max_new_tokens=MAX_NEW_TOKENS)
    draft = ModelSpec(str(folders[family, "draft"])) if with_draft else None
    return RunSpec(ModelSpec(str(folders[family, role])), workload, TechniqueSpec(name, params, draft),
                   repeats=1, warmup=0)


def _snapshot(loaded: LoadedModel | None) -> dict[str, Any] | None:
    if loaded is None:
        return None
    model = loaded.model
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "config": model.config.to_dict(),
            "generation": getattr(getattr(model, "generation_config", None), "to_dict", dict)(),
            "training": model.training}


def _assert_unchanged(loaded: LoadedModel | None, before: dict[str, Any] | None) -> None:
    after = _snapshot(loaded)
    if before is None:
        return
    assert after["config"] == before["config"] and after["generation"] == before["generation"]
    assert after["training"] == before["training"]
    assert after["weights"].keys() == before["weights"].keys()
    changed = [k for k, v in before["weights"].items() if not torch.equal(v, after["weights"][k])]
    assert changed == [], f"release() left tensors changed: {changed[:5]}"


# ----------------------------------------------------------------------------------------------
# The matrix


def test_the_matrix_covers_every_registered_technique_for_each_kind():
    """A technique registered later for causal LMs or classifiers must get a row here."""
    for kind, cases in (("causal_lm", LM_CASES), ("classifier", ENCODER_CASES)):
        applicable = {name for name in techniques.names() if kind in techniques.get(name).applies_to}
        assert {technique for technique, _, _ in cases.values()} == applicable, kind


@pytest.mark.parametrize("family, case", _params(LM_FAMILIES, LM_CASES) + _params(ENCODER_FAMILIES, ENCODER_CASES))
def test_every_technique_works_or_is_refused_naming_the_architecture(folders, models, baseline_outputs, family,
                                                                     case):
    # 1. Plan time: the technique's check() on the folder's facts, before any weight loads.
    spec = _spec(folders, family, case)
    try:
        planned = runner.plan(spec)
    except NotApplicableError as refusal:
        facts = read_facts(spec.model)
        reason = str(refusal)
        assert "\n" not in reason
        assert facts.architecture in reason or facts.family in reason, (
            f"{case} refuses {facts.architecture} without naming it: {reason}")
        return
    # 2. Accepted: the contract on the shared loaded models, as the runner drives it.
    role = "target" if family in LM_FAMILIES else "encoder"
    target = models(family, role)
    draft = models(family, "draft") if spec.technique.draft is not None else None
    before = {"target": _snapshot(target), "draft": _snapshot(draft)}
    trial = runner.build_trial(planned, model=target, draft=draft)
    if (family, role) not in baseline_outputs:
        baseline = Baseline()
        baseline.prepare(trial)
        baseline_outputs[family, role] = [baseline.run(batch).output for batch in trial.batches]
    reference = baseline_outputs[family, role]
    technique = planned.technique
    trial.sampling = technique.sampling()
    try:
        technique.prepare(trial)
        calls = [technique.run(batch) for batch in trial.batches]
        labels = [y for batch in trial.batches for y in (batch.labels or [])]
        outputs = [call.output for call in calls]
        report = technique.report(Outcome(per_call=[call.internals for call in calls], baseline_outputs=reference,
                                          technique_outputs=outputs,
                                          standard_quality=quality.compare(target.kind, reference, outputs, labels)))
    finally:
        technique.release()
    # 3. What it produced: a typed report; a lossless technique equals the baseline token for token.
    assert isinstance(report, TechniqueReport) and report.headline
    assert len(outputs) == len(reference) and all(len(o) == len(r) for o, r in zip(outputs, reference))
    if target.kind == "causal_lm":
        assert all(row and len(row) <= MAX_NEW_TOKENS for batch in outputs for row in batch)
    else:
        assert all(0 <= label < LABELS for batch in outputs for label in batch)
    if report.lossless:
        assert outputs == reference, f"{case} on {target.info['architecture']} is not lossless"
    # 4. No shared model altered once released.
    _assert_unchanged(target, before["target"])
    _assert_unchanged(draft, before["draft"])


@pytest.mark.parametrize("family", [*LM_FAMILIES, *ENCODER_FAMILIES])
def test_facts_describe_each_folder_before_loading(folders, family):
    """What check() decides on: the kind, family, architecture and sizes, read from the files alone."""
    is_lm = family in LM_FAMILIES
    facts = read_facts(ModelSpec(str(folders[family, "target" if is_lm else "encoder"])))
    cls = (LM_FAMILIES if is_lm else ENCODER_FAMILIES)[family][0]
    assert facts.kind == ("causal_lm" if is_lm else "classifier")
    assert facts.family == family and facts.architecture == cls.__name__
    assert facts.layers == (TARGET_LAYERS if is_lm else ENCODER_LAYERS) and facts.hidden_size == HIDDEN
    assert facts.weights == "safetensors" and facts.parameters and facts.tokenizer_digest
    if is_lm:
        draft = read_facts(ModelSpec(str(folders[family, "draft"])))
        assert draft.tokenizer_digest == facts.tokenizer_digest and draft.parameters < facts.parameters


# ----------------------------------------------------------------------------------------------
# KV caches: rolled back exactly where the speculative loop rolls back


class WrongDrafter(LookupDrafter):
    """Proposes tokens the target never picks first (its greedy token plus one), so every round rolls back."""

    def __init__(self, target: Any) -> None:
        super().__init__()
        self.target = target

    def propose(self, seq, k, sample, temperature):
        best = int(self.target(input_ids=seq).logits[0, -1].argmax())
        return [(best + 1 + j) % self.target.config.vocab_size for j in range(k)], None


PROMPT = "def parse_header(self, line):\n    "


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_rollback_leaves_the_caches_as_if_rejected_tokens_never_ran(models, family):
    target, draft = models(family, "target"), models(family, "draft")
    ids = target.tokenizer(PROMPT, return_tensors="pt").input_ids
    rejected = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        # 1. The target's cache: cut back after a rejected block, it equals a cache that never saw it ...
        cache, fresh = DynamicCache(), DynamicCache()
        target.model(input_ids=torch.cat([ids, rejected], dim=1), cache=cache, use_cache=True)
        _crop(cache, ids.shape[1])
        target.model(input_ids=ids, cache=fresh, use_cache=True)
        assert cache.get_seq_length() == fresh.get_seq_length() == ids.shape[1]
        for kept, clean in zip(cache.layers, fresh.layers, strict=True):
            torch.testing.assert_close(kept.keys, clean.keys)
            torch.testing.assert_close(kept.values, clean.values)
        # ... and the next step reads the same from both.
        step = torch.tensor([[9]])
        torch.testing.assert_close(target.model(input_ids=step, cache=cache, use_cache=True).logits,
                                   target.model(input_ids=step, cache=fresh, use_cache=True).logits)
        # 2. The draft's cache after a round is cut back to the kept tokens the same way.
        drafter = ModelDrafter(draft.model)
        drafter.reset()
        proposal, _ = drafter.propose(ids, 4, False, 1.0)
        assert drafter.cache.get_seq_length() == ids.shape[1] + len(proposal) - 1
        drafter.rollback(ids.shape[1] - 1)
        assert drafter.cache.get_seq_length() == ids.shape[1] - 1
        # 3. A loop whose every proposal is rejected still gives the target's own greedy output.
        greedy = target.model.generate(ids, max_new_tokens=8, do_sample=False,
                                       pad_token_id=target.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        tokens, stats = speculative_generate(target.model, WrongDrafter(target.model), ids, 8, draft_tokens=3)
    assert tokens == greedy[: len(tokens)] and len(tokens) == len(greedy)
    assert stats.rejections == stats.proposed_by_position[0] > 0 and sum(stats.accepted_by_position) == 0


# ----------------------------------------------------------------------------------------------
# Through the runner: plan, execute (fresh loads, its own lossless check), one run per family


@pytest.mark.parametrize("family, case", [*[(f, "speculative-draft") for f in LM_FAMILIES],
                                          *[(f, "int8-dynamic") for f in ENCODER_FAMILIES]])
def test_one_run_per_family_through_the_runner(folders, family, case):
    result = runner.execute(runner.plan(_spec(folders, family, case)), progress=False)
    assert result.status == "ok", result.failure_reason
    assert result.quality["inputs"] == 2 and len(result.outputs) == 2
    if family in LM_FAMILIES:
        assert result.quality["exact_match_rate"] == 1.0 and result.report["lossless"] is True
        assert result.internals["technique"]["draft_forward_passes"] > 0
