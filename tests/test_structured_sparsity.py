"""Structured sparsity: grouped FFNs that equal the model at sparsity 0, compute only the chosen groups,
select the same groups per token in the one-token and many-token paths, and refuse what they cannot read."""

import copy

import pytest
import torch
import transformers as hf

from workbench import runner
from workbench.models.loading import load_model
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques.base import Facts, Outcome, TechniqueParamError
from workbench.techniques.structured_sparsity import (SparseFFN, StructuredSparsity, cluster_neurons, find_ffns,
                                                      install, kept_groups, train_routers)

GROUPS = 4
_DECODER = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64)
_ENCODER = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, num_labels=3)
TINY = {  # family -> a tiny seeded random model of it, one per FFN layout
    "llama": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(**_DECODER, mlp_bias=True)),
    "phi3": lambda: hf.Phi3ForCausalLM(hf.Phi3Config(**_DECODER, pad_token_id=0)),
    "gpt2": lambda: hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=64, n_embd=16, n_inner=32, n_layer=2, n_head=2,
                                                                   n_positions=64, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(**_DECODER)),
    "opt": lambda: hf.OPTForCausalLM(hf.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                                  num_attention_heads=2, word_embed_proj_dim=16,
                                                  max_position_embeddings=64)),
    "bert": lambda: hf.BertForSequenceClassification(hf.BertConfig(**_ENCODER)),
    "distilbert": lambda: hf.DistilBertForSequenceClassification(hf.DistilBertConfig(
        vocab_size=64, dim=16, hidden_dim=32, n_layers=2, n_heads=2, max_position_embeddings=64, num_labels=3)),
}


def tiny(family: str):
    torch.manual_seed(0)
    return TINY[family]().eval()


