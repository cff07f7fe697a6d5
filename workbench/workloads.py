"""Workloads: the inputs both variants see, seeded and in the same order.

A workload is a built-in name (``code-prompts``, ``code-snippets``, ``digits``) or a JSONL file with
one JSON object per line:

- text generation: ``{"prompt": "def add(a, b):"}``
- text classification: ``{"text": "import asyncio", "label": 1}`` (label: index or label name)
- image generation: ``{"class_label": 3}`` (class-conditional) or ``{"prompt": "a red car"}``

Example:
    >>> from workbench.specs import WorkloadSpec
    >>> wl = load_workload(WorkloadSpec("code-prompts", max_items=2))  # doctest: +SKIP
    >>> wl.modality, len(wl.items)  # doctest: +SKIP
    ('text-generation', 2)
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkloadError
from workbench.specs import WorkloadSpec

MODALITY_FOR_KIND = {
    "causal_lm": "text-generation",
    "classifier": "text-classification",
    "diffusion": "image-generation",
}
_DEFAULT_ITEMS = 16  # inputs of a built-in workload when max_items is None


@dataclass
class Workload:
    """Inputs of one modality, in run order."""

    name: str  # the built-in name or file path it came from
    modality: str  # text-generation | text-classification | image-generation
    items: list[dict[str, Any]]  # one dict per input (keys as in the JSONL format)
    description: str = ""  # where the inputs come from, for reports


@dataclass
class Batch:
    """Model-ready inputs for one call (``size`` inputs)."""

    size: int  # inputs in this batch
    inputs: dict[str, Any] = field(default_factory=dict)  # tensors for the model: input_ids (B, T), ...
    texts: list[str] = field(default_factory=list)  # prompts or texts, for outputs and reports
    labels: list[int] | None = None  # gold labels (classification)
    class_labels: list[int] | None = None  # classes to draw (class-conditional diffusion)
    prompts: list[str] | None = None  # text prompts (text-to-image diffusion)
    seeds: list[int] = field(default_factory=list)  # one seed per input (diffusion noise, sampling)


def _code_prompts(n: int, seed: int) -> list[dict[str, Any]]:
    from workbench import datasets

    return [{"prompt": p} for p in datasets.code_prompts(n, seed=seed)]


def _code_snippets(n: int, seed: int) -> list[dict[str, Any]]:
    from workbench import datasets

    return [{"text": t, "label": y} for t, y in datasets.code_snippets("test", n=n, seed=seed)]


def _digits(n: int, seed: int) -> list[dict[str, Any]]:
    return [{"class_label": (seed + i) % 10} for i in range(n)]


BUILTIN: dict[str, tuple[str, Callable[[int, int], list[dict[str, Any]]], str]] = {
    "code-prompts": ("text-generation", _code_prompts,
                     "Python function openings from held-out standard-library files"),
    "code-snippets": ("text-classification", _code_snippets,
                      "held-out standard-library snippets labelled with their package area"),
    "digits": ("image-generation", _digits, "digit classes 0-9 in turn, one seed each"),
}


def load_workload(spec: WorkloadSpec) -> Workload:
    """The inputs a workload spec names (built-in or JSONL), cut to ``max_items``.

    Raises:
        WorkloadError: unknown name, missing file, or a bad line (with its number and the fix).
    """
    if spec.name in BUILTIN:
        modality, make, description = BUILTIN[spec.name]
        items = make(spec.max_items or _DEFAULT_ITEMS, spec.seed)
        return Workload(spec.name, modality, items, description)
    path = Path(spec.name).expanduser()
    if path.suffix != ".jsonl" and not path.exists():
        raise WorkloadError(
            f"workload {spec.name!r} is neither a built-in ({', '.join(BUILTIN)}) nor a .jsonl file"
        )
    if not path.is_file():
        if path.is_dir():
            raise WorkloadError(f"workload {spec.name!r} is a folder, not a file: name a .jsonl file in it")
        raise WorkloadError(f"workload file {spec.name!r} does not exist: check the path")
    items = read_jsonl(path)
    modality = _modality_of(items, path)
    if spec.max_items is not None:
        items = items[: spec.max_items]
    return Workload(str(path), modality, items, f"{len(items)} inputs from {path.name}")


CALIBRATION_SEED_OFFSET = 50_021  # calibration inputs' seeds start this far from the timed inputs' seeds


def load_calibration(spec: WorkloadSpec, timed: Workload) -> Workload:
    """A calibration split of the same workload that shares no input with ``timed``, as large as it.

    Built-ins draw it from the timed inputs' own distribution, minus the timed inputs: other held-out
    prompts (code-prompts), other snippets of the held-out files (code-snippets: never the files the zoo
    classifier was trained on, whose accuracy would flatter every choice made on them), the same classes
    with other seeds (digits, whose batches get seeds offset by ``CALIBRATION_SEED_OFFSET``). A JSONL file gives the lines after ``max_items``;
    when the file has none to spare, the split is empty and a technique that needs one says so.
    """
    wanted = len(timed.items)
    if spec.name == "code-prompts":
        from workbench import datasets

        taken = {item["prompt"] for item in timed.items}
        pool = datasets.code_prompts(min(2 * wanted, _prompt_pool_size(spec.seed)), seed=spec.seed)
        items = [{"prompt": p} for p in pool if p not in taken][:wanted]
    elif spec.name == "code-snippets":
        items = _other_snippets(timed, wanted, spec.seed)
    elif spec.name in BUILTIN:
        items = list(timed.items)  # digits: the same classes; their batches get other seeds
    else:
        start = len(timed.items) if spec.max_items is not None else None
        items = [] if start is None else read_jsonl(Path(spec.name).expanduser())[start:start + wanted]
    return Workload(timed.name, timed.modality, items, f"calibration split of {timed.name} ({len(items)} inputs, "
                    "none of them timed)")


def _other_snippets(timed: Workload, wanted: int, seed: int) -> list[dict[str, Any]]:
    """Held-out snippets that are not among the timed ones (as many as the held-out files offer)."""
    from workbench import datasets

    taken = {item["text"] for item in timed.items}
    for pool_size in (2 * wanted + 16, wanted + 16):
        try:
            pool = datasets.code_snippets("test", n=pool_size, seed=seed)
        except ValueError:  # the held-out files offer fewer distinct snippets
            continue
        return [{"text": t, "label": y} for t, y in pool if t not in taken][:wanted]
    return []


def _prompt_pool_size(seed: int) -> int:
    from workbench import datasets

    return len(datasets._prompt_candidates(seed))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL workload file; each bad line raises with its line number."""
    items: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark some editors write is fine
    except UnicodeDecodeError:
        raise WorkloadError(f"workload file {str(path)!r} is not UTF-8 text: save it as UTF-8 JSONL") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(
                f"{path}:{number}: not valid JSON ({exc.msg}): write one object per line, "
                'e.g. {"prompt": "def add(a, b):"}'
            ) from None
        except RecursionError:
            raise WorkloadError(f"{path}:{number}: JSON nested too deeply: a workload line is one flat object, "
                                'e.g. {"prompt": "def add(a, b):"}') from None
        if not isinstance(item, dict):
            raise WorkloadError(f"{path}:{number}: expected a JSON object, got {type(item).__name__}")
        _check_item(item, path, number)
        items.append(item)
    if not items:
        raise WorkloadError(f"workload file {str(path)!r} has no inputs: add one JSON object per line")
    return items


