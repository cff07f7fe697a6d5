"""Execute RunSpecs: plan (no weights), build the trial, measure side by side, judge quality, report.

:func:`plan` checks everything that can be checked from files (technique name and parameters, workload
file, model location, kind, weights format, and the technique's own :meth:`~Technique.check` on the
model *facts*) and raises a one-line :class:`WorkbenchError` before any weight is loaded; a
:class:`NotApplicableError` from it means "valid, but cannot apply here" (exit 2 for ``workbench run``,
a *skipped* row in a sweep). :func:`execute` runs one :class:`Plan`; any exception from then on becomes a
stored *failed* run with its reason, never a lost one. Many runs go through :func:`workbench.sweep.run_sweep`,
each in its own worker, which receives the plan (:meth:`Plan.to_dict`) instead of planning again.

Example:
    >>> from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
    >>> spec = RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts", max_items=2),
    ...                TechniqueSpec("speculative", draft=ModelSpec("zoo:code-draft")), repeats=2)
    >>> result = run(spec, store=None)  # doctest: +SKIP
    >>> result.status, result.comparison["verdict"]  # doctest: +SKIP
    ('ok', 'faster')
"""

from __future__ import annotations

import datetime as dt
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from workbench import __version__, quality
from workbench.errors import NotApplicableError
from workbench.measure import BASELINE, CallOutput, run_interleaved, summarize_samples
from workbench.models.facts import ModelFacts, read_facts
from workbench.models.loading import LoadedModel, load_model
from workbench.specs import RunSpec
from workbench.techniques import get as get_technique
from workbench.techniques.base import Facts, Outcome, Technique, TechniqueReport, Trial
from workbench.techniques.baseline import Baseline
from workbench.workloads import (Workload, check_compatible, check_fits, load_calibration, load_workload,
                                 make_batches)
from workbench.workloads import CALIBRATION_SEED_OFFSET


@dataclass
class Plan:
    """A validated spec with what validation already built (nothing heavy is loaded yet)."""

    spec: RunSpec
    technique: Technique
    workload: Workload  # the timed inputs
    calibration: Workload  # a disjoint split for techniques that train or calibrate
    facts: Facts  # what the model files say

    @property
    def kind(self) -> str:
        return self.facts.model.kind

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: what a worker needs to execute without planning again."""
        return {"spec": self.spec.to_dict(), "facts": self.facts.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The plan a parent made; rebuilds the technique object and the inputs (cheap), reads no model file."""
        spec = RunSpec.from_dict(data["spec"])
        workload = load_workload(spec.workload)
        return cls(spec, get_technique(spec.technique.name)(**spec.technique.param_dict), workload,
                   load_calibration(spec.workload, workload), Facts.from_dict(data["facts"]))


