"""Local, deterministic data sets: no downloads, nothing from the network.

Three sources, all shipped with the interpreter or a dependency:

* **Python code** from the running interpreter's standard library sources. Files are split into
  ``"train"`` and ``"test"`` (held-out) by file, from a hash of the file's path and the seed, so a
  file's split never depends on which other files exist or on a size cap.
  :func:`code_files` gives the files, :func:`code_prompts` gives generation prompts from held-out files.
* **Code-area classification**: a few consecutive lines of stdlib code -> which package area they come
  from (:data:`SNIPPET_LABELS`). Distinctive lines (``await``, ``self.assertEqual``) are easy, generic
  lines (``return None``) are genuinely ambiguous, so early exit shows a real speed/accuracy trade-off.
  Split by file. :func:`code_snippets`.
* **Digits**: scikit-learn's 8x8 hand-written digits (1,797 images), :func:`digits`.

Everything is a pure function of its arguments and of the interpreter's stdlib (record the Python
version beside results: another interpreter ships other sources).

Example:
    >>> from workbench import datasets
    >>> prompts = datasets.code_prompts(4, seed=0)
    >>> len(prompts), all(100 <= len(p) <= 400 for p in prompts)
    (4, True)
    >>> snippets = datasets.code_snippets("test", n=12)
    >>> sorted({label for _, label in snippets}) == list(range(len(datasets.SNIPPET_LABELS)))
    True
"""

from __future__ import annotations

import ast
import functools
import hashlib
import platform
import random
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

# Top-level stdlib folders that are not representative library code (tests, bundled third-party
# code, generated tables, demos, build config) and never enter any data set.
EXCLUDED_DIRS: frozenset[str] = frozenset(
    {
        "test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "pydoc_data",
        "encodings", "ensurepip", "turtledemo", "distutils", "__phello__", "lib-dynload",
        "__pycache__", "venv",
    }
)
MIN_FILE_CHARS = 1_000  # smaller files are mostly re-exports
MAX_FILE_CHARS = 130_000  # larger files (_pydecimal, tkinter) would dominate a capped corpus
TEST_FRACTION_CODE = 0.12  # share of stdlib files held out from LM / tokenizer training

# Code-area classification: label -> stdlib packages whose files carry that label.
SNIPPET_AREAS: dict[str, tuple[str, ...]] = {
    "asyncio": ("asyncio",),
    "email": ("email",),
    "http/urllib": ("http", "urllib"),
    "json/xml": ("json", "xml"),
    "logging": ("logging",),
    "unittest": ("unittest",),
}
SNIPPET_LABELS: tuple[str, ...] = tuple(SNIPPET_AREAS)
TEST_FRACTION_SNIPPETS = 0.25  # share of each area's files held out (at least one file)
SNIPPET_LINES = (2, 6)  # inclusive range of non-blank lines per snippet
DEFAULT_SNIPPETS = {"train": 3_000, "test": 1_200}  # default n per split (balanced over labels)


@dataclass(frozen=True)
class SourceFile:
    """One stdlib source file.

    Attributes:
        path: path relative to the stdlib root, POSIX separators, e.g. ``"email/utils.py"``.
        text: the file's source text.
    """

    path: str
    text: str


def stdlib_root() -> Path:
    """The running interpreter's standard-library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def describe_code_source() -> str:
    """One line naming where the code corpus comes from (for metadata)."""
    return f"CPython {platform.python_version()} standard library sources at {stdlib_root()}"


def _stable_fraction(text: str) -> float:
    """A number in [0, 1) that depends only on ``text`` (not on PYTHONHASHSEED)."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@functools.lru_cache(maxsize=2)
def _eligible_files(root: str) -> tuple[SourceFile, ...]:
    """Every stdlib ``.py`` file fit for a data set, sorted by path."""
    base = Path(root)
    files = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_") or "test" in rel.parts[:-1]:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if MIN_FILE_CHARS <= len(text) <= MAX_FILE_CHARS:
            files.append(SourceFile(rel.as_posix(), text))
    return tuple(files)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def code_files(split: Split, max_chars: int | None = None, seed: int = 0) -> list[SourceFile]:
    """Stdlib source files of one split, in a fixed pseudo-random order, capped in size.

    A file is held out (``"test"``) when a hash of ``(seed, path)`` falls below
    :data:`TEST_FRACTION_CODE`; the order is by a second hash, so any prefix is a diverse sample
    of the whole library rather than its alphabetically first modules.

    Args:
        split: ``"train"`` or ``"test"`` (held-out files).
        max_chars: stop before the total text would exceed this many characters; ``None`` = all.
        seed: selects the split and the order.

    Returns:
        The files; the same list for the same arguments and interpreter.
    """
    _check_split(split)
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive or None, got {max_chars}")
    want_test = split == "test"
    chosen = [
        f for f in _eligible_files(str(stdlib_root()))
        if (_stable_fraction(f"split:{seed}:{f.path}") < TEST_FRACTION_CODE) == want_test
    ]
    chosen.sort(key=lambda f: _stable_fraction(f"order:{seed}:{f.path}"))
    if max_chars is None:
        return chosen
    capped, total = [], 0
    for f in chosen:
        if total + len(f.text) > max_chars:
            continue  # a smaller later file may still fit
        capped.append(f)
        total += len(f.text)
    return capped


