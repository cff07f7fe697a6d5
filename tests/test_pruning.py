"""Pruning: removed heads and neurons give really smaller matrices that compute exactly what masking them would;
magnitude pruning zeros weights in the same shapes; refusals name the architecture."""

from __future__ import annotations

import pytest
import torch
import transformers as hf

from workbench.models.facts import ModelFacts
from workbench.techniques import get
from workbench.techniques.base import Facts, TechniqueParamError
from workbench.techniques.pruning import (LAYOUTS, Pruning, _blocks, _weight_in_out, importance, prune_magnitude,
                                          prune_structured, recover)
from workbench.workloads import Batch

SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


def _llama() -> hf.LlamaForCausalLM:
    """4 query heads over 2 KV heads (2 per group), FFN 64, 2 layers."""
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
                                              max_position_embeddings=64, **SPECIAL)).eval()


def _gpt2() -> hf.GPT2LMHeadModel:
    torch.manual_seed(0)
    return hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=64,
                                            **SPECIAL)).eval()


def _batch() -> Batch:
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return Batch(size=2, inputs={"input_ids": ids, "attention_mask": mask}, texts=["a", "b"])


def _masked(model: torch.nn.Module, family: str, done: dict, scores: list) -> torch.nn.Module:
    """The unpruned model with the removed heads' and neurons' out-projection inputs zeroed."""
    import copy

    layout, masked = LAYOUTS[family], copy.deepcopy(model)
    heads, kv = 4, model.config.num_key_value_heads if family == "llama" else 4
    group = heads // kv
    for block, per_layer, score in zip(_blocks(masked), done["per_layer"], scores):
        units = torch.topk(score["heads"].view(kv, group).sum(1), per_layer["heads_kept"] // group).indices
        neurons = torch.topk(score["neurons"], per_layer["neurons_kept"]).indices
        with torch.no_grad():
            w = _weight_in_out(block.get_submodule(layout.out_projection))  # (heads * head_dim, H) view
            keep = torch.zeros(kv, w.shape[0] // kv, dtype=torch.bool)
            keep[units] = True
            w[~keep.flatten()] = 0
            w = _weight_in_out(block.get_submodule(layout.ffn_out))
            keep = torch.zeros(w.shape[0], dtype=torch.bool)
            keep[neurons] = True
            w[~keep] = 0
    return masked


@pytest.mark.parametrize("family, make", [("llama", _llama), ("gpt2", _gpt2)])
def test_removed_heads_and_neurons_shrink_the_matrices_and_equal_masking_them(family, make):
    model, batch = make(), _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = importance(model, LAYOUTS[family], [batch])
    # 1. Nothing removed: the copy computes what the model does.
    same, _ = prune_structured(model, family, scores, 0.0, 0.0)
    with torch.inference_mode():
        reference = model(**batch.inputs).logits
        torch.testing.assert_close(same(**batch.inputs).logits, reference)
    # 2. Half the heads (one KV group of two under GQA) and a quarter of the neurons: smaller matrices ...
    pruned, done = prune_structured(model, family, scores, 0.5, 0.25)
    block = _blocks(pruned)[0]
    if family == "llama":
        attn, mlp = block.self_attn, block.mlp
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (16, 8, 8)
        assert attn.o_proj.in_features == 16 and attn.num_key_value_groups == 2
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 48
    else:
        assert block.attn.c_attn.weight.shape == (32, 48) and block.attn.c_proj.weight.shape == (16, 32)
        assert block.mlp.c_fc.weight.shape == (32, 96) and block.mlp.c_proj.weight.shape == (96, 32)
    assert done["heads_removed"] == 4 and done["heads_total"] == 8
    assert done["parameters_after"] < done["parameters_before"]
    # ... computing exactly what the model does with those heads and neurons masked out.
    with torch.inference_mode():
        torch.testing.assert_close(pruned(**batch.inputs).logits,
                                   _masked(model, family, done, scores)(**batch.inputs).logits)
        # 3. The KV cache copes with the fewer heads: cached greedy decoding equals uncached.
        prompt = batch.inputs["input_ids"][:1]
        cached = pruned.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=1)
        uncached = pruned.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=1, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    # 4. The model itself is untouched.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_magnitude_zeros_weights_in_the_same_shapes_and_recovery_keeps_them():
    model = _llama()
    pruned, done = prune_magnitude(model, 0.5)
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in model.parameters()]
    assert done["sparsity_achieved"] == pytest.approx(0.5, abs=0.01) and done["linear_layers"] == 14
    assert torch.equal(pruned.lm_head.weight, model.lm_head.weight)  # outside the blocks: whole
    assert done["pruned_layers_csr_bytes"] > done["pruned_layers_dense_bytes"]  # int64 indices at 50%
    zeros = _blocks(pruned)[0].mlp.down_proj.weight == 0
    recovery = recover(pruned, "causal_lm", [_batch()], steps=4, learning_rate=1e-2, pad_token_id=1)
    assert recovery["loss_after"] < recovery["loss_before"]
    assert bool((_blocks(pruned)[0].mlp.down_proj.weight[zeros] == 0).all())
    assert Pruning.features({"method": "magnitude"}, {}, None) == {"compute_fraction": 1.0}


def _facts(family: str, architecture: str, calibration_items: int = 4) -> Facts:
    model = ModelFacts(name="m", location="/nonexistent", kind="causal_lm", family=family, architecture=architecture,
                       layers=2, hidden_size=32, vocab_size=64, max_positions=64, parameters=None, model_bytes=None,
                       weights="safetensors", tokenizer_digest=None, digest="0")
    return Facts(model, None, "cpu", calibration_items)


class _Spec:
    class workload:
        name = "code-prompts"


def test_check_refuses_unknown_families_and_missing_calibration_and_bad_fractions():
    reason = Pruning().check(_facts("phi3", "Phi3ForCausalLM"), _Spec())
    assert "Phi3ForCausalLM" in reason and "qkv_proj" in reason and "\n" not in reason
    assert Pruning().check(_facts("llama", "LlamaForCausalLM"), _Spec()) is None
    assert "calibration" in Pruning().check(_facts("llama", "LlamaForCausalLM", 0), _Spec())
    assert Pruning(method="magnitude").check(_facts("llama", "LlamaForCausalLM", 0), _Spec()) is None
    with pytest.raises(TechniqueParamError, match="heads_fraction=1.0"):
        Pruning(heads_fraction=1.0)
    assert get("pruning").display_name({}) == "structured pruning (25% heads, 25% neurons)"
    assert get("pruning").display_name({"method": "magnitude", "recovery_steps": 5}) == \
        "magnitude pruning (50% of weights, recovery steps 5)"
    small = Pruning.features({"heads_fraction": 0.5, "neurons_fraction": 0.5},
                             {"layers": 2, "hidden_size": 32, "parameters": 30_000}, None)["compute_fraction"]
    assert 0.0 < small < Pruning.features({}, {"layers": 2, "hidden_size": 32, "parameters": 30_000},
                                          None)["compute_fraction"] < 1.0