@dataclass
class RunResult:
    """Everything one run measured: a stored row's worth of data, plus display helpers."""

    spec: RunSpec
    status: str  # "ok", "failed" or "skipped"
    failure_reason: str | None = None  # one line; the traceback tail is kept in internals["error"]
    summary: dict[str, Any] = field(default_factory=dict)  # measure.summarize_samples of the raw samples (pure)
    samples: dict[str, dict[str, list]] = field(default_factory=dict)  # raw samples per variant
    quality: dict[str, Any] = field(default_factory=dict)  # standard comparison + the technique's metrics by name
    internals: dict[str, Any] = field(default_factory=dict)  # technique internals, model descriptors
    outputs: list[dict[str, Any]] = field(default_factory=list)  # per input: input, baseline, technique
    environment: dict[str, Any] = field(default_factory=dict)  # environment.fingerprint()
    report: dict[str, Any] = field(default_factory=dict)  # TechniqueReport.to_dict() (empty before measuring)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> model_bytes,
    # bytes_read_per_token, roofline_fraction
    model_name: str | None = None  # canonical identity of the model (see models.facts); default spec.model.name
    model_digest: str | None = None  # content digest of the model files
    draft_name: str | None = None  # canonical identity of the draft
    noise: dict[str, Any] = field(default_factory=dict)  # workbench.noise record: what else used the machine
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def comparison(self) -> dict[str, Any]:
        """Speedup, its interval and verdict (empty for a run that failed before measuring)."""
        return self.summary.get("comparison", {})

    @property
    def noisy(self) -> bool:
        """Other work crossed a threshold while this ran (see :mod:`workbench.noise`): figures suspect."""
        return bool(self.noise.get("noisy"))

    @property
    def quality_metrics(self) -> list[dict[str, Any]]:
        """The technique's quality figures, each with name, value, unit and direction."""
        return list(self.report.get("quality") or [])

    def to_row(self) -> dict[str, Any]:
        """The flat store row (see :mod:`workbench.store`)."""
        spec = self.spec
        comp = self.comparison
        report = self.report
        draft = spec.technique.draft
        return {
            "run_id": self.run_id,
            "spec_key": spec.key(),
            "created_at": self.created_at,
            "workbench_version": __version__,
            "status": self.status,
            "failure_reason": self.failure_reason,
            "model": self.model_name or spec.model.name,
            "model_digest": self.model_digest,
            "workload": spec.workload.name,
            "technique": spec.technique.name,
            "draft": (self.draft_name or draft.name) if draft else None,
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
            "lossless": report.get("lossless"),
            "model_bytes": report.get("model_bytes"),
            "bytes_read_per_token": report.get("bytes_read_per_token"),
            "headline": report.get("headline") or None,
            "quality_metrics": report.get("quality") if report else None,
            "technique_features": report.get("features") if report else None,
            "resources": self.resources or None,
            "noisy": self.noise.get("noisy") if self.noise else None,
            "noise": self.noise or None,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunResult:
        """A result from a store row (as a worker sends it or ``Store.get`` returns it).

        Rows stored before the typed report existed (schema < 3) keep their figures: model bytes and
        the roofline were then kept in the summary's variants, and are read from there.
        """
        created = row.get("created_at")
        if isinstance(created, str):
            created = dt.datetime.fromisoformat(created)
        summary = row.get("summary") or {}
        report = {key: row.get(key) for key in ("lossless", "model_bytes", "bytes_read_per_token", "headline")}
        report["quality"] = row.get("quality_metrics") or []
        report["features"] = row.get("technique_features") or {}
        report["internals"] = (row.get("internals") or {}).get("technique") or {}
        resources = row.get("resources") or {
            name: {key: stats[key] for key in ("model_bytes", "bytes_read_per_token", "roofline_fraction")
                   if key in stats} for name, stats in (summary.get("variants") or {}).items()}
        extra = {"created_at": created} if created is not None else {}
        return cls(spec=RunSpec.from_dict(row["spec"]), status=row["status"],
                   failure_reason=row.get("failure_reason"), summary=summary,
                   samples=row.get("samples") or {}, quality=row.get("quality") or {},
                   internals=row.get("internals") or {}, outputs=row.get("outputs") or [],
                   environment=row.get("environment") or {}, report=report, resources=resources,
                   model_name=row.get("model"), model_digest=row.get("model_digest"), draft_name=row.get("draft"),
                   noise=row.get("noise") or {}, run_id=row["run_id"], **extra)

    def to_json(self) -> dict[str, Any]:
        """One JSON-ready object: spec, statistics of both variants, speedup, quality, report, outputs."""
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


def skipped_result(spec: RunSpec, reason: str, environment: dict[str, Any]) -> RunResult:
    """The stored form of a run that cannot apply here: status skipped, with the reason."""
    from workbench.models.facts import canonical_name

    draft = spec.technique.draft
    return RunResult(spec=spec, status="skipped", failure_reason=reason, environment=environment,
                     model_name=canonical_name(spec.model), draft_name=canonical_name(draft) if draft else None)


def plan(spec: RunSpec, here: bool = True) -> Plan:
    """Validate a spec without loading weights; raises a one-line WorkbenchError on bad input.

    ``here=False`` plans a run another machine will execute (a cluster node): what only that machine can
    tell (is a GPU there?) is left to it.

    Raises:
        NotApplicableError: the spec is valid but cannot run here (the technique refuses these model
            facts, pickle-only weights, a GPU device on a machine without one).
        WorkbenchError: anything else the user must fix (unknown model, technique or parameter, bad workload).
    """
    # 1. The technique exists and its parameters are valid.
    technique = get_technique(spec.technique.name)(**spec.technique.param_dict)
    # 2. The workload parses (line numbers on bad lines), and its calibration split.
    workload = load_workload(spec.workload)
    calibration = load_calibration(spec.workload, workload)
    # 3. The model (and draft) files: found, of a kind the workload fits, safe to load.
    model = read_facts(spec.model)
    check_compatible(workload, model.kind)
    draft = read_facts(spec.technique.draft) if spec.technique.draft is not None else None
    for facts, model_spec in ((model, spec.model), (draft, spec.technique.draft)):
        if facts is not None and facts.weights == "pickle" and not model_spec.allow_pickle:
            raise NotApplicableError(
                f"model {model_spec.name!r} ships pickle-based weights (a folder of it has no safetensors), which "
                "can run code when loaded: convert it to safetensors, or opt in with allow_pickle=True if you "
                "trust its source")
    check_fits(workload, spec.workload, model)  # tokenizer, position limit, labels (after the safety refusal)
    facts = Facts(model, draft, spec.device, len(calibration.items))
    # 4. The technique's own verdict on these facts, still before any weight loads.
    reason = technique.check(facts, spec)
    if reason:
        raise NotApplicableError(reason)
    if here and spec.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise NotApplicableError(f"device={spec.device!r} but no CUDA GPU is visible here: use --device cpu")
    return Plan(spec, technique, workload, calibration, facts)


def execute(plan_: Plan, environment: dict[str, Any] | None = None, progress: bool = True,
            wait_quiet_s: float = 0.0, on_calls: Callable[[int, int], None] | None = None) -> RunResult:
    """Run one planned comparison; failures come back as a failed RunResult, never as an exception.

    ``on_calls(done, total)`` is called once the models are loaded (``done`` 0) and after every warm-up
    and timed call, ``total`` being all of them (both variants); the worker forwards it to the compare
    panel's progress bar.

    Contention is measured before and during the run (:class:`workbench.noise.NoiseMonitor`) and
    stored with it; without ``spec.threads`` torch gets the cores other processes leave free (said so
    in ``environment["threads_chosen"]``). ``wait_quiet_s`` > 0 first waits up to that long for the
    machine to become quiet, and runs anyway (flagged, if still noisy) when it does not.
    """
    import torch

    from workbench import noise

    spec = plan_.spec
    # 1. Contention before the run: wait for quiet if asked, then probe; threads from the free cores.
    waited = noise.wait_for_quiet(wait_quiet_s) if wait_quiet_s > 0 else None
    monitor = noise.NoiseMonitor(device=spec.device)
    before = monitor.start()
    if spec.threads:
        torch.set_num_threads(spec.threads)  # before the fingerprint, which records the threads used
        chosen = {"threads": spec.threads, "why": "set by the spec"}
    else:
        threads, available, others = noise.free_threads(before)
        torch.set_num_threads(threads)
        chosen = {"threads": threads, "why": f"{available} cores available to this process, other processes "
                                             f"busy on {others:.2f} of them"}
    if environment is None:
        from workbench.environment import fingerprint

        environment = fingerprint(device=spec.device.split(":")[0])
    environment = {**environment, "torch_threads": torch.get_num_threads(), "threads_chosen": chosen}
    facts = plan_.facts
    result = RunResult(spec=spec, status="failed", environment=environment, model_name=facts.model.name,
                       model_digest=facts.model.digest, draft_name=facts.draft.name if facts.draft else None)
    technique, baseline = plan_.technique, Baseline()
    try:
        _measure(plan_, technique, baseline, result, progress, on_calls)
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
        # 3. Contention over the whole run, stored with it.
        result.noise = {**monitor.stop(), **({"wait_for_quiet": waited} if waited else {})}
    return result


def build_trial(plan_: Plan, model: LoadedModel | None = None, draft: LoadedModel | None = None) -> Trial:
    """Load the model (and draft) unless given, and make the timed and calibration batches: what
    :meth:`Technique.prepare` receives.

    Example:
        >>> trial = build_trial(plan(spec))  # doctest: +SKIP
        >>> technique.prepare(trial)  # doctest: +SKIP
    """
    spec = plan_.spec
    if model is None:
        model = load_model(spec.model, spec.device, spec.dtype)
    if draft is None and spec.technique.draft is not None:
        draft = load_model(spec.technique.draft, spec.device, spec.dtype)
    batches = make_batches(plan_.workload, model, spec.workload)
    calibration = (make_batches(plan_.calibration, model, spec.workload, seed_offset=CALIBRATION_SEED_OFFSET)
                   if plan_.calibration.items else [])
    return Trial(spec=spec, facts=plan_.facts, model=model, draft=draft, workload=plan_.workload,
                 batches=batches, calibration=calibration)


def _measure(plan_: Plan, technique: Technique, baseline: Baseline, result: RunResult, progress: bool,
             on_calls: Callable[[int, int], None] | None = None) -> None:
    import torch

    spec = plan_.spec
    # 1. The trial: models loaded once, the timed and calibration batches made once.
    trial = build_trial(plan_)
    model, batches = trial.model, trial.batches
    result.internals["model_info"] = model.info
    if trial.draft is not None:
        result.internals["draft_info"] = trial.draft.info
    result.internals["workload_info"] = {"modality": plan_.workload.modality, "inputs": len(plan_.workload.items),
                                         "calibration_inputs": len(plan_.calibration.items),
                                         "description": plan_.workload.description}
    # 2. Both variants prepared on the same trial; a sampling technique's baseline samples alike.
    trial.sampling = technique.sampling()
    baseline.prepare(trial)
    technique.prepare(trial)
    # Baseline against itself is an A/A check of the harness: the second copy gets its own name.
    other = "baseline_again" if spec.technique.name == BASELINE else spec.technique.name
    calls = {BASELINE: lambda i: baseline.run(batches[i]), other: lambda i: technique.run(batches[i])}

    def reseed(variant: str, item: int) -> None:
        torch.manual_seed(spec.seed * 1_000_003 + item)

    # 3. Warm-up, then interleaved timed calls (counted for the bar and for ``on_calls``).
    total = (spec.warmup + spec.repeats) * len(batches) * len(calls)
    done = 0
    with _progress(total, f"{spec.technique.name} vs baseline", progress) as bar:
        def advance(calls_finished: int) -> None:
            nonlocal done
            done += calls_finished
            bar.update(calls_finished)
            if on_calls is not None:
                on_calls(done, total)

        if on_calls is not None:
            on_calls(0, total)
        measured = run_interleaved(calls, len(batches), spec.repeats, spec.warmup, spec.device,
                                   before_call=reseed, on_progress=advance)
    # 3b. A sampling technique is judged by distribution, never by token identity: more samples of both
    #     variants per input, untimed, compared under the target (see workbench.sampled_quality).
    sampled = None
    if trial.sampling is not None:
        from workbench import sampled_quality

        sampled = sampled_quality.compare_variants(model, batches, baseline.run, technique.run, trial.sampling,
                                                   seed=spec.seed).to_dict()
    # 4. Statistics, then the technique's typed report on the same outputs.
    result.samples = measured.samples
    result.summary = summarize_samples(measured.samples, seed=spec.seed, margin_percent=spec.margin_percent)
    labels = [y for b in batches for y in (b.labels or [])]
    standard = sampled or quality.compare(model.kind, measured.outputs[BASELINE], measured.outputs[other], labels)
    report = technique.report(Outcome(per_call=measured.internals[other], baseline_outputs=measured.outputs[BASELINE],
                                      technique_outputs=measured.outputs[other], standard_quality=standard))
    if not isinstance(report, TechniqueReport):
        raise TypeError(f"technique {technique.name!r} report() returned {type(report).__name__}, "
                        "not a TechniqueReport")
    result.report = report.to_dict()
    result.quality = {**standard, **{metric.name: metric.value for metric in report.quality}}
    result.internals["technique"] = report.internals
    result.resources = _resources(result, model, trial.draft, report, other)
    result.outputs = _outputs(model, batches, measured.outputs[BASELINE], measured.outputs[other])
    result.status = "ok"
    # 5. A lossless technique whose output differs from the baseline's is a failed run.
    mismatch = standard.get("first_mismatch")
    if report.lossless and mismatch is not None:
        result.status = "failed"
        result.failure_reason = (f"not lossless: input {mismatch['input']} differs from the baseline's greedy "
                                 f"output at token {mismatch['token']}")


def _resources(result: RunResult, model: LoadedModel, draft: LoadedModel | None, report: TechniqueReport,
               other: str) -> dict[str, dict[str, Any]]:
    """Model bytes, bytes read per token and the roofline fraction of both variants.

    Roofline: how close decoding runs to the memory-bandwidth limit, tokens/s x bytes read per token /
    bandwidth. Batch-1 decoding reads every weight once per forward pass, so the bytes read per token
    are the model's bytes unless the technique reports its own figure (target plus draft reads over the
    tokens they produced). 1.0 is the physical limit of this machine's measured bandwidth.
    """
    base_bytes = model.info["model_bytes"]
    technique_bytes = report.model_bytes or base_bytes + (draft.info["model_bytes"] if draft else 0)
    figures = {BASELINE: {"model_bytes": base_bytes, "bytes_read_per_token": base_bytes},
               other: {"model_bytes": technique_bytes,
                       "bytes_read_per_token": report.bytes_read_per_token or report.model_bytes or base_bytes}}
    on_gpu = result.spec.device.startswith("cuda")
    bandwidth = result.environment.get("gpu_memory_bandwidth_bytes_per_s" if on_gpu else "memory_bandwidth_bytes_per_s")
    for name, entry in figures.items():
        stats = result.summary["variants"].get(name, {})
        if not bandwidth or stats.get("tokens_per_s") is None or result.spec.workload.batch_size != 1:
            entry.pop("bytes_read_per_token")
            continue
        entry["roofline_fraction"] = stats["tokens_per_s"] * entry["bytes_read_per_token"] / bandwidth
    return figures


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
    """Plan, execute and (when a store is given) record one run in this process. Bad input raises before
    any work; many runs go through :func:`workbench.sweep.run_sweep` (one worker each)."""
    result = execute(plan(spec), progress=progress)
    if store is not None:
        store.append(result.to_row())
    return result


__all__ = ["ModelFacts", "Plan", "RunResult", "build_trial", "execute", "plan", "run", "skipped_result"]
