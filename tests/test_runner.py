"""The runner end to end: measure, store, read back, recompute; failures are stored, sweeps go on."""

import pytest

from workbench import runner
from workbench.measure import summarize_samples
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.store import Store
from workbench.techniques import base


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'runs.sqlite'}")


def speculative_spec(**workload):
    return RunSpec(
        ModelSpec("zoo:code-target"),
        WorkloadSpec("code-prompts", max_items=3, max_new_tokens=8, **workload),
        TechniqueSpec("speculative", {"num_assistant_tokens": 3}, ModelSpec("zoo:code-draft")),
        repeats=3,
        warmup=1,
    )


def test_recorded_run_reads_back_and_statistics_recompute(quick_zoo, store):
    result = runner.run(speculative_spec(), store=store, progress=False)
    assert result.status == "ok", result.failure_reason
    frame = store.runs()
    assert len(frame) == 1
    row = frame.iloc[0]
    assert row["run_id"] == result.run_id and row["status"] == "ok"
    assert row["spec_key"] == result.spec.key()
    assert row["environment"]["machine_id"] == result.environment["machine_id"]
    # the stored raw samples give back the stored statistics exactly
    recomputed = summarize_samples(row["samples"], seed=row["seed"])
    stored = row["summary"]
    assert recomputed == stored  # the summary is a pure function of the samples: nothing patched in
    assert row["speedup"] == pytest.approx(stored["comparison"]["speedup"])
    assert row["speedup_ci_low"] <= row["speedup"] <= row["speedup_ci_high"]
    # generation figures are there for both variants
    for stats in stored["variants"].values():
        assert stats["ttft_s"]["median"] > 0 and stats["tpot_s"]["median"] > 0 and stats["tokens_per_s"] > 0
    # bytes come from the technique's typed report, stored as columns and per-variant resources
    resources = row["resources"]
    assert resources["speculative"]["model_bytes"] > resources["baseline"]["model_bytes"] > 0
    assert row["model_bytes"] == resources["speculative"]["model_bytes"]
    assert row["lossless"] == True and row["bytes_read_per_token"] > 0  # noqa: E712 (a pandas boolean)
    assert row["model"] == "zoo:code-target" and len(row["model_digest"]) == 16
    assert len(row["samples"]["baseline"]["latency_s"]) == 3 * 3


EXPLODE = '''
from workbench.techniques import base
from workbench.techniques._execute import run_plain


@base.register
class Explode(base.Technique):
    name = "test-explode"
    applies_to = ("causal_lm",)
    description = "raises on its third timed call"

    def prepare(self, trial):
        self.model, self.spec, self.calls = trial.model, trial.spec, 0

    def run(self, batch):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom on call 3")
        return run_plain(self.model, batch, self.spec)

    def report(self, outcome):
        return base.TechniqueReport(lossless=False)
'''


@pytest.fixture
def exploding_technique(tmp_path, monkeypatch):
    """A technique in its own file, registered through WORKBENCH_TECHNIQUES (sweep workers import it too)."""
    path = tmp_path / "explode.py"
    path.write_text(EXPLODE)
    monkeypatch.setenv(base.PLUGINS_ENV, str(path))
    yield base.get("test-explode")
    base._REGISTRY.pop("test-explode")
    base._LOADED_PLUGINS.discard(str(path))


def test_failing_run_is_stored_and_the_sweep_goes_on(quick_zoo, store, exploding_technique):
    from workbench.sweep import run_sweep

    bad = RunSpec(ModelSpec("zoo:code-draft"), WorkloadSpec("code-prompts", max_items=2, max_new_tokens=4),
                  TechniqueSpec("test-explode"), repeats=2)
    good = RunSpec(ModelSpec("zoo:code-draft"), WorkloadSpec("code-prompts", max_items=2, max_new_tokens=4),
                   TechniqueSpec("baseline"), repeats=2)
    outcome = run_sweep([bad, good], store, progress=False)
    assert (outcome.failed, outcome.ok) == (1, 1)
    frame = store.runs()
    assert list(frame["status"]) == ["failed", "ok"]
    assert frame.iloc[0]["failure_reason"] == "RuntimeError: boom on call 3"
    assert "Traceback" in frame.iloc[0]["internals"]["error"]


def test_baseline_against_itself_is_not_significant_or_close(quick_zoo):
    spec = RunSpec(ModelSpec("zoo:code-draft"), WorkloadSpec("code-prompts", max_items=2, max_new_tokens=4),
                   TechniqueSpec("baseline"), repeats=4)
    result = runner.run(spec, progress=False)
    assert result.status == "ok"
    assert set(result.summary["variants"]) == {"baseline", "baseline_again"}
    assert result.quality["exact_match_rate"] == 1.0
    comp = result.comparison
    assert comp["ci_low"] <= comp["speedup"] <= comp["ci_high"]


def test_not_lossless_output_fails_the_run(quick_zoo, monkeypatch):
    """A technique claiming to be lossless whose tokens differ is a failed run naming the position."""
    from workbench.techniques.speculative import Speculative

    original = Speculative.run

    def corrupt(self, batch):
        out = original(self, batch)
        out.output = [row[:2] + [(row[2] + 1) % 100] + row[3:] for row in out.output]
        return out

    monkeypatch.setattr(Speculative, "run", corrupt)
    result = runner.run(speculative_spec(), progress=False)
    assert result.status == "failed"
    assert result.failure_reason == "not lossless: input 0 differs from the baseline's greedy output at token 2"
