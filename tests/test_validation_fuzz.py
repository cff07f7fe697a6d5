"""Property-based: random sweep files and random `workbench sweep` argument lists never give a traceback.

Whatever is thrown at the validator (random YAML text, random structures built from the real keys, near
misses and junk, random command lines), the outcome is a valid plan or one clean WorkbenchError line
(or a typer usage error, exit 2). No weights load while validating: loading raises in these tests.
"""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from workbench import techniques as registry
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.sweep import MODEL_KEYS, SWEEP_KEYS, TECHNIQUE_KEYS, WORKLOAD_KEYS, parse_sweep, plan_sweep

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("no_weight_loading")  # validation never loads a model (conftest)


def check_sweep_text(text: str) -> None:
    """Valid plan or one-line WorkbenchError; anything else fails the test with its traceback."""
    try:
        sweep = parse_sweep(text, source="fuzz.yaml")
        planned = plan_sweep(sweep)
    except WorkbenchError as err:
        message = str(err)
        assert message and "\n" not in message and "Traceback" not in message
        event("clean error")
        return
    event("valid plan")
    assert len(planned) == len(sweep.specs) >= 1
    assert all(p.spec.key() == s.key() for p, s in zip(planned, sweep.specs))


# -- random YAML text ------------------------------------------------------------------------------

YAML_BITS = st.sampled_from([
    "models:", "workloads:", "techniques:", "grid:", "params:", " - ", "[", "]", "{", "}", ":", ",", "\n",
    "  ", "zoo:code-classifier", "code-snippets", "baseline", "quantization", "seeds: [0, 1]", "&a", "*a",
    "!!python/object:os.system", "'", '"', "#", "null", "~", "1e400", "-1", "? ", "|", ">", "!!binary", "\t",
    "<<: *a", "repeats: 1", "%YAML 1.1", "---", "...", "max_items: 2",
])


@FUZZ
@given(st.one_of(st.text(max_size=200), st.lists(YAML_BITS, max_size=25).map("".join)))
def test_random_yaml_text_is_a_plan_or_one_clean_error(quick_zoo, text):
    check_sweep_text(text)


# -- random structures ------------------------------------------------------------------------------

PARAM_NAMES = sorted({key for name in registry.names() for key in registry.get(name).params})


def near_misses(keys: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.sampled_from(list(keys) + [k[:-1] for k in keys] + [k.upper() for k in keys] + ["", "x"])


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(), st.text(max_size=10))
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
MODEL_NAMES = st.sampled_from(["zoo:code-target", "zoo:code-classifier", "zoo:code-draft", "zoo:digits-diffusion",
                               "zoo:nope", "zoo:", "", " padded", "/no/such/folder"])
MODELS = st.one_of(MODEL_NAMES, st.dictionaries(near_misses(MODEL_KEYS), st.one_of(MODEL_NAMES, SCALARS), max_size=3),
                   JUNK)
WORKLOADS = st.one_of(
    st.sampled_from(["code-prompts", "code-snippets", "digits", "missing.jsonl", ""]),
    st.fixed_dictionaries({"name": st.sampled_from(["code-prompts", "code-snippets", "digits"])},
                          optional={k: st.one_of(st.integers(-1, 4), SCALARS) for k in WORKLOAD_KEYS[1:]}),
    st.dictionaries(near_misses(WORKLOAD_KEYS), SCALARS, max_size=3),
)
TECHNIQUES = st.one_of(
    st.sampled_from(registry.names() + ["nope", ""]),
    st.fixed_dictionaries(
        {"name": st.sampled_from(registry.names())},
        optional={"params": st.dictionaries(st.sampled_from(PARAM_NAMES + ["nope"]), SCALARS, max_size=2),
                  "grid": st.dictionaries(st.sampled_from(PARAM_NAMES),
                                          st.one_of(st.lists(SCALARS, max_size=2), SCALARS), max_size=2),
                  "draft": st.one_of(MODEL_NAMES, JUNK)}),
    st.dictionaries(near_misses(TECHNIQUE_KEYS), JUNK, max_size=3),
)
SECTIONS = {
    "models": st.one_of(st.lists(MODELS, min_size=1, max_size=2), JUNK),
    "workloads": st.one_of(st.lists(WORKLOADS, min_size=1, max_size=2), JUNK),
    "techniques": st.one_of(st.lists(TECHNIQUES, min_size=1, max_size=3), JUNK),
    "devices": st.one_of(st.lists(st.sampled_from(["cpu", "cuda", "cuda:1", "tpu"]), max_size=2), JUNK),
    "dtypes": st.one_of(st.lists(st.sampled_from(["float32", "bfloat16", "int3"]), max_size=2), JUNK),
    "seeds": st.one_of(st.lists(st.integers(-1, 3), max_size=2), JUNK),
    "repeats": SCALARS, "warmup": SCALARS, "threads": SCALARS, "margin_percent": SCALARS, "timeout_per_run_s": SCALARS,
    "max_memory_gb": SCALARS, "name": SCALARS, "labels": JUNK,
    "hardware": st.one_of(st.lists(st.sampled_from(["cpu-a", "gpu-h100", "cpu b!", "", "x" * 80]), max_size=2), JUNK),
}
assert set(SECTIONS) == set(SWEEP_KEYS)
REQUIRED = ("models", "workloads", "techniques")
STRUCTURES = st.tuples(
    st.fixed_dictionaries({k: SECTIONS[k] for k in REQUIRED},
                          optional={k: v for k, v in SECTIONS.items() if k not in REQUIRED}),
    st.dictionaries(near_misses(SWEEP_KEYS), JUNK, max_size=1),
    st.booleans(),
).map(lambda parts: {**parts[0], **parts[1]} if parts[2] else parts[0])


