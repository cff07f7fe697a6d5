"""Execute RunSpecs: validate, load, measure side by side, judge quality, store.

:func:`plan` checks everything that can be checked cheaply (technique name and parameters, workload
file, model location and kind, applicability) and raises a one-line :class:`WorkbenchError` before any
weight is loaded. :func:`execute` runs one planned spec; any exception from then on becomes a stored
*failed* run with its reason, never a lost one. :func:`run_sweep` runs many and goes on after failures.

Example:
    >>> from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
    >>> spec = RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts", max_items=2),
    ...                TechniqueSpec("speculative", draft=ModelSpec("zoo:code-draft")), repeats=2)
    >>> result = run(spec, store=None)  # doctest: +SKIP
    >>> result.status, result.comparison["verdict"]  # doctest: +SKIP
    ('ok', 'faster')
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from workbench import __version__, quality
from workbench.errors import NotApplicableError
from workbench.measure import BASELINE, CallOutput, run_interleaved, summarize_samples
from workbench.models.loading import LoadedModel, detect_kind, load_model, resolve_location
from workbench.specs import RunSpec
from workbench.techniques import get as get_technique
from workbench.techniques.base import Technique
from workbench.techniques.baseline import Baseline
from workbench.workloads import Workload, check_compatible, load_workload, make_batches


@dataclass
class Plan:
    """A validated spec with what validation already built (nothing heavy is loaded yet)."""

    spec: RunSpec
    technique: Technique
    workload: Workload
    kind: str


@dataclass
class RunResult:
    """Everything one run measured: a stored row's worth of data, plus display helpers."""

    spec: RunSpec
    status: str  # "ok" or "failed"
    failure_reason: str | None = None  # one line; the traceback tail is kept in internals["error"]
    summary: dict[str, Any] = field(default_factory=dict)  # statistics from measure.summarize_samples
    samples: dict[str, dict[str, list]] = field(default_factory=dict)  # raw samples per variant
    quality: dict[str, Any] = field(default_factory=dict)  # quality.compare(...) of technique vs baseline
    internals: dict[str, Any] = field(default_factory=dict)  # technique internals, model descriptors
    outputs: list[dict[str, Any]] = field(default_factory=list)  # per input: input, baseline, technique
    environment: dict[str, Any] = field(default_factory=dict)  # environment.fingerprint()
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def comparison(self) -> dict[str, Any]:
        """Speedup, its interval and verdict (empty for a run that failed before measuring)."""
        return self.summary.get("comparison", {})

    def to_row(self) -> dict[str, Any]:
        """The flat store row (see :mod:`workbench.store`)."""
        spec = self.spec
        comp = self.comparison
        return {
            "run_id": self.run_id,
            "spec_key": spec.key(),
            "created_at": self.created_at,
            "workbench_version": __version__,
            "status": self.status,
            "failure_reason": self.failure_reason,
            "model": spec.model.name,
            "workload": spec.workload.name,
            "technique": spec.technique.name,
            "draft": spec.technique.draft.name if spec.technique.draft else None,
            "params": spec.technique.param_dict,
            "device": spec.device,
            "dtype": spec.dtype,
            "seed": spec.seed,
            "repeats": spec.repeats,
            "warmup": spec.warmup,
            "machine_id": self.environment.get("machine_id"),
            "environment": self.environment,
            "spec": spec.to_dict(),
            "summary": self.summary,
            "samples": self.samples,
            "quality": self.quality,
            "internals": self.internals,
            "outputs": self.outputs,
            "speedup": comp.get("speedup"),
            "speedup_ci_low": comp.get("ci_low"),
            "speedup_ci_high": comp.get("ci_high"),
            "significant": comp.get("significant"),
        }

    def to_json(self) -> dict[str, Any]:
        """One JSON-ready object: spec, statistics of both variants, speedup, quality, internals, outputs."""
        row = self.to_row()
        row["created_at"] = self.created_at.isoformat()
        return row

    def table(self) -> Any:
        """The side-by-side table as a pandas DataFrame (one row per variant)."""
        from workbench.display import run_table

        return run_table(self)

    def _repr_html_(self) -> str:
        from workbench.display import run_html

        return run_html(self)