def _check_item(item: dict[str, Any], path: Path, number: int) -> None:
    if "text" in item:
        if not isinstance(item["text"], str) or "label" not in item:
            raise WorkloadError(f'{path}:{number}: a classification line needs "text" (string) and "label"')
        if not isinstance(item["label"], (int, str)) or isinstance(item["label"], bool):
            raise WorkloadError(f'{path}:{number}: "label" must be an index or a label name')
    elif "class_label" in item:
        if not isinstance(item["class_label"], int) or isinstance(item["class_label"], bool):
            raise WorkloadError(f'{path}:{number}: "class_label" must be an integer class index')
    elif "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"]:
            raise WorkloadError(f'{path}:{number}: "prompt" must be a non-empty string')
    else:
        raise WorkloadError(
            f'{path}:{number}: no "prompt", "text" or "class_label" key (keys: {sorted(item)}): '
            'use {"prompt": ...} for generation, {"text": ..., "label": ...} for classification'
        )


def _modality_of(items: list[dict[str, Any]], path: Path) -> str:
    def one(item: dict[str, Any]) -> str:
        if "text" in item:
            return "text-classification"
        if "class_label" in item:
            return "image-generation"
        return "text-generation"  # a prompt: text generation, or text-to-image for a diffusion model

    first = one(items[0])
    for number, item in enumerate(items, start=1):
        if one(item) != first:
            raise WorkloadError(f"{path}: line {number} is a {one(item)} input but line 1 is {first}: "
                                "keep one kind of input per file")
    return first


def check_compatible(workload: Workload, kind: str) -> None:
    """Raise when the workload's inputs do not suit the model kind."""
    expected = MODALITY_FOR_KIND[kind]
    ok = workload.modality == expected or (kind == "diffusion" and workload.modality == "text-generation")
    if not ok:
        raise WorkloadError(
            f"workload {workload.name!r} holds {workload.modality} inputs but the model is a {kind}: "
            f"use a {expected} workload (built-ins: "
            f"{', '.join(n for n, (m, _, _) in BUILTIN.items() if m == expected)})"
        )