# Mostly valid sweeps (valid names, small grids), so the planner's deeper checks are reached too.
NEARLY_VALID = st.fixed_dictionaries(
    {"models": st.lists(st.sampled_from(["zoo:code-target", "zoo:code-classifier", "zoo:digits-diffusion"]),
                        min_size=1, max_size=2, unique=True),
     "workloads": st.lists(st.builds(lambda name, n: {"name": name, "max_items": n},
                                     st.sampled_from(["code-prompts", "code-snippets", "digits"]), st.integers(1, 3)),
                           min_size=1, max_size=2, unique_by=lambda w: w["name"]),
     "techniques": st.lists(st.sampled_from(registry.names()), min_size=1, max_size=3, unique=True)},
    optional={"seeds": st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True),
              "repeats": st.integers(1, 3), "devices": st.sampled_from([["cpu"], ["cpu", "cuda"]]),
              "name": st.text(min_size=1, max_size=8)},
)


FAMILIES = [("zoo:code-target", "code-prompts"), ("zoo:code-classifier", "code-snippets"),
            ("zoo:digits-diffusion", "digits")]
MATCHED = st.sampled_from(FAMILIES).flatmap(lambda family: st.fixed_dictionaries(
    {"models": st.just([family[0]]),
     "workloads": st.integers(1, 3).map(lambda n: [{"name": family[1], "max_items": n}]),
     "techniques": st.lists(st.one_of(st.sampled_from(registry.names()), TECHNIQUES), min_size=1, max_size=3)},
    optional={"seeds": st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True),
              "repeats": st.one_of(st.integers(1, 3), SCALARS)},
))


@FUZZ
@given(st.one_of(STRUCTURES, NEARLY_VALID, MATCHED))
def test_random_sweep_structures_are_a_plan_or_one_clean_error(quick_zoo, structure):
    check_sweep_text(yaml.safe_dump(structure, allow_unicode=True))


# -- random command lines ---------------------------------------------------------------------------

ARGS = st.lists(st.one_of(
    st.sampled_from(["--store", "--resume", "--timeout-per-run", "--max-memory", "--quiet", "-q", "--bogus",
                     "--dry-run", "--help", "VALID", "BAD", "missing.yaml", "nan", "inf", "-1", "0", "1e9", "3",
                     "sqlite:///fuzz.sqlite", "postgresql://u:p@127.0.0.1:1/db", "notaurl", "sqlite:///", ""]),
    st.text(max_size=12),
), max_size=6)


@FUZZ
@given(ARGS)
def test_random_command_lines_exit_cleanly(quick_zoo, tmp_path_factory, args):
    folder = tmp_path_factory.mktemp("cli")
    valid = folder / "valid.yaml"
    valid.write_text("models: [zoo:code-classifier]\nworkloads: [{name: code-snippets, max_items: 2}]\n"
                     "techniques: [baseline]\nrepeats: 1\n")
    bad = folder / "bad.yaml"
    bad.write_text("models: [zoo:code-classifier\n")
    args = [str(valid) if a == "VALID" else str(bad) if a == "BAD" else a for a in args]
    # --dry-run first: no value option can swallow it, so nothing is ever run.
    result = CliRunner().invoke(app, ["sweep", "--dry-run", *args])
    assert result.exit_code in (0, 1, 2), result.output
    if result.exception is not None:
        assert isinstance(result.exception, (SystemExit, WorkbenchError)), repr(result.exception)
        if isinstance(result.exception, WorkbenchError):
            assert "\n" not in str(result.exception)