def sparse_copy(model, kept: int, seed: int = 1):
    """A copy with SparseFFNs keeping ``kept`` of GROUPS groups, routers random (seeded)."""
    model = copy.deepcopy(model)
    sites = find_ffns(model)
    torch.manual_seed(seed)
    ffns = [SparseFFN(site, GROUPS, kept) for site in sites]
    for ffn in ffns:
        torch.nn.init.normal_(ffn.router.weight)
    install(model, sites, ffns)
    return model, ffns


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", TINY)
def test_sparsity_zero_reproduces_the_model(family):
    model = tiny(family)
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    dense, ffns = sparse_copy(model, kept=GROUPS)
    assert len(ffns) == 2 and all(f.group_size == 32 // GROUPS for f in ffns)
    torch.testing.assert_close(logits(dense, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    if "Sequence" in type(model).__name__:
        return
    with torch.inference_mode():  # greedy decoding (one-token steps) token for token
        want = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = dense.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def reference_ffn(ffn: SparseFFN, x: torch.Tensor) -> torch.Tensor:
    """(N, H) -> (N, H) the dense FFN with the hidden neurons of each token's unchosen groups zeroed."""
    chosen = torch.topk(ffn.router(x), ffn.kept, dim=-1).indices  # (N, k)
    mask = torch.zeros(x.shape[0], ffn.groups).scatter_(1, chosen, 1.0)  # (N, G)
    pre = (x @ ffn.w_in.reshape(-1, ffn.hidden).T).reshape(x.shape[0], ffn.groups, -1, ffn.group_size)
    if ffn.b_in is not None:
        pre = pre + ffn.b_in
    hidden = ffn._hidden(pre) * mask[..., None]  # (N, G, gs)
    out = hidden.reshape(x.shape[0], -1) @ ffn.w_out.reshape(-1, ffn.hidden)
    return out if ffn.b_out is None else out + ffn.b_out


@pytest.mark.parametrize("family", ("llama", "gpt2", "bert"))
def test_one_token_and_many_token_paths_compute_exactly_the_chosen_groups(family):
    _, ffns = sparse_copy(tiny(family), kept=2)
    ffn = ffns[0]
    x = torch.randn(9, ffn.hidden, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = reference_ffn(ffn, x)
        many = ffn(x[None])[0]  # the dispatch path: each group on the tokens that chose it
        one = torch.cat([ffn(x[i:i + 1][None])[0] for i in range(9)])  # one-token steps
    torch.testing.assert_close(many, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, want, atol=1e-5, rtol=1e-5)
    assert ffn.decode_computed == 9 * 2 and ffn.decode_slots == 9 * GROUPS
    assert ffn.computed == 2 * 9 * 2 and ffn.slots == 2 * 9 * GROUPS
    # the skipped groups' weights are never read: poisoning them leaves a one-token step unchanged
    chosen = set(torch.topk(ffn.router(x[0]), 2).indices.tolist())
    with torch.no_grad():
        for g in set(range(GROUPS)) - chosen:
            ffn.w_in[g] = float("nan")
            ffn.w_out[g] = float("nan")
        torch.testing.assert_close(ffn(x[:1])[0], want[0], atol=1e-5, rtol=1e-5)


def test_regrouped_weights_are_contiguous_blocks_of_the_original():
    model = tiny("llama")
    mlp = model.model.layers[0].mlp
    ffn = SparseFFN(find_ffns(model)[0], GROUPS, 2)
    size = 32 // GROUPS
    assert ffn.w_in.shape == (GROUPS, 2, size, 16) and ffn.w_in.is_contiguous()
    assert torch.equal(ffn.w_in[1, 0], mlp.gate_proj.weight[size:2 * size])
    assert torch.equal(ffn.w_in[1, 1], mlp.up_proj.weight[size:2 * size])
    assert torch.equal(ffn.w_out[1], mlp.down_proj.weight[:, size:2 * size].T)
    assert torch.equal(ffn.b_in[1, 1], mlp.up_proj.bias[size:2 * size])


def test_clustering_puts_neurons_that_fire_together_in_one_group_and_keeps_the_ffn():
    # 12 neurons, interleaved: neuron i fires on the tokens of kind i % 3 only
    kind = torch.arange(60) % 3
    activations = (kind[:, None] == (torch.arange(12) % 3)[None]).float() * torch.rand(60, 12) + 0.01
    order = cluster_neurons(activations, groups=3)
    assert sorted(order.tolist()) == list(range(12))
    assert all(len({int(n) % 3 for n in block}) == 1 for block in order.reshape(3, 4))
    # a neuron order never changes the FFN itself
    model = tiny("llama")
    site = find_ffns(model)[0]
    permuted = SparseFFN(site, GROUPS, GROUPS, torch.randperm(32, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(5, 16)
    with torch.inference_mode():
        torch.testing.assert_close(permuted(x), model.model.layers[0].mlp(x), atol=1e-5, rtol=1e-5)


def test_routers_learn_to_rank_groups_better_than_chance():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=generator)
    importance = (x @ torch.randn(12, 8, generator=generator)).exp()  # a learnable ranking
    weight, bias, report = train_routers([x], [importance], kept=2, steps=150)
    assert weight.shape == (1, 8, 12) and bias.shape == (1, 8)
    assert report["held_out_tokens"] == 100 and report["loss_last"] < report["loss_first"]
    assert report["held_out_recall"] > 0.8 > 2 / 8  # chance is k / G


def spec(model: str = "zoo:code-target", workload: str = "code-prompts", max_items: int = 3, **params) -> RunSpec:
    return RunSpec(ModelSpec(model), WorkloadSpec(workload, max_items=max_items, max_new_tokens=5),
                   TechniqueSpec("structured_sparsity", {"groups": 8, "router_steps": 20, "quality_tokens": 64,
                                                         **params}), repeats=1)


@pytest.fixture(scope="module")
def code_target(quick_zoo):
    return load_model(ModelSpec("zoo:code-target"))


def test_end_to_end_on_a_zoo_lm_counts_the_sparsity_it_ran_and_leaves_the_model(code_target):
    run_spec, model = spec(sparsity=0.75), code_target
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    planned = runner.plan(run_spec)
    trial = runner.build_trial(planned, model=model)
    technique = planned.technique
    technique.prepare(trial)
    calls = [technique.run(b) for b in trial.batches]
    report = technique.report(Outcome([c.internals for c in calls], [], [], {}))
    technique.release()
    inside = report.internals
    assert inside["groups_kept_per_token"] == 2 and inside["group_size"] == 128 // 8
    assert inside["sparsity_achieved_one_token_steps"] == pytest.approx(0.75)
    assert inside["sparsity_achieved"] == pytest.approx(0.75)  # prefill dispatch skips the same share
    assert inside["router_training"]["held_out_recall"] > 2 / 8
    assert report.model_bytes > model.info["model_bytes"] * 0.99  # the routers come on top of the weights
    names = {m.name for m in report.quality}
    assert {"perplexity_change_percent", "next_token_kl_mean"} <= names
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in before.items())


def test_zero_sparsity_end_to_end_equals_the_baseline(code_target):
    from workbench.techniques.baseline import Baseline

    run_spec, model = spec(sparsity=0.0), code_target
    planned = runner.plan(run_spec)
    trial = runner.build_trial(planned, model=model)
    baseline, technique = Baseline(), planned.technique
    baseline.prepare(trial)
    technique.prepare(trial)
    assert [technique.run(b).output for b in trial.batches] == [baseline.run(b).output for b in trial.batches]
    report = technique.report(Outcome([], [], [], {}))
    perplexity = next(m for m in report.quality if m.name == "perplexity_change_percent")
    assert perplexity.value == pytest.approx(0.0, abs=1e-4)


def facts_of(tmp_path, model, calibration_items: int = 4) -> Facts:
    from workbench.models.facts import read_facts

    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp_path)
    return Facts(read_facts(ModelSpec(str(tmp_path))), None, "cpu", calibration_items)


def test_check_refuses_what_it_cannot_read_in_one_line(tmp_path):
    albert = hf.AlbertForSequenceClassification(hf.AlbertConfig(vocab_size=64, embedding_size=8, hidden_size=16,
                                                                num_hidden_layers=1, num_attention_heads=2,
                                                                intermediate_size=32))
    reason = StructuredSparsity().check(facts_of(tmp_path / "albert", albert),
                                        spec("zoo:code-classifier", "code-snippets"))
    assert "AlbertForSequenceClassification" in reason and "shared" in reason and "\n" not in reason
    llama = facts_of(tmp_path / "llama", tiny("llama"))
    assert StructuredSparsity(groups=4).check(llama, spec()) is None
    reason = StructuredSparsity(groups=5).check(llama, spec())
    assert "LlamaForCausalLM" in reason and "groups=5" in reason and "32" in reason
    reason = StructuredSparsity().check(facts_of(tmp_path / "none", tiny("gpt2"), calibration_items=0), spec())
    assert "max_items" in reason


@pytest.mark.parametrize("params, fragment", [({"sparsity": 1.0}, "sparsity=1.0"), ({"sparsity": -0.1}, "minimum"),
                                              ({"groups": 0}, "minimum"), ({"sparsty": 0.5}, "did you mean")])
def test_bad_parameters_name_the_value(params, fragment):
    with pytest.raises(TechniqueParamError, match=fragment):
        StructuredSparsity(**params)


def test_names_and_features():
    assert kept_groups(16, 0.5) == 8 and kept_groups(16, 0.97) == 1 and kept_groups(4, 0.0) == 4
    assert StructuredSparsity.display_name({"sparsity": 0.25, "groups": 8}) == "structured sparsity (25%, groups 8)"
    info = {"layers": 2, "hidden_size": 16, "parameters": 16384}  # FFNs: 2 * 8 * 16^2 = 4096, a quarter
    assert StructuredSparsity.features({"sparsity": 0.5}, info, None)["compute_fraction"] == pytest.approx(0.875)
    assert StructuredSparsity.features({"sparsity": 0.0}, info, None)["compute_fraction"] == 1.0
    assert StructuredSparsity.features({"sparsity": 0.5}, {}, None)["compute_fraction"] == 0.5