def make_batches(workload: Workload, loaded: Any, spec: WorkloadSpec, seed_offset: int = 0) -> list[Batch]:
    """Tokenise or arrange the inputs into batches of ``spec.batch_size`` on the model's device.

    Input ``i`` gets the seed ``spec.seed * 100_003 + seed_offset + i`` (diffusion noise, sampling).
    """
    check_compatible(workload, loaded.kind)
    batches = []
    for start in range(0, len(workload.items), spec.batch_size):
        chunk = workload.items[start : start + spec.batch_size]
        seeds = [spec.seed * 100_003 + seed_offset + start + i for i in range(len(chunk))]
        batches.append(_make_batch(chunk, loaded, seeds))
    return batches


def _make_batch(chunk: list[dict[str, Any]], loaded: Any, seeds: list[int]) -> Batch:
    tok = loaded.tokenizer
    if loaded.kind == "causal_lm":
        texts = [item["prompt"] for item in chunk]
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # generation continues from the right edge
        enc = tok(texts, return_tensors="pt", padding=True)
        return Batch(len(chunk), {k: v.to(loaded.device) for k, v in enc.items()}, texts, seeds=seeds)
    if loaded.kind == "classifier":
        texts = [item["text"] for item in chunk]
        labels = [_label_index(item["label"], loaded) for item in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=_max_tokens(loaded.model))
        return Batch(len(chunk), {k: v.to(loaded.device) for k, v in enc.items()}, texts, labels=labels,
                     seeds=seeds)
    if "class_label" in chunk[0]:
        labels = [int(item["class_label"]) for item in chunk]
        return Batch(len(chunk), texts=[f"class {c}" for c in labels], class_labels=labels, seeds=seeds)
    prompts = [item["prompt"] for item in chunk]
    return Batch(len(chunk), texts=prompts, prompts=prompts, seeds=seeds)


def _max_tokens(model: Any) -> int:
    """Tokens a classifier can take, at most 512: its position table, less the offset where RoBERTa-style
    embeddings start counting (``padding_idx + 1``; a 514-row RoBERTa table holds 512 positions)."""
    positions = getattr(model.config, "max_position_embeddings", 512) or 512
    table = getattr(getattr(model.base_model, "embeddings", None), "position_embeddings", None)
    offset = table.padding_idx + 1 if getattr(table, "padding_idx", None) is not None else 0
    return min(512, positions - offset)


def _label_index(label: int | str, loaded: Any) -> int:
    if isinstance(label, int):
        return label
    label2id = getattr(loaded.model.config, "label2id", {}) or {}
    if label not in label2id:
        raise WorkloadError(f"label {label!r} is not one of the model's labels {sorted(label2id)}")
    return int(label2id[label])


def check_fits(workload: Workload, spec: WorkloadSpec, facts: Any) -> None:
    """Plan-time: the inputs are ones the model can take (``facts``: its :class:`ModelFacts`).

    A text model needs its tokenizer files; a causal LM's longest prompt plus ``max_new_tokens`` must fit
    its position limit (past it, learned position tables index out of range mid-run); a classifier's
    labels must be among its head's. Each failure is one WorkloadError naming the value and the fix.
    """
    from workbench.models.facts import TOKENIZER_FILES, prompt_tokens

    if facts.kind in ("causal_lm", "classifier") and not facts.has_tokenizer:
        raise WorkloadError(f"model {facts.name!r} has no readable tokenizer in {facts.location!r} (one of "
                            f"{', '.join(TOKENIZER_FILES)}): save it beside the weights with "
                            "tokenizer.save_pretrained(folder)")
    if facts.kind == "causal_lm" and facts.max_positions:
        lengths = prompt_tokens(facts, [item["prompt"] for item in workload.items]) or [0]
        longest = max(lengths)
        need = longest + spec.max_new_tokens
        if need > facts.max_positions:
            room = facts.max_positions - longest
            fix = (f"lower --max-new-tokens to at most {room}" if room > 0
                   else f"shorten prompt {lengths.index(longest)} or use a model with a longer context")
            raise WorkloadError(
                f"workload {workload.name!r}: its longest prompt ({longest} tokens) plus --max-new-tokens "
                f"{spec.max_new_tokens} is {need} tokens, beyond the position limit of {facts.max_positions} of "
                f"model {facts.name!r}: {fix}")
    if facts.kind == "classifier" and facts.num_labels:
        for i, item in enumerate(workload.items):
            label = item.get("label")
            if isinstance(label, int) and not 0 <= label < facts.num_labels:
                raise WorkloadError(f"workload {workload.name!r} item {i} has label {label}, but model {facts.name!r} "
                                    f"scores {facts.num_labels} labels (0 to {facts.num_labels - 1}): fix the label, "
                                    "or use a model trained on these labels")
            if isinstance(label, str) and facts.label_names is not None and label not in facts.label_names:
                close = difflib.get_close_matches(label, facts.label_names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; its labels: {', '.join(facts.label_names[:10])}"
                raise WorkloadError(f"workload {workload.name!r} item {i} has label {label!r}, not one of model "
                                    f"{facts.name!r}'s labels{hint}")
