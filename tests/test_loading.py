import os
import time

import pytest
import torch

from workbench.errors import ModelLoadError
from workbench.models.loading import load_model
from workbench.specs import ModelSpec


def test_zoo_and_local_folder_load_with_real_classes(quick_zoo):
    by_zoo = load_model(ModelSpec("zoo:code-draft"))
    assert by_zoo.kind == "causal_lm" and type(by_zoo.model).__name__ == "GPT2LMHeadModel"
    assert by_zoo.info["parameters"] > 0 and by_zoo.info["model_bytes"] >= 4 * by_zoo.info["parameters"]
    by_path = load_model(ModelSpec(by_zoo.location))
    assert all(torch.equal(a, b) for a, b in zip(by_zoo.model.state_dict().values(),
                                                 by_path.model.state_dict().values()))
    classifier = load_model(ModelSpec("zoo:code-classifier"))
    assert classifier.kind == "classifier" and classifier.info["layers"] >= 2
    diffusion = load_model(ModelSpec("zoo:digits-diffusion"))
    assert diffusion.kind == "diffusion"


def test_uncached_hub_id_without_network_fails_fast_in_one_line(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSpec("workbench-test/definitely-not-cached-model"))
    assert time.perf_counter() - start < 60
    message = str(err.value)
    assert "definitely-not-cached-model" in message and "\n" not in message
    assert "local folder" in message or "hub" in message


def test_unknown_zoo_name_and_missing_folder(quick_zoo, tmp_path):
    with pytest.raises(ModelLoadError, match="no-such"):
        load_model(ModelSpec("zoo:no-such"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(ModelSpec(str(tmp_path)))


def test_pickle_only_weights_are_refused_unless_allowed(quick_zoo, tmp_path):
    source = load_model(ModelSpec("zoo:code-draft"))
    folder = tmp_path / "pickled"
    source.model.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    for safe in folder.glob("*.safetensors"):
        os.remove(safe)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle-based weights"):
        load_model(ModelSpec(str(folder)))
    allowed = load_model(ModelSpec(str(folder), allow_pickle=True))
    assert allowed.kind == "causal_lm"
