"""What a model's files say about it, read before any weight loads: kind, architecture, sizes, tokenizer
identity, weight format and a content digest.

These *facts* are what a technique's :meth:`~workbench.techniques.base.Technique.check` decides on at
plan time, what the meta-learner describes a never-measured model with, and what gives one model one
identity wherever it appears: a local folder is named by its resolved absolute path (``zoo:NAME`` for a
folder of the zoo), a hub id by its id and revision, and every model carries ``digest``, a hash of its
config and weight index (safetensors headers, file sizes and sampled bytes), so two spellings or two
copies of one model are recognised as one.

Example:
    >>> from workbench.specs import ModelSpec
    >>> facts = read_facts(ModelSpec("zoo:code-target"))  # doctest: +SKIP
    >>> facts.kind, facts.family, facts.layers  # doctest: +SKIP
    ('causal_lm', 'gpt2', 4)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import ModelLoadError
from workbench.specs import ModelSpec

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_SAMPLE_BYTES = 65_536  # bytes hashed from the start and the end of each weight file for the digest


@dataclass(frozen=True)
class ModelFacts:
    """One model as its files describe it (nothing loaded). JSON-safe through :meth:`to_dict`."""

    name: str  # canonical identity: zoo:NAME, the absolute folder, or the hub id (@revision when pinned)
    location: str  # the resolved local folder
    kind: str  # causal_lm | classifier | diffusion
    family: str  # config model_type (gpt2, llama, bert) or the pipeline class
    architecture: str | None  # config architectures[0], e.g. LlamaForCausalLM
    layers: int | None  # transformer blocks
    hidden_size: int | None  # width of the residual stream
    vocab_size: int | None  # tokens in the vocabulary
    max_positions: int | None  # position limit (n_positions / max_position_embeddings)
    parameters: int | None  # from the safetensors headers
    model_bytes: int | None  # bytes of the safetensors weights as stored
    weights: str  # "safetensors", "pickle" (some folder of weights has only pickle files) or "none"
    tokenizer_digest: str | None  # hash of the vocabulary: equal digests, same tokenizer
    digest: str  # content digest of config + weight index (16 hex digits)
    num_labels: int | None = None  # classifiers: how many labels the head scores (None for other kinds)
    label_names: list[str] | None = None  # classifiers: the names config.json gives them (label2id), if any

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFacts:
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})

    @property
    def has_tokenizer(self) -> bool:
        """Whether the folder holds tokenizer files (a text model needs them; diffusion pipelines never)."""
        return self.tokenizer_digest is not None

    def info(self) -> dict[str, Any]:
        """The descriptors the meta-learner reads (the keys of a loaded model's ``info``)."""
        return {"family": self.family, "architecture": self.architecture, "parameters": self.parameters,
                "model_bytes": self.model_bytes, "layers": self.layers, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size}


def read_facts(spec: ModelSpec) -> ModelFacts:
    """The facts of the model ``spec`` names; raises a one-line :class:`ModelLoadError` when not found."""
    from workbench.models.loading import detect_kind, resolve_location

    location = resolve_location(spec).resolve()
    kind = detect_kind(location)
    return _read(str(location), kind, _canonical_name(spec, location), _stamp(location))


def describe_files(location: Path) -> dict[str, Any]:
    """The meta-learner's model descriptors (``ModelFacts.info()``) of a folder, whatever its kind."""
    location = Path(location).resolve()
    if not (location / "model_index.json").is_file() and not (location / "config.json").is_file():
        raise ModelLoadError(f"model folder {str(location)!r} has no config.json: give a save_pretrained folder")
    kind = "diffusion" if (location / "model_index.json").is_file() else "text"
    return _read(str(location), kind, str(location), _stamp(location)).info()


def canonical_name(spec: ModelSpec) -> str:
    """The identity a model is stored under (see the module docstring); the name itself when not found."""
    from workbench.models.loading import resolve_location

    try:
        return _canonical_name(spec, resolve_location(spec).resolve())
    except ModelLoadError:
        return spec.name


def _canonical_name(spec: ModelSpec, location: Path) -> str:
    if spec.source == "hub":
        return f"{spec.name}@{spec.revision}" if spec.revision else spec.name
    from workbench import paths

    zoo = paths.zoo_dir().resolve()
    if location.parent == zoo:
        return f"zoo:{location.name}"
    return str(location)


def _stamp(location: Path) -> tuple:
    """Sizes and modification times of the files the facts come from: the cache key."""
    files = sorted(p for p in location.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".txt",
                                                                                   ".model", ".bin", ".pt", ".pth"))
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@functools.lru_cache(maxsize=64)
def _read(location_text: str, kind: str, name: str, stamp: tuple) -> ModelFacts:
    location = Path(location_text)
    if kind == "diffusion":
        index = _json(location / "model_index.json") or {}
        params, nbytes = safetensors_size(location / "unet")
        return ModelFacts(name=name, location=location_text, kind=kind,
                          family=str(index.get("_class_name") or "diffusion"), architecture=None, layers=None,
                          hidden_size=None, vocab_size=None, max_positions=None, num_labels=None,
                          label_names=None, parameters=params,
                          model_bytes=nbytes, weights=_weights_format(location), tokenizer_digest=None,
                          digest=_digest(location))
    config = _json(location / "config.json") or {}
    params, nbytes = safetensors_size(location)
    return ModelFacts(
        name=name, location=location_text, kind=kind,
        family=str(config.get("model_type") or "unknown"),
        architecture=(config.get("architectures") or [None])[0],
        layers=_int(config.get("num_hidden_layers") or config.get("n_layer") or config.get("n_layers")),
        hidden_size=_int(config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
                         or config.get("dim")),  # n_layers / dim: DistilBERT's names
        vocab_size=_int(config.get("vocab_size")),
        max_positions=_int(config.get("n_positions") or config.get("max_position_embeddings")),
        num_labels=_num_labels(config) if kind == "classifier" else None,
        label_names=_label_names(config) if kind == "classifier" else None,
        parameters=params, model_bytes=nbytes, weights=_weights_format(location),
        tokenizer_digest=_tokenizer_digest(location), digest=_digest(location),
    )