def code_prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts for code generation: a function's signature plus its first lines, from held-out files.

    Each prompt is a function (or method, dedented) from a held-out stdlib file, cut where a
    statement ends (never inside a docstring or a multi-line call), 100-400 characters long,
    always including at least one body statement. It ends without the newline, like a cursor at the end of a line: byte-level BPE
    merges a newline with the next line's indentation, so a bare trailing newline would be an
    unnatural token boundary.

    Args:
        n: how many prompts (distinct functions).
        seed: the file split and the choice of functions.

    Returns:
        ``n`` prompt strings.

    Raises:
        ValueError: ``n`` < 1 or more than the held-out files offer.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    candidates = _prompt_candidates(seed)
    if n > len(candidates):
        raise ValueError(f"n={n} exceeds the {len(candidates)} prompts held-out files offer")
    rng = random.Random(f"prompts:{seed}")
    return rng.sample(candidates, n)


@functools.lru_cache(maxsize=64)  # a sweep cycles through its seeds (and their calibration splits) for every
# configuration: a cache smaller than that misses every time (5 seeds planned 4x slower than 4 with maxsize=4)
def _prompt_candidates(seed: int) -> list[str]:
    prompts = []
    for f in code_files("test", seed=seed):
        try:
            tree = ast.parse(f.text)
        except SyntaxError:
            continue
        lines = f.text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                prompt = _function_prompt(lines, node)
                if prompt is not None:
                    prompts.append(prompt)
    return prompts


def _function_prompt(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function from ``def`` to the end of its last statement that fits in 400 chars, or None.

    Cuts only where a statement ends (never inside a docstring or a multi-line call) and only after
    at least one body statement; the result (dedented) must be 100-400 characters.
    """
    first = node.lineno - 1  # decorators are left out: prompts start at ``def``
    statement_ends = sorted(
        {child.end_lineno for child in ast.walk(node) if isinstance(child, ast.stmt) and child is not node
         and child.end_lineno is not None}
    )
    best = None
    for end in statement_ends:  # 1-based, inclusive
        prompt = textwrap.dedent("".join(lines[first:end])).rstrip()
        if len(prompt) > 400:
            break
        best = prompt
    return best if best is not None and len(best) >= 100 else None


# --------------------------------------------------------------------------- code-area snippets


def snippet_files(split: Split, seed: int = 0) -> dict[str, list[SourceFile]]:
    """The files each snippet label draws from in one split (split by file, per label).

    For each area the files are shuffled by ``seed``; the first
    ``max(1, round(TEST_FRACTION_SNIPPETS * count))`` are ``"test"``, the rest ``"train"``.
    """
    _check_split(split)
    all_files = _eligible_files(str(stdlib_root()))
    out: dict[str, list[SourceFile]] = {}
    for label, packages in SNIPPET_AREAS.items():
        files = [f for f in all_files if f.path.split("/")[0] in packages]
        if len(files) < 2:
            raise RuntimeError(f"stdlib at {stdlib_root()} has too few files for label {label!r}")
        random.Random(f"snippets:{seed}:{label}").shuffle(files)
        n_test = max(1, round(TEST_FRACTION_SNIPPETS * len(files)))
        out[label] = files[:n_test] if split == "test" else files[n_test:]
    return out


def code_snippets(split: Split, n: int | None = None, seed: int = 0) -> list[tuple[str, int]]:
    """Labelled snippets: a few consecutive lines of stdlib code -> index into SNIPPET_LABELS.

    Each snippet is 2-6 consecutive non-blank lines (blank lines dropped, common indentation
    removed) at a random place in a file of its label's area, files chosen in proportion to their
    line count. Classes are balanced; exact duplicates are skipped; order is shuffled.

    Args:
        split: ``"train"`` or ``"test"``; no file contributes to both.
        n: total number of snippets; default 3,000 for train and 1,200 for test.
        seed: the file split and the sampling.

    Returns:
        ``[(snippet_text, label_index), ...]`` of length ``n``.
    """
    _check_split(split)
    n = DEFAULT_SNIPPETS[split] if n is None else n
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"snippets:{seed}:{split}:{n}")
    out: list[tuple[str, int]] = []
    for label_id, (label, files) in enumerate(snippet_files(split, seed).items()):
        want = n // len(SNIPPET_LABELS) + (label_id < n % len(SNIPPET_LABELS))
        out.extend((text, label_id) for text in _sample_snippets(files, want, rng, label))
    rng.shuffle(out)
    return out


def _sample_snippets(files: list[SourceFile], want: int, rng: random.Random, label: str) -> list[str]:
    lo, hi = SNIPPET_LINES
    per_file = [[line for line in f.text.splitlines() if line.strip()] for f in files]
    per_file = [lines for lines in per_file if len(lines) >= hi]
    weights = [len(lines) for lines in per_file]
    seen: set[str] = set()
    out: list[str] = []
    for _ in range(want * 20):
        if len(out) == want:
            break
        lines = rng.choices(per_file, weights=weights)[0]
        k = rng.randint(lo, hi)
        start = rng.randrange(len(lines) - k + 1)
        snippet = textwrap.dedent("\n".join(lines[start:start + k]))
        if snippet not in seen:
            seen.add(snippet)
            out.append(snippet)
    if len(out) < want:
        raise ValueError(f"label {label!r} offers only {len(out)} distinct snippets, {want} asked")
    return out


# --------------------------------------------------------------------------- digits

TEST_FRACTION_DIGITS = 0.2


def digits(split: Split, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 hand-written digits, stratified 80/20 train/test split.

    Args:
        split: ``"train"`` (1,437 images) or ``"test"`` (360 images).
        seed: the split.

    Returns:
        ``(images, labels)``: images ``(N, 1, 8, 8)`` float32 in [-1, 1] (ink is +1; the raw
        0..16 intensities are mapped linearly), labels ``(N,)`` int64 digits 0-9.
    """
    _check_split(split)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None, :, :]
    labels = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_FRACTION_DIGITS, random_state=seed, stratify=labels
    )
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)
