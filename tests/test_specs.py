import pytest

from workbench.specs import ModelSpec, RunSpec, SpecError, TechniqueSpec, WorkloadSpec, parse_param


def make(**overrides):
    fields = dict(
        model=ModelSpec("zoo:code-target"),
        workload=WorkloadSpec("code-prompts", max_items=4),
        technique=TechniqueSpec("speculative", {"num_assistant_tokens": 4}, ModelSpec("zoo:code-draft")),
    )
    fields.update(overrides)
    return RunSpec(**fields)


def test_key_is_stable_and_sensitive():
    assert make().key() == make().key()
    assert make().key() != make(repeats=6).key()
    assert make().key() != make(technique=TechniqueSpec("speculative", {"num_assistant_tokens": 5},
                                                         ModelSpec("zoo:code-draft"))).key()
    # labels are free-form tags and do not change the identity of a run
    assert make().key() == make(labels=(("who", "me"),)).key()


def test_params_order_does_not_matter():
    a = TechniqueSpec("speculative", {"a": 1, "b": 2})
    b = TechniqueSpec("speculative", {"b": 2, "a": 1})
    assert a == b and hash(a) == hash(b)


def test_round_trip_through_dict():
    spec = make(threads=2, labels=(("x", "y"),))
    again = RunSpec.from_dict(spec.to_dict())
    assert again == spec and again.key() == spec.key()


def test_specs_are_frozen():
    with pytest.raises(Exception):
        make().repeats = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"repeats": 0}, "repeats=0"),
        ({"warmup": -1}, "warmup=-1"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"dtype": "int3"}, "dtype='int3'"),
        ({"threads": 0}, "threads=0"),
    ],
)
def test_bad_run_values_name_the_value(overrides, fragment):
    with pytest.raises(SpecError) as err:
        make(**overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value", [("max_items", 0), ("max_new_tokens", 0), ("batch_size", -2)])
def test_bad_workload_values(field, value):
    with pytest.raises(SpecError, match=f"{field}={value}"):
        WorkloadSpec("code-prompts", **{field: value})


def test_bad_param_value_type():
    with pytest.raises(SpecError, match="has type list"):
        TechniqueSpec("speculative", {"k": [1, 2]})


def test_parse_param():
    assert parse_param("k=4") == ("k", 4)
    assert parse_param("t=0.5") == ("t", 0.5)
    assert parse_param("do_sample=true") == ("do_sample", True)
    assert parse_param("name=abc") == ("name", "abc")
    with pytest.raises(SpecError, match="not key=value"):
        parse_param("novalue")


def test_model_source():
    assert ModelSpec("zoo:code-target").source == "zoo"
    assert ModelSpec("gpt2").source == "hub"
    with pytest.raises(SpecError):
        ModelSpec("zoo:")