def _num_labels(config: dict[str, Any]) -> int | None:
    """Labels of a classifier head: id2label's size, else num_labels, else transformers' default of 2."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return _int(config.get("num_labels")) or 2


def _label_names(config: dict[str, Any]) -> list[str] | None:
    label2id = config.get("label2id")
    if isinstance(label2id, dict) and label2id and all(isinstance(k, str) for k in label2id):
        return sorted(label2id)
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json(path: Path) -> dict[str, Any] | None:
    from workbench.models.loading import read_config

    return read_config(path)


def _weights_format(location: Path) -> str:
    from workbench.models.loading import weights_format

    return weights_format(location)


def safetensors_size(folder: Path) -> tuple[int | None, int | None]:
    """Parameters and bytes summed from the JSON headers of every ``*.safetensors`` file in ``folder``."""
    params = nbytes = 0
    files = sorted(Path(folder).glob("*.safetensors"))
    for path in files:
        for name, tensor in _safetensors_header(path).items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in tensor["shape"]:
                count *= int(dim)
            params += count
            nbytes += count * _DTYPE_BYTES.get(tensor["dtype"], 4)
    return (params, nbytes) if files else (None, None)


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def _digest(location: Path) -> str:
    """sha256 over the configs, each weight file's header, size and first/last bytes: 16 hex digits."""
    sha = hashlib.sha256()
    for path in sorted(location.rglob("*.json")):
        if "tokenizer" in path.name or path.name in ("special_tokens_map.json", "vocab.json"):
            continue
        sha.update(path.relative_to(location).as_posix().encode())
        sha.update(path.read_bytes())
    for path in sorted(location.rglob("*.safetensors")):
        size = path.stat().st_size
        sha.update(f"{path.relative_to(location).as_posix()}:{size}".encode())
        with open(path, "rb") as handle:
            sha.update(handle.read(_SAMPLE_BYTES))
            handle.seek(max(0, size - _SAMPLE_BYTES))
            sha.update(handle.read(_SAMPLE_BYTES))
    return sha.hexdigest()[:16]


def _tokenizer_digest(location: Path) -> str | None:
    """sha256 of the sorted vocabulary (token -> id), or None when the folder has no tokenizer files."""
    if not any((location / name).is_file() for name in TOKENIZER_FILES):
        return None
    tokenizer = load_tokenizer(str(location), _stamp(location))
    if tokenizer is None:  # unreadable tokenizer files: loading will say so with the library's reason
        return None
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


@functools.lru_cache(maxsize=8)
def load_tokenizer(location_text: str, stamp: tuple) -> Any:
    """The folder's tokenizer (cached by its files' sizes and times), or None when it has none or it is unreadable."""
    location = Path(location_text)
    if not any((location / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(location)
    except Exception:
        return None


def prompt_tokens(facts: ModelFacts, prompts: list[str]) -> list[int] | None:
    """Tokens in each prompt by the model's own tokenizer (None when it has none readable)."""
    tokenizer = load_tokenizer(facts.location, _stamp(Path(facts.location)))
    if tokenizer is None:
        return None
    return [len(ids) for ids in tokenizer(prompts)["input_ids"]]