def plan(spec: RunSpec) -> Plan:
    """Validate a spec without loading weights; raises a one-line WorkbenchError on bad input."""
    # 1. The technique exists and its parameters are valid.
    technique = get_technique(spec.technique.name)(**spec.technique.param_dict)
    # 2. The workload file parses (line numbers on bad lines).
    workload = load_workload(spec.workload)
    # 3. The model (and draft) can be found, and the kinds fit.
    location = resolve_location(spec.model)
    kind = detect_kind(location)
    check_compatible(workload, kind)
    reason = technique.why_not(kind, spec)
    if reason:
        raise NotApplicableError(reason)
    draft_location = None
    if spec.technique.draft is not None:
        if not technique.needs_draft:
            raise NotApplicableError(f"technique {technique.name!r} takes no draft model: drop --draft")
        draft_location = resolve_location(spec.technique.draft)
        detect_kind(draft_location)
    # 4. What the files alone can tell (tokenizers, sizes, layer counts), still before any weight loads.
    reason = technique.why_not_located(location, draft_location)
    if reason:
        raise NotApplicableError(reason)
    if spec.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise NotApplicableError(f"device={spec.device!r} but no CUDA GPU is visible here: use --device cpu")
    return Plan(spec, technique, workload, kind)


def execute(plan_: Plan, environment: dict[str, Any] | None = None, progress: bool = True) -> RunResult:
    """Run one planned comparison; failures come back as a failed RunResult, never as an exception."""
    spec = plan_.spec
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)  # before the fingerprint, which records the threads used
    if environment is None:
        from workbench.environment import fingerprint

        environment = fingerprint(device=spec.device.split(":")[0])
    result = RunResult(spec=spec, status="failed", environment=environment)
    technique, baseline = plan_.technique, Baseline()
    try:
        _measure(plan_, technique, baseline, result, progress)
    except Exception as exc:  # a failing trial is data: keep the reason, go on
        result.status = "failed"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result.failure_reason = f"{type(exc).__name__}: {message}"[:500]
        result.internals["error"] = traceback.format_exc(limit=8)[-4000:]
    finally:
        for variant in (technique, baseline):
            try:
                variant.release()
            except Exception as exc:  # release must not hide the run's own outcome
                result.internals.setdefault("release_errors", []).append(repr(exc))
    return result


def _measure(plan_: Plan, technique: Technique, baseline: Baseline, result: RunResult, progress: bool) -> None:
    import torch

    spec = plan_.spec
    # 1. Load the model and the draft.
    model = load_model(spec.model, spec.device, spec.dtype)
    draft = load_model(spec.technique.draft, spec.device, spec.dtype) if spec.technique.draft else None
    reason = technique.why_not_loaded(model, draft)
    if reason:
        raise NotApplicableError(reason)
    result.internals["model_info"] = model.info
    if draft is not None:
        result.internals["draft_info"] = draft.info
    result.internals["workload_info"] = {"modality": plan_.workload.modality, "inputs": len(plan_.workload.items),
                                         "description": plan_.workload.description}
    # 2. Inputs, and both variants prepared on the same model.
    batches = make_batches(plan_.workload, model, spec.workload)
    baseline.prepare(model, spec)
    technique.prepare(model, spec, draft)
    # Baseline against itself is an A/A check of the harness: the second copy gets its own name.
    other = "baseline_again" if spec.technique.name == BASELINE else spec.technique.name
    calls = {BASELINE: lambda i: baseline.run(batches[i]), other: lambda i: technique.run(batches[i])}

    def reseed(variant: str, item: int) -> None:
        torch.manual_seed(spec.seed * 1_000_003 + item)

    # 3. Warm-up, then interleaved timed calls.
    total = (spec.warmup + spec.repeats) * len(batches) * len(calls)
    with _progress(total, f"{spec.technique.name} vs baseline", progress) as bar:
        measured = run_interleaved(calls, len(batches), spec.repeats, spec.warmup, spec.device,
                                   before_call=reseed, on_progress=bar.update)
    # 4. Statistics, quality and internals.
    result.samples = measured.samples
    result.summary = summarize_samples(measured.samples, seed=spec.seed)
    labels = [y for b in batches for y in (b.labels or [])]
    result.quality = quality.compare(model.kind, measured.outputs[BASELINE], measured.outputs[other], labels)
    result.quality.update(technique.extra_quality(measured.outputs[BASELINE], measured.outputs[other]))
    result.internals["technique"] = technique.internals(measured.internals[other])
    _add_model_bytes(result, model, draft, other)
    _add_roofline(result, other)
    result.outputs = _outputs(model, batches, measured.outputs[BASELINE], measured.outputs[other])
    result.status = "ok"
    # 5. A lossless technique whose output differs from the baseline's is a failed run.
    mismatch = result.quality.get("first_mismatch")
    if technique.lossless and mismatch is not None:
        result.status = "failed"
        result.failure_reason = (f"not lossless: input {mismatch['input']} differs from the baseline's greedy "
                                 f"output at token {mismatch['token']}")


