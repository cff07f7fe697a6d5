"""Local data sets: deterministic, split by file, the shapes and ranges their docstrings promise."""

from __future__ import annotations

import numpy as np
import pytest

from workbench import datasets


def test_code_files_split_by_file_and_deterministic():
    train = datasets.code_files("train")
    test = datasets.code_files("test")
    assert train and test
    assert not {f.path for f in train} & {f.path for f in test}
    assert [f.path for f in datasets.code_files("test")] == [f.path for f in test]
    assert not any(part in datasets.EXCLUDED_DIRS for f in train + test for part in f.path.split("/")[:-1])


def test_code_files_cap_keeps_the_split():
    capped = datasets.code_files("train", max_chars=300_000)
    assert sum(len(f.text) for f in capped) <= 300_000
    assert {f.path for f in capped} <= {f.path for f in datasets.code_files("train")}
    assert {f.path for f in datasets.code_files("test", seed=1)} != {f.path for f in datasets.code_files("test")}


def test_code_prompts_come_from_held_out_functions():
    prompts = datasets.code_prompts(12, seed=0)
    assert prompts == datasets.code_prompts(12, seed=0)
    assert len(set(prompts)) == 12
    held_out = "\n".join(f.text for f in datasets.code_files("test"))
    for p in prompts:
        assert 100 <= len(p) <= 400
        assert p.startswith(("def ", "async def ")) and not p.endswith("\n")
        assert p.splitlines()[0].strip() in held_out
        assert len(p.splitlines()) >= 2
    assert datasets.code_prompts(12, seed=1) != prompts


def test_code_prompts_reject_bad_n():
    with pytest.raises(ValueError, match="n must be"):
        datasets.code_prompts(0)
    with pytest.raises(ValueError, match="exceeds"):
        datasets.code_prompts(10**6)


def test_snippets_balanced_deterministic_and_labelled():
    snippets = datasets.code_snippets("test", n=120)
    assert snippets == datasets.code_snippets("test", n=120)
    assert len(snippets) == 120
    counts = np.bincount([y for _, y in snippets], minlength=len(datasets.SNIPPET_LABELS))
    assert counts.tolist() == [20] * len(datasets.SNIPPET_LABELS)
    for text, _ in snippets:
        assert 2 <= len(text.splitlines()) <= 6
    assert len(datasets.code_snippets("train")) == datasets.DEFAULT_SNIPPETS["train"]


def test_snippets_split_by_file_and_come_from_their_area():
    train, test = datasets.snippet_files("train"), datasets.snippet_files("test")
    assert set(train) == set(test) == set(datasets.SNIPPET_LABELS)
    for label in datasets.SNIPPET_LABELS:
        assert train[label] and test[label]
        assert not {f.path for f in train[label]} & {f.path for f in test[label]}
        packages = datasets.SNIPPET_AREAS[label]
        assert all(f.path.split("/")[0] in packages for f in train[label] + test[label])
    # every test snippet's first line comes from a held-out file of its label
    sources = {label: "\n".join(f.text for f in files) for label, files in test.items()}
    for text, y in datasets.code_snippets("test", n=60):
        assert text.splitlines()[0].strip() in sources[datasets.SNIPPET_LABELS[y]]


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split must be one of"):
        datasets.code_snippets("validation")


def test_digits_shapes_ranges_and_split():
    x_train, y_train = datasets.digits("train")
    x_test, y_test = datasets.digits("test")
    assert x_train.shape[1:] == (1, 8, 8) and x_train.dtype == np.float32
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 360
    assert x_train.min() == -1.0 and x_train.max() == 1.0
    assert y_train.dtype == np.int64 and set(np.unique(y_test)) == set(range(10))
    again, _ = datasets.digits("test")
    np.testing.assert_array_equal(again, x_test)
    # no image of the test split is in the train split
    train_rows = {row.tobytes() for row in x_train}
    assert sum(row.tobytes() in train_rows for row in x_test) <= 2  # load_digits has a few duplicates
