import json

import pytest

from workbench.errors import WorkloadError
from workbench.specs import WorkloadSpec
from workbench.workloads import BUILTIN, check_compatible, load_workload


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_builtin_workloads_are_seeded_and_sized():
    for name in BUILTIN:
        a = load_workload(WorkloadSpec(name, max_items=3, seed=1))
        b = load_workload(WorkloadSpec(name, max_items=3, seed=1))
        assert a.items == b.items and len(a.items) == 3


def test_jsonl_prompts(tmp_path):
    path = write(tmp_path / "w.jsonl", [json.dumps({"prompt": "def f(x):"}), "", json.dumps({"prompt": "import os"})])
    workload = load_workload(WorkloadSpec(path))
    assert workload.modality == "text-generation" and [i["prompt"] for i in workload.items] == ["def f(x):", "import os"]


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (['{"prompt": "ok"}', "{not json"], ":2: not valid JSON"),
        (['{"prompt": "ok"}', "[1, 2]"], ":2: expected a JSON object"),
        (['{"prompt": ""}'], ':1: "prompt" must be a non-empty string'),
        (['{"question": "x"}'], ':1: no "prompt", "text" or "class_label" key'),
        (['{"text": "x"}'], ":1: a classification line needs"),
        (['{"prompt": "a"}', '{"text": "b", "label": 0}'], "line 2 is a text-classification input"),
    ],
)
def test_bad_lines_name_the_line(tmp_path, lines, fragment):
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(WorkloadError) as err:
        load_workload(WorkloadSpec(path))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(WorkloadError, match="neither a built-in"):
        load_workload(WorkloadSpec("no-such-workload"))
    with pytest.raises(WorkloadError, match="does not exist"):
        load_workload(WorkloadSpec(str(tmp_path / "missing.jsonl")))
    empty = write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(WorkloadError, match="has no inputs"):
        load_workload(WorkloadSpec(empty))


def test_modality_must_fit_the_model():
    workload = load_workload(WorkloadSpec("code-snippets", max_items=2))
    with pytest.raises(WorkloadError, match="use a text-generation workload"):
        check_compatible(workload, "causal_lm")
    check_compatible(workload, "classifier")