def _add_model_bytes(result: RunResult, model: LoadedModel, draft: LoadedModel | None, other: str) -> None:
    variants = result.summary["variants"]
    variants[BASELINE]["model_bytes"] = model.info["model_bytes"]
    reported = result.internals.get("technique", {}).get("model_bytes")
    variants[other]["model_bytes"] = reported or model.info["model_bytes"] + (draft.info["model_bytes"] if draft else 0)


def _add_roofline(result: RunResult, other: str) -> None:
    """How close decoding runs to the memory-bandwidth limit: tokens/s x bytes read per token / bandwidth.

    Batch-1 decoding reads every weight once per forward pass, so the bytes read per token are the
    model's bytes (or, for a technique that reports it, its own figure, e.g. target plus draft reads
    over the tokens they produced). 1.0 is the physical limit of this machine's measured bandwidth.
    """
    bandwidth = result.environment.get("gpu_memory_bandwidth_bytes_per_s") if result.spec.device.startswith("cuda") \
        else result.environment.get("memory_bandwidth_bytes_per_s")
    variants = result.summary["variants"]
    for name, stats in variants.items():
        if not bandwidth or stats.get("tokens_per_s") is None or result.spec.workload.batch_size != 1:
            continue
        per_token = result.internals.get("technique", {}).get("bytes_read_per_token") if name == other else None
        per_token = per_token or result.internals["model_info"]["model_bytes"]
        stats["bytes_read_per_token"] = per_token
        stats["roofline_fraction"] = stats["tokens_per_s"] * per_token / bandwidth


def _outputs(model: LoadedModel, batches: list, base: list[CallOutput], tech: list[CallOutput]) -> list[dict]:
    rows = []
    for batch, base_out, tech_out in zip(batches, base, tech):
        for index in range(batch.size):
            row: dict[str, Any] = {"input": batch.texts[index]}
            for name, out in (("baseline", base_out[index]), ("technique", tech_out[index])):
                if model.kind == "causal_lm":
                    row[name] = model.tokenizer.decode(out, skip_special_tokens=True)
                    row[f"{name}_tokens"] = list(out)
                elif model.kind == "classifier":
                    row[name] = int(out)
                else:
                    row[name] = quality.image_digest(out)
            if batch.labels is not None:
                row["label"] = batch.labels[index]
            rows.append(row)
    return rows


def _progress(total: int, description: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="call", disable=not enabled, leave=False)


def run(spec: RunSpec, store: Any = None, progress: bool = True) -> RunResult:
    """Plan, execute and (when a store is given) record one run. Bad input raises before any work."""
    result = execute(plan(spec), progress=progress)
    if store is not None:
        store.append(result.to_row())
    return result


def run_sweep(specs: Iterable[RunSpec], store: Any = None, progress: bool = True) -> list[RunResult]:
    """Run many specs one after another; a failing run is stored as failed and the sweep goes on.

    Every spec is planned first, so bad input (an unknown name, a bad parameter, a missing file) stops
    the sweep before any long work starts. A spec that is valid but cannot run here (a GPU-only
    variant on CPU, a library not installed) is kept as a *skipped* run with its reason, not crashed on.
    """
    from tqdm.auto import tqdm

    from workbench.environment import fingerprint

    planned: list[Plan | RunResult] = []
    environments: dict[str, dict[str, Any]] = {}  # one fingerprint per device kind, not per skipped spec
    for spec in specs:
        try:
            planned.append(plan(spec))
        except NotApplicableError as exc:
            device = spec.device.split(":")[0]
            if device not in environments:
                environments[device] = fingerprint(device=device)
            planned.append(RunResult(spec=spec, status="skipped", failure_reason=str(exc),
                                     environment=environments[device]))
    results = []
    for item in tqdm(planned, desc="sweep", unit="run", disable=not progress):
        result = item if isinstance(item, RunResult) else execute(item, progress=progress)
        if store is not None:
            store.append(result.to_row())
        results.append(result)
    return results
