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


MAX_CONFIG_BYTES = 16 * 2**20  # a config.json / model_index.json larger than this is not a model's config


def read_config(path: Path) -> dict[str, Any] | None:
    """A model folder's JSON file as a dict (None when absent); one-line ModelLoadError when it is not a
    JSON object in UTF-8 (not JSON, another encoding, a list, nested past Python's limit, or huge)."""
    if not path.is_file():
        return None
    fix = "restore the file from the model's source, or save the model again with save_pretrained"
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelLoadError(f"{str(path)!r} is {path.stat().st_size:,} bytes, too large for a model config: {fix}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"{str(path)!r} is not UTF-8 text: {fix}") from None
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{str(path)!r} is not valid JSON ({err.msg} at line {err.lineno} column "
                             f"{err.colno}): {fix}") from None
    except RecursionError:
        raise ModelLoadError(f"{str(path)!r} is JSON nested too deeply for a model config: {fix}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object: {fix}")
    return data


def detect_kind(location: Path) -> str:
    """The model kind from the folder's config files, without loading weights."""
    if (location / "model_index.json").is_file() or (location / "unet").is_dir():
        index = read_config(location / "model_index.json") or {}
        name = index.get("_class_name", "DigitsPipeline")
        if not isinstance(name, str) or not name.isidentifier():
            raise ModelLoadError(f"{str(location / 'model_index.json')!r} names the pipeline class {name!r}, not a "
                                 "class name: restore the file from the model's source")
        return "diffusion"
    config_path = location / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"model folder {str(location)!r} has no config.json or model_index.json")
    config = read_config(config_path) or {}
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelLoadError(f"{str(config_path)!r} has architectures={architectures!r}, not a list of class names: "
                             "restore the file from the model's source")
    for arch in architectures:
        if arch.endswith(_CLASSIFIER_SUFFIXES):
            return "classifier"
        if arch.endswith(_CAUSAL_SUFFIXES):
            return "causal_lm"
    raise ModelLoadError(
        f"model at {str(location)!r} has architectures {config.get('architectures')}: workbench runs "
        "causal LMs (*ForCausalLM), sequence classifiers (*ForSequenceClassification) and diffusers pipelines"
    )


PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # weight files that are (or may be) pickles


def weights_format(location: Path) -> str:
    """How a model folder's weights are stored, judged folder by folder (each diffusers component has its
    own): "pickle" when any folder holding weights has only pickle files (a safetensors file elsewhere does
    not make it safe), "safetensors" when every such folder has safetensors, "none" without weights."""
    kinds: dict[Path, set[str]] = {}
    for path in Path(location).rglob("*"):
        if path.suffix == ".safetensors":
            kinds.setdefault(path.parent, set()).add("safetensors")
        elif any(path.match(pattern) for pattern in PICKLE_PATTERNS):
            kinds.setdefault(path.parent, set()).add("pickle")
    if not kinds:
        return "none"
    return "pickle" if any(found == {"pickle"} for found in kinds.values()) else "safetensors"


def _check_weights(location: Path, spec: ModelSpec) -> None:
    if weights_format(location) == "pickle" and not spec.allow_pickle:
        raise ModelLoadError(
            f"model {spec.name!r} ships pickle-based weights (a folder of it has no safetensors), which can run "
            "code when loaded: convert it to safetensors, or opt in with allow_pickle=True if you trust its source"
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
    class_name = (read_config(index_path) or {}).get("_class_name")
    if class_name in (None, "DigitsPipeline"):
        from workbench.models.digits import DigitsPipeline

        pipe = DigitsPipeline.from_pretrained(location, use_safetensors=not spec.allow_pickle)
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
