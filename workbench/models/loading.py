"""Load a model by Hugging Face id, local folder or ``zoo:NAME``, safely.

Safetensors only and ``trust_remote_code=False`` unless the :class:`~workbench.specs.ModelSpec` asks
otherwise. A hub id that is not cached while the hub cannot be reached gives one clear error, fast.

Example:
    >>> from workbench.specs import ModelSpec
    >>> loaded = load_model(ModelSpec("zoo:code-draft"))  # doctest: +SKIP
    >>> loaded.kind, loaded.info["parameters"]  # doctest: +SKIP
    ('causal_lm', 123456)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import ModelLoadError
from workbench.specs import ModelSpec

KINDS = ("causal_lm", "classifier", "diffusion")  # what a technique can declare it applies to

_CLASSIFIER_SUFFIXES = ("ForSequenceClassification",)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class LoadedModel:
    """A model ready to run, with what the harness and the meta-learner need to know about it."""

    spec: ModelSpec  # what was asked for
    kind: str  # one of KINDS
    model: Any  # a transformers PreTrainedModel or a diffusers pipeline
    tokenizer: Any | None  # the tokenizer for text models, None for diffusion
    device: str  # where the weights live
    dtype: str  # the weights' dtype name
    location: str  # resolved local folder
    info: dict[str, Any] = field(default_factory=dict)  # descriptors: parameters, layers, bytes, family


def resolve_location(spec: ModelSpec) -> Path:
    """The local folder that holds the model, downloading from the hub only when reachable.

    Raises:
        ModelLoadError: unknown zoo name, missing folder, or a hub id neither cached nor reachable.
    """
    if spec.source == "zoo":
        from workbench.models import zoo

        try:
            return zoo.model_dir(spec.name[4:])
        except zoo.ZooError as exc:
            raise ModelLoadError(str(exc)) from None
    if spec.source == "path":
        path = Path(spec.name).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model path {spec.name!r} is not a folder: give a save_pretrained folder")
        return path
    return _hub_snapshot(spec)


def _hub_snapshot(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = ["*.json", "*.txt", "*.model", "*.safetensors", "*.py", "*.tiktoken", "merges.txt"]
    if spec.allow_pickle:
        patterns += ["*.bin", "*.pt", "*.pth"]
    try:
        return Path(snapshot_download(spec.name, revision=spec.revision, allow_patterns=patterns,
                                      local_files_only=True))
    except HFValidationError:
        raise ModelLoadError(
            f"model {spec.name!r} is neither a folder here, a zoo:NAME, nor a valid hub id: check the spelling"
        ) from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    try:
        return Path(snapshot_download(spec.name, revision=spec.revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelLoadError(
            f"model {spec.name!r} is not on the Hugging Face hub (or needs a login): check the id, "
            "run `hf auth login`, or pass a local folder or zoo:NAME"
        ) from None
    except Exception as exc:  # network failures come in many types; all mean the same to the user
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"model {spec.name!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({reason}): connect to the network once to cache it, pass a local folder, or use a zoo model "
            "(`workbench zoo list`)"
        ) from None


def detect_kind(location: Path) -> str:
    """The model kind from the folder's config files, without loading weights."""
    if (location / "model_index.json").is_file() or (location / "unet").is_dir():
        return "diffusion"
    config_path = location / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"model folder {str(location)!r} has no config.json or model_index.json")
    config = json.loads(config_path.read_text())
    for arch in config.get("architectures") or []:
        if arch.endswith(_CLASSIFIER_SUFFIXES):
            return "classifier"
        if arch.endswith(_CAUSAL_SUFFIXES):
            return "causal_lm"
    raise ModelLoadError(
        f"model at {str(location)!r} has architectures {config.get('architectures')}: workbench runs "
        "causal LMs (*ForCausalLM), sequence classifiers (*ForSequenceClassification) and diffusers pipelines"
    )


def _check_weights(location: Path, spec: ModelSpec) -> None:
    has_safe = any(location.rglob("*.safetensors"))
    has_pickle = any(p for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in location.rglob(pattern))
    if not has_safe and has_pickle and not spec.allow_pickle:
        raise ModelLoadError(
            f"model {spec.name!r} ships only pickle-based weights, which can run code when loaded: "
            "convert it to safetensors, or opt in with allow_pickle=True if you trust its source"
        )


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def describe_module(module: Any) -> dict[str, Any]:
    """Parameter count and bytes of a torch module (parameters plus buffers)."""
    params = sum(p.numel() for p in module.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    nbytes += sum(b.numel() * b.element_size() for b in module.buffers())
    return {"parameters": int(params), "model_bytes": int(nbytes)}


def load_model(spec: ModelSpec, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a model for inference (eval mode, no grad needed) on ``device`` in ``dtype``."""
    # 1. Find the files and the kind before any weight is read.
    location = resolve_location(spec)
    kind = detect_kind(location)
    _check_weights(location, spec)
    common = {"trust_remote_code": spec.trust_remote_code}
    use_safetensors = None if spec.allow_pickle else True
    # 2. Load with the real library classes.
    try:
        if kind == "diffusion":
            model = _load_pipeline(location, device=device, dtype=dtype, spec=spec)
            tokenizer = None
        else:
            import transformers

            auto = (transformers.AutoModelForCausalLM if kind == "causal_lm"
                    else transformers.AutoModelForSequenceClassification)
            model = auto.from_pretrained(location, dtype=torch_dtype(dtype), use_safetensors=use_safetensors,
                                         **common)
            model.to(device).eval()
            tokenizer = transformers.AutoTokenizer.from_pretrained(location, **common)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model {spec.name!r} could not be loaded from {str(location)!r}: {first}") from None
    # 3. Describe it for the store and the meta-learner.
    info = _describe(model, kind)
    return LoadedModel(spec=spec, kind=kind, model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                       location=str(location), info=info)


def _load_pipeline(location: Path, device: str, dtype: str, spec: ModelSpec) -> Any:
    """A diffusers pipeline: the zoo's DigitsPipeline, or whatever model_index.json names."""
    index_path = location / "model_index.json"
    class_name = json.loads(index_path.read_text()).get("_class_name") if index_path.is_file() else None
    if class_name in (None, "DigitsPipeline"):
        from workbench.models.digits import DigitsPipeline

        pipe = DigitsPipeline.from_pretrained(location)
    else:
        import diffusers

        pipe = diffusers.DiffusionPipeline.from_pretrained(
            location, torch_dtype=torch_dtype(dtype), use_safetensors=not spec.allow_pickle,
            trust_remote_code=spec.trust_remote_code,
        )
    pipe.to(device, torch_dtype(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _describe(model: Any, kind: str) -> dict[str, Any]:
    if kind == "diffusion":
        module = model.unet
        info = describe_module(module)
        info.update(family=type(model).__name__, layers=None, hidden_size=None)
        return info
    info = describe_module(model)
    config = model.config
    info.update(
        family=getattr(config, "model_type", type(model).__name__),
        architecture=type(model).__name__,
        layers=getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None),
        hidden_size=getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        vocab_size=getattr(config, "vocab_size", None),
    )
    return info
