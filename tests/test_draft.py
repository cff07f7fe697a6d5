"""`workbench draft build`: a draft distilled here from a tiny real target loads, shares the target's
tokenizer, keeps K layers, proposes among its restricted vocabulary, and speculative decoding with it
gives the target's own greedy output; bad input is one clear line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from workbench.errors import WorkbenchError
from workbench.models.draft import DRAFT_FILE, DraftError, DraftRecipe, build_draft, draft_vocabulary
from workbench.models.facts import read_facts
from workbench.models.loading import load_model
from workbench.runner import run
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques._speculative_loop import ModelDrafter, speculative_generate

PROMPTS = ["def parse_header(self, line):\n    ", "class Reader:\n    def __init__(self", "import os\n\ndef walk("]
RECIPE = DraftRecipe(layers=1, steps=3, prompts=4, new_tokens=6, draft_vocab=64)


@pytest.fixture(scope="module")
def tiny_llama(quick_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer random Llama with the quick zoo's code tokenizer, saved as a folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(quick_zoo / "code-target")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper than the random init, so greedy choices are clear-cut
        model.get_input_embeddings().weight.mul_(20.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("drafts") / "tiny-1l"
    return build_draft(str(tiny_llama), RECIPE, workload="code-prompts", out=out), tiny_llama


def test_built_draft_loads_shares_the_tokenizer_and_keeps_k_layers(built):
    record, target_folder = built
    draft = load_model(ModelSpec(record.path))
    assert draft.kind == "causal_lm" and draft.model.config.num_hidden_layers == RECIPE.layers == record.layers
    assert type(draft.model).__name__ == "LlamaForCausalLM"
    assert read_facts(ModelSpec(record.path)).tokenizer_digest == read_facts(ModelSpec(str(target_folder))).tokenizer_digest
    # Started from the target: its embeddings (frozen) are the target's own; the layer trained away from it.
    target = load_model(ModelSpec(str(target_folder)))
    torch.testing.assert_close(draft.model.get_input_embeddings().weight, target.model.get_input_embeddings().weight)
    assert not torch.equal(draft.model.model.layers[0].mlp.up_proj.weight, target.model.model.layers[0].mlp.up_proj.weight)
    # The model card: target, layers, steps, data, losses, time; the restricted vocabulary it proposes among.
    card = json.loads((Path(record.path) / DRAFT_FILE).read_text())
    assert card["target"] == str(target_folder.resolve()) and card["steps"] == 3 and card["layers"] == 1
    for key in ("train_kl", "heldout_kl", "heldout_kl_at_init", "heldout_agreement", "draft_cost_ratio",
                "heldout_vocab_coverage", "train_s"):
        assert card["metrics"][key] is not None, key
    assert card["train_seconds"] > 0 and "prompts of code-prompts" in card["data"]
    vocab = draft_vocabulary(record.path)
    assert vocab is not None and len(vocab) == len(set(vocab.tolist())) == 64
    assert int(vocab.max()) < target.model.config.vocab_size


def test_speculative_decoding_with_the_built_draft_equals_target_greedy(built):
    record, target_folder = built
    target, draft = load_model(ModelSpec(str(target_folder))), load_model(ModelSpec(record.path))
    vocab = draft_vocabulary(record.path)
    for drafter in (ModelDrafter(draft.model, vocab=vocab), ModelDrafter(draft.model)):  # restricted and full head
        for prompt in PROMPTS:
            ids = target.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.inference_mode():
                reference = target.model.generate(ids, max_new_tokens=16, do_sample=False,
                                                  pad_token_id=target.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
                tokens, stats = speculative_generate(target.model, drafter, ids, 16, draft_tokens=3)
            assert tokens == reference[: len(tokens)] and len(tokens) == len(reference), prompt
            assert stats.rounds > 0
    # The restricted drafter proposes only ids of its vocabulary.
    drafter = ModelDrafter(draft.model, vocab=vocab)
    drafter.reset()
    proposal, _ = drafter.propose(target.tokenizer(PROMPTS[0], return_tensors="pt").input_ids, 4, False, 1.0)
    assert proposal and set(proposal) <= set(vocab.tolist())


def test_the_runner_takes_the_built_folder_as_draft(built):
    record, target_folder = built
    spec = RunSpec(ModelSpec(str(target_folder)), WorkloadSpec("code-prompts", max_items=2, max_new_tokens=8),
                   TechniqueSpec("speculative", {"num_assistant_tokens": 3}, ModelSpec(record.path)),
                   repeats=1, warmup=0)
    result = run(spec, progress=False)
    assert result.status == "ok", result.failure_reason  # a lossless run fails when any output differs
    report = result.to_json()
    assert report["quality"]["exact_match_rate"] == 1.0
    technique = report["internals"]["technique"]
    assert technique["draft_vocab_size"] == 64 and technique["acceptance_by_position"]


def test_cli_builds_a_gpt2_draft_and_prints_its_folder(quick_zoo, workbench_cmd, cli_env, tmp_path):
    out = tmp_path / "code-draft-1l"
    done = subprocess.run([*workbench_cmd, "draft", "build", "--target", "zoo:code-target", "--layers", "1",
                           "--steps", "2", "--prompts", "4", "--new-tokens", "4", "--out", str(out), "-q"],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out.resolve())
    draft = load_model(ModelSpec(str(out)))
    assert draft.model.config.num_hidden_layers == 1
    assert draft_vocabulary(out) is None  # the quick target's vocabulary is below 4096: the full head


@pytest.mark.parametrize("target, layers, fragment", [
    ("zoo:code-target", 4, "use 1 to 3"),
    ("zoo:no-such-model", 1, "unknown zoo model 'no-such-model'"),
    ("zoo:code-classifier", 1, "is a classifier model"),
])
def test_bad_input_is_one_clear_error(quick_zoo, tmp_path, target, layers, fragment):
    with pytest.raises(WorkbenchError, match=fragment) as caught:
        build_draft(target, DraftRecipe(layers=layers, steps=1), out=tmp_path / "x")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "x").exists()


def test_bad_input_on_the_command_line_is_one_line_and_exit_2(quick_zoo, workbench_cmd, cli_env, tmp_path):
    done = subprocess.run([*workbench_cmd, "draft", "build", "--target", "zoo:code-target", "--layers", "9",
                           "--out", str(tmp_path / "x")], env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --layers 9") and "use 1 to 3" in lines[0], done.stderr


def test_recipe_checks_its_values():
    with pytest.raises(DraftError, match="steps=0"):
        DraftRecipe(steps=0)
    with pytest.raises(DraftError, match="draft_vocab=-1"):
        DraftRecipe(draft_vocab=-1)


def test_a_restricted_vocabulary_draft_keeps_sampling_exact():
    """With do_sample, proposals among 3 of 5 tokens (q zero elsewhere) still give the target's distribution."""
    from scipy.stats import chisquare
    from transformers import GPT2Config, GPT2LMHeadModel

    def tiny(seed: int, layers: int) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=5, n_embd=16, n_layer=layers, n_head=2, n_positions=32)).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
        return model

    target, other = tiny(1, 2), tiny(2, 1)
    prompt, samples = torch.tensor([[1, 2, 1, 2, 1]]), 800
    with torch.no_grad():  # exact marginals of the first two new tokens under plain sampling
        first = torch.softmax(target(input_ids=prompt).logits[0, -1].double(), dim=-1)
        second = sum(first[t] * torch.softmax(target(input_ids=torch.cat([prompt, torch.tensor([[t]])], 1))
                                              .logits[0, -1].double(), dim=-1) for t in range(5))
    drafter = ModelDrafter(other, vocab=torch.tensor([0, 2, 4]))
    counts = torch.zeros(2, 5)
    torch.manual_seed(0)
    with torch.inference_mode():
        for _ in range(samples):
            # 3 tokens: the prefill's, then one round proposing one token (the loop never drafts the last)
            tokens, stats = speculative_generate(target, drafter, prompt, 3, draft_tokens=2, do_sample=True)
            assert stats.proposed_by_position[:1] == [1]
            counts[0, tokens[0]] += 1
            counts[1, tokens[1]] += 1
    for i, exact in enumerate((first, second)):
        assert chisquare(counts[i].numpy(), samples * exact.numpy()).pvalue > 1e-4, (i, counts[i], exact)
